"""One rank of a DeepSpeed trainer: the torch engine's fused multi-LoRA step over a frozen
base that ZeRO-3 partitions across the process group.

Each rank holds a 1/W shard of every base weight (gathered layer by layer during forward
and backward), the full LoRA factors of every adapter and each adapter's own AdamW. The
rows of a fused batch are split across ranks and the LoRA gradients summed (see
data_parallel.py), so every rank applies identical optimizer steps. MoE blocks are ZeRO-3
leaf modules: their parameters are gathered as one unit, which lets the experts wrapper
index the fused expert weights directly. No DeepSpeed optimizer is built.

With `expert_parallel` = P > 1 the ranks also form groups of P that split every MoE
layer's experts (expert_parallel.py): each rank keeps E / P experts' base weights, outside
ZeRO, and runs them for the tokens of its whole group.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator, Sequence

from tunemesh_trainer.domain import AdamSpec, AdapterState, EngineItem, ItemOutcome, LoraSpec
from tunemesh_trainer.engine.data_parallel import parallelism
from tunemesh_trainer.engine.torch_engine import TorchTrainingEngine

logger = logging.getLogger(__name__)


def zero_config(stage: int) -> dict:
    """DeepSpeed config for a frozen, inference-style partitioned base (no DeepSpeed optimizer).

    Prefetching is off so that every rank gathers exactly the modules it runs, in order."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage, "stage3_prefetch_bucket_size": 0},
        "steps_per_print": 1 << 30,
    }


def rank_device() -> str:
    """This rank's device: `cpu` under the CPU accelerator, else the accelerator's device of
    LOCAL_RANK (e.g. `cuda:3`)."""
    import os

    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "cpu"
    return accelerator.device_name(int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def partitioned_loading(zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3, models loaded inside are built under `zero.Init`: each rank
    materialises only its shard of every weight, never the whole model."""
    if zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(zero_config(zero_stage))  # transformers holds a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config
        _restore_functional_linear()


def _restore_functional_linear() -> None:
    """Undo `zero.Init`'s process-wide swap of torch.nn.functional.linear for DeepSpeed's
    memory-efficient version. Its custom backward multiplies unpadded gradients, so rows
    would get other bits than alone (batch_invariant.py), in this process's every engine;
    and it saves no memory here, where every weight that trains is a LoRA factor."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def _align_parameter_ids(device: str) -> None:
    """Start every rank's ZeRO parameter ids at the same number. ZeRO-3 checks that ranks
    traced the same parameters by id, and ids count up per process: a rank that partitioned
    models before (rank 0 of a re-formed group) would otherwise disagree."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import Init

    next_id = torch.tensor([Init.param_id], dtype=torch.long, device=device)
    dist.all_reduce(next_id, op=dist.ReduceOp.MAX)
    Init.param_id = int(next_id)


class DeepSpeedTrainingEngine:
    """A TorchTrainingEngine whose base model is partitioned by ZeRO (stage 0 or 3)."""

    def __init__(
        self,
        model_dir: pathlib.Path,
        name: str,
        family: str,
        max_lora_rank: int,
        max_seq_len: int,
        num_threads: int | None = None,
        max_batch_tokens: int = 8192,
        zero_stage: int = 3,
        expert_parallel: int = 1,
        dtype: str = "float32",
        batch_invariant: bool = True,
    ) -> None:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.utils import set_z3_leaf_modules

        device = rank_device()
        rank, world = dist.get_rank(), dist.get_world_size()
        _align_parameter_ids(device)
        with partitioned_loading(zero_stage):
            self._local = TorchTrainingEngine(
                model_dir, name, family, max_lora_rank, max_seq_len, num_threads=num_threads,
                device=device, max_batch_tokens=max_batch_tokens, parallelism=parallelism(rank, world, device),
                dtype=dtype, batch_invariant=batch_invariant,
            )
        experts_per_rank = self._shard_experts(rank, world, expert_parallel)
        leaves = self._local.expert_block_types()
        if zero_stage == 3 and leaves:
            set_z3_leaf_modules(self._local.model, leaves)
        self._zero, *_ = deepspeed.initialize(model=self._local.model, config=zero_config(zero_stage))
        self.info = self._local.info
        logger.info("rank %d/%d: %s partitioned with ZeRO-%d (%d MoE leaf classes, %s experts per layer here)",
                    rank, world, name, zero_stage, len(leaves), experts_per_rank or "all")

    def _shard_experts(self, rank: int, world: int, size: int) -> int:
        """Split the MoE layers' experts over expert-parallel groups of `size` ranks; 0 if not."""
        from tunemesh_trainer.engine import expert_parallel

        group = expert_parallel.form_groups(world, rank, size)
        if size == 1 or not self._local.expert_layers:
            return 0
        return expert_parallel.shard_experts(self._local.expert_layers, group)

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        return self._local.create_adapter(adapter_id, spec)

    def delete_adapter(self, adapter_id: str) -> None:
        self._local.delete_adapter(adapter_id)

    def adapter_ids(self) -> list[str]:
        return self._local.adapter_ids()

    def run_batch(self, items: Sequence[EngineItem]) -> list[ItemOutcome]:
        return self._local.run_batch(items)

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        return self._local.optim_step(adapter_id, adam)

    def export_adapter(self, adapter_id: str, with_optimizer: bool) -> AdapterState:
        return self._local.export_adapter(adapter_id, with_optimizer)

    def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        return self._local.import_adapter(adapter_id, state)

    def adapter_digest(self, adapter_id: str) -> str:
        return self._local.adapter_digest(adapter_id)
