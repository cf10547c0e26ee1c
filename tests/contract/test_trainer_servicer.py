"""TrainerServicer on an in-process grpc.aio server, over the real torch engine (tiny-dense).

The server runs on an event loop in a background thread; tests call it with the
generated synchronous internal stub, exactly as another process would.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import grpc
import numpy as np
import pytest

from tunemesh_internal.v1 import trainer_pb2, trainer_pb2_grpc
from tunemesh.v1 import types_pb2
from loop_thread import LoopThread
from tunemesh import tensors
from tunemesh.errors import error_from_rpc
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server
from tunemesh_common.models import TINY_DENSE, ModelRegistry, tokenizer_files
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.server import TrainerServicer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
MAX_ADAPTERS = 3
ADAM = types_pb2.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
LORA = types_pb2.LoraConfig(rank=4, train_attn=True, train_mlp=True, train_unembed=True, seed=1)


async def _serve(servicer: TrainerServicer) -> tuple[grpc.aio.Server, int]:
    server, _ = build_server()
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class Served:
    """A servicer on its own port, with a channel and a stub to it."""

    def __init__(self, loop: LoopThread, servicer: TrainerServicer) -> None:
        self.loop, self.servicer = loop, servicer
        self.server, port = loop.run(_serve(servicer))
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address, options=rpc.CHANNEL_OPTIONS)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.server.stop(None))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    registry = ModelRegistry.default(tmp_path_factory.mktemp("trainer_servicer_data"))
    return registry.entry(TINY_DENSE), registry.materialize(TINY_DENSE)


@pytest.fixture(scope="module")
def engine(model):
    from tunemesh_trainer.engine import build_torch_engine

    entry, path = model
    return build_torch_engine(path, name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                              max_seq_len=entry.max_seq_len, num_threads=2)


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def trainer(loop, engine, model):
    core = TrainerCore(engine, MAX_ADAPTERS)
    servicer = TrainerServicer("node-t", "127.0.0.1:0")
    served = Served(loop, servicer)
    servicer.attach(core, tokenizer_files(model[1]))
    yield served
    served.close()
    core.close()


@pytest.fixture(autouse=True)
def no_leftover_adapters(request):
    yield
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
        for adapter_id in engine.adapter_ids():
            engine.delete_adapter(adapter_id)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), error_from_rpc(err).reason


def create(stub, adapter_id: str, lora: types_pb2.LoraConfig = LORA) -> int:
    request = trainer_pb2.CreateAdapterRequest(adapter_id=adapter_id, base_model=TINY_DENSE, lora_config=lora)
    return stub.CreateAdapter(request, timeout=30).num_parameters


def datum(tokens, targets=None, weights=None) -> types_pb2.Datum:
    d = types_pb2.Datum()
    d.model_input.chunks.add().encoded_text.tokens.extend(tokens)
    targets = np.asarray(targets if targets is not None else list(tokens[1:]) + [0], np.int64)
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensors.encode(targets))
    if weights is not None:
        d.loss_fn_inputs["weights"].CopyFrom(tensors.encode(np.asarray(weights, np.float32)))
    return d


def item(item_id, adapter_id, data, kind=trainer_pb2.ITEM_KIND_FORWARD_BACKWARD) -> trainer_pb2.BatchItem:
    return trainer_pb2.BatchItem(item_id=item_id, adapter_id=adapter_id, kind=kind, data=data,
                                 loss_fn="cross_entropy")


def run_batch(stub, *items) -> trainer_pb2.RunBatchResponse:
    return stub.RunBatch(trainer_pb2.RunBatchRequest(items=items), timeout=60)


def logprobs_of(result: trainer_pb2.BatchItemResult) -> list[np.ndarray]:
    assert result.WhichOneof("outcome") == "result", result.error
    return [tensors.decode(o.loss_fn_outputs["logprobs"]) for o in result.result.outputs]


def reference_logprobs(model_dir, tokens, targets) -> np.ndarray:
    """log p(target_i | tokens[:i+1]) from the plain HF base model (a fresh LoRA has B = 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([tokens])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(targets)].numpy()


# ---- tests -----------------------------------------------------------------------------


def test_unavailable_loading_until_attached(loop, engine, model):
    servicer = TrainerServicer("node-late", "127.0.0.1:0")
    served = Served(loop, servicer)
    try:
        stub = served.stub
        calls = [
            lambda: stub.GetTrainerInfo(trainer_pb2.GetTrainerInfoRequest(), timeout=10),
            lambda: create(stub, "runs/early"),
            lambda: stub.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(adapter_id="runs/early"), timeout=10),
            lambda: run_batch(stub, item("op-1", "runs/early", [datum([1, 2, 3])])),
            lambda: stub.OptimStep(trainer_pb2.OptimStepRequest(adapter_id="runs/early", adam_params=ADAM),
                                   timeout=10),
        ]
        for call in calls:
            assert status_of(call) == (grpc.StatusCode.UNAVAILABLE, "LOADING")
        core = TrainerCore(engine, 1)
        servicer.attach(core, tokenizer_files(model[1]))
        node = stub.GetTrainerInfo(trainer_pb2.GetTrainerInfoRequest(), timeout=10).node
        assert (node.node_id, node.max_adapters, node.models[0].name) == ("node-late", 1, TINY_DENSE)
        core.close()
    finally:
        served.close()


