"""Tenant B against tenant A's resources, over every public RPC (issue 15, item 9).

The matrix is checked against the service descriptors, so an RPC added without a row
fails `test_every_public_rpc_has_a_row`. Each cell is B's call through a raw stub (so it
can send what the SDK never would) against the in-process mesh (real scheduler
servicers, the real trainer engine on the tiny model, the real checkpoint service and a
real sampler; see mesh_harness.py). A cell expects one of:

- NOT_FOUND, answered exactly as (code, reason) for a made-up resource of the same shape,
  so B cannot even learn that A's resource exists (STYLE: NOT_FOUND also for other
  tenants' resources), and the call never reaches the trainer; or
- success confined to B (listings, capabilities, an import under a name A also uses, a
  request id A also used), with the cell's own check that nothing of A's shows.

Around every cell, A's fingerprint must not move, bit for bit: A's runs, its operations,
its checkpoints (sha256 of every file, expiry), its adapters' digests (weights, AdamW
state, gradients) on the trainer, and logprobs through A's sampling session.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tunemesh
from mesh_harness import ADAM, FAST_RETRY, LORA, A, B, datum, status_of
from tunemesh.v1 import checkpoints_pb2, operations_pb2, sampling_pb2, sessions_pb2, training_pb2, types_pb2
from tunemesh_common.models import TINY_DENSE

NOT_FOUND = grpc.StatusCode.NOT_FOUND
PUBLIC = (sessions_pb2, training_pb2, operations_pb2, sampling_pb2, checkpoints_pb2)
TOKENS = [5, 17, 230, 41, 9, 600, 77, 3]
PROBE = [11, 12, 300, 45, 8, 900, 2, 64]
SHARED_IMPORT = "shared-name"  # A and B each import a different adapter under this name


def _public_rpcs() -> set[str]:
    return {f"{service.name}.{method.name}"
            for module in PUBLIC for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods}


@dataclasses.dataclass
class Names:
    """One tenant's resources (or made-up ones of the same shape, `ghost`)."""

    session: str
    ended_session: str
    run: str
    op: str
    state_path: str
    sampler_path: str
    import_path: str
    sampling_session: str
    ended_sampling_session: str
    shared_import_path: str = ""  # an import of A's under the name B imports too (ImportCheckpoint's row)
    request_id: str = ""
    queued_op: str = ""  # set per cell (`Row.queued`): a fresh op waiting behind a seq_id gap


def _ghost() -> Names:
    new = lambda: str(uuid.uuid4())  # noqa: E731
    run = new()
    return Names(
        session=f"sessions/{new()}", ended_session=f"sessions/{new()}", run=f"runs/{run}", op=f"operations/{new()}",
        state_path=f"tunemesh://runs/{run}/state/private", sampler_path=f"tunemesh://runs/{run}/sampler/w",
        import_path="tunemesh://imports/nobody-has-this", sampling_session=f"sampling_sessions/{new()}",
        ended_sampling_session=f"sampling_sessions/{new()}", queued_op=f"operations/{new()}",
    )


