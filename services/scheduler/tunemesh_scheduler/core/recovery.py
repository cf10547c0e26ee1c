"""What a restarted scheduler makes of its durable state (pure: records in, plan out).

For each run: its epoch goes up by one (calls of the scheduler before are fenced off);
its `last_seq_id` and `step` start from the stored floor and the operation log above it
adds what finished since; finished operations come back as they were (results and
idempotency), unfinished ones with their payload are queued again (the trainer applies a
seq_id at most once, so one that was running when the scheduler died is not applied
twice, and its outcome comes back); unfinished ones whose call was not kept (too large
for the store) are forgotten, so the client's re-send (same request id and seq_id)
queues them.
"""

from __future__ import annotations

import dataclasses

from tunemesh_scheduler.core.ports import StoredState
from tunemesh_scheduler.core.records import OperationRecord, OpKind, OpState, RunRecord, SessionRecord


@dataclasses.dataclass
class RecoveredRun:
    """One run as the new scheduler takes it over."""

    run: RunRecord
    finished: list[OperationRecord]
    queued: list[OperationRecord]
    lost: list[OperationRecord]  # unfinished, payload not kept: the client re-sends


@dataclasses.dataclass
class RecoveryPlan:
    sessions: list[SessionRecord]
    runs: list[RecoveredRun]
    sampling_sessions: list
    orphans: list[OperationRecord]  # operations of runs the store no longer has


def plan(state: StoredState) -> RecoveryPlan:
    by_run: dict[str, list[OperationRecord]] = {r.name: [] for r in state.runs}
    orphans = []
    for op in state.operations:
        (by_run[op.run] if op.run in by_run else orphans).append(op)
    for op in state.operations:
        if not op.done:
            op.payload = state.payloads.get((op.run, op.seq_id))
    runs = [_recover_run(run, sorted(by_run[run.name], key=lambda o: o.seq_id)) for run in state.runs]
    runs.sort(key=lambda r: (r.run.create_time, r.run.name))
    sessions = sorted(state.sessions, key=lambda s: (s.create_time, s.name))
    return RecoveryPlan(sessions, runs, state.sampling_sessions, orphans)


def _recover_run(run: RunRecord, ops: list[OperationRecord]) -> RecoveredRun:
    run = dataclasses.replace(run, epoch=run.epoch + 1)
    recovered = RecoveredRun(run, [], [], [])
    for op in ops:
        op.node_id = run.node_id
        if op.done:
            recovered.finished.append(op)
            if op.seq_id > run.last_seq_id:
                run.step = _step_after(run.step, op)
        elif op.payload is not None and op.seq_id > run.last_seq_id:
            op.state = OpState.QUEUED
            op.epoch = run.epoch
            recovered.queued.append(op)
        else:
            recovered.lost.append(op)
    return recovered


def _step_after(step: int, op: OperationRecord) -> int:
    """The run's optimizer step count after finished operation `op`."""
    if op.state is not OpState.SUCCEEDED:
        return step
    if op.kind is OpKind.OPTIM_STEP:
        return step + 1
    if op.kind is OpKind.LOAD_STATE:
        return op.result.step
    return step
