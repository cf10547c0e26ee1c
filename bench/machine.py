"""What this machine can do, measured in the run that uses it, and what a workload costs.

`measure_peaks` times a large matmul (fp32 and bf16; by torch's `mm` and by oneDNN's linear,
the faster being the ceiling: in float32 `mm` runs MKL at about half of what oneDNN
reaches on this project's hosts; where there is no bfloat16 GEMM, bf16 is timed as the
engines run it, in float32) and a large copy with torch, on the threads torch is set
to use: the compute and memory-bandwidth ceilings a bench's figures are divided by. Benches measure them before and after their phases and keep the best
(`best_peaks`). `ModelShape` reads a HF config; `sampling_bound` gives the tokens/s a
sampling round could reach if every matmul ran at the measured peak and every decode step
read the weights and the KV cache at the measured bandwidth, whichever is slower: a
roofline, not a prediction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

MATMUL_SIZE = 2048
COPY_BYTES = 256 << 20


def _best_seconds(run, repeats: int) -> float:
    run()  # warm up (allocation, thread pool)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(repeats: int = 5) -> dict:
    """{"fp32_gflops", "bf16_gflops", "copy_gb_s", "threads"}: best of `repeats`; the matmul
    figures are the faster kernel's, each kernel's also given (`fp32_gflops_mm`, `..._onednn`)."""
    import torch

    peaks = {"threads": torch.get_num_threads()}
    dnn = hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    bf16_fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for dtype, key in ((torch.float32, "fp32_gflops"), (torch.bfloat16, "bf16_gflops")):
        n = MATMUL_SIZE
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        b_t = b.t().contiguous()  # oneDNN: what the engines' frozen base layers run on
        if dtype is torch.bfloat16 and not bf16_fast and dnn:
            # no bfloat16 GEMM here (oneDNN builds none without AVX-512, torch's is a scalar
            # loop): the engines compute bfloat16 layers in float32, and so does this ceiling
            kernels = {"float32": lambda: torch.ops.mkldnn._linear_pointwise(a.float(), b_t.float(), None, "none",
                                                                             [], "")}
        else:
            kernels = {"mm": lambda: torch.mm(a, b)}  # MKL in float32 on CPU builds
            if dnn:
                kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
        for name, run in kernels.items():
            peaks[f"{key}_{name}"] = round(2 * n**3 / _best_seconds(run, repeats) / 1e9, 1)
        peaks[key] = max(peaks[f"{key}_{name}"] for name in kernels)  # the machine's, by its fastest kernel
    source = torch.empty(COPY_BYTES // 4)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), repeats)
    peaks["copy_gb_s"] = round(2 * COPY_BYTES / seconds / 1e9, 2)  # bytes read + written
    return peaks


def best_peaks(*measured: dict | None) -> dict:
    """The machine's ceilings over several measurements (the best of each): on a shared
    machine a ceiling measured while a neighbour ran would flatter every ratio to it."""
    found = [m for m in measured if m]
    return {key: max(m[key] for m in found) for key in found[0]}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes a decoder's cost depends on (a dense Llama-style model)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, model_dir: Path) -> ModelShape:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], heads,
                   config.get("num_key_value_heads", heads), config.get("head_dim") or config["hidden_size"] // heads,
                   config["vocab_size"])

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's linears: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def token_flops(self, lora_rank: int, context: int, with_head: bool) -> float:
        """FLOPs of one token through the model: the linears, LoRA of `lora_rank` on every
        one of them, attention over `context` positions, and the vocab head if `with_head`."""
        per_layer = sum(2 * i * o + 2 * lora_rank * (i + o) for i, o in self.linear_shapes())
        per_layer += 4 * self.heads * self.head_dim * context
        return self.layers * per_layer + (2 * self.hidden * self.vocab if with_head else 0)

    def training_flops(self, rows: int, seq_len: int, lora_rank: int) -> float:
        """FLOPs of one LoRA forward_backward over `rows` rows of `seq_len` tokens: the
        forward (vocab head at every position, causal attention over positions 1..T), the
        activation gradients of the frozen linears and the head (as much again), and LoRA
        and attention backward (twice their forward: gradients of inputs and of factors,
        of queries and of keys/values). The frozen weights get no gradient."""
        total = 0.0
        for position in range(1, seq_len + 1):
            base = self.token_flops(0, 0, True)
            lora = self.token_flops(lora_rank, 0, False) - self.token_flops(0, 0, False)
            attention = self.token_flops(0, position, False) - self.token_flops(0, 0, False)
            total += 2 * base + 3 * lora + 3 * attention
        return rows * total

    def weight_elements(self) -> int:
        """Weights a decode step reads: every layer's linears and the vocab head."""
        return self.layers * sum(i * o for i, o in self.linear_shapes()) + self.hidden * self.vocab

    def kv_elements(self, context: int) -> int:
        """Keys and values one row's attention reads at `context` positions."""
        return 2 * self.layers * self.kv_heads * self.head_dim * context