class World:
    """A's resources (trained, saved, imported, sampled), B's own, and raw stubs."""

    def __init__(self, mesh, tmp) -> None:
        self.mesh = mesh
        self.b_ops: set[str] = set()  # every operation B submitted
        self.a_ops: list[str] = []  # every operation A submitted
        self.a = self._alice(tmp)
        self.ghost = _ghost()
        self.b_session = self._session(B)
        self.b_run = self._run(B, self.b_session)
        self.b_state_path = self._save(B, self.b_run, 1, training_pb2.SaveStateRequest, "b-state").path
        self.watch_run = self._run(A, self.a.session)  # A trains on it while B watches (not fingerprinted)
        self.a_logprobs = self._sampling_logprobs(A, self.a.sampling_session)
        self.a_probe = self.probe()  # A's forward, before any cell runs
        self.a_fixed_ops = list(self.a_ops)  # all done; later ones are on runs B's rows do not touch

    # A's world ---------------------------------------------------------------------

    def _alice(self, tmp) -> Names:
        session, ended = self._session(A), self._session(A)
        request_id = str(uuid.uuid4())
        run = self.mesh.training.CreateTrainingRun(training_pb2.CreateTrainingRunRequest(
            session=session, base_model=TINY_DENSE, lora_config=LORA, request_id=request_id), metadata=A).run.name
        op = self._submit(A, "ForwardBackward", training_pb2.ForwardBackwardRequest(
            run=run, seq_id=1, request_id=str(uuid.uuid4()), data=[datum(TOKENS)]))
        self.mesh.wait(op.name)
        self.mesh.wait(self._submit(A, "OptimStep", training_pb2.OptimStepRequest(
            run=run, seq_id=2, adam_params=ADAM)).name)
        state = self._save(A, run, 3, training_pb2.SaveStateRequest, "private", ttl_seconds=86400)
        sampler = self._save(A, run, 4, training_pb2.SaveWeightsForSamplerRequest, "w")
        with tunemesh.ServiceClient(self.mesh.address, "key-a", retry_policy=FAST_RETRY,
                                    tokenizer_cache_dir=tmp / "tok-a") as alice:
            checkpoints = alice.create_checkpoint_client()
            self.a_peft = checkpoints.download(sampler.path, tmp / "a-peft")
            imported = checkpoints.import_peft(self.a_peft, base_model=TINY_DENSE, name="a-private")
            shared = checkpoints.import_peft(self.a_peft, base_model=TINY_DENSE, name=SHARED_IMPORT)
        sampling = self._sampling_session(A, session, shared.path)
        ended_sampling = self._sampling_session(A, ended, sampler.path)
        self.mesh.sessions.EndSession(sessions_pb2.EndSessionRequest(session=ended), metadata=A)
        return Names(session, ended, run, op.name, state.path, sampler.path, imported.path, sampling,
                     ended_sampling, shared.path, request_id)

    def fresh_queued_op(self) -> str:
        """An operation of A that stays QUEUED (seq_id 1 of its run never comes), on a new
        run of A's; the mesh fails it after its 60 s gap timeout, so each cell makes one."""
        run = self._run(A, self.a.session)
        op = self._submit(A, "Forward", training_pb2.ForwardRequest(run=run, seq_id=2, data=[datum(PROBE)]))
        assert op.state == operations_pb2.OPERATION_STATE_QUEUED
        return op.name

    # calls -------------------------------------------------------------------------

    def _session(self, who) -> str:
        return self.mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=who).session.name

    def _run(self, who, session: str) -> str:
        request = training_pb2.CreateTrainingRunRequest(session=session, base_model=TINY_DENSE, lora_config=LORA)
        return self.mesh.training.CreateTrainingRun(request, metadata=who, timeout=30).run.name

    def _submit(self, who, method: str, request) -> operations_pb2.Operation:
        op = getattr(self.mesh.training, method)(request, metadata=who, timeout=30).operation
        if who is B:
            self.b_ops.add(op.name)
        else:
            self.a_ops.append(op.name)
        return op

    def _save(self, who, run: str, seq_id: int, request_type, name: str, **fields) -> checkpoints_pb2.Checkpoint:
        op = self._submit(who, request_type.__name__.removesuffix("Request"),
                          request_type(run=run, seq_id=seq_id, name=name, **fields))
        done = self.mesh.wait(op.name, metadata=who)
        assert done.HasField("save_checkpoint"), done
        return done.save_checkpoint.checkpoint

    def _sampling_session(self, who, session: str, path: str) -> str:
        request = sampling_pb2.CreateSamplingSessionRequest(session=session, model_path=path)
        return self.mesh.sampling.CreateSamplingSession(request, metadata=who, timeout=60).sampling_session.name

    def _sampling_logprobs(self, who, sampling_session: str) -> list[float]:
        request = sampling_pb2.ComputeLogprobsRequest(sampling_session=sampling_session, prompt=_prompt(PROBE))
        return list(self.mesh.sampling.ComputeLogprobs(request, metadata=who, timeout=60).logprobs)

    def probe(self) -> bytes:
        """Logprobs of A's run on PROBE, through a forward of its own (serialized tensor)."""
        op = self._submit(A, "Forward", training_pb2.ForwardRequest(
            run=self.a.run, seq_id=self.next_seq_id(self.a.run), data=[datum(PROBE)]))
        done = self.mesh.wait(op.name)
        return done.forward_backward.outputs[0].loss_fn_outputs["logprobs"].SerializeToString(deterministic=True)

    def next_seq_id(self, run: str, who=A) -> int:
        """The seq_id the owner would send next on `run` (on A's, the most harmful for B to take)."""
        request = training_pb2.GetTrainingRunRequest(name=run)
        return self.mesh.training.GetTrainingRun(request, metadata=who).run.last_seq_id + 1

    def fingerprint(self) -> dict[str, Any]:
        """Everything of A's that B must not change or reach, serialized."""
        mesh, a = self.mesh, self.a
        mesh.sessions.HeartbeatSession(sessions_pb2.HeartbeatSessionRequest(session=a.session), metadata=A)  # open
        runs = mesh.training.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(page_size=1000), metadata=A).runs
        ops = self.a_fixed_ops + ([a.queued_op] if a.queued_op else [])
        return {
            "runs": [r.name if r.name == self.watch_run else r.SerializeToString(deterministic=True) for r in runs],
            "ops": [mesh.operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=A)
                    .operation.SerializeToString(deterministic=True) for name in ops],
            "checkpoints": mesh.checkpoints.ListCheckpoints(checkpoints_pb2.ListCheckpointsRequest(), metadata=A)
            .SerializeToString(deterministic=True),
            "adapter": mesh.engine.adapter_digest(a.run),
            "sampled": self._sampling_logprobs(A, a.sampling_session),
        }


