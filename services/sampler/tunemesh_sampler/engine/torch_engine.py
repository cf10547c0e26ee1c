"""Batched multi-LoRA generation on a frozen HF causal LM, in plain torch (LoRA on linears
and on fused MoE expert weights).

Concurrent `generate` calls queue their rows (one row per sample) by tenant; one worker
thread runs a KV-cached decode loop that rows join and leave step by step (continuous
batching): each step admits waiting rows into the free slots of `max_batch_rows`, taking
the tenants in turn, prefills them together and merges them into the running rows (each
adapter's rows contiguous); a row that finished leaves at once and its slot goes to the
next waiting row. So a long generation holds no one else back beyond sharing the steps,
and scoring calls run between two steps.

Every row lies in the cache from index 0 (prompts right-padded, each row's next token
written at its own length; kv_cache.py), as the trainer lays out its rows, and attention is
masked by position (tunemesh_common.numerics.attention). In batch-invariant mode (the
default) a row's numbers then depend on nothing else in its batch, and the logprob of a
sampled token equals the trainer's forward logprob of that token bit for bit.

Sampling is per row and independent of the rest of the batch: each sampled row draws one
uniform per step from its own `torch.Generator`, seeded from the request's seed and the
sample's index. The logprob reported for a token is the log-softmax of the model's raw
logits at that step (temperature 1, no top-k / top-p filtering): the model's own
probability of the token, comparable across sampling settings.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunemesh_common.numerics import attention
from tunemesh_common.numerics.batch_invariant import BatchInvariantMode, one_thread_if
from tunemesh_sampler.engine import kv_cache
from tunemesh_common.lora import peft_format
from tunemesh.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    TunemeshError,
    UnavailableError,
)
from tunemesh_common.lora.frozen_base import load_frozen_base
from tunemesh_common.lora.multi_lora import RowPlan
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence, SamplingSpec, StopReason
from tunemesh_sampler.engine.lora_targets import LoraTargets
from tunemesh_sampler.engine.stop_strings import StopStrings
from tunemesh_sampler.engine.token_choice import TokenChooser, request_seed, row_generator

logger = logging.getLogger(__name__)

BASE_SEGMENT = ""  # the segment id of rows without an adapter (never an adapter key)
RESERVE_AHEAD_TOKENS = 512  # cache positions reserved ahead of decoding (a long max_tokens grows the cache as it goes)
# A forward over at most this many (input tokens x base parameters) runs on one thread:
# with the local mesh's sleeping OpenMP threads, waking one for every small operation
# cost more than it gave. Measured (2 cores, OMP_WAIT_POLICY=PASSIVE): a 16-row decode
# step of tiny-dense took 2.7 ms on two threads and 1.1 on one; a SmolLM2 step broke even
# at one row (68.4 vs 66.6 ms) and lost on one thread at 16 rows (102.7 vs 108.3 ms), its
# large GEMMs wanting both threads' memory bandwidth. (Training crosses over later:
# tunemesh_trainer.engine.torch_engine.ONE_THREAD_WORK.)
ONE_THREAD_WORK = 1e8

Detokenize = Callable[[list[int]], str]


@dataclasses.dataclass(eq=False)
class _Job:
    """One `generate` call waiting for its rows."""

    request: GenerateRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    sequences: list[SampledSequence | None]
    remaining: int
    stops: StopStrings | None = None


@dataclasses.dataclass(eq=False)
class _Row:
    """One sample of a job while it decodes."""

    job: _Job
    index: int
    generator: torch.Generator | None  # None: greedy
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    reason: StopReason | None = None

    @property
    def spec(self) -> SamplingSpec:
        return self.job.request.spec

    @property
    def segment(self) -> str:
        key = self.job.request.adapter_key
        return BASE_SEGMENT if key is None else key


class _FairRows:
    """Rows waiting for a slot, by tenant: `pop` takes the tenants in turn (each tenant's
    rows in arrival order), so one tenant's many rows never hold another's few back."""

    def __init__(self) -> None:
        self._by_tenant: collections.OrderedDict[str, collections.deque[_Row]] = collections.OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._by_tenant)

    def add(self, tenant: str, rows: list[_Row]) -> None:
        self._by_tenant.setdefault(tenant, collections.deque()).extend(rows)

    def pop(self) -> _Row | None:
        """The next tenant's oldest row (that tenant goes to the back of the turn)."""
        if not self._by_tenant:
            return None
        tenant, rows = next(iter(self._by_tenant.items()))
        row = rows.popleft()
        if rows:
            self._by_tenant.move_to_end(tenant)
        else:
            del self._by_tenant[tenant]
        return row

    def drain(self) -> list[_Row]:
        rows = [row for queue in self._by_tenant.values() for row in queue]
        self._by_tenant.clear()
        return rows


