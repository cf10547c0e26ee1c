"""Fused multi-tenant LoRA training on a frozen HF causal LM, in plain torch."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from tunemesh.errors import AlreadyExistsError, Code, InvalidArgumentError, NotFoundError, UnimplementedError
from tunemesh_common.lora.frozen_base import load_frozen_base
from tunemesh_common.lora.multi_lora import MultiLoraExperts, RowPlan
from tunemesh_common.numerics import attention, batch_invariant
from tunemesh_common.numerics.batch_invariant import BatchInvariantMode, one_thread_if, thread_count
from tunemesh_trainer.domain import (
    AdamSpec,
    AdapterState,
    EngineItem,
    ItemFailure,
    ItemKind,
    ItemOutcome,
    LoraSpec,
    ModelInfo,
)
from tunemesh_trainer.engine.adapter import AdapterSlot
from tunemesh_trainer.engine.batch import ChunkPart, pack_items, pack_targets, plan_chunks, plan_lanes
from tunemesh_trainer.engine.data_parallel import Parallelism, SingleProcess
from tunemesh_trainer.engine.expert_usage import ExpertUsage
from tunemesh_trainer.engine.losses import LOSSES, target_logprobs
from tunemesh_trainer.engine.validation import validate_item

logger = logging.getLogger(__name__)

# A fused pass over at most this many (batch tokens x base parameters) runs on one thread:
# waking a second thread for every small operation cost more than it gave. Measured on 2
# cores with the local mesh's OMP_WAIT_POLICY=PASSIVE (bench/README.md, overhead): a 1 x 8
# forward_backward on tiny-dense took 21 ms on two threads and 4 ms on one, 8 x 4 x 64
# tokens 188 against 91 ms; on SmolLM2 (135 M) one thread won up to about 128 tokens
# (1 x 8: 445 against 205 ms; 2 x 64: even) and two beyond (8 x 2 x 64: 6.5 against 7.7 s).
# A row's numbers are the same either way in batch-invariant mode (see one_thread and
# tests/unit/trainer/test_trainer_threads.py).
ONE_THREAD_WORK = 2e10


class TorchTrainingEngine:
    """A frozen base model whose target linears (and fused MoE expert weights) carry many
    adapters' LoRA factors. Routers stay frozen: they are never a LoRA target."""

    def __init__(
        self,
        model_dir: pathlib.Path,
        name: str,
        family: str,
        max_lora_rank: int,
        max_seq_len: int,
        num_threads: int | None = None,
        device: str = "cpu",
        max_batch_tokens: int = 8192,
        parallelism: Parallelism | None = None,
        dtype: str = "float32",
        batch_invariant: bool = True,
    ) -> None:
        """`parallelism` spreads each batch's rows over processes (default: all here; see
        data_parallel.py). `dtype` is the frozen base's (float32 or bfloat16); LoRA factors,
        their gradients, AdamW and the losses are float32 either way. `batch_invariant`:
        a row's forward numbers do not depend on the rest of its batch and equal the torch
        sampler's in the same mode (tunemesh_common.numerics)."""
        self._max_batch_tokens = max_batch_tokens  # padded tokens per chunk of a fused pass
        self._parallel = parallelism or SingleProcess()
        if num_threads:
            torch.set_num_threads(num_threads)
        self._device = torch.device(device)
        self._base = load_frozen_base(model_dir, dtype, self._device)
        # ZeRO-3 leaves each rank a partition: ds_numel is a parameter's whole size
        self._base_params = sum(getattr(p, "ds_numel", p.numel()) for p in self._base.model.parameters())
        self.one_thread_work = ONE_THREAD_WORK
        # whether a batch of several adapters may run in lanes, a thread each (`_run_lanes`)
        self.lanes = self._parallel.concurrent_passes and self._device.type == "cpu"
        self._parallel.prepare(self._base.model)
        self._routing = self._base.routing
        self.batch_invariant = batch_invariant
        self._gemms_wrapped = self._base.gemms_all_wrapped
        if batch_invariant:
            attention.use_attention(self._base.model, attention.INVARIANT)
            self._routing.batch_invariant = True
        self._slots: dict[str, AdapterSlot] = {}
        self._lane_pool: concurrent.futures.ThreadPoolExecutor | None = None  # made by the first split batch
        self._lane_workers = 0
        self.info = ModelInfo(
            name=name,
            family=family,
            vocab_size=self._base.vocab_size,
            max_seq_len=max_seq_len,
            max_lora_rank=max_lora_rank,
        )
        logger.info("loaded %s (%s) with %d LoRA target linears and %d MoE experts layers",
                    name, family, len(self._base.linears), len(self._base.experts))

    @property
    def model(self) -> torch.nn.Module:
        """The base model with the LoRA wrappers installed (for partitioning it)."""
        return self._base.model

    @property
    def expert_layers(self) -> dict[str, MultiLoraExperts]:
        """The wrapped fused-experts modules by name (for sharding them across ranks)."""
        return self._base.experts

    def expert_block_types(self) -> list[type]:
        """Classes of the modules holding a wrapped experts module (MoE blocks): their
        parameters must be gathered as one unit under ZeRO-3."""
        model = self._base.model
        return sorted({type(model.get_submodule(n.rpartition(".")[0])) for n in self._base.experts},
                      key=lambda cls: cls.__qualname__)

    # adapters -----------------------------------------------------------------

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        if not adapter_id:
            raise InvalidArgumentError("BAD_ADAPTER_ID", "adapter id must be non-empty")
        if adapter_id in self._slots:
            raise AlreadyExistsError("ADAPTER_EXISTS", f"adapter {adapter_id!r} already exists")
        if not 1 <= spec.rank <= self.info.max_lora_rank:
            raise InvalidArgumentError("BAD_LORA_RANK", f"rank must lie in [1, {self.info.max_lora_rank}]")
        if not math.isfinite(spec.alpha) or spec.alpha < 0:
            raise InvalidArgumentError("BAD_LORA_ALPHA", "alpha must be finite and >= 0")
        if spec.train_experts and self._base.has_fused_experts and not self._base.experts:
            raise UnimplementedError("EXPERT_LORA_UNSUPPORTED", "LoRA on this model's expert layout is not supported")
        targets = self.target_modules(spec)
        if not targets:
            raise InvalidArgumentError("NO_TARGET_MODULES", "the spec selects no module of this model")
        slot = AdapterSlot(spec, {n: self._base.target_shape(n) for n in targets}, self._device)
        for module_name, pair in slot.pairs.items():
            self._base.pair_table(module_name)[adapter_id] = pair
        self._slots[adapter_id] = slot
        return slot.num_params

    def target_modules(self, spec: LoraSpec) -> list[str]:
        """Names of the linears (and `<experts>.gate_up_proj` / `.down_proj` expert weights)
        an adapter with `spec` gets LoRA on (sorted)."""
        wanted = {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed,
                  "experts": spec.train_experts}
        return sorted(n for n, group in self._base.groups.items() if wanted[group])

    def delete_adapter(self, adapter_id: str) -> None:
        slot = self._slot(adapter_id)
        for module_name in slot.pairs:
            del self._base.pair_table(module_name)[adapter_id]
        del self._slots[adapter_id]

    def adapter_ids(self) -> list[str]:
        return sorted(self._slots)

    def adapter(self, adapter_id: str) -> AdapterSlot:
        """The adapter's slot (weights, accumulated grads, optimizer): for checkpoints."""
        return self._slot(adapter_id)

    def export_adapter(self, adapter_id: str, with_optimizer: bool) -> AdapterState:
        return self._slot(adapter_id).export_state(with_optimizer)

    def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        return self._slot(adapter_id).import_state(state)

    def adapter_digest(self, adapter_id: str) -> str:
        return self._slot(adapter_id).digest()

    @property
    def adapter_threads(self) -> int:
        """How many different adapters' optimizer steps (and exports) may run at once, each
        on a thread of its own (TrainerCore): one per torch thread where batches run in
        lanes (on the CPU each step runs on one thread), else 1."""
        return torch.get_num_threads() if self.lanes and batch_invariant.PER_THREAD_COUNTS else 1

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        """AdamW on one thread on the CPU, always (so its numbers never depend on a thread
        count): elementwise work over an adapter's factors gains nothing from a second
        sleeping thread to wake (SmolLM2, rank 16: 40.7 ms on two, 26.5 ms on one)."""
        with one_thread_if(self._device.type == "cpu"):
            return self._slot(adapter_id).optim_step(adam)

    def _slot(self, adapter_id: str) -> AdapterSlot:
        slot = self._slots.get(adapter_id)
        if slot is None:
            raise NotFoundError("ADAPTER_NOT_FOUND", f"no adapter {adapter_id!r}")
        return slot

    # batches ------------------------------------------------------------------

    def run_batch(self, items: Sequence[EngineItem]) -> list[ItemOutcome]:
        outcomes = [ItemOutcome(item_id=item.item_id) for item in items]
        runnable = []
        for item, outcome in zip(items, outcomes):
            outcome.failure = validate_item(
                item,
                adapters=self._slots,
                losses=LOSSES,
                vocab_size=self.info.vocab_size,
                max_seq_len=self.info.max_seq_len,
            )
            if outcome.failure is None:
                runnable.append((item, outcome))
        if runnable:
            with self._threads(runnable):
                self._run(runnable)
        return outcomes

    def _threads(self, runnable: list[tuple[EngineItem, ItemOutcome]]) -> contextlib.AbstractContextManager:
        """One thread for a batch on the CPU up to `one_thread_work` (ONE_THREAD_WORK), else
        torch's threads."""
        tokens = sum(len(datum.tokens) for item, _ in runnable for datum in item.data)
        return one_thread_if(self._device.type == "cpu" and tokens * self._base_params <= self.one_thread_work)

    def _run(self, runnable: list[tuple[EngineItem, ItemOutcome]]) -> None:
        """The fused pass; on an unexpected error (e.g. out of memory) each item is run
        alone, so only the item that breaks fails."""
        try:
            self._fused(runnable)
        except Exception:
            if not self._parallel.retries_alone:
                raise
            logger.exception("fused pass over %d items failed; running them one by one", len(runnable))
            for item, outcome in runnable:
                self._slots[item.adapter_id].drop_fresh_grads()
                outcome.outputs, outcome.metrics, outcome.failure = [], {}, None
                if len(runnable) == 1:
                    outcome.failure = ItemFailure(int(Code.INTERNAL), "ENGINE_ERROR", "the trainer failed on this item")
                else:
                    self._run([(item, outcome)])

    def _fused(self, runnable: list[tuple[EngineItem, ItemOutcome]]) -> None:
        """Chunk by padded size, forward/backward each chunk; gradients join each adapter's
        accumulation only after every chunk, and only if its items all stayed finite."""
        slots = {item.adapter_id: self._slots[item.adapter_id] for item, _ in runnable}
        for slot in slots.values():
            slot.drop_fresh_grads()
        for outcome in (o for _, o in runnable):
            outcome.metrics = {"loss:sum": 0.0, "num_tokens:sum": 0.0}
        usage = ExpertUsage()
        trained = sorted({item.adapter_id for item, _ in runnable if item.kind is ItemKind.FORWARD_BACKWARD})
        walk_all = self._parallel.walks_all_layers and bool(trained)
        local = self._parallel.local_items([item for item, _ in runnable])
        lanes = self._lanes(local)
        if lanes is not None:
            self._run_lanes(lanes, local, [outcome for _, outcome in runnable], usage)
        else:
            chunks = plan_chunks(local, self._max_batch_tokens)
            passes = self._parallel.pass_count(len(chunks))  # before any pass: a collective
            for chunk in chunks:
                self._run_chunk(chunk, [runnable[part.index][1] for part in chunk], usage, walk_all)
            for _ in range(passes - len(chunks)):
                self._idle_pass(walk_all)
        self._parallel.reduce_gradients([slots[adapter_id] for adapter_id in trained])
        self._parallel.merge_outcomes([outcome for _, outcome in runnable], usage)
        for index, (_, outcome) in enumerate(runnable):
            outcome.metrics.update(usage.metrics(index))
        self._settle_gradients(runnable, slots)

    def _lanes(self, items: list[EngineItem]) -> list[list[int]] | None:
        """The batch split into lanes (`plan_lanes`), at most one per torch thread of the
        calling thread, where this process runs every row on the CPU and can give each lane
        threads of its own; else None (one pass on torch's threads)."""
        threads = torch.get_num_threads()
        if not self.lanes or threads < 2 or not batch_invariant.PER_THREAD_COUNTS:
            return None
        return plan_lanes(items, threads)

    def _run_lanes(self, lanes: list[list[int]], items: list[EngineItem], outcomes: list[ItemOutcome],
                   usage: ExpertUsage) -> None:
        """Each lane's chunks on a thread of its own (the first on this one), with an equal
        share of the caller's torch threads (one each on two cores). Every OpenMP thread of a
        pass on two threads waits at each operation's end for the other, sleeping under the local mesh's OMP_WAIT_POLICY=PASSIVE (a wake per
        operation) or spinning (which collapses when a neighbour takes a core, bench/README.md,
        contention.py); lanes share no operation, so neither happens. A lane's rows get the
        same numbers as in one pass in batch-invariant mode (one thread sums a row as two do,
        batch_invariant.py). Every lane has stopped before an error of one is raised."""
        if self._lane_pool is None or self._lane_workers < len(lanes) - 1:  # none yet, or too few threads
            if self._lane_pool is not None:
                self._lane_pool.shutdown(wait=False)
            self._lane_workers = len(lanes) - 1
            self._lane_pool = concurrent.futures.ThreadPoolExecutor(self._lane_workers, thread_name_prefix="lane")
        shares = [ExpertUsage() for _ in lanes]
        each = max(1, torch.get_num_threads() // len(lanes))  # torch threads per lane
        others = [self._lane_pool.submit(self._run_lane, lane, items, outcomes, share, each)
                  for lane, share in zip(lanes[1:], shares[1:])]
        try:
            self._run_lane(lanes[0], items, outcomes, shares[0], each)
        finally:
            concurrent.futures.wait(others)
        for future in others:
            future.result()
        usage.combine([share.counts for share in shares])

    def _run_lane(self, lane: list[int], items: list[EngineItem], outcomes: list[ItemOutcome],
                  usage: ExpertUsage, threads: int) -> None:
        with thread_count(threads):
            for chunk in plan_chunks([items[index] for index in lane], self._max_batch_tokens):
                parts = [dataclasses.replace(part, index=lane[part.index]) for part in chunk]
                self._run_chunk(parts, [outcomes[part.index] for part in parts], usage, walk_all=False)

    def _run_chunk(
        self, parts: list[ChunkPart], outcomes: list[ItemOutcome], usage: ExpertUsage, walk_all: bool
    ) -> None:
        """Forward (and backward) one chunk. `walk_all`: run a backward through every layer
        even without a trainable row here, as the other ranks of the group do."""
        items = [part.item for part in parts]
        packed = pack_items(items, self._device)
        train = walk_all or any(item.kind is ItemKind.FORWARD_BACKWARD for item in items)
        listening = usage.listen(self._routing, [int(d.tokens.shape[0]) for i in items for d in i.data])
        with torch.set_grad_enabled(train), self._routing.use(packed.plan, real_tokens=packed.real_bt.reshape(-1)), \
                listening, self._numerics():
            logits_btv = self._base.model(
                input_ids=packed.tokens_bt, position_ids=packed.positions_bt, use_cache=False
            ).logits
            targets_btk = pack_targets(items, tuple(packed.tokens_bt.shape), self._device)
            logprobs_btk = target_logprobs(logits_btv, targets_btk)
            del logits_btv
            losses = [self._score(item, outcome, logprobs_btk, row)
                      for item, outcome, row in zip(items, outcomes, packed.first_rows)]
        for part, row in zip(parts, packed.first_rows):
            usage.absorb(part.index, row, len(part.item.data))
        trained = [loss for item, loss in zip(items, losses)
                   if item.kind is ItemKind.FORWARD_BACKWARD and loss is not None]
        if trained:
            sum(trained).backward()
        elif walk_all:
            (logprobs_btk.sum() * 0.0).backward()

    def _idle_pass(self, walk_all: bool) -> None:
        """A forward (and backward) over one pad token without LoRA: keeps a rank with no
        rows left in step with the others' ZeRO-3 parameter gathers."""
        tokens_bt = torch.zeros((1, 1), dtype=torch.long, device=self._device)
        with torch.set_grad_enabled(walk_all), self._routing.use(RowPlan(segments=(), trainable=frozenset())), \
                self._numerics():
            logits_btv = self._base.model(input_ids=tokens_bt, position_ids=tokens_bt, use_cache=False).logits
        if walk_all:
            (logits_btv.sum() * 0.0).backward()

    def _numerics(self) -> contextlib.AbstractContextManager:
        """A model-wide BatchInvariantMode where some GEMM runs outside tunemesh's wrappers
        (e.g. a MoE router); else nothing (the wrappers pad their own)."""
        if self.batch_invariant and not self._gemms_wrapped:
            return BatchInvariantMode()
        return contextlib.nullcontext()

    def _score(
        self, item: EngineItem, outcome: ItemOutcome, logprobs_btk: torch.Tensor, first_row: int
    ) -> torch.Tensor | None:
        """Loss and outputs of an item's datums in this chunk; None once the item is non-finite."""
        loss_def = LOSSES[item.loss_fn]
        config = loss_def.spec.resolve_config(item.loss_config)
        total = None
        for offset, datum in enumerate(item.data):
            n = int(datum.tokens.shape[0])
            inputs = {k: self._input_tensor(k, v) for k, v in datum.loss_inputs.items()}
            target_shape = inputs["target_tokens"].shape
            logprobs = logprobs_btk[first_row + offset, :n, : int(np.prod(target_shape[1:]))]
            result = loss_def.fn(logprobs.reshape(target_shape), inputs, config)
            total = result.loss if total is None else total + result.loss
            outcome.outputs.append({k: _to_numpy(v) for k, v in result.outputs.items()})
        loss_value = float(total.detach())
        outcome.metrics["loss:sum"] += loss_value
        outcome.metrics["num_tokens:sum"] += float(item.num_tokens)
        if outcome.failure is None and not math.isfinite(loss_value):
            outcome.failure = _failure("NON_FINITE_LOSS", f"loss is {loss_value}")
        return None if outcome.failure is not None else total

    def _input_tensor(self, key: str, value: np.ndarray) -> torch.Tensor:
        dtype = torch.long if key == "target_tokens" else torch.float32
        return torch.tensor(np.asarray(value), dtype=dtype, device=self._device)

    def _settle_gradients(
        self, runnable: list[tuple[EngineItem, ItemOutcome]], slots: dict[str, AdapterSlot]
    ) -> None:
        """Absorb each adapter's fresh gradients if all its items and gradients are finite;
        otherwise drop them and fail its forward_backward items. On one thread: a few hundred
        small per-tensor operations per adapter, each of which woke the second thread (the
        same numbers: element-wise adds, and norms read only for finiteness)."""
        with one_thread_if(self._device.type == "cpu"):
            self._settle_each(runnable, slots)

    def _settle_each(self, runnable: list[tuple[EngineItem, ItemOutcome]], slots: dict[str, AdapterSlot]) -> None:
        for adapter_id, slot in slots.items():
            own = [(item, out) for item, out in runnable
                   if item.adapter_id == adapter_id and item.kind is ItemKind.FORWARD_BACKWARD]
            if own and all(out.failure is None for _, out in own) and slot.fresh_grads_finite():
                slot.absorb_fresh_grads()
                continue
            slot.drop_fresh_grads()
            for _, outcome in own:
                if outcome.failure is None:
                    outcome.failure = _failure("NON_FINITE_GRADIENT", "gradient is not finite")
        for _, outcome in runnable:
            if outcome.failure is not None:
                outcome.outputs = []


def _failure(reason: str, message: str) -> ItemFailure:
    return ItemFailure(code=int(Code.INVALID_ARGUMENT), reason=reason, message=message)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()