def _prompt(tokens) -> types_pb2.ModelInput:
    prompt = types_pb2.ModelInput()
    prompt.chunks.add().encoded_text.tokens.extend(tokens)
    return prompt


@pytest.fixture(scope="module")
def world(mesh, tmp_path_factory):
    return World(mesh, tmp_path_factory.mktemp("cross_tenant"))


# the matrix --------------------------------------------------------------------------

Call = Callable[[World, Names], Any]


@dataclasses.dataclass(frozen=True)
class Row:
    rpc: str  # Service.Method
    what: str
    call: Call  # B's call, against A's names (or the ghost's)
    expect: grpc.StatusCode | None = NOT_FOUND  # None: succeeds, and `call` checks it is B's alone
    queued: bool = False  # the call needs a QUEUED operation of A's


def _stream(call):
    """Drain a server stream (errors surface here, as for a unary call)."""
    return list(call)


def _wait(name: str, seconds: float = 5.0) -> operations_pb2.WaitOperationRequest:
    request = operations_pb2.WaitOperationRequest(name=name)
    request.timeout.FromSeconds(int(seconds))
    return request


def _fb_request(w: World, n: Names, cls):
    return cls(run=n.run, seq_id=w.next_seq_id(w.a.run), request_id=str(uuid.uuid4()), data=[datum(PROBE)])


def _b_creates_a_session(w: World, n: Names) -> None:
    session = w.mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=B).session.name
    code, _ = status_of(lambda: w.mesh.sessions.HeartbeatSession(
        sessions_pb2.HeartbeatSessionRequest(session=session), metadata=A))
    assert code == NOT_FOUND  # B's session is B's alone, as A's are A's


def _capabilities_are_tenant_free(w: World, n: Names) -> None:
    ask = lambda who: w.mesh.sessions.GetCapabilities(sessions_pb2.GetCapabilitiesRequest(), metadata=who)  # noqa: E731
    assert ask(B) == ask(A)


def _tokenizer_is_tenant_free(w: World, n: Names) -> None:
    ask = lambda who: w.mesh.sessions.GetTokenizer(  # noqa: E731
        sessions_pb2.GetTokenizerRequest(base_model=TINY_DENSE), metadata=who, timeout=30)
    assert ask(B) == ask(A)


def _b_lists_only_its_runs(w: World, n: Names) -> None:
    runs = w.mesh.training.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(page_size=1000), metadata=B).runs
    assert w.b_run in {r.name for r in runs}
    assert not {r.name for r in runs} & {n.run, w.watch_run}
    assert all(r.session != n.session for r in runs)


def _b_reuses_as_request_id_for_a_run(w: World, n: Names) -> None:
    request = training_pb2.CreateTrainingRunRequest(session=w.b_session, base_model=TINY_DENSE, lora_config=LORA,
                                                    request_id=n.request_id)
    run = w.mesh.training.CreateTrainingRun(request, metadata=B, timeout=30).run
    assert run.name != n.run and run.session == w.b_session  # a new run of B's, not A's run back