def test_get_tokenizer_is_unavailable_until_attached(loop):
    served = Served(loop, TrainerServicer("node-late2", "127.0.0.1:0"))
    try:
        call = lambda: served.stub.GetTokenizer(trainer_pb2.GetTokenizerRequest(), timeout=10)  # noqa: E731
        assert status_of(call) == (grpc.StatusCode.UNAVAILABLE, "LOADING")
    finally:
        served.close()


def test_trainer_info_describes_the_model_and_counts_adapters(trainer, model):
    entry, path = model
    node = trainer.stub.GetTrainerInfo(trainer_pb2.GetTrainerInfoRequest(), timeout=10).node
    (served,) = node.models
    config = json.loads((path / "config.json").read_text())
    assert (served.name, served.family, served.max_seq_len, served.max_lora_rank) == (
        TINY_DENSE, "dense", entry.max_seq_len, entry.max_lora_rank)
    assert served.vocab_size == config["vocab_size"] == entry.vocab_size
    assert (node.node_id, node.max_adapters, node.adapters) == ("node-t", MAX_ADAPTERS, 0)
    create(trainer.stub, "runs/a")
    assert trainer.stub.GetTrainerInfo(trainer_pb2.GetTrainerInfoRequest(), timeout=10).node.adapters == 1


def _lora_parameter_count(config: dict, rank: int, attn: bool, mlp: bool, unembed: bool) -> int:
    """rank * (in + out) summed over the targeted linears, from config.json alone."""
    h, d = config["hidden_size"], config["head_dim"]
    q, kv, i = config["num_attention_heads"] * d, config["num_key_value_heads"] * d, config["intermediate_size"]
    per_layer = attn * ((h + q) + 2 * (h + kv) + (q + h)) + mlp * (2 * (h + i) + (i + h))
    return rank * (config["num_hidden_layers"] * per_layer + unembed * (h + config["vocab_size"]))


def test_create_and_delete_adapter(trainer, model):
    config = json.loads((model[1] / "config.json").read_text())
    stub = trainer.stub
    assert create(stub, "runs/a") == _lora_parameter_count(config, 4, True, True, True)
    attn_only = types_pb2.LoraConfig(rank=2, train_attn=True)
    assert create(stub, "runs/b", attn_only) == _lora_parameter_count(config, 2, True, False, False)
    assert status_of(lambda: create(stub, "runs/a")) == (grpc.StatusCode.ALREADY_EXISTS, "ADAPTER_EXISTS")
    too_big = types_pb2.LoraConfig(rank=model[0].max_lora_rank + 1, train_attn=True)
    assert status_of(lambda: create(stub, "runs/c", too_big)) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_LORA_RANK")
    stub.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(adapter_id="runs/a"), timeout=10)
    delete_again = lambda: stub.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(adapter_id="runs/a"))  # noqa: E731
    assert status_of(delete_again) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    (gone,) = run_batch(stub, item("op-1", "runs/a", [datum([1, 2])])).results
    assert (gone.item_id, gone.error.code, gone.error.reason) == ("op-1", grpc.StatusCode.NOT_FOUND.value[0],
                                                                  "ADAPTER_NOT_FOUND")


def test_run_batch_isolates_a_bad_item_and_keeps_request_order(trainer, model):
    create(trainer.stub, "runs/a")
    create(trainer.stub, "runs/b")
    broken = datum([4, 5, 6], weights=[1, 1, 1])
    broken.loss_fn_inputs["weights"].data = b"\x00" * 5  # not 3 float32s
    a_data = [datum([10, 11, 12, 13, 14], weights=[1, 0.5, 0, 1, 1]), datum([20, 21, 22])]
    b_tokens, b_targets = [30, 31, 32, 33], [31, 32, 33, 34]
    response = run_batch(
        trainer.stub,
        item("op-a", "runs/a", a_data),
        item("op-bad", "runs/b", [broken]),
        item("op-b", "runs/b", [datum(b_tokens, b_targets)], kind=trainer_pb2.ITEM_KIND_FORWARD),
    )
    assert [r.item_id for r in response.results] == ["op-a", "op-bad", "op-b"]
    bad = response.results[1]
    assert bad.WhichOneof("outcome") == "error"
    assert (bad.error.code, bad.error.reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "BAD_TENSOR")
    a_logprobs = logprobs_of(response.results[0])
    assert [lp.shape for lp in a_logprobs] == [(5,), (3,)]
    assert all(lp.dtype == np.float32 and (lp <= 0).all() for lp in a_logprobs)
    expected_loss = -(np.dot([1, 0.5, 0, 1, 1], a_logprobs[0]) + a_logprobs[1].sum())
    assert response.results[0].result.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)
    (b_logprobs,) = logprobs_of(response.results[2])
    np.testing.assert_allclose(b_logprobs, reference_logprobs(model[1], b_tokens, b_targets), atol=1e-4)
    assert response.engine_seconds > 0


