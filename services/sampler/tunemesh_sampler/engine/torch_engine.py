"""Batched multi-LoRA generation on a frozen HF causal LM, in plain torch (LoRA on linears
and on fused MoE expert weights).

Concurrent `generate` calls queue their rows (one row per sample); one worker thread takes
all pending rows (up to `max_batch_rows`), groups them by adapter so each adapter's rows
are contiguous, left-pads the prompts and runs one KV-cached decode loop for the batch.

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
import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache

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
from tunemesh_sampler.engine.token_choice import TokenChooser, request_seed, row_generator

logger = logging.getLogger(__name__)

BASE_SEGMENT = ""  # the segment id of rows without an adapter (never an adapter key)

Detokenize = Callable[[list[int]], str]


@dataclasses.dataclass(eq=False)
class _Job:
    """One `generate` call waiting for its rows."""

    request: GenerateRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    sequences: list[SampledSequence | None]
    remaining: int


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
    ) -> None:
        """`dtype` is the base model's, float32 or bfloat16 (LoRA factors stay float32, logits
        are read in float32)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self._device = torch.device(device)
        self._max_batch_rows = max(1, max_batch_rows)
        self._detokenize = detokenize
        base = load_frozen_base(model_dir, dtype, self._device)
        self._model = base.model
        self._routing = base.routing
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
        self.batches_run = 0  # fused decode loops run so far
        self._pending: collections.deque[_Row] = collections.deque()
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
        job = _Job(request, loop.create_future(), loop, [None] * n, n)
        seed = request_seed(request.spec)
        rows = [_Row(job, i, row_generator(request.spec, seed, i)) for i in range(n)]
        with self._lock:
            self._pending.extend(rows)
        loop.call_soon(self._kick)  # after the other ready callers have queued: one batch
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
        """Schedule one batch on the worker unless one is already waiting to start."""
        with self._lock:
            if self._scheduled or self._closed or not self._pending:
                return
            self._scheduled = True
            self._executor.submit(self._run_next_batch)

    def _run_next_batch(self) -> None:
        """Worker thread: decode every pending row (up to the batch size) together."""
        with self._lock:
            self._scheduled = False
            rows = self._take_rows()
        try:
            if rows:
                self._decode(rows)
        except Exception:
            logger.exception("decode batch of %d rows failed", len(rows))
            for job in {row.job for row in rows}:
                _settle(job, InternalError("ENGINE_ERROR", "the sampler failed on this request"))
        self._kick()

    def _take_rows(self) -> list[_Row]:
        rows: list[_Row] = []
        while self._pending and len(rows) < self._max_batch_rows:
            row = self._pending.popleft()
            if not row.job.future.done():  # cancelled callers free their rows
                rows.append(row)
        rows = [row for row in rows if self._still_loaded(row)]
        return sorted(rows, key=lambda row: row.segment)  # stable: each adapter's rows contiguous

    def _still_loaded(self, row: _Row) -> bool:
        try:
            self._check_adapter(row.job.request.adapter_key)
        except NotFoundError as err:
            _settle(row.job, err)
            return False
        return True

    def _decode(self, rows: list[_Row]) -> None:
        """Prefill the left-padded prompts, then one token per step until every row stopped."""
        self.batches_run += 1
        ids_bt, mask_bt = _left_pad([row.job.request.prompt_tokens for row in rows], self._device)
        positions_bt = (mask_bt.cumsum(-1) - 1).clamp(min=0)
        chooser = TokenChooser([row.spec for row in rows], self._device)
        cache = DynamicCache(config=self._model.config)
        with torch.no_grad(), self._routing.use(RowPlan(_segments(rows), frozenset())):
            logits_bv = self._last_logits(ids_bt, mask_bt, positions_bt, cache)
            while True:
                tokens_b, logprobs_b = chooser.choose(
                    logits_bv, [row.generator if row.reason is None else None for row in rows])
                if self._advance(rows, tokens_b.tolist(), logprobs_b.tolist()):
                    return
                mask_bt = torch.cat([mask_bt, mask_bt.new_ones(len(rows), 1)], dim=1)
                positions_bt = positions_bt[:, -1:] + 1
                logits_bv = self._last_logits(tokens_b[:, None], mask_bt, positions_bt, cache)

    def _last_logits(self, ids_bt, mask_bt, positions_bt, cache) -> torch.Tensor:
        out = self._model(
            input_ids=ids_bt,
            attention_mask=mask_bt,
            position_ids=positions_bt,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _advance(self, rows: list[_Row], tokens: list[int], logprobs: list[float]) -> bool:
        """Append each running row's new token and apply its stops; True once all stopped."""
        for row, token, logprob in zip(rows, tokens, logprobs):
            if row.reason is not None:
                continue
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in self._eos or token in row.spec.stop_token_ids or self._cut_at_stop_string(row):
                row.reason = StopReason.STOP
            elif len(row.tokens) >= row.spec.max_tokens:
                row.reason = StopReason.LENGTH
            if row.reason is not None:
                _finish(row)
        return all(row.reason is not None for row in rows)

    def _cut_at_stop_string(self, row: _Row) -> bool:
        """If the new text holds a stop string: keep the tokens before the first token whose
        prefix text holds it (so the output text holds none) and return True."""
        stops = [s for s in row.spec.stop if s]
        if not stops or self._detokenize is None:
            return False
        detokenize = self._detokenize

        def holds_stop(k: int) -> bool:
            text = detokenize(row.tokens[:k])
            return any(s in text for s in stops)

        if not holds_stop(len(row.tokens)):
            return False
        first = next(k for k in range(1, len(row.tokens) + 1) if holds_stop(k))
        del row.tokens[first - 1:], row.logprobs[first - 1:]
        return True

    # scoring ------------------------------------------------------------------

    async def prompt_logprobs(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        self._check_open()
        self._check_adapter(adapter_key)
        self._check_tokens(tokens, 0)
        return await asyncio.wrap_future(self._executor.submit(self._score, adapter_key, tuple(tokens)))

    def _score(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        self._check_adapter(adapter_key)  # unloaded while queued: never the base model instead
        if len(tokens) < 2:
            return []
        ids_bt = torch.tensor([tokens], dtype=torch.long, device=self._device)
        segment = BASE_SEGMENT if adapter_key is None else adapter_key
        with torch.no_grad(), self._routing.use(RowPlan(((segment, 0, 1),), frozenset())):
            logits_tv = self._model(input_ids=ids_bt, use_cache=False).logits[0, :-1].float()
        logprobs_tv = torch.log_softmax(logits_tv, dim=-1)
        return logprobs_tv.gather(-1, ids_bt[0, 1:, None]).squeeze(-1).tolist()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
        for job in {row.job for row in pending}:
            _settle(job, UnavailableError("ENGINE_CLOSED", "the sampling engine closed"))
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


def _left_pad(prompts: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids_bt = torch.zeros(len(prompts), width, dtype=torch.long)
    mask_bt = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids_bt[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask_bt[i, width - len(prompt):] = 1
    return ids_bt.to(device), mask_bt.to(device)


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