def _b_reuses_as_request_id_for_an_op(w: World, n: Names) -> None:
    request_id = str(uuid.uuid4())
    a_op = w._submit(A, "Forward", training_pb2.ForwardRequest(
        run=w.watch_run, seq_id=w.next_seq_id(w.watch_run), request_id=request_id, data=[datum(PROBE)]))
    w.mesh.wait(a_op.name)
    mine = w._submit(B, "Forward", training_pb2.ForwardRequest(
        run=w.b_run, seq_id=w.next_seq_id(w.b_run, B), request_id=request_id, data=[datum(PROBE)]))
    assert mine.run == w.b_run and mine.name != a_op.name  # B's own op: neither A's back nor REQUEST_ID_REUSED
    w.mesh.wait(mine.name, metadata=B)


def _b_watches_only_its_completions(w: World, n: Names) -> None:
    """A's completions (named, replayed or live) never appear on B's stream; B's do."""
    ops = w.mesh.operations
    request = operations_pb2.WatchOperationsRequest(names=[n.op, n.queued_op])
    request.heartbeat_interval.FromMilliseconds(50)
    stream = ops.WatchOperations(request, metadata=B, timeout=60)
    first = next(stream)
    assert not first.operations and sorted(first.missing) == sorted([n.op, n.queued_op])
    a_op = w._submit(A, "Forward", training_pb2.ForwardRequest(run=w.watch_run, seq_id=w.next_seq_id(w.watch_run),
                                                               data=[datum(PROBE)]))
    w.mesh.wait(a_op.name)
    b_op = w._submit(B, "Forward", training_pb2.ForwardRequest(run=w.b_run, seq_id=w.next_seq_id(w.b_run, B),
                                                               data=[datum(PROBE)]))
    w.mesh.wait(b_op.name, metadata=B)
    seen: list[str] = []
    for response in stream:  # until B's own completion arrives (A's finished before it)
        seen += [op.name for op in response.operations]
        if b_op.name in seen:
            break
    stream.cancel()
    assert seen == [b_op.name], seen
    replay = operations_pb2.WatchOperationsRequest(epoch=first.epoch, cursor=0)
    stream = ops.WatchOperations(replay, metadata=B, timeout=60)
    replayed = {op.name for op in next(stream).operations}
    stream.cancel()
    assert b_op.name in replayed and replayed <= w.b_ops  # B's whole log holds B's operations only
    a_request = operations_pb2.WatchOperationsRequest(epoch=first.epoch, cursor=0)
    stream = ops.WatchOperations(a_request, metadata=A, timeout=60)
    assert a_op.name in {op.name for op in next(stream).operations}  # A's op did complete, in A's log
    stream.cancel()


def _b_lists_only_its_checkpoints(w: World, n: Names) -> None:
    listed = lambda run: w.mesh.checkpoints.ListCheckpoints(  # noqa: E731
        checkpoints_pb2.ListCheckpointsRequest(run=run), metadata=B).checkpoints
    mine = listed("")
    assert w.b_state_path in {c.path for c in mine} and not {c.path for c in mine} & {n.state_path, n.sampler_path}
    a_weights = {_weights_sha(w, A, path) for path in (n.state_path, n.sampler_path, n.import_path)}
    assert n.import_path not in {c.path for c in mine}
    assert not {_weights_sha_of(c) for c in mine} & a_weights  # B's own import of that name is B's
    assert list(listed(n.run)) == list(listed(w.ghost.run)) == []


def _weights_sha_of(checkpoint: checkpoints_pb2.Checkpoint) -> str:
    return next(f.sha256 for f in checkpoint.files if f.name == "adapter_model.safetensors")


def _weights_sha(w: World, who, path: str) -> str:
    request = checkpoints_pb2.GetCheckpointRequest(path=path)
    return _weights_sha_of(w.mesh.checkpoints.GetCheckpoint(request, metadata=who).checkpoint)


