"""Base model registry: built-in tiny/SmolLM2 models and local HF directories.

Importing this package loads neither torch nor transformers; building a model does.
"""

from tunemesh_common.models.entry import (
    DENSE,
    MOE,
    ModelEntry,
    detect_family,
    entry_for_local_dir,
)
from tunemesh_common.models.registry import (
    SMOLLM2,
    TINY_DENSE,
    TINY_MOE,
    ModelRegistry,
    load_model_list,
)
from tunemesh_common.models.tokenizer import tokenizer_files

__all__ = [
    "DENSE",
    "MOE",
    "SMOLLM2",
    "TINY_DENSE",
    "TINY_MOE",
    "ModelEntry",
    "ModelRegistry",
    "detect_family",
    "entry_for_local_dir",
    "load_model_list",
    "tokenizer_files",
]