@dataclasses.dataclass(eq=False)
class _Batch:
    """The rows decoding together: how many tokens each row has in the cache (its next
    token's position), the KV cache (every row from index 0), each row's next-token logits."""

    rows: list[_Row]
    lengths_b: torch.Tensor
    cache: DynamicCache
    logits_bv: torch.Tensor
    chooser: TokenChooser | None = None

    @property
    def width(self) -> int:
        """Cache positions any row uses."""
        return int(self.lengths_b.max())

    def select(self, indices: list[int]) -> None:
        """Keep rows `indices`, in that order; then drop the cache positions past every kept
        row's length (the tail of rows that left)."""
        index_b = torch.tensor(indices, dtype=torch.long, device=self.lengths_b.device)
        self.rows = [self.rows[i] for i in indices]
        self.lengths_b, self.logits_bv = self.lengths_b[index_b], self.logits_bv[index_b]
        self.cache.batch_select_indices(index_b)
        width = self.width
        for layer in _cache_layers(self.cache):
            if layer.keys.shape[-2] > width:
                layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]

    def reserve(self) -> None:
        """Room in the cache for the tokens the rows may still generate, up to
        RESERVE_AHEAD_TOKENS (the cache was rebuilt by a join or a selection; decoding then
        writes in place, and a longer generation grows the cache by doubling)."""
        remaining = max(row.spec.max_tokens - len(row.tokens) for row in self.rows)
        kv_cache.reserve(self.cache, self.width + min(remaining, RESERVE_AHEAD_TOKENS))

    def merged(self, other: _Batch) -> _Batch:
        """This batch's rows then `other`'s, both caches padded after their tokens to the longer one."""
        mine_layers, their_layers = _cache_layers(self.cache), _cache_layers(other.cache)
        width = max(mine_layers[0].keys.shape[-2], their_layers[0].keys.shape[-2])
        for mine, theirs in zip(mine_layers, their_layers, strict=True):
            mine.keys = torch.cat([_right_pad_time(mine.keys, width), _right_pad_time(theirs.keys, width)])
            mine.values = torch.cat([_right_pad_time(mine.values, width), _right_pad_time(theirs.values, width)])
        return _Batch([*self.rows, *other.rows], torch.cat([self.lengths_b, other.lengths_b]), self.cache,
                      torch.cat([self.logits_bv, other.logits_bv]))


def _cache_layers(cache: DynamicCache) -> list:
    """The cache's per-layer key/value stores (full attention layers only: rows join and
    leave by editing them)."""
    layers = list(cache.layers)
    if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in layers):
        raise InternalError("UNSUPPORTED_CACHE", "continuous batching needs full-attention cache layers")
    return layers


