"""When a run's automatic snapshot is due, and which ones are being written.

A snapshot is asked for after a run's OPTIM_STEP every `every_steps` optimizer steps,
every `every_s` seconds, or when the trainer rounds that carried the run's work since its
last snapshot would pass `replay_budget_s` seconds with one more round like its last (what
a move replays: so a trainer's death costs its runs at most about that much recompute,
on any model), never sooner than `min_interval_s` after the run's last one. Each of these
counts from the run's latest snapshot, written or still being written. Up to
`MAX_WRITING` snapshots of a run are written at once: with steps pipelined, the next
step's snapshot is asked for while the last one is still being written, and waiting for
it would leave every second step unsnapshot (a move would replay it). Pure: time and round
durations come in as arguments.
"""

from __future__ import annotations

import dataclasses

from tunemesh_common.checkpoints import paths as checkpoint_paths
from tunemesh_scheduler.core.records import OperationRecord, OpState, RunRecord

MAX_WRITING = 2  # snapshots of one run out at once (each holds a copy of the adapter on its trainer)


def snapshot_path(run_name: str, seq_id: int) -> str:
    """Where the automatic snapshot taken after `seq_id` of a run is written."""
    return f"tunemesh://{run_name}/state/{checkpoint_paths.SNAPSHOT_PREFIX}{seq_id:012d}"


@dataclasses.dataclass(frozen=True)
class SnapshotPolicy:
    every_steps: int = 8  # 0: never by steps
    every_s: float = 300.0  # 0: never by time
    min_interval_s: float = 0.0  # never sooner than this after the run's last snapshot
    replay_budget_s: float = 0.0  # trainer seconds of the run's work since it; 0: never by work


@dataclasses.dataclass
class _Mark:
    """A snapshot asked for and not yet written (or the run's last written one)."""

    seq_id: int
    step: int  # the run's optimizer steps once the snapshot's step is applied
    time: float
    work_s: float = 0.0  # the run's work_s the snapshot covers
    own_round: bool = False  # the run's next round carries the step the snapshot follows


@dataclasses.dataclass
class _Progress:
    """Snapshot bookkeeping of one run."""

    written: _Mark  # the last snapshot written (work_s 0: work_s counts from it)
    writing: list[_Mark] = dataclasses.field(default_factory=list)  # asked for, oldest first
    work_s: float = 0.0  # trainer seconds of the run's rounds since the step of its last snapshot
    last_round_s: float = 0.0  # the run's latest round

    def latest(self) -> _Mark:
        return self.writing[-1] if self.writing else self.written


class SnapshotBook:
    """Snapshot progress of every run."""

    def __init__(self, policy: SnapshotPolicy) -> None:
        self.policy = policy
        self._progress: dict[str, _Progress] = {}

    def forget(self, run_name: str) -> None:
        self._progress.pop(run_name, None)

    def writing(self, run_name: str) -> list[int]:
        """seq_ids of the run's snapshots asked for and not yet written, oldest first."""
        progress = self._progress.get(run_name)
        return [m.seq_id for m in progress.writing] if progress is not None else []

    def _of(self, run: RunRecord, now: float) -> _Progress:
        progress = self._progress.get(run.name)
        if progress is None:
            progress = self._progress[run.name] = _Progress(_Mark(0, run.step, now))
        return progress

    def worked(self, runs, seconds: float, now: float) -> None:
        """A trainer round of `seconds`, ending at `now`, carried work of each of `runs`
        (a run's first round starts its bookkeeping, so its first snapshot comes in time)."""
        for run in runs:
            progress = self._of(run, now - seconds)
            progress.work_s += seconds
            progress.last_round_s = seconds
            for mark in progress.writing:
                if mark.own_round:  # the snapshot covers the round of its own step
                    mark.work_s += seconds
                    mark.own_round = False

    def mark(self, run: RunRecord, step: OperationRecord, now: float) -> None:
        """Name a snapshot path on OPTIM_STEP `step` of `run` when one is due."""
        if step.snapshot_path:
            return  # sent again (its trainer died): it still asks for the snapshot it asked for
        progress = self._of(run, now)
        latest, policy = progress.latest(), self.policy
        since = now - latest.time
        steps_due = policy.every_steps and run.step + 1 - latest.step >= policy.every_steps
        time_due = policy.every_s and since >= policy.every_s
        work_due = (policy.replay_budget_s
                    and progress.work_s - latest.work_s + progress.last_round_s > policy.replay_budget_s)
        if (len(progress.writing) < MAX_WRITING and (steps_due or time_due or work_due)
                and since >= policy.min_interval_s):
            step.snapshot_path = snapshot_path(run.name, step.seq_id)
            progress.writing.append(_Mark(step.seq_id, run.step + 1, now, progress.work_s, own_round=True))

    def finished(self, run: RunRecord, op: OperationRecord) -> bool:
        """`op` of `run` finished: True when it asked for a snapshot that now needs confirming."""
        if not op.snapshot_path:
            return False
        if op.state is OpState.SUCCEEDED:
            return True
        self.failed(run, op.seq_id)
        return False

    def written(self, run: RunRecord, seq_id: int, now: float) -> bool:
        """The run's snapshot after `seq_id` is written; False when the run is no longer known."""
        progress = self._progress.get(run.name)
        if progress is None:
            return False
        mark = next((m for m in progress.writing if m.seq_id == seq_id), None)
        if mark is None:
            return True  # superseded by a later one written first
        covered = mark.work_s
        progress.writing = [m for m in progress.writing if m.seq_id > seq_id]
        for later in progress.writing:
            later.work_s -= covered
        progress.work_s = max(0.0, progress.work_s - covered)  # what came after the step
        progress.written = dataclasses.replace(mark, work_s=0.0, time=now, own_round=False)
        return True

    def failed(self, run: RunRecord, seq_id: int) -> None:
        """The snapshot after `seq_id` was not written: a later step asks again."""
        progress = self._progress.get(run.name)
        if progress is not None:
            progress.writing = [m for m in progress.writing if m.seq_id != seq_id]
