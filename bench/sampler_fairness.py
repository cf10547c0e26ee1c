"""Sampling fairness (issue 15, item 2d): while tenant A holds a long 16-sample generation,
tenant B's short sample should finish within 2x its solo time.

    python bench/sampler_fairness.py                                   # tiny-dense
    python bench/sampler_fairness.py --model HuggingFaceTB/SmolLM2-135M-Instruct --a-tokens 256
    python bench/sampler_fairness.py --json bench/results/sampler_fairness.json

One mesh (etcd, scheduler, trainer, one torch-engine sampler) on loopback; A and B are two
tenants (two API keys) sampling the base model through the SDK. B times `--b-calls` short
samples (1 sample, `--b-tokens` new tokens) alone, then the same while A's generation of 16
samples x `--a-tokens` runs (only B's calls that ended before A's did count). Both are
measured in one run; the figure is the ratio of B's medians, contended / solo. The sampler's
engine batches continuously: B's rows join A's running decode loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TINY, BenchMesh, log, write_json  # noqa: E402


def b_sample_seconds(client, prompt, tokens: int, calls: int, until: threading.Event | None = None,
                     first: list | None = None) -> list[float]:
    """Seconds of each of B's samples (greedy, `tokens` new); with `until`, only those that
    ended before it was set (the first call's seconds go to `first` in any case)."""
    import tunemesh

    params = tunemesh.SamplingParams(max_tokens=tokens, temperature=0.0)
    seconds = []
    for _ in range(calls):
        began = time.perf_counter()
        client.sample(prompt, num_samples=1, sampling_params=params).result(timeout=600)
        if first is not None and not first:
            first.append(time.perf_counter() - began)
        if until is None or not until.is_set():
            seconds.append(time.perf_counter() - began)
    return seconds


def measure(mesh: BenchMesh, args: argparse.Namespace) -> dict:
    import tunemesh

    with tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[0]) as a_service, \
            tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[1]) as b_service:
        a = a_service.create_sampling_client(base_model=mesh.model)
        b = b_service.create_sampling_client(base_model=mesh.model)
        prompt = tunemesh.ModelInput.from_ints(list(range(11, 11 + args.prompt_tokens)))
        b_sample_seconds(b, prompt, args.b_tokens, 2)  # warm-up: the sampler's first calls
        solo = b_sample_seconds(b, prompt, args.b_tokens, args.b_calls)
        log(f"B solo: median {statistics.median(solo) * 1000:.0f} ms over {len(solo)}")
        a_done, a_seconds = threading.Event(), []

        def flood() -> None:
            began = time.perf_counter()
            params = tunemesh.SamplingParams(max_tokens=args.a_tokens, temperature=1.0, seed=1)
            a.sample(prompt, num_samples=16, sampling_params=params).result(timeout=3600)
            a_seconds.append(time.perf_counter() - began)
            a_done.set()

        thread = threading.Thread(target=flood)
        thread.start()
        time.sleep(args.a_head_start_s)  # A's rows are decoding when B starts
        first: list[float] = []
        contended = b_sample_seconds(b, prompt, args.b_tokens, args.b_calls, until=a_done, first=first)
        thread.join()
    log(f"B's first call started during A's generation: {first[0] * 1000:.0f} ms")
    if not contended:  # B's calls waited for A's whole generation (an engine without continuous batching)
        return {"b_solo_median_ms": round(statistics.median(solo) * 1000, 1), "b_first_contended_ms":
                round(first[0] * 1000, 1), "ratio_first_solo": round(first[0] / statistics.median(solo), 3),
                "a_seconds": round(a_seconds[0], 2), "note": "no call of B ended before A's generation did"}
    log(f"B with A's 16 x {args.a_tokens}: median {statistics.median(contended) * 1000:.0f} ms over "
        f"{len(contended)}; A took {a_seconds[0]:.1f} s")
    ratio = statistics.median(contended) / statistics.median(solo)
    return {"b_solo_ms": [round(s * 1000, 1) for s in solo], "b_contended_ms": [round(s * 1000, 1) for s in contended],
            "b_solo_median_ms": round(statistics.median(solo) * 1000, 1),
            "b_contended_median_ms": round(statistics.median(contended) * 1000, 1),
            "ratio_contended_solo": round(ratio, 3), "aim": "<= 2", "met": ratio <= 2.0,
            "b_first_contended_ms": round(first[0] * 1000, 1),
            "a_seconds": round(a_seconds[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--a-tokens", type=int, default=100, help="new tokens of each of A's 16 samples")
    parser.add_argument("--b-tokens", type=int, default=8, help="new tokens of B's sample")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--b-calls", type=int, default=10)
    parser.add_argument("--a-head-start-s", type=float, default=0.5)
    parser.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    result = {"model": args.model, "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
              "a": {"samples": 16, "tokens": args.a_tokens}, "b": {"samples": 1, "tokens": args.b_tokens}}
    with tempfile.TemporaryDirectory(prefix="tunemesh-sampler-fairness-") as state, \
            BenchMesh(args.model, args.data_dir, Path(state), tenants=2, samplers=1) as mesh:
        result.update(measure(mesh, args))
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"(d) B's median with A's long generation / solo: {result.get('ratio_contended_solo')} (aim <= 2); "
          f"B's first call {result['b_first_contended_ms']} ms, solo median {result['b_solo_median_ms']} ms")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
