"""tunemesh sampler service: generation from a base model with hot-swapped LoRA adapters."""