def _b_imports_under_as_name(w: World, n: Names) -> None:
    """B's import under the name A used is B's own: A's stays, and sampling each gives
    each tenant's adapter (the sampler keys adapters by tenant and path)."""
    directory = w.a_peft.parent / f"b-peft-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes((w.a_peft / "adapter_config.json").read_bytes())
    tensors = {k: v + np.float32(0.05) for k, v in load_file(w.a_peft / "adapter_model.safetensors").items()}
    save_file(tensors, directory / "adapter_model.safetensors")
    with tunemesh.ServiceClient(w.mesh.address, "key-b", retry_policy=FAST_RETRY,
                                tokenizer_cache_dir=directory / "tok") as bob:
        imported = bob.create_checkpoint_client().import_peft(directory, base_model=TINY_DENSE, name=SHARED_IMPORT)
    assert imported.path == n.shared_import_path  # the same path, in B's namespace
    assert _weights_sha(w, B, n.shared_import_path) != _weights_sha(w, A, n.shared_import_path)
    sampling = w._sampling_session(B, w.b_session, n.shared_import_path)
    assert w._sampling_logprobs(B, sampling) != w.a_logprobs


def _sample(name: str) -> sampling_pb2.SampleRequest:
    params = sampling_pb2.SamplingParams(max_tokens=4, temperature=0.0)
    return sampling_pb2.SampleRequest(sampling_session=name, prompt=_prompt(PROBE), num_samples=1,
                                      sampling_params=params)


