"""Recovery time after a SIGKILL, and the price of durability (journal + snapshots on vs off).

    python bench/recovery.py                                  # tiny-dense: 10 trainer + 10 scheduler kills, price
    python bench/recovery.py --quick                          # tiny-dense, 2 kills each, 1 price pair
    python bench/recovery.py --model HuggingFaceTB/SmolLM2-135M-Instruct --parts price \
        --json bench/results/recovery_smollm2.json            # SmolLM2 2x64, 8 steps (slow)

Recovery (mesh: etcd, checkpoint service, two trainers of the model, one scheduler): a
few runs pipeline forward_backward + optim_step on their own threads; every future's
resolution is stamped with time.monotonic in a done callback. A trainer fault SIGKILLs
the trainer holding the most runs, waits until each of its runs completes an operation,
then restarts it (the next kill again finds two trainers); a scheduler fault SIGKILLs the
scheduler and starts it again at once. Recovery of a run = its first future resolving
after the kill (results computed before it and delivered within IN_FLIGHT_S are counted
apart). Every run must complete an operation right before each kill, or the bench stops
with a diagnosis; the kill then comes at a random point of a step (`--kill-at random`) or
at once (`round-end`). A restarted trainer takes half the runs back, so a trainer kill
moves runs onto a trainer busy with others. Price: 8 tenants' runs on one trainer, aggregate training tokens/s with
TUNEMESH_SCHEDULER_DURABLE=true vs false, a fresh mesh per repeat, on/off alternating.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402
    ADAM, SMOLLM2, TINY, Workload, _with_data_dir, log, mesh_seconds, sdk_datums, token_rows, write_json,
)

LEASE_TTL_S = 5.0  # a trainer's etcd lease (tunemesh_common.membership.registry), kept alive every ttl/3
IN_FLIGHT_S = 0.2  # resolutions this soon after a kill were computed before it (no fault recovers faster)
RESULT_TIMEOUT_S = 180.0  # longest wait for one future of a pipeline
# `asctime level name: message`, and the context the services append: ` [run=... node=...]`
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ [\w.]+: (.*?)(?: \[(?:\w+=\S+ ?)+\])?$")


# pure helpers --------------------------------------------------------------------------


def percentiles_s(seconds: list[float]) -> dict[str, float]:
    """n, p50, p95 and max of durations in seconds."""
    p50, p95 = np.percentile(seconds, [50, 95])
    return {"n": len(seconds), "p50_s": round(float(p50), 3), "p95_s": round(float(p95), 3),
            "max_s": round(float(max(seconds)), 3)}


def first_after(times: list[float], t: float) -> float | None:
    """The first of `times` (in resolution order) later than `t`."""
    return next((x for x in times if x > t), None)


def recovery_sample(times: list[float], t_kill: float) -> dict:
    """One affected run after a kill at `t_kill`: `first_s` (its first resolution after the
    kill), `in_flight` (resolutions within IN_FLIGHT_S: results computed before the kill
    and delivered after it) and `recovered_s` (its first resolution after those)."""
    first, recovered = first_after(times, t_kill), first_after(times, t_kill + IN_FLIGHT_S)
    return {"first_s": round(first - t_kill, 3) if first is not None else None,
            "in_flight": sum(t_kill < x <= t_kill + IN_FLIGHT_S for x in times),
            "recovered_s": round(recovered - t_kill, 3) if recovered is not None else None}


def step_period_s(times: list[float], since: float, until: float) -> float | None:
    """Seconds per training step of one run over [since, until]: a step resolves two
    futures (forward_backward, optim_step)."""
    resolved = sum(since <= x <= until for x in times)
    return 2 * (until - since) / resolved if resolved >= 4 else None


def recent_step_period_s(traces: list[list[float]], now: float, window_s: float = 30.0) -> float | None:
    """Median step period of runs over the last `window_s` seconds (None: too few steps)."""
    periods = [p for times in traces if (p := step_period_s(times, now - window_s, now)) is not None]
    return float(np.median(periods)) if periods else None


def kill_pause_s(rng: random.Random, step_period: float | None, kill_at: str) -> float:
    """How long after every run's latest resolution the kill comes: at once (`round-end`:
    the trainer has just started a round and the last step's snapshots are still being
    written, the worst moment for a move) or at a uniformly random point of a step
    (`random`: a fault at a random time)."""
    if kill_at == "round-end" or not step_period:
        return 0.0
    return rng.uniform(0.0, step_period)


def recovery_summary(kills: list[dict], baseline_s: float | None, per_kill: dict[str, float] | None = None) -> dict:
    """Percentiles of every affected run's recovery over all kills, and ratios to the
    steady step period of the same runs (and to `per_kill` references, e.g. the lease TTL)."""
    samples = [s for k in kills for s in k["runs"].values()]
    first = percentiles_s([s["first_s"] for s in samples])
    recovered = percentiles_s([s["recovered_s"] for s in samples])
    ratios = {"recovered_p50_over_step_period": round(recovered["p50_s"] / baseline_s, 1)} if baseline_s else {}
    for name, reference in (per_kill or {}).items():
        ratios[f"recovered_p50_over_{name}"] = round(recovered["p50_s"] / reference, 2)
    return {"kills": len(kills), "first": first, "recovered": recovered,
            "step_period_s": round(baseline_s, 4) if baseline_s else None,
            "samples_with_in_flight": sum(s["in_flight"] > 0 for s in samples), "ratios": ratios,
            "breakdown_p50_s": breakdown(kills)}


def breakdown(kills: list[dict]) -> dict:
    """Medians over the kills of when each stage was reached (seconds after the kill, from
    the scheduler's log and the bench's restart), and of the calls replayed per run."""
    stages = {}
    for key in ("trainer_left_s", "last_replay_s", "leading_s", "recovered_state_s", "serving_s"):
        values = [k["scheduler_log"][key] for k in kills if key in k["scheduler_log"]]
        if values:
            stages[key] = round(float(np.median(values)), 3)
    stages["restart_s"] = round(float(np.median([k["restart_s"] for k in kills])), 3)
    replayed = [n for k in kills for n in k["scheduler_log"]["replayed_calls"].values()]
    if replayed:
        stages["replayed_calls_per_run"] = float(np.median(replayed))
    return stages


def log_entries(text: str) -> list[tuple[float, str]]:
    """(epoch seconds, message) of each line a service logged (`asctime level name: message`)."""
    entries = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1e3
            entries.append((stamp, match[3]))
    return entries


def log_events(entries: list[tuple[float, str]], since_wall: float) -> dict:
    """What the scheduler logged after `since_wall`, as seconds after it: the first trainer
    leaving, run moves and replays (calls replayed per run), and, after a restart, when it
    took the leadership, recovered its state and served."""
    events: dict = {"replayed_calls": {}}
    for stamp, message in entries:
        if stamp < since_wall:
            continue
        at = round(stamp - since_wall, 3)
        if (m := re.fullmatch(r"trainer (\S+) left", message)) and "trainer_left_s" not in events:
            events["trainer_left_s"] = at
        elif m := re.fullmatch(r"replayed (\d+) calls of (\S+) on (\S+)", message):
            events["replayed_calls"][m[2]] = int(m[1])
            events["last_replay_s"] = at
        elif message.startswith("recovered ") and "sessions" in message:
            events["recovered_state_s"], events["recovered"] = at, message
        elif message.startswith("leading ") and "leading_s" not in events:  # the etcd leadership (replicas)
            events["leading_s"] = at
        elif re.match(r"scheduler (leading and )?serving on", message):
            events["serving_s"] = at
    return events


PRICE_MODES = {  # scheduler settings of each side of the price
    "on": {"TUNEMESH_SCHEDULER_DURABLE": "true"},
    "off": {"TUNEMESH_SCHEDULER_DURABLE": "false"},
    "journal": {"TUNEMESH_SCHEDULER_DURABLE": "true", "TUNEMESH_SCHEDULER_SNAPSHOT_EVERY_STEPS": "0",
                "TUNEMESH_SCHEDULER_SNAPSHOT_EVERY_S": "0",
                "TUNEMESH_SCHEDULER_SNAPSHOT_REPLAY_BUDGET_S": "0"},  # the journal without snapshots
    "plain": {"TUNEMESH_SCHEDULER_DURABLE": "true"},  # as "on", with every hop in plaintext (--insecure)
}


def price_order(pairs: int, modes: tuple[str, ...] = ("on", "off")) -> list[str]:
    """The mode of each mesh: every mode once per group, mirrored group by group
    (on off off on ...) so drift on a shared machine hits them alike."""
    return [mode for i in range(pairs) for mode in (modes if i % 2 == 0 else modes[::-1])]


def price_summary(rounds: list[dict]) -> dict:
    """Median tokens/s per mode, each mode's ratio to durability off (medians), and the
    ratio within each group of meshes."""
    by_mode: dict[str, list[float]] = {}
    for r in rounds:
        by_mode.setdefault(r["mode"], []).append(r["tokens_per_s"])
    summary = {f"{mode}_tokens_per_s": round(float(np.median(v)), 1) for mode, v in by_mode.items()}
    for mode in by_mode.keys() - {"off"}:
        summary[f"ratio_{mode}_off"] = round(float(np.median(by_mode[mode]) / np.median(by_mode["off"])), 3)
        summary[f"group_ratios_{mode}_off"] = [round(a / b, 3) for a, b in zip(by_mode[mode], by_mode["off"])]
    if "plain" in by_mode:  # the price of TLS: durable meshes with TLS on every hop over plaintext ones
        summary["ratio_on_plain"] = round(float(np.median(by_mode["on"]) / np.median(by_mode["plain"])), 3)
        summary["group_ratios_on_plain"] = [round(a / b, 3) for a, b in zip(by_mode["on"], by_mode["plain"])]
    return summary


def format_report(result: dict) -> str:
    lines = [f"{result['model']}, {result['cpu_count']} CPUs, load average (1 min) {result['load_average_1m']}"]
    for fault, r in result.get("recovery", {}).items():
        lines.append(f"{fault} SIGKILL, {r['kills']} kills: recovered p50 {r['recovered']['p50_s']} s, "
                     f"p95 {r['recovered']['p95_s']} s, max {r['recovered']['max_s']} s (n={r['recovered']['n']}); "
                     f"first resolution p50 {r['first']['p50_s']} s; ratios {r['ratios']}; "
                     f"stages (p50, s after the kill) {r['breakdown_p50_s']}")
    if price := result.get("price"):
        s = price["summary"]
        for mode in ("on", "journal"):
            if f"ratio_{mode}_off" in s:
                lines.append(f"durability {mode}/off: {s[f'{mode}_tokens_per_s']} / {s['off_tokens_per_s']} tok/s = "
                             f"{s[f'ratio_{mode}_off']} (groups {s[f'group_ratios_{mode}_off']})")
    return "\n".join(lines)


# the mesh ------------------------------------------------------------------------------


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (the mesh's children inherit them, restarts included)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Mesh:
    """etcd, the checkpoint service, `trainers` trainers of `model` (sharing the model
    cache `data_dir`) and the scheduler, with `env` set for every service it starts."""

    def __init__(self, model: str, data_dir: Path, state_dir: Path, trainers: int, tenants: int,
                 env: dict[str, str] | None = None, insecure: bool = False) -> None:
        self.model, self.data_dir, self.state_dir, self.trainers = model, data_dir, state_dir, trainers
        self.insecure = insecure  # plaintext hops (the default mesh runs TLS everywhere)
        self.keys, self.env, self._stack = [f"bench-key-{i}" for i in range(tenants)], env or {}, None
        self.address = ""

    def __enter__(self) -> Mesh:
        from tunemesh_local import launcher

        self.state_dir.mkdir(parents=True, exist_ok=True)
        from tunemesh_common.service import api_keys

        keys_file = self.state_dir / "bench_api_keys.json"  # hashed; the keys stay in self.keys
        made = [api_keys.new_key(f"tenant-{i}") for i in range(len(self.keys))]
        self.keys = [key for key, _ in made]
        api_keys.write_key_file(keys_file, [record for _, record in made])
        replicas = {"schedulers": 1} if "schedulers" in launcher.MeshConfig.__dataclass_fields__ else {}
        config = launcher.MeshConfig(self.state_dir, trainers=self.trainers, models=(self.model,),
                                     api_keys_file=keys_file, samplers=0, ready_timeout=300.0,
                                     insecure=self.insecure, **replicas)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(environ(self.env))
        try:
            mesh = launcher.up(config, services=self._services)
            self.address = mesh.scheduler_address
            if mesh.ca_file:  # TLS (the default): this process's clients trust the mesh CA
                self._stack.enter_context(environ({"TUNEMESH_CA_BUNDLE": mesh.ca_file}))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        from tunemesh_local import launcher

        try:
            launcher.down(self.state_dir, grace=10.0)
        finally:
            self._stack.close()

    def _services(self, config, etcd_endpoint: str, api_keys_file: Path) -> list:
        from tunemesh_local import launcher

        specs = launcher.default_services(config, etcd_endpoint, api_keys_file)
        return [dataclasses.replace(spec, argv=_with_data_dir(spec.argv, self.data_dir)) for spec in specs]

    def kill(self, name: str) -> tuple[float, float]:
        """SIGKILL service `name` and reap it; returns (monotonic, wall) time of the kill."""
        from tunemesh_local import processes, state

        record = next(p for p in state.load(self.state_dir).processes if p.name == name)
        at = time.monotonic(), time.time()
        os.kill(record.pid, signal.SIGKILL)
        processes.terminate([(record.pid, record.start_time)], grace=5.0)
        return at

    def restart(self, name: str) -> None:
        """Start `name` again on its address; returns once it is ready (bounded)."""
        from tunemesh_local import launcher

        launcher.restart(self.state_dir, name, timeout=120.0)

    def log_text(self, name: str) -> str:
        return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")


# recovery ------------------------------------------------------------------------------


class RunTrace:
    """When each future of one run resolved (monotonic), and any that failed."""

    def __init__(self) -> None:
        self.resolved: list[float] = []
        self.errors: list[str] = []
        self.submitted = 0
        self._changed = threading.Condition()

    def note(self, future) -> None:
        at = time.monotonic()
        with self._changed:
            error = future.exception()
            if error is None:
                self.resolved.append(at)
            else:
                self.errors.append(repr(error))
            self._changed.notify_all()

    def wait_after(self, t: float, timeout_s: float) -> bool:
        """Whether a future resolved after `t` within `timeout_s`."""
        with self._changed:
            return self._changed.wait_for(lambda: first_after(self.resolved, t) is not None or self.errors,
                                          timeout_s) and not self.errors

    def times(self) -> list[float]:
        with self._changed:
            return list(self.resolved)


def pipeline(client, datums: list, trace: RunTrace, stop: threading.Event, depth: int) -> None:
    """forward_backward + optim_step until `stop`, at most `depth` steps in flight."""
    import tunemesh

    adam, in_flight = tunemesh.AdamParams(**ADAM), collections.deque()
    while not stop.is_set():
        pair = (client.forward_backward(datums, "cross_entropy"), client.optim_step(adam))
        trace.submitted += 2
        for future in pair:
            future.add_done_callback(trace.note)
        in_flight.append(pair)
        while len(in_flight) >= depth:
            for future in in_flight.popleft():
                future.result(timeout=RESULT_TIMEOUT_S)
    for pair in in_flight:
        for future in pair:
            future.result(timeout=RESULT_TIMEOUT_S)


class Pipelines:
    """`runs` runs (one tenant each) pipelining steps on their own threads."""

    def __init__(self, mesh: Mesh, vocab_size: int, workload: Workload, runs: int) -> None:
        import tunemesh

        self.services = [tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[i]) for i in range(runs)]
        self.clients = [s.create_lora_training_client(mesh.model, rank=workload.rank, seed=i)
                        for i, s in enumerate(self.services)]
        self.traces = {c.run: RunTrace() for c in self.clients}
        self.stop, self.failures = threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(c, vocab_size, workload, i), daemon=True)
                        for i, c in enumerate(self.clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, client, vocab_size: int, workload: Workload, index: int) -> None:
        datums = sdk_datums(token_rows(vocab_size, workload.batch, workload.seq_len, workload.seed + index))
        try:
            pipeline(client, datums, self.traces[client.run], self.stop, workload.depth)
        except BaseException as err:  # noqa: BLE001 - reported by close()
            self.failures.append(f"{client.run}: {err!r}")

    def placement(self) -> dict[str, str]:
        """Run -> the trainer holding it now."""
        return {c.run: c.get_info().trainer_node for c in self.clients}

    def close(self, abort: bool = False) -> list[str]:
        """Stop the pipelines and join them (bounded; `abort`: fail their pending futures
        first instead of draining them); returns every failure seen."""
        self.stop.set()
        for service in self.services if abort else ():
            service.close()
        for thread in self.threads:
            thread.join(timeout=RESULT_TIMEOUT_S)
        for service in self.services:
            service.close()
        return self.failures + [f"{run}: {e}" for run, t in self.traces.items() for e in t.errors]


class RecoveryTimeout(RuntimeError):
    """A run did not complete an operation within the bound around a kill, or one failed."""

    kills: list[dict] = []  # the kills measured before this one


def await_progress(mesh: Mesh, pipes: Pipelines, runs: list[str], since: float, timeout_s: float, what: str) -> None:
    """Block until every run in `runs` resolved a future after `since`; if one does not
    within `timeout_s` (or a future failed), write a diagnosis and raise."""
    deadline = time.monotonic() + timeout_s
    for run in runs:
        if not pipes.traces[run].wait_after(since, max(0.0, deadline - time.monotonic())):
            report = mesh.state_dir / "recovery_timeout.txt"
            report.write_text(diagnosis(mesh, pipes, since))
            tail = "\n".join(mesh.log_text("scheduler").splitlines()[-40:])
            errors = pipes.traces[run].errors
            failed = f"had an operation fail {what}: {errors}" if errors else \
                f"completed nothing within {timeout_s:.0f} s {what}"
            raise RecoveryTimeout(f"{run} {failed}; diagnosis in {report}; scheduler log tail:\n{tail}")


def diagnosis(mesh: Mesh, pipes: Pipelines, t_kill: float) -> str:
    """What the bench and the scheduler know of each run after a kill: futures submitted
    and resolved, the run's step and trainer, the scheduler's operation metrics, and
    where every bench thread stands."""
    import faulthandler
    import urllib.request

    from tunemesh_local import state

    lines = []
    for client in pipes.clients:
        trace, info = pipes.traces[client.run], _bounded(client.get_info, 10.0)
        lines.append(f"{client.run}: submitted {trace.submitted}, resolved {len(trace.times())} "
                     f"({sum(x > t_kill for x in trace.times())} after the kill), errors {trace.errors}; "
                     f"service says step {getattr(info, 'step', info)} on {getattr(info, 'trainer_node', '?')}")
    record = next(p for p in state.load(mesh.state_dir).processes if p.name == "scheduler")
    try:
        with urllib.request.urlopen(record.metrics_url, timeout=10.0) as response:
            metrics = response.read().decode()
        prefixes = ("tunemesh_scheduler_operations", "tunemesh_scheduler_queue_depth", "tunemesh_scheduler_ready_depth",
                    "tunemesh_scheduler_nodes", "tunemesh_scheduler_runs")
        lines += [m for m in metrics.splitlines() if m.startswith(prefixes)]
    except OSError as err:
        lines.append(f"scheduler metrics at {record.metrics_url!r}: {err!r}")
    with tempfile.TemporaryFile("w+") as stacks:
        faulthandler.dump_traceback(stacks, all_threads=True)
        stacks.seek(0)
        lines.append(stacks.read())
    return "\n".join(lines) + "\n"


def _bounded(call, timeout_s: float):
    """call() on a daemon thread; its result, or a note if it raised or took too long."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_try(call)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else f"(no answer within {timeout_s} s)"


