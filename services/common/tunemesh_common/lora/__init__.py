"""LoRA math and formats: per-row multi-LoRA routing (`multi_lora`), the frozen base
model the torch engines load with its LoRA targets wrapped (`frozen_base`) and the PEFT adapter format
(`peft_format`)."""
