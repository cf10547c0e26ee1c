"""HF PEFT as the reference for the fused multi-LoRA engine: one PEFT model per adapter,
holding that adapter's current weights."""

from __future__ import annotations

import torch

from tunemesh_trainer.domain import LoraSpec


def randomize_b(engine, adapter_id: str, gen: torch.Generator) -> None:
    """Non-zero B so that A's gradients are non-trivial too."""
    slot = engine.adapter(adapter_id)
    weights = {n: t.clone() for n, t in slot.weights().items()}
    for name, tensor in weights.items():
        if ".lora_B." in name:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
    slot.load_weights(weights)


def peft_model(model_dir, spec: LoraSpec, targets: list[str], weights: dict[str, torch.Tensor]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(base, config).eval()
    inner = model.base_model.model
    with torch.no_grad():
        for name, tensor in weights.items():
            module_name, _, rest = name.partition(".lora_")
            layer = getattr(inner.get_submodule(module_name), f"lora_{rest[0]}")["default"]
            layer.weight.copy_(tensor)
    return model


def peft_named_params(model, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    inner = model.base_model.model
    return {
        f"{m}.lora_{ab}.weight": getattr(inner.get_submodule(m), f"lora_{ab}")["default"].weight
        for m in targets for ab in ("A", "B")
    }


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))



def peft_expert_model(model_dir, spec: LoraSpec, targets: list[str], weights: dict[str, torch.Tensor]):
    """Like `peft_model`, with targets `<experts>.gate_up_proj` / `<experts>.down_proj`
    becoming PEFT `target_parameters` on the fused 3-D expert weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    experts = sorted({t.rsplit(".", 1)[-1] for t in targets if ".experts." in t})
    modules = [t for t in targets if ".experts." not in t]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, lora_dropout=0.0,
                        target_modules=modules or None,
                        target_parameters=[f"experts.{p}" for p in experts] or None)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, tensor in weights.items():
            peft_factor(model, name).copy_(tensor)
    return model


def peft_factor(model, name: str) -> torch.nn.Parameter:
    """The PEFT parameter of a tunemesh LoRA tensor name (`<module>.lora_A.weight`)."""
    from tunemesh_common.lora.peft_format import PEFT_PREFIX, peft_key

    module, _, rest = peft_key(name)[len(PEFT_PREFIX):].partition(".lora_")
    return getattr(model.base_model.model.get_submodule(module), f"lora_{rest[0]}")["default"].weight


def save_random_peft_adapter(model_dir, directory, seed: int, targets: list[str], rank: int = 8,
                             b_std: float = 0.05):
    """A PEFT adapter (rank `rank`, alpha 2 * rank) on `targets` of the model in `model_dir`,
    seeded, with B drawn from N(0, b_std) so that it changes the output; LoRA factors only.
    Returns `directory`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    model.save_pretrained(directory, save_embedding_layers=False)
    return directory