def sampling_bound(shape: ModelShape, rows: int, prompt_len: int, new_tokens: int, lora_rank: int,
                   peak_gflops: float, copy_gb_s: float, bytes_per_weight: int = 4) -> dict:
    """The roofline of one sampling round: `rows` prompts of `prompt_len` tokens prefilled
    together (which gives each row its first new token), then `new_tokens - 1` decode
    steps of all rows. Each step costs the larger of its
    FLOPs at `peak_gflops` and its bytes (weights once, every row's KV cache) at
    `copy_gb_s` (a copy's rate, reads and writes counted). Returns the seconds of each part
    and the tokens/s bound."""
    prefill_flops = rows * (sum(shape.token_flops(lora_rank, c, False) for c in range(1, prompt_len + 1))
                            + 2 * shape.hidden * shape.vocab)
    prefill_s = prefill_flops / (peak_gflops * 1e9)
    decode_s = 0.0
    compute_bound_steps = 0
    for step in range(new_tokens - 1):
        context = prompt_len + step + 1
        compute = rows * shape.token_flops(lora_rank, context, True) / (peak_gflops * 1e9)
        memory = (shape.weight_elements() + rows * shape.kv_elements(context)) * bytes_per_weight / (copy_gb_s * 1e9)
        decode_s += max(compute, memory)
        compute_bound_steps += compute >= memory
    seconds = prefill_s + decode_s
    return {"prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "compute_bound_steps": compute_bound_steps, "steps": new_tokens - 1,
            "tokens_per_s": round(rows * new_tokens / seconds, 1)}


def frozen_gemm_gflops(shape: ModelShape, tokens: int, repeats: int = 3) -> float:
    """GFLOP/s of the frozen base's own GEMMs at a training pass's shapes: every layer's
    linears and the vocab head over `tokens` rows, the forward and the input gradient, on
    oneDNN as the engines run them (float32), one weight per layer, each shape's layers
    timed together (best of `repeats`). A fused pass cannot beat its base GEMMs, so
    this rate over the matmul peak bounds its model FLOP utilisation from above."""
    import collections

    import torch

    counts = collections.Counter({(i, o): 0 for i, o in shape.linear_shapes()})
    for i, o in shape.linear_shapes():
        counts[(i, o)] += shape.layers
    counts[(shape.hidden, shape.vocab)] += 1
    flops = seconds = 0.0
    for (i, o), count in counts.items():
        # one weight per layer, as the model has them: one weight used again and again would
        # stay in the cache, which a pass through the model's weights does not
        weights, x, grad = [torch.randn(o, i) for _ in range(count)], torch.randn(tokens, i), torch.randn(tokens, o)

        def run() -> None:
            for weight in weights:
                torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
                torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")

        seconds += _best_seconds(run, repeats)
        flops += count * 4 * tokens * i * o
    return round(flops / seconds / 1e9, 1)