KINDS = (("state", "state_path"), ("sampler", "sampler_path"), ("imported", "import_path"))
S, T, O, C, P = "SessionService", "TrainingService", "OperationService", "CheckpointService", "SamplingService"
ROWS = [
    # sessions
    Row(f"{S}.CreateSession", "B's new session is B's alone", _b_creates_a_session, None),
    Row(f"{S}.HeartbeatSession", "A's open session", lambda w, n: w.mesh.sessions.HeartbeatSession(
        sessions_pb2.HeartbeatSessionRequest(session=n.session), metadata=B)),
    Row(f"{S}.HeartbeatSession", "A's ended session", lambda w, n: w.mesh.sessions.HeartbeatSession(
        sessions_pb2.HeartbeatSessionRequest(session=n.ended_session), metadata=B)),
    Row(f"{S}.EndSession", "A's open session", lambda w, n: w.mesh.sessions.EndSession(
        sessions_pb2.EndSessionRequest(session=n.session), metadata=B)),
    Row(f"{S}.EndSession", "A's ended session", lambda w, n: w.mesh.sessions.EndSession(
        sessions_pb2.EndSessionRequest(session=n.ended_session), metadata=B)),
    Row(f"{S}.GetCapabilities", "the same answer as A's", _capabilities_are_tenant_free, None),
    Row(f"{S}.GetTokenizer", "the same answer as A's", _tokenizer_is_tenant_free, None),
    # training
    Row(f"{T}.CreateTrainingRun", "in A's session", lambda w, n: w.mesh.training.CreateTrainingRun(
        training_pb2.CreateTrainingRunRequest(session=n.session, base_model=TINY_DENSE, lora_config=LORA),
        metadata=B, timeout=30)),
    *[Row(f"{T}.CreateTrainingRun", f"from A's {kind} checkpoint",
          lambda w, n, p=path: w.mesh.training.CreateTrainingRun(training_pb2.CreateTrainingRunRequest(
              session=w.b_session, from_checkpoint=getattr(n, p), load_optimizer_state=p == "state_path"),
              metadata=B, timeout=30))
      for kind, path in KINDS],
    Row(f"{T}.CreateTrainingRun", "with A's request id", _b_reuses_as_request_id_for_a_run, None),
    Row(f"{T}.GetTrainingRun", "A's run", lambda w, n: w.mesh.training.GetTrainingRun(
        training_pb2.GetTrainingRunRequest(name=n.run), metadata=B)),
    Row(f"{T}.ListTrainingRuns", "only B's runs", _b_lists_only_its_runs, None),
    Row(f"{T}.DeleteTrainingRun", "A's run", lambda w, n: w.mesh.training.DeleteTrainingRun(
        training_pb2.DeleteTrainingRunRequest(name=n.run), metadata=B)),
    Row(f"{T}.Forward", "on A's run", lambda w, n: w.mesh.training.Forward(
        _fb_request(w, n, training_pb2.ForwardRequest), metadata=B)),
    Row(f"{T}.Forward", "on B's run with a request id A used", _b_reuses_as_request_id_for_an_op, None),
    Row(f"{T}.ForwardBackward", "on A's run", lambda w, n: w.mesh.training.ForwardBackward(
        _fb_request(w, n, training_pb2.ForwardBackwardRequest), metadata=B)),
    Row(f"{T}.OptimStep", "on A's run", lambda w, n: w.mesh.training.OptimStep(training_pb2.OptimStepRequest(
        run=n.run, seq_id=w.next_seq_id(w.a.run), adam_params=ADAM), metadata=B)),
    Row(f"{T}.SaveState", "of A's run", lambda w, n: w.mesh.training.SaveState(training_pb2.SaveStateRequest(
        run=n.run, seq_id=w.next_seq_id(w.a.run), name="stolen"), metadata=B)),
    Row(f"{T}.SaveWeightsForSampler", "of A's run", lambda w, n: w.mesh.training.SaveWeightsForSampler(
        training_pb2.SaveWeightsForSamplerRequest(run=n.run, seq_id=w.next_seq_id(w.a.run), name="stolen"),
        metadata=B)),
    Row(f"{T}.LoadState", "B's checkpoint into A's run", lambda w, n: w.mesh.training.LoadState(
        training_pb2.LoadStateRequest(run=n.run, seq_id=w.next_seq_id(w.a.run), path=w.b_state_path), metadata=B)),
    Row(f"{T}.LoadState", "A's checkpoint into B's run", lambda w, n: w.mesh.training.LoadState(
        training_pb2.LoadStateRequest(run=w.b_run, seq_id=w.next_seq_id(w.b_run, B), path=n.state_path,
                                      load_optimizer_state=True), metadata=B)),
    Row(f"{T}.ResumeTrainingRun", "A's run into B's session", lambda w, n: w.mesh.training.ResumeTrainingRun(
        training_pb2.ResumeTrainingRunRequest(name=n.run, session=w.b_session), metadata=B, timeout=30)),
    Row(f"{T}.ResumeTrainingRun", "B's run into A's session", lambda w, n: w.mesh.training.ResumeTrainingRun(
        training_pb2.ResumeTrainingRunRequest(name=w.b_run, session=n.session), metadata=B, timeout=30)),
    # operations
    Row(f"{O}.GetOperation", "A's finished op", lambda w, n: w.mesh.operations.GetOperation(
        operations_pb2.GetOperationRequest(name=n.op), metadata=B)),
    Row(f"{O}.GetOperation", "A's queued op", lambda w, n: w.mesh.operations.GetOperation(
        operations_pb2.GetOperationRequest(name=n.queued_op), metadata=B), queued=True),
    Row(f"{O}.WaitOperation", "A's finished op", lambda w, n: w.mesh.operations.WaitOperation(
        _wait(n.op), metadata=B, timeout=10)),
    Row(f"{O}.WaitOperation", "A's queued op", lambda w, n: w.mesh.operations.WaitOperation(
        _wait(n.queued_op), metadata=B, timeout=10), queued=True),
    Row(f"{O}.CancelOperation", "A's queued op", lambda w, n: w.mesh.operations.CancelOperation(
        operations_pb2.CancelOperationRequest(name=n.queued_op), metadata=B), queued=True),
    Row(f"{O}.WatchOperations", "no completion of A's, named, replayed or live", _b_watches_only_its_completions,
        None, queued=True),
    # checkpoints
    Row(f"{C}.ListCheckpoints", "only B's, also filtered by A's run", _b_lists_only_its_checkpoints, None),
    *[Row(f"{C}.{rpc}", f"A's {kind} checkpoint", call)
      for kind, path in KINDS
      for rpc, call in (
          ("GetCheckpoint", lambda w, n, p=path: w.mesh.checkpoints.GetCheckpoint(
              checkpoints_pb2.GetCheckpointRequest(path=getattr(n, p)), metadata=B)),
          ("DeleteCheckpoint", lambda w, n, p=path: w.mesh.checkpoints.DeleteCheckpoint(
              checkpoints_pb2.DeleteCheckpointRequest(path=getattr(n, p)), metadata=B)),
          ("UpdateCheckpointTtl", lambda w, n, p=path: w.mesh.checkpoints.UpdateCheckpointTtl(
              checkpoints_pb2.UpdateCheckpointTtlRequest(path=getattr(n, p), ttl_seconds=1), metadata=B)),
          ("DownloadCheckpoint", lambda w, n, p=path: _stream(w.mesh.checkpoints.DownloadCheckpoint(
              checkpoints_pb2.DownloadCheckpointRequest(path=getattr(n, p)), metadata=B, timeout=30))),
      )],
    Row(f"{C}.ImportCheckpoint", "under the name of A's import", _b_imports_under_as_name, None),
    # sampling
    Row(f"{P}.CreateSamplingSession", "in A's session", lambda w, n: w.mesh.sampling.CreateSamplingSession(
        sampling_pb2.CreateSamplingSessionRequest(session=n.session, base_model=TINY_DENSE), metadata=B, timeout=30)),
    *[Row(f"{P}.CreateSamplingSession", f"on A's {kind} checkpoint",
          lambda w, n, p=path: w.mesh.sampling.CreateSamplingSession(sampling_pb2.CreateSamplingSessionRequest(
              session=w.b_session, model_path=getattr(n, p)), metadata=B, timeout=30))
      for kind, path in KINDS],
    Row(f"{P}.Sample", "A's sampling session", lambda w, n: w.mesh.sampling.Sample(
        _sample(n.sampling_session), metadata=B, timeout=60)),
    Row(f"{P}.Sample", "A's sampling session of an ended session", lambda w, n: w.mesh.sampling.Sample(
        _sample(n.ended_sampling_session), metadata=B, timeout=60)),
    Row(f"{P}.ComputeLogprobs", "A's sampling session", lambda w, n: w.mesh.sampling.ComputeLogprobs(
        sampling_pb2.ComputeLogprobsRequest(sampling_session=n.sampling_session, prompt=_prompt(PROBE)),
        metadata=B, timeout=60)),
    Row(f"{P}.ComputeLogprobs", "A's sampling session of an ended session",
        lambda w, n: w.mesh.sampling.ComputeLogprobs(sampling_pb2.ComputeLogprobsRequest(
            sampling_session=n.ended_sampling_session, prompt=_prompt(PROBE)), metadata=B, timeout=60)),
]