def _try(call):
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - a diagnosis reports whatever happened
        return repr(err)


def one_kill(mesh: Mesh, pipes: Pipelines, fault: str, timeout_s: float, rng: random.Random,
             kill_at: str = "random") -> dict:
    """Kill (and restart) the trainer holding the most runs, or the scheduler; measure."""
    # every run is live right now (a run that recovered from the last kill and then
    # stalled would otherwise be rescued, unseen, by this kill moving it)
    await_progress(mesh, pipes, list(pipes.traces), time.monotonic(), timeout_s, "before this kill")
    placement = pipes.placement()
    victim = collections.Counter(placement.values()).most_common(1)[0][0] if fault == "trainer" else "scheduler"
    affected = [run for run, node in placement.items() if fault == "scheduler" or node == victim]
    period = recent_step_period_s([pipes.traces[run].times() for run in affected], time.monotonic())
    pause = kill_pause_s(rng, period, kill_at)
    time.sleep(pause)
    load = os.getloadavg()[0]
    t_kill, wall = mesh.kill(victim)
    restart_s = None
    if fault == "scheduler":
        mesh.restart(victim)
        restart_s = round(time.monotonic() - t_kill, 3)
    await_progress(mesh, pipes, affected, t_kill + IN_FLIGHT_S, timeout_s, "after the kill")  # see recovery_sample
    if fault == "trainer":
        mesh.restart(victim)  # the next kill finds two trainers again
        restart_s = round(time.monotonic() - t_kill, 3)
    runs = {run: recovery_sample(pipes.traces[run].times(), t_kill) for run in affected}
    events = log_events(log_entries(mesh.log_text("scheduler")), wall)
    return {"victim": victim, "load_average_1m": round(load, 2), "restart_s": restart_s, "runs": runs,
            "step_period_s": period and round(period, 3), "pause_s": round(pause, 3), "scheduler_log": events}