def _right_pad_time(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` [B, H, T, D] with zeros after its time axis up to `width`."""
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=-2)


class TorchSamplingEngine:
    """A frozen base model whose target linears and fused experts carry many adapters' LoRA factors."""

    def __init__(
        self,
        model_dir: pathlib.Path,
        name: str,
        family: str,
        max_lora_rank: int,
        max_seq_len: int,
        num_threads: int | None = None,
        device: str = "cpu",
        max_batch_rows: int = 64,
        detokenize: Detokenize | None = None,
        dtype: str = "float32",
        batch_invariant: bool = True,
    ) -> None:
        """`dtype` is the base model's, float32 or bfloat16 (LoRA factors stay float32, logits
        are read in float32). `batch_invariant`: a row's numbers never depend on the rest of
        its batch and equal the trainer's in the same mode (tunemesh_common.numerics), at
        the price measured in bench/README.md."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self._device = torch.device(device)
        self._max_batch_rows = max(1, max_batch_rows)
        self._detokenize = detokenize
        base = load_frozen_base(model_dir, dtype, self._device)
        self._model = base.model
        self._base_params = sum(p.numel() for p in base.model.parameters())
        self._body = base.model.base_model  # the decoder stack, without the vocab head
        self._head = base.model.get_output_embeddings()
        self.batch_invariant = batch_invariant
        self._gemms_wrapped = base.gemms_all_wrapped
        attention.use_attention(base.model, attention.INVARIANT if batch_invariant else attention.POSITIONAL)
        self._routing = base.routing
        self._routing.batch_invariant = batch_invariant
        self._targets = LoraTargets(base)
        self._eos = _eos_token_ids(base.model)
        self.info = ModelInfo(
            name=name,
            family=family,
            vocab_size=base.vocab_size,
            max_seq_len=max_seq_len,
            max_lora_rank=max_lora_rank,
            eos_token_ids=tuple(sorted(self._eos)),
        )
        self.batches_run = 0  # groups of rows prefilled together (each joins the running decode loop)
        self._pending = _FairRows()
        self._scores: collections.deque[tuple[str | None, tuple[int, ...], concurrent.futures.Future]] = \
            collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler-engine")
        logger.info("loaded %s (%s) with %d LoRA target linears and %d MoE experts layers",
                    name, family, len(self._targets.linears), len(self._targets.experts))

    # adapters -----------------------------------------------------------------

    def load_adapter(self, adapter_key: str, directory: pathlib.Path) -> None:
        if not adapter_key:
            raise InvalidArgumentError("BAD_ADAPTER_KEY", "adapter key must be non-empty")
        if adapter_key in self._targets:
            raise AlreadyExistsError("ADAPTER_LOADED", f"adapter {adapter_key!r} is already loaded")
        raw_config, data = _read_adapter_files(pathlib.Path(directory))
        config = peft_format.parse_config(raw_config)
        if not 1 <= config.rank <= self.info.max_lora_rank:
            raise InvalidArgumentError("BAD_LORA_RANK", f"rank {config.rank} is not in [1, {self.info.max_lora_rank}]")
        modules = peft_format.check_factors(peft_format.read_header(data), config.rank, config.target_parameters)
        factors = _read_factors(data)
        pairs = {m: self._targets.pair(m, factors[f"{m}.lora_A.weight"], factors[f"{m}.lora_B.weight"], config,
                                       self._device) for m in sorted(modules)}
        self._targets.attach(adapter_key, pairs)
        logger.info("loaded adapter %s: rank %d on %d modules", adapter_key, config.rank, len(pairs))

    def unload_adapter(self, adapter_key: str) -> None:
        if not self._targets.detach(adapter_key):
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key!r} is not loaded")

    # generation ---------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampledSequence]:
        self._check_request(request)
        loop = asyncio.get_running_loop()
        n = request.num_samples
        stops = StopStrings(request.spec.stop, self._detokenize) if request.spec.stop else None
        job = _Job(request, loop.create_future(), loop, [None] * n, n, stops)
        seed = request_seed(request.spec)
        rows = [_Row(job, i, row_generator(request.spec, seed, i)) for i in range(n)]
        with self._lock:
            self._pending.add(request.tenant, rows)
        loop.call_soon(self._kick)  # after the other ready callers have queued: one prefill
        return await job.future

    def _check_request(self, request: GenerateRequest) -> None:
        self._check_open()
        self._check_adapter(request.adapter_key)
        self._check_tokens(request.prompt_tokens, request.spec.max_tokens)
        if request.num_samples < 1:
            raise InvalidArgumentError("BAD_NUM_SAMPLES", "num_samples must be >= 1")
        if request.spec.max_tokens < 1:
            raise InvalidArgumentError("BAD_MAX_TOKENS", "max_tokens must be >= 1")
        if request.spec.stop and self._detokenize is None:
            raise FailedPreconditionError("NO_TOKENIZER", "this model has no tokenizer: stop strings are unsupported")

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("ENGINE_CLOSED", "the sampling engine is closed")

    def _check_adapter(self, adapter_key: str | None) -> None:
        if adapter_key is not None and adapter_key not in self._targets:
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key!r} is not loaded")

    def _check_tokens(self, tokens: Sequence[int], new_tokens: int) -> None:
        if not tokens:
            raise InvalidArgumentError("EMPTY_PROMPT", "the prompt has no tokens")
        if len(tokens) + new_tokens > self.info.max_seq_len:
            raise InvalidArgumentError(
                "PROMPT_TOO_LONG",
                f"{len(tokens)} prompt tokens + {new_tokens} new exceed {self.info.max_seq_len}",
            )
        if not all(0 <= t < self.info.vocab_size for t in tokens):
            raise InvalidArgumentError("BAD_TOKEN_ID", f"token ids must lie in [0, {self.info.vocab_size})")

    def _kick(self) -> None:
        """Start the worker's loop unless it runs (it takes what was queued meanwhile)."""
        with self._lock:
            if self._scheduled or self._closed or not (self._pending or self._scores):
                return
            self._scheduled = True
            self._executor.submit(self._run)

    def _run(self) -> None:
        """Worker thread: one decode loop for as long as there are rows. Each step first
        runs the scoring calls that queued, then admits pending rows into the free slots
        (fairly across tenants: prefilled together, they join the running rows), then
        picks every row's next token; rows that finished leave at once, freeing their
        slots for the next step."""
        batch: _Batch | None = None
        while True:
            self._run_scores()
            with self._lock:
                running = batch.rows if batch is not None else []
                new = [] if self._closed else self._take_rows(self._max_batch_rows - len(running))
                if self._closed or (batch is None and not new and not self._scores):
                    self._scheduled = False
                    closing = self._closed
                    break
            try:
                if new:
                    batch = self._join(batch, new)
                if batch is not None:
                    batch = self._step(batch)
            except Exception:
                logger.exception("decode step of %d rows failed", len(running) + len(new))
                for job in {row.job for row in [*running, *new]}:
                    _settle(job, InternalError("ENGINE_ERROR", "the sampler failed on this request"))
                batch = None
        if closing and batch is not None:
            for job in {row.job for row in batch.rows}:
                _settle(job, UnavailableError("ENGINE_CLOSED", "the sampling engine closed"))

    def _take_rows(self, free: int) -> list[_Row]:
        rows: list[_Row] = []
        while free > len(rows) and (row := self._pending.pop()) is not None:
            if not row.job.future.done() and self._still_loaded(row):  # cancelled callers free their rows
                rows.append(row)
        return rows

    def _still_loaded(self, row: _Row) -> bool:
        try:
            self._check_adapter(row.job.request.adapter_key)
        except NotFoundError as err:
            _settle(row.job, err)
            return False
        return True

    def _join(self, batch: _Batch | None, rows: list[_Row]) -> _Batch:
        """Prefill `rows` (right-padded, together) and merge them into the running `batch`;
        each adapter's rows end up contiguous."""
        self.batches_run += 1
        rows = sorted(rows, key=lambda row: row.segment)
        ids_bt, lengths_b = _right_pad([row.job.request.prompt_tokens for row in rows], self._device)
        positions_bt = torch.arange(ids_bt.shape[1], device=self._device).expand_as(ids_bt)
        cache = kv_cache.reserved_cache(self._model.config)
        logits_bv = self._forward(rows, ids_bt, positions_bt, cache, lengths_b - 1)
        joined = _Batch(rows, lengths_b, cache, logits_bv)
        if batch is not None:
            joined = batch.merged(joined)
        order = sorted(range(len(joined.rows)), key=lambda i: joined.rows[i].segment)  # stable
        if order != list(range(len(order))):
            joined.select(order)
        joined.chooser = TokenChooser([row.spec for row in joined.rows], self._device)
        joined.reserve()
        return joined

    def _step(self, batch: _Batch) -> _Batch | None:
        """Every row's next token; finished (or abandoned) rows leave; the others are fed
        their token. None once no row runs."""
        tokens_b, logprobs_b = batch.chooser.choose(batch.logits_bv, [row.generator for row in batch.rows])
        self._advance(batch.rows, tokens_b.tolist(), logprobs_b.tolist())
        kept = [i for i, row in enumerate(batch.rows) if row.reason is None and not row.job.future.done()]
        if not kept:
            return None
        if len(kept) < len(batch.rows):
            batch.select(kept)
            tokens_b = tokens_b[kept]
            batch.chooser = TokenChooser([row.spec for row in batch.rows], self._device)
            batch.reserve()
        kv_cache.write_at(batch.cache, batch.lengths_b)
        batch.logits_bv = self._forward(batch.rows, tokens_b[:, None], batch.lengths_b[:, None], batch.cache,
                                        torch.zeros_like(batch.lengths_b))
        batch.lengths_b = batch.lengths_b + 1
        return batch

    def _forward(self, rows: list[_Row], ids_bt, positions_bt, cache, last_b) -> torch.Tensor:
        """Each row's logits (float32) at its input position `last_b`, its adapter's LoRA
        applied; the body runs on every input position, the vocab head on one per row."""
        with torch.no_grad(), self._routing.use(RowPlan(_segments(rows), frozenset()), batched=True), \
                self._numerics(), self._threads(ids_bt.numel()):
            hidden_btd = self._body(input_ids=ids_bt, position_ids=positions_bt, past_key_values=cache,
                                    use_cache=True).last_hidden_state
            picked_b1d = hidden_btd[torch.arange(len(rows), device=self._device), last_b][:, None]
            return self._head(picked_b1d)[:, 0].float()

    def _threads(self, tokens: int) -> contextlib.AbstractContextManager:
        """One thread for a forward over `tokens` input tokens up to ONE_THREAD_WORK, else torch's."""
        return one_thread_if(self._device.type == "cpu" and tokens * self._base_params <= ONE_THREAD_WORK)

    def _numerics(self) -> contextlib.AbstractContextManager:
        """A model-wide BatchInvariantMode where some GEMM runs outside tunemesh's wrappers
        (e.g. a MoE router); else nothing (the wrappers pad their own)."""
        if self.batch_invariant and not self._gemms_wrapped:
            return BatchInvariantMode()
        return contextlib.nullcontext()

    def _advance(self, rows: list[_Row], tokens: list[int], logprobs: list[float]) -> None:
        """Append each row's new token and apply its stops (a stopped row is finished)."""
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in self._eos or token in row.spec.stop_token_ids or self._stopped_by_string(row):
                row.reason = StopReason.STOP
            elif len(row.tokens) >= row.spec.max_tokens:
                row.reason = StopReason.LENGTH
            if row.reason is not None:
                _finish(row)

    @staticmethod
    def _stopped_by_string(row: _Row) -> bool:
        """If the new text holds a stop string: return True, after keeping only the tokens
        before the first token whose prefix text holds it (so the output text holds none)
        unless the request keeps stop strings (then the newest token completed it: keep all)."""
        keep = row.job.stops.cut(row.tokens) if row.job.stops else None
        if keep is None:
            return False
        if not row.spec.include_stop_str:
            del row.tokens[keep:], row.logprobs[keep:]
        return True

    # scoring ------------------------------------------------------------------

    async def prompt_logprobs(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        """Queued for the worker, which runs it between two decode steps (never behind a
        whole generation)."""
        self._check_open()
        self._check_adapter(adapter_key)
        self._check_tokens(tokens, 0)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._scores.append((adapter_key, tuple(tokens), future))
        self._kick()
        return await asyncio.wrap_future(future)

    def _run_scores(self) -> None:
        """Worker thread: every scoring call queued so far."""
        while True:
            with self._lock:
                if not self._scores:
                    return
                adapter_key, tokens, future = self._scores.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._score(adapter_key, tokens))
            except BaseException as err:  # noqa: BLE001 - the caller gets it
                future.set_exception(err)

    def _score(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        self._check_adapter(adapter_key)  # unloaded while queued: never the base model instead
        if len(tokens) < 2:
            return []
        ids_bt = torch.tensor([tokens], dtype=torch.long, device=self._device)
        segment = BASE_SEGMENT if adapter_key is None else adapter_key
        with torch.no_grad(), self._routing.use(RowPlan(((segment, 0, 1),), frozenset())), self._numerics(), \
                self._threads(ids_bt.numel()):
            logits_tv = self._model(input_ids=ids_bt, use_cache=False).logits[0, :-1].float()
        logprobs_tv = torch.log_softmax(logits_tv, dim=-1)
        return logprobs_tv.gather(-1, ids_bt[0, 1:, None]).squeeze(-1).tolist()

    def failure(self) -> str | None:
        return None  # runs in this process: it fails with it

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending.drain(), _FairRows()
            scores, self._scores = list(self._scores), collections.deque()
        for job in {row.job for row in pending}:
            _settle(job, UnavailableError("ENGINE_CLOSED", "the sampling engine closed"))
        for _, _, future in scores:
            if future.set_running_or_notify_cancel():
                future.set_exception(UnavailableError("ENGINE_CLOSED", "the sampling engine closed"))
        self._executor.shutdown(wait=True)


def load_detokenizer(model_dir: pathlib.Path) -> Detokenize | None:
    """token ids -> text with the model directory's tokenizer (special tokens kept), if it has one."""
    from tunemesh_common.models import tokenizer_files

    if not tokenizer_files(model_dir):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _read_adapter_files(directory: pathlib.Path) -> tuple[bytes, bytearray]:
    try:
        raw_config = (directory / peft_format.CONFIG_FILE).read_bytes()
        return raw_config, bytearray((directory / peft_format.WEIGHTS_FILE).read_bytes())
    except OSError as err:
        raise InvalidArgumentError("BAD_ADAPTER_FILES", f"cannot read the adapter in {directory}: {err}") from None


def _read_factors(data: bytearray) -> dict[str, torch.Tensor]:
    """The file's tensors as float32, by internal name (`<module>.lora_A.weight`)."""
    arrays = peft_format.read_float32(data)
    if arrays is not None:
        tensors = {key: torch.from_numpy(array) for key, array in arrays.items()}
    else:
        from safetensors.torch import load

        tensors = {key: t.to(torch.float32) for key, t in load(bytes(data)).items()}
    return {peft_format.internal_name(key): t for key, t in tensors.items()}


def _eos_token_ids(model: nn.Module) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config and config (int or list each)."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        found.update([value] if isinstance(value, int) else value)
    return frozenset(int(v) for v in found)


def _right_pad(prompts: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as rows from position 0, padded with token 0 after their ends; their lengths."""
    width = max(len(p) for p in prompts)
    ids_bt = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids_bt[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return ids_bt.to(device), torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)


def _segments(rows: list[_Row]) -> tuple[tuple[str, int, int], ...]:
    """(adapter id, first row, end row) of each run of rows with one adapter."""
    segments: list[tuple[str, int, int]] = []
    for i, row in enumerate(rows):
        if segments and segments[-1][0] == row.segment:
            segments[-1] = (row.segment, segments[-1][1], i + 1)
        else:
            segments.append((row.segment, i, i + 1))
    return tuple(segments)


def _finish(row: _Row) -> None:
    job = row.job
    job.sequences[row.index] = SampledSequence(tuple(row.tokens), tuple(row.logprobs), row.reason)
    job.remaining -= 1
    if job.remaining == 0:
        _settle(job, list(job.sequences))


def _settle(job: _Job, outcome: list[SampledSequence] | TunemeshError) -> None:
    """Resolve a job's future from any thread (first outcome wins)."""

    def resolve() -> None:
        if job.future.done():
            return
        if isinstance(outcome, TunemeshError):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    try:
        job.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the caller's event loop is closed: nobody waits
        pass
