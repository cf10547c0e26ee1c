"""When a run's automatic snapshot is due, and whether one is being written.

A snapshot is asked for after a run's OPTIM_STEP every `every_steps` optimizer steps,
every `every_s` seconds, or when the trainer rounds that carried the run's work since its
last snapshot would pass `replay_budget_s` seconds with one more round like its last (what
a move replays: so a trainer's death costs its runs at most about that much recompute,
on any model), never sooner than `min_interval_s` after the run's last one, and never
while one is being written. Pure: time and round durations come in as arguments.
"""

from __future__ import annotations

import dataclasses

from tunemesh_common.checkpoints import paths as checkpoint_paths
from tunemesh_scheduler.core.records import OperationRecord, OpState, RunRecord


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
class _Progress:
    """Snapshot bookkeeping of one run."""

    step_at_snapshot: int
    time_at_snapshot: float
    pending: bool = False  # a snapshot is being written
    work_s: float = 0.0  # trainer seconds of the run's rounds since the step of its last snapshot
    work_at_mark: float = 0.0  # work_s covered by the snapshot being written
    round_of_mark: bool = False  # the run's next round carries the step the snapshot follows
    last_round_s: float = 0.0  # the run's latest round


class SnapshotBook:
    """Snapshot progress of every run."""

    def __init__(self, policy: SnapshotPolicy) -> None:
        self.policy = policy
        self._progress: dict[str, _Progress] = {}

    def forget(self, run_name: str) -> None:
        self._progress.pop(run_name, None)

    def worked(self, runs, seconds: float, now: float) -> None:
        """A trainer round of `seconds`, ending at `now`, carried work of each of `runs`
        (a run's first round starts its bookkeeping, so its first snapshot comes in time)."""
        for run in runs:
            progress = self._progress.setdefault(run.name, _Progress(run.step, now - seconds))
            progress.work_s += seconds
            progress.last_round_s = seconds
            if progress.round_of_mark:  # the snapshot covers the round of its own step
                progress.work_at_mark += seconds
                progress.round_of_mark = False

    def mark(self, run: RunRecord, step: OperationRecord, now: float) -> None:
        """Name a snapshot path on OPTIM_STEP `step` of `run` when one is due."""
        progress = self._progress.setdefault(run.name, _Progress(run.step, now))
        policy = self.policy
        since = now - progress.time_at_snapshot
        steps_due = policy.every_steps and run.step + 1 - progress.step_at_snapshot >= policy.every_steps
        time_due = policy.every_s and since >= policy.every_s
        work_due = policy.replay_budget_s and progress.work_s + progress.last_round_s > policy.replay_budget_s
        if not progress.pending and (steps_due or time_due or work_due) and since >= policy.min_interval_s:
            step.snapshot_path = snapshot_path(run.name, step.seq_id)
            progress.pending = True
            progress.work_at_mark, progress.round_of_mark = progress.work_s, True

    def finished(self, run: RunRecord, op: OperationRecord) -> bool:
        """`op` of `run` finished: True when it asked for a snapshot that now needs confirming."""
        if not op.snapshot_path:
            return False
        if op.state is OpState.SUCCEEDED:
            return True
        self._progress[run.name].pending = self._progress[run.name].round_of_mark = False
        return False

    def written(self, run: RunRecord, now: float) -> bool:
        """The run's pending snapshot is written; False when the run is no longer known."""
        progress = self._progress.get(run.name)
        if progress is None:
            return False
        progress.pending = False
        progress.step_at_snapshot, progress.time_at_snapshot = run.step, now
        progress.work_s = max(0.0, progress.work_s - progress.work_at_mark)  # what came after the step
        return True

    def failed(self, run: RunRecord) -> None:
        progress = self._progress.get(run.name)
        if progress is not None:
            progress.pending = progress.round_of_mark = False