def measure_recovery(args: argparse.Namespace, vocab_size: int, fault: str, root: Path) -> dict:
    """`args.kills` kills of `fault` on a fresh two-trainer mesh with `args.runs` runs."""
    workload = dataclasses.replace(price_workload(args), warmup=0, steps=0)
    rng, kills = random.Random(args.seed), []
    with Mesh(args.model, args.data_dir, root / f"recovery-{fault}", trainers=2, tenants=args.runs) as mesh:
        pipes, aborted = Pipelines(mesh, vocab_size, workload, args.runs), True
        try:
            time.sleep(args.warmup_s)
            for k in range(args.kills):
                time.sleep(rng.uniform(*args.between_s))
                try:
                    kills.append(one_kill(mesh, pipes, fault, args.recovery_timeout, rng, args.kill_at))
                except RecoveryTimeout as err:
                    err.kills = kills
                    raise
                log(f"{fault} kill {k + 1}/{args.kills}: " + ", ".join(
                    f"{run} {s['recovered_s']} s" for run, s in kills[-1]["runs"].items()))
            aborted = False
        finally:
            failures = pipes.close(abort=aborted)
    if failures:
        raise RuntimeError(f"operations failed during the {fault} kills: {failures[:5]}")
    references = {"lease_ttl": LEASE_TTL_S} if fault == "trainer" else {
        "serving": breakdown(kills).get("serving_s") or float(np.median([k["restart_s"] for k in kills]))}
    periods = [k["step_period_s"] for k in kills if k["step_period_s"]]  # each kill's, just before it
    baseline = float(np.median(periods)) if periods else None
    return {**recovery_summary(kills, baseline, references), "runs": args.runs, "kill_at": args.kill_at,
            "workload": dataclasses.asdict(workload), "kill_log": kills}


