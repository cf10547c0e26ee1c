"""Tinker model ids and paths <-> tunemesh runs and paths, through the gateway's table.

A run the gateway created answers to its Tinker model id (`{session}:train:{n}`), which
it also carries as the run's user_metadata label `tinker.model_id`: a table that lost it
(a restarted in-memory gateway) finds it again among the caller's runs. Any other run of
the caller (made with the tunemesh SDK) answers to its bare run id, so its checkpoints
still get tinker:// paths. Whose run it is, the scheduler checks on every call.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunemesh.errors import NotFoundError
from tunemesh.v1 import training_pb2
from tunemesh_common.checkpoints.paths import is_segment

from tunemesh_gateway.convert import IMPORTS, MODEL_ID_LABEL, TinkerPath, run_of_path, session_id_of, tinker_path
from tunemesh_gateway.core.ports import Caller, GatewayStore, Upstream

PAGE = 100


class Names:
    def __init__(self, store: GatewayStore, upstream: Upstream, timeout_s: float) -> None:
        self._store, self._up, self._timeout_s = store, upstream, timeout_s

    async def run(self, caller: Caller, model_id: str) -> str:
        """`runs/{id}` of a Tinker model id; NotFoundError when it names none of the caller's."""
        run = await self._store.run_of(model_id)
        if run is not None:
            return run
        if is_segment(model_id) and model_id != IMPORTS:
            return f"runs/{model_id}"
        if ":train:" in model_id and (run := await self._recover(caller, model_id)):
            return run
        raise NotFoundError("MODEL_NOT_FOUND", f"model {model_id[:140]!r} not found")

    async def _recover(self, caller: Caller, model_id: str) -> str | None:
        """Find the run labelled `model_id` among the caller's runs; the table learns every
        label it reads. A label counts only when it names the run's own session: anyone may
        write any label (user_metadata), but sessions are the tenant's, so no tenant can make
        another's model id answer to its own run."""
        found, token = None, ""
        while True:
            request = training_pb2.ListTrainingRunsRequest(page_size=PAGE, page_token=token)
            page = await self._up.call(caller, self._up.training.ListTrainingRuns, request, self._timeout_s)
            for run in page.runs:
                label = run.user_metadata.get(MODEL_ID_LABEL, "")
                if not label.startswith(session_id_of(run.session) + ":train:"):
                    continue
                held = await self._store.run_of(label) or await self._store.put_model(label, run.name)
                found = held if label == model_id else found
            token = page.next_page_token
            if not token:
                return found

    async def model_ids(self, runs: Iterable[str]) -> dict[str, str]:
        """{run: the Tinker training_run_id it answers to} for `runs`."""
        runs = list(runs)
        known = await self._store.models_of(runs)
        return {run: known.get(run, run.removeprefix("runs/")) for run in runs}

    async def model_id(self, run: str) -> str:
        return (await self.model_ids([run]))[run]

    async def tunemesh_path(self, caller: Caller, path: str) -> str:
        """The tunemesh path of a tinker:// path (InvalidArgumentError if malformed)."""
        parsed = TinkerPath.parse(path)
        if parsed.training_run_id == IMPORTS:
            return parsed.tunemesh("")
        return parsed.tunemesh(await self.run(caller, parsed.training_run_id))

    async def tinker_path(self, path: str) -> str:
        """The tinker:// path of a tunemesh checkpoint path."""
        run = run_of_path(path)
        return str(tinker_path(path, await self.model_id(run) if run else IMPORTS))