def test_every_public_rpc_has_a_row():
    assert {row.rpc for row in ROWS} == _public_rpcs()


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.rpc.split('.')[1]}-{r.what}" for r in ROWS])
def test_tenant_b_cannot_see_or_touch_tenant_a(world, row):
    if row.queued:
        world.a.queued_op = world.fresh_queued_op()
    before, trainer_calls = world.fingerprint(), dict(world.mesh.trainer.calls)
    if row.expect is None:
        row.call(world, world.a)
    else:
        answer = status_of(lambda: row.call(world, world.a))
        assert answer == status_of(lambda: row.call(world, world.ghost))  # as if A's did not exist
        assert answer[0] == row.expect, answer
        assert dict(world.mesh.trainer.calls) == trainer_calls  # refused before any work
    assert world.fingerprint() == before
    if row.queued:  # B could not cancel it; A can
        cancelled = world.mesh.operations.CancelOperation(
            operations_pb2.CancelOperationRequest(name=world.a.queued_op), metadata=A).operation
        assert cancelled.state == operations_pb2.OPERATION_STATE_CANCELLED
        world.a.queued_op = ""


def test_sampling_through_an_ended_session_is_refused_for_its_owner_too(world):
    """An ended session's sampling sessions end with it, as its runs do (SESSION_ENDED)."""
    name = world.a.ended_sampling_session
    for call in (lambda: world.mesh.sampling.Sample(_sample(name), metadata=A, timeout=60),
                 lambda: world.mesh.sampling.ComputeLogprobs(sampling_pb2.ComputeLogprobsRequest(
                     sampling_session=name, prompt=_prompt(PROBE)), metadata=A, timeout=60)):
        assert status_of(call) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_ENDED")


def test_as_probe_forward_is_bit_for_bit_what_it_was(world):
    """After the whole matrix, A's run computes exactly what it computed before any of it."""
    assert world.probe() == world.a_probe
