"""Per-call cost of API key authentication, against the old plain dict lookup in the same run.

    python bench/auth_cost.py [--keys 1000] [--calls 20000] [--json bench/results/auth_cost.json]

Times `KeyAuthenticator` on one event loop, as the scheduler's interceptor calls it:
a key verified before (the cache: SHA-256 + constant-time compare), a key seen for the
first time (one scrypt run, in a worker thread), a wrong key (one scrypt run), and the
dict lookup the scheduler did before keys were hashed. `--keys` records are in the ring:
a call hashes against the one its id names, whatever their number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000, help="records in the keys file")
    parser.add_argument("--calls", type=int, default=20000, help="calls timed on the cached path")
    parser.add_argument("--kdf-calls", type=int, default=30, help="calls timed on each KDF path")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    result = asyncio.run(measure(args.keys, args.calls, args.kdf_calls))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


async def measure(n_keys: int, calls: int, kdf_calls: int) -> dict:
    from tunemesh_common.service import api_keys
    from tunemesh_common.service.throttle import FailureThrottle

    made = [api_keys.new_key(f"tenant-{i % 50}") for i in range(n_keys)]
    ring = api_keys.KeyRing(fixed=[record for _, record in made])
    auth = api_keys.KeyAuthenticator(ring, FailureThrottle(max_failures=1 << 30))
    keys = [key for key, _ in made]
    plain = {key: record.tenant for key, record in made}
    peer = "ipv4:127.0.0.1:50000"

    def old(metadata):  # what the scheduler did before: parse the header, dict lookup
        return plain.get(api_keys.api_key_from_metadata(metadata))

    first = [{"authorization": f"Bearer {key}"} for key in keys[:kdf_calls]]
    uncached = [await _timed(auth(m, peer)) for m in first]  # each key's first call
    wrong = []
    for key in keys[:kdf_calls]:
        try:
            await _timed(auth({"authorization": f"Bearer {key[:-2]}zz"}, peer), wrong)
        except Exception:  # noqa: BLE001 - the refusal is what is timed
            pass
    hot = [{"authorization": f"Bearer {keys[i % kdf_calls]}"} for i in range(calls)]
    start = time.perf_counter()
    for metadata in hot:
        await auth(metadata, peer)
    cached_s = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    for metadata in hot:
        old(metadata)
    old_s = (time.perf_counter() - start) / calls
    kdf = made[0][1].kdf
    return {
        "keys_in_ring": n_keys, "kdf": f"scrypt n={kdf.n} r={kdf.r} p={kdf.p} dklen={kdf.dklen}",
        "old_dict_lookup_us": round(old_s * 1e6, 2),
        "cached_us": round(cached_s * 1e6, 2),
        "first_use_ms_median": round(statistics.median(uncached) * 1e3, 2),
        "wrong_key_ms_median": round(statistics.median(wrong) * 1e3, 2) if wrong else None,
        "cached_over_old": round(cached_s / old_s, 1),
    }


async def _timed(coro, into: list | None = None) -> float:
    start = time.perf_counter()
    try:
        await coro
    finally:
        elapsed = time.perf_counter() - start
        if into is not None:
            into.append(elapsed)
    return elapsed


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