# the price of durability ---------------------------------------------------------------


def price_workload(args: argparse.Namespace) -> Workload:
    """Defaults: tiny-dense 1 x 32 tokens, 96 steps after 4; others 2 x 64, 8 steps after 1."""
    tiny = args.model == TINY
    return Workload(batch=args.batch or (1 if tiny else 2), seq_len=args.seq_len or (32 if tiny else 64),
                    steps=args.steps or (96 if tiny else 8), warmup=args.warmup if args.warmup is not None
                    else (4 if tiny else 1), rank=args.rank, depth=args.depth)


def price_round(args: argparse.Namespace, vocab_size: int, mode: str, state_dir: Path) -> dict:
    """One fresh one-trainer mesh in `mode` (PRICE_MODES): tokens/s of 8 tenants' runs."""
    workload, load = price_workload(args), os.getloadavg()[0]
    with Mesh(args.model, args.data_dir, state_dir, trainers=1, tenants=args.tenants, env=PRICE_MODES[mode],
              insecure=mode == "plain") as mesh:
        seconds = mesh_seconds(mesh, vocab_size, workload, args.tenants, args.rounds)
        snapshots = sum(m.startswith("snapshot of ") for _, m in log_entries(mesh.log_text("scheduler")))
    tokens = workload.tokens(args.tenants)
    return {"mode": mode, "seconds": [round(s, 3) for s in seconds], "snapshots": snapshots,
            "tokens_per_s": round(tokens / float(np.median(seconds)), 1), "load_average_1m": round(load, 2)}


