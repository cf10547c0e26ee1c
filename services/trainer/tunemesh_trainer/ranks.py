"""The processes of a trainer's rank group: forming it, watching it, its workers' entry point.

A trainer with W > 1 ranks is a process group (see engine/rank_group.py for what the
ranks do in it). Ranks come from torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment) or from this module: `local_group` /
`shared_local_group` start ranks 1..W-1 on this host as `python -m tunemesh_trainer.ranks`
and join as rank 0; a watchdog thread reports a worker that exits while its group lives.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tunemesh.errors import InternalError
from tunemesh_trainer.engine.rank_group import RankGroup, serve_rank

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.5  # how often the watchdog looks for a lost rank
WORKER_MODULE = "tunemesh_trainer.ranks"  # what `python -m` runs in a local worker
TIMEOUT_ENV = "TUNEMESH_RANK_TIMEOUT_S"  # a local worker's collective timeout: rank 0's
DEFAULT_TIMEOUT_S = 600.0
WorkerLost = Callable[[int, int], None]  # (rank, exit code)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun, deepspeed) started it, else None."""
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and "WORLD_SIZE" in os.environ else None


def rank_env(rank: int, world: int, port: int, threads: int = 0,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str]:
    """Environment of rank `rank` of a local group on 127.0.0.1:`port`: on a host with at
    least `world` CUDA devices rank r uses device r (nccl), else the CPU (gloo), unless
    DS_ACCELERATOR is set already."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR") or ("cuda" if _cuda_devices() >= world else "cpu"),
           TIMEOUT_ENV: str(timeout_s)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_local_workers(world: int, port: int, threads: int = 0,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 on this host as `python -m tunemesh_trainer.ranks`."""
    return [
        subprocess.Popen([sys.executable, "-m", WORKER_MODULE],
                         env={**os.environ, **rank_env(rank, world, port, threads, timeout_s)})
        for rank in range(1, world)
    ]


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Join the process group described by the environment; return the gloo control group.

    `timeout_s` bounds every collective: a rank that died stops the others after it."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    timeout = datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    logger.info("joined rank %d of %d", dist.get_rank(), dist.get_world_size())
    return control


@contextlib.contextmanager
def local_group(world: int, threads: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[RankGroup]:
    """A group of `world` ranks on this host with this process as rank 0 (workers are
    subprocesses), closed on exit. A process can form one group only: see shared_local_group."""
    saved = dict(os.environ)
    group, workers = _form(world, threads, timeout_s)
    try:
        yield group
    finally:
        group.close()
        for worker in workers:
            _stop(worker)
        os.environ.clear()
        os.environ.update(saved)


_SHARED: dict[int, RankGroup] = {}


def shared_local_group(world: int, threads: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                       on_worker_exit: WorkerLost | None = None) -> RankGroup:
    """This process's one local group of `world` ranks, formed on first use, closed at exit
    (a second group formed in the same process after closing one hangs in DeepSpeed).
    `on_worker_exit(rank, code)` is called (from a watchdog thread) if a worker exits
    before the group closes: the group cannot go on without it."""
    if world not in _SHARED:
        if _SHARED:
            raise InternalError("GROUP_EXISTS", f"this process already leads a group of {next(iter(_SHARED))} ranks")
        group, workers = _form(world, threads, timeout_s)
        _SHARED[world] = group
        closing = threading.Event()
        if on_worker_exit is not None:
            threading.Thread(target=_watch_workers, args=(workers, closing, on_worker_exit), daemon=True,
                             name="rank-watchdog").start()

        def close() -> None:
            closing.set()
            group.close()
            for worker in workers:
                _stop(worker)

        atexit.register(close)
    return _SHARED[world]


def _watch_workers(workers: list[subprocess.Popen], closing: threading.Event, on_exit: WorkerLost) -> None:
    while not closing.wait(WATCH_PERIOD_S):
        for rank, worker in enumerate(workers, start=1):
            code = worker.poll()
            if code is not None and not closing.is_set():
                on_exit(rank, code)
                return


def _form(world: int, threads: int, timeout_s: float) -> tuple[RankGroup, list[subprocess.Popen]]:
    """Start the workers and join as rank 0. The rank's environment (RANK, MASTER_PORT, ...)
    stays set while the group lives: the collectives need it."""
    port = free_port()
    workers = start_local_workers(world, port, threads, timeout_s)
    os.environ.update(rank_env(0, world, port, timeout_s=timeout_s))
    try:
        return group_with_keepalive(join_group(timeout_s), timeout_s), workers
    except BaseException:
        for worker in workers:
            worker.kill()
        raise


def group_with_keepalive(control: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> RankGroup:
    """Rank 0's RankGroup on `control`, with a thread that keeps idle followers from
    timing out: every quarter of `timeout_s` with nothing sent, a KEEPALIVE goes out."""
    group = RankGroup(control)

    def keep() -> None:
        seen: int | None = 0
        while seen is not None:
            time.sleep(timeout_s / 4)
            seen = group.keep_alive(seen)

    threading.Thread(target=keep, daemon=True, name="rank-keepalive").start()
    return group


def _stop(worker: subprocess.Popen) -> None:
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def main() -> None:
    """A local worker: join the group its environment describes and follow rank 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_rank(join_group(float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))))


if __name__ == "__main__":
    # Run through the imported module, not as __main__: whatever rank 0 pickles must
    # unpickle to the very classes this worker compares with. The RankCall members live in
    # tunemesh_trainer.engine.rank_group, never run as __main__; keep it that way here too.
    from tunemesh_trainer import ranks

    ranks.main()