def test_optim_step_reports_metrics_and_changes_the_adapter(trainer):
    stub = trainer.stub
    create(stub, "runs/a")
    probe = datum([40, 41, 42, 43])
    before = logprobs_of(run_batch(stub, item("f0", "runs/a", [probe], trainer_pb2.ITEM_KIND_FORWARD)).results[0])
    run_batch(stub, item("fb1", "runs/a", [probe]))
    step = lambda params: stub.OptimStep(  # noqa: E731
        trainer_pb2.OptimStepRequest(adapter_id="runs/a", adam_params=params), timeout=30)
    metrics = step(ADAM).metrics
    assert metrics["step:max"] == 1.0 and metrics["grad_norm:max"] > 0
    after = logprobs_of(run_batch(stub, item("f1", "runs/a", [probe], trainer_pb2.ITEM_KIND_FORWARD)).results[0])
    assert after[0].sum() > before[0].sum()  # one step on these targets raises their likelihood
    assert step(ADAM).metrics["step:max"] == 2.0
    bad = types_pb2.AdamParams(learning_rate=1e-2, beta1=1.5)
    assert status_of(lambda: step(bad)) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_ADAM_PARAMS")
    unknown = trainer_pb2.OptimStepRequest(adapter_id="runs/zz", adam_params=ADAM)
    assert status_of(lambda: stub.OptimStep(unknown)) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")


def test_get_tokenizer_returns_the_model_files(trainer, model):
    from tokenizers import Tokenizer

    files = {f.name: f.content for f in trainer.stub.GetTokenizer(trainer_pb2.GetTokenizerRequest(), timeout=10).files}
    assert files["tokenizer.json"] == (model[1] / "tokenizer.json").read_bytes()
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tokenizer.get_vocab_size() == model[0].vocab_size
    assert tokenizer.decode(tokenizer.encode("the cat sat").ids) == "the cat sat"


def test_capacity_is_resource_exhausted(trainer):
    for n in range(MAX_ADAPTERS):
        create(trainer.stub, f"runs/{n}")
    assert status_of(lambda: create(trainer.stub, "runs/extra")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_ADAPTER_SLOT")
    trainer.stub.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(adapter_id="runs/0"), timeout=10)
    create(trainer.stub, "runs/extra")


class _SlowCreates:
    """The engine, with create_adapter delayed: widens the check-then-create window."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def create_adapter(self, adapter_id, spec):
        time.sleep(0.3)
        return self._engine.create_adapter(adapter_id, spec)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_concurrent_creates_cannot_exceed_capacity(loop, engine, model):
    core = TrainerCore(_SlowCreates(engine), 1)
    servicer = TrainerServicer("node-race", "127.0.0.1:0")
    servicer.attach(core, {})
    served = Served(loop, servicer)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(
                lambda n: _try(lambda: create(served.stub, f"runs/race-{n}")), range(2)))
        assert sorted(outcomes) == ["NO_ADAPTER_SLOT", "ok"]
    finally:
        served.close()
        core.close()


def _try(call) -> str:
    try:
        call()
        return "ok"
    except grpc.RpcError as err:
        return error_from_rpc(err).reason or err.code().name


def test_run_batch_applies_optimizer_items_after_the_fused_pass(trainer):
    """One batch: b's forward_backward, a's optim step, and an optim step of an unknown adapter."""
    stub = trainer.stub
    create(stub, "runs/a")
    create(stub, "runs/b")
    probe = datum([40, 41, 42, 43])
    run_batch(stub, item("fb-a", "runs/a", [probe]))
    before = logprobs_of(run_batch(stub, item("f-a", "runs/a", [probe], kind=trainer_pb2.ITEM_KIND_FORWARD)).results[0])
    optim = trainer_pb2.BatchItem(item_id="opt-a", adapter_id="runs/a", kind=trainer_pb2.ITEM_KIND_OPTIM_STEP,
                                  adam_params=ADAM)
    lost = trainer_pb2.BatchItem(item_id="opt-x", adapter_id="runs/x", kind=trainer_pb2.ITEM_KIND_OPTIM_STEP,
                                 adam_params=ADAM)
    response = run_batch(stub, item("fb-b", "runs/b", [probe]), optim, lost)
    results = {r.item_id: r for r in response.results}
    assert [r.item_id for r in response.results] == ["fb-b", "opt-a", "opt-x"]
    assert results["fb-b"].WhichOneof("outcome") == "result"
    assert results["opt-a"].WhichOneof("outcome") == "optim_step"
    assert results["opt-a"].optim_step.metrics["step:max"] == 1
    assert results["opt-a"].optim_step.metrics["grad_norm:max"] > 0
    assert (results["opt-x"].error.code, results["opt-x"].error.reason) == (
        grpc.StatusCode.NOT_FOUND.value[0], "ADAPTER_NOT_FOUND")
    after = logprobs_of(run_batch(stub, item("f-a2", "runs/a", [probe], kind=trainer_pb2.ITEM_KIND_FORWARD)).results[0])
    assert after[0].sum() > before[0].sum()  # the step raised the likelihood of the trained probe
