"""An in-process mesh for contract tests: a real trainer servicer (tiny-dense torch
engine), a real checkpoint service on a temporary root, and the public scheduler
servicers over SchedulerCore; placement runs over an in-memory table. The trainer
servicer counts the RPCs that reach it, so tests can show that rejected requests never
got there.
"""

from __future__ import annotations

import collections
import os

import grpc
import numpy as np
import pytest

import tunemesh
from tunemesh_internal.v1 import checkpoint_pb2_grpc, sampler_pb2_grpc, trainer_pb2_grpc
from tunemesh.v1 import (
    checkpoints_pb2_grpc, operations_pb2, operations_pb2_grpc, sampling_pb2_grpc, sessions_pb2, sessions_pb2_grpc,
    training_pb2, training_pb2_grpc,
    types_pb2,
)
from loop_thread import LoopThread
from tunemesh import tensors
from tunemesh.errors import error_from_rpc
from tunemesh_common.service import rpc
from tunemesh_common.service.api_keys import KeyAuthenticator
from tunemesh_common.service.host import build_server
from tunemesh_common.service.throttle import FailureThrottle
from tunemesh_common.models import TINY_DENSE, tokenizer_files
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.server import CheckpointServicer, StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_scheduler.checkpoints import CheckpointProxy
from tunemesh_scheduler.core import SchedulerConfig, SchedulerCore
from tunemesh_sampler.adapters import AdapterCache
from tunemesh_sampler.checkpoints import AdapterLoader
from tunemesh_sampler.core import SamplerCore
from tunemesh_sampler.server import SamplerServicer
from tunemesh_scheduler.nodes import EtcdPlacement, SamplerDirectory, TrainerDirectory
from tunemesh_scheduler.sampler_client import GrpcSamplerPort, SamplerRouter
from tunemesh_scheduler.server import CheckpointServicer as SchedulerCheckpointServicer
from tunemesh_scheduler.server import OperationServicer, SamplingServicer, SessionServicer, TrainingServicer
from tunemesh_scheduler.tokenizers import TokenizerCache
from tunemesh_scheduler.trainer_client import GrpcTrainerPort
from tunemesh_scheduler.validation import Limits
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.server import TrainerServicer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A, B = (("authorization", "Bearer key-a"),), (("x-api-key", "key-b"),)
LIMITS = Limits(max_datums=4, max_tokens=64)
VOCAB = 1024  # tiny-dense
LORA = types_pb2.LoraConfig(rank=4, train_attn=True, train_mlp=True, train_unembed=True, seed=3)
ADAM = types_pb2.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
FAST_RETRY = tunemesh.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=30.0,
                                  attempt_timeout_s=30.0)