def measure_price(args: argparse.Namespace, vocab_size: int, root: Path) -> dict:
    modes = ("on", "off", *(("journal",) if args.journal_only else ()), *(("plain",) if args.tls_price else ()))
    rounds = []
    for i, mode in enumerate(price_order(args.price_pairs, modes)):
        rounds.append(price_round(args, vocab_size, mode, root / f"price-{i}"))
        log(f"price {i}: {mode} {rounds[-1]['tokens_per_s']} tok/s, {rounds[-1]['snapshots']} snapshots")
    return {"tenants": args.tenants, "rounds_per_mesh": args.rounds, "modes": {m: PRICE_MODES[m] for m in modes},
            "workload": dataclasses.asdict(price_workload(args)), "summary": price_summary(rounds), "meshes": rounds}


# orchestration ---------------------------------------------------------------------------


def code_version() -> dict:
    """Where the services come from, and its git commit (None outside a checkout)."""
    import subprocess

    import tunemesh_scheduler

    root = Path(tunemesh_scheduler.__file__).resolve().parents[3]
    described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--exclude", "*"],
                               capture_output=True, text=True, check=False)
    return {"root": str(root), "git": described.stdout.strip() or None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=TINY, help=f"registry name (default {TINY}; SmolLM2: {SMOLLM2})")
    p.add_argument("--parts", default="trainer,scheduler,price", help="comma-separated, run in this order: "
                   "trainer, scheduler, price")
    p.add_argument("--kills", type=int, default=10, help="kills per fault kind")
    p.add_argument("--runs", type=int, default=4, help="runs pipelining during the kills (one tenant each)")
    p.add_argument("--warmup-s", type=float, default=8.0, help="pipelining before the first kill")
    p.add_argument("--between-s", default="3,6", help="random pause before each kill, min,max seconds")
    p.add_argument("--kill-at", choices=("random", "round-end"), default="random",
                   help="once every run resolved an operation, kill at a random point of a step (default) or at "
                        "once, right after a round (the worst moment: its snapshots are still being written; "
                        "what sessions before the fourteenth measured)")
    p.add_argument("--recovery-timeout", type=float, default=120.0, help="longest wait for a run after a kill")
    p.add_argument("--tenants", type=int, default=8, help="tenants (one run each) in the price meshes")
    p.add_argument("--price-pairs", type=int, default=3, help="groups of meshes (one per mode) for the price")
    p.add_argument("--journal-only", action="store_true", help="price: also meshes with the journal but no snapshots")
    p.add_argument("--tls-price", action="store_true",
                   help="price: also durable meshes in plaintext (mode plain; every mesh else runs TLS)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per price mesh (median)")
    p.add_argument("--batch", type=int, default=0, help="datums per step (default 1 tiny, 2 otherwise)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per datum (default 32 tiny, 64 otherwise)")
    p.add_argument("--steps", type=int, default=0, help="measured steps per round (default 96 tiny, 8)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 4 tiny, 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--depth", type=int, default=2, help="steps in flight per run")
    p.add_argument("--threads", type=int, default=0, help="torch threads per trainer (0: the launcher's default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the pauses between kills")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--state-dir", type=Path, help="keep the meshes' state and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--note", default="", help="stored with the figures (e.g. which code was measured)")
    p.add_argument("--quick", action="store_true", help="2 kills of each kind, 1 price pair of 16 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.price_pairs, args.rounds, args.warmup_s = 2, 1, 1, 4.0
        args.steps = args.steps or 16
    args.parts = [part for part in args.parts.split(",") if part]
    if not set(args.parts) <= {"trainer", "scheduler", "price"}:
        p.error(f"--parts takes trainer, scheduler and price, got {args.parts}")
    args.between_s = tuple(float(x) for x in args.between_s.split(","))
    return args


def run_part(args: argparse.Namespace, part: str, vocab_size: int, root: Path, result: dict) -> None:
    """Measure one part into `result`; a run that never recovers is recorded, then raised."""
    if part == "price":
        result["price"] = measure_price(args, vocab_size, root)
        return
    try:
        result["recovery"][part] = measure_recovery(args, vocab_size, part, root)
    except RecoveryTimeout as err:
        result["recovery"][part] = {"failed_at_kill": len(err.kills) + 1, "kill_log": err.kills,
                                    "failure": str(err).split("; scheduler log tail")[0]}
        write_json(args.json, result)
        raise


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    from tunemesh_common.models import ModelRegistry
    from tunemesh_local.launcher import local_trainer_threads

    if args.threads:
        os.environ["TUNEMESH_TRAINER_NUM_THREADS"] = str(args.threads)
    registry = ModelRegistry.default(args.data_dir)
    vocab_size = registry.entry(args.model).vocab_size
    registry.materialize(args.model)  # converted once here, not by two trainers at once
    threads = {"recovery (2 trainers)": args.threads or local_trainer_threads(2),
               "price (1 trainer)": args.threads or local_trainer_threads(1)}
    result = {"model": args.model, "note": args.note, "code": code_version(), "cpu_count": os.cpu_count(),
              "trainer_threads": threads, "lease_ttl_s": LEASE_TTL_S, "in_flight_s": IN_FLIGHT_S,
              "load_average_1m": [round(os.getloadavg()[0], 2)], "recovery": {}}
    with contextlib.ExitStack() as stack:
        root = args.state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunemesh-recovery-")))
        for part in args.parts:  # in the order given
            run_part(args, part, vocab_size, root, result)
            result["load_average_1m"].append(round(os.getloadavg()[0], 2))
            write_json(args.json, result)  # what is measured so far, should a later part fail
    print(format_report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