class CountingTrainer(TrainerServicer):
    """The real trainer servicer, counting the RPCs that reach it."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: collections.Counter[str] = collections.Counter()

    async def CreateAdapter(self, request, context):
        self.calls["CreateAdapter"] += 1
        return await super().CreateAdapter(request, context)

    async def RunBatch(self, request, context):
        self.calls["RunBatch"] += 1
        self.calls["items"] += len(request.items)
        return await super().RunBatch(request, context)

    async def OptimStep(self, request, context):
        self.calls["OptimStep"] += 1
        return await super().OptimStep(request, context)

    async def DeleteAdapter(self, request, context):
        self.calls["DeleteAdapter"] += 1
        return await super().DeleteAdapter(request, context)

    async def GetTokenizer(self, request, context):
        self.calls["GetTokenizer"] += 1
        return await super().GetTokenizer(request, context)


class MemoryPlacementTable:
    """The slice of registry.PlacementTable that EtcdPlacement uses, in memory."""

    def __init__(self) -> None:
        self.placements: dict[str, str] = {}

    async def list_placements(self) -> dict[str, str]:
        return dict(self.placements)

    async def place_run(self, run_id: str, node_id: str) -> bool:
        return self.placements.setdefault(run_id, node_id) == node_id

    async def release_run(self, run_id: str, expected_node: str) -> bool:
        if self.placements.get(run_id) != expected_node:
            return False
        del self.placements[run_id]
        return True


class Mesh:
    """Trainer server + scheduler server on one background loop."""

    def __init__(self, loop: LoopThread, engine, model_dir, checkpoint_root, sampling_engine) -> None:
        self.loop = loop
        self.sampling_engine = sampling_engine
        self.checkpoint_root = checkpoint_root
        self.engine = engine
        self.model_dir = model_dir
        self.trainer_core = TrainerCore(engine, 64)
        self.table = MemoryPlacementTable()
        loop.run(self._start())
        self.channel = grpc.insecure_channel(self.address, options=rpc.CHANNEL_OPTIONS)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(self.channel)
        self.checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(self.channel)
        self.sampling = sampling_pb2_grpc.SamplingServiceStub(self.channel)

    async def _start(self) -> None:
        self.trainer_server, _ = build_server()
        trainer_port = self.trainer_server.add_insecure_port("127.0.0.1:0")
        self.checkpoint_server, _ = build_server(rpc.trusted_tenant)
        self.catalog = catalog = CheckpointCatalog(FilesystemStore(self.checkpoint_root, fsync=False))
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(
            CheckpointServicer(catalog, 64 << 10, 1 << 30), self.checkpoint_server)
        checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server(
            StorageServicer(catalog, 64 << 10, 1 << 30), self.checkpoint_server)
        checkpoint_address = f"127.0.0.1:{self.checkpoint_server.add_insecure_port('127.0.0.1:0')}"
        await self.checkpoint_server.start()
        self.storage = CheckpointStorageClient(checkpoint_address, timeout_s=60)
        self.proxy = CheckpointProxy(checkpoint_address, timeout_s=60)
        self.trainer = CountingTrainer("node-t", f"127.0.0.1:{trainer_port}", "", self.storage)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.trainer, self.trainer_server)
        await self.trainer_server.start()
        self.trainer.attach(self.trainer_core, tokenizer_files(self.model_dir))
        self.directory = TrainerDirectory()
        self.directory.on_change("node-t", self.trainer.node().SerializeToString())
        self.port = GrpcTrainerPort(self.directory.address_of, timeout_s=60)
        self.core = SchedulerCore(EtcdPlacement(self.directory, self.table), self.port,
                                  SchedulerConfig(gap_timeout_s=60, batch_token_budget=4096))
        await self.core.start()
        await self._start_sampler()
        # (failed attempts are not throttled here: tests try many bad keys from one address)
        self.server, _ = build_server(KeyAuthenticator.inline(KEYS, throttle=FailureThrottle(max_failures=1 << 30)))
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(self.core, self.directory, LIMITS, TokenizerCache(self.directory, self.port)), self.server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(self.core, self.directory, LIMITS, self.proxy), self.server)
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(
            SchedulerCheckpointServicer(self.proxy, self.directory), self.server)
        sampling_pb2_grpc.add_SamplingServiceServicer_to_server(
            SamplingServicer(self.core, self.samplers, self.proxy, LIMITS), self.server)
        operations_pb2_grpc.add_OperationServiceServicer_to_server(OperationServicer(self.core, 30.0), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def _start_sampler(self) -> None:
        """A sampler node on the same model (torch engine), registered as if from etcd."""
        self.sampler_server, _ = build_server()
        port = self.sampler_server.add_insecure_port("127.0.0.1:0")
        self.sampler = SamplerServicer("node-s", f"127.0.0.1:{port}", max_adapters=2)
        sampler_pb2_grpc.add_SamplerServiceServicer_to_server(self.sampler, self.sampler_server)
        await self.sampler_server.start()
        loader = AdapterLoader(self.sampling_engine, self.storage, self.checkpoint_root.parent / "sampler-cache")
        self.sampler.attach(SamplerCore(self.sampling_engine, AdapterCache(loader.load, loader.unload, 2)))
        self.sampler_directory = SamplerDirectory()
        self.sampler_directory.on_change("node-s", self.sampler.node().SerializeToString())
        self.samplers = SamplerRouter(
            self.sampler_directory, GrpcSamplerPort(self.sampler_directory.address_of, timeout_s=60))

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.core.stop()
        await self.port.close()
        await self.trainer_server.stop(None)
        await self.storage.close()
        await self.proxy.close()
        await self.checkpoint_server.stop(None)
        await self.samplers.close()
        await self.sampler_server.stop(None)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self._stop())
        self.trainer_core.close()

    # shortcuts ------------------------------------------------------------------------

    def new_run(self, metadata=A, lora=LORA) -> str:
        session = self.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=metadata).session.name
        request = training_pb2.CreateTrainingRunRequest(session=session, base_model=TINY_DENSE, lora_config=lora)
        return self.training.CreateTrainingRun(request, metadata=metadata, timeout=30).run.name

    def wait(self, name: str, metadata=A) -> operations_pb2.Operation:
        request = operations_pb2.WaitOperationRequest(name=name)
        request.timeout.FromSeconds(30)
        op = self.operations.WaitOperation(request, metadata=metadata, timeout=40).operation
        assert op.done, op
        return op


def datum(tokens, targets=None, weights=None) -> types_pb2.Datum:
    d = types_pb2.Datum()
    d.model_input.chunks.add().encoded_text.tokens.extend(tokens)
    targets = list(tokens[1:]) + [0] if targets is None else targets
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensors.encode(np.asarray(targets, np.int64)))
    if weights is not None:
        d.loss_fn_inputs["weights"].CopyFrom(tensors.encode(np.asarray(weights, np.float32)))
    return d


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), error_from_rpc(info.value).reason


def reference_logprobs(model_dir, tokens, targets) -> np.ndarray:
    """log p(target_i | tokens[:i+1]) from the plain HF base model (a fresh LoRA has B = 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(targets)].numpy()


