"""TokenizerCache: the files of a trainer of the model, fetched once, always with a config.json."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh.errors import NotFoundError, UnavailableError
from tunemesh.v1 import sessions_pb2
from tunemesh_internal.v1 import trainer_pb2
from tunemesh_scheduler.nodes import TrainerDirectory
from tunemesh_scheduler.tokenizers import CONFIG_FILE, MINIMAL_CONFIG, TokenizerCache

MODEL = "org/model"
TOKENIZER = sessions_pb2.TokenizerFile(name="tokenizer.json", content=b'{"model": {}}')
REAL_CONFIG = sessions_pb2.TokenizerFile(name=CONFIG_FILE, content=b'{"model_type": "llama"}')


class FakeTrainers:
    """GrpcTrainerPort's tokenizer_files: per node, files or an error; counts calls."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def tokenizer_files(self, node_id: str) -> trainer_pb2.GetTokenizerResponse:
        self.calls.append(node_id)
        answer = self.answers[node_id]
        if isinstance(answer, Exception):
            raise answer
        return trainer_pb2.GetTokenizerResponse(files=answer)


def directory(*node_ids: str) -> TrainerDirectory:
    nodes = TrainerDirectory()
    for node_id in node_ids:
        node = trainer_pb2.TrainerNode(node_id=node_id, address=f"{node_id}:1",
                                       models=[sessions_pb2.SupportedModel(name=MODEL)])
        nodes.on_change(node_id, node.SerializeToString())
    return nodes


def by_name(files) -> dict[str, bytes]:
    return {f.name: f.content for f in files}


def test_a_trainers_config_json_is_relayed_as_is():
    trainers = FakeTrainers({"t0": [TOKENIZER, REAL_CONFIG]})
    files = asyncio.run(TokenizerCache(directory("t0"), trainers).files(MODEL))
    assert by_name(files) == {"tokenizer.json": TOKENIZER.content, CONFIG_FILE: REAL_CONFIG.content}


def test_files_without_config_json_get_the_minimal_one_once():
    trainers = FakeTrainers({"t0": [TOKENIZER]})
    cache = TokenizerCache(directory("t0"), trainers)

    async def twice():
        return await cache.files(MODEL), await cache.files(MODEL)

    first, second = asyncio.run(twice())
    assert by_name(first) == {"tokenizer.json": TOKENIZER.content, CONFIG_FILE: MINIMAL_CONFIG}
    assert [f.name for f in first].count(CONFIG_FILE) == 1
    assert list(second) == list(first) and trainers.calls == ["t0"]


def test_an_unavailable_or_empty_trainer_is_skipped():
    trainers = FakeTrainers({"t0": UnavailableError("TRAINER_GONE", "down"), "t1": [], "t2": [TOKENIZER]})
    files = asyncio.run(TokenizerCache(directory("t0", "t1", "t2"), trainers).files(MODEL))
    assert CONFIG_FILE in by_name(files) and trainers.calls == ["t0", "t1", "t2"]


def test_no_trainer_answering_is_unavailable_and_unknown_models_not_found():
    trainers = FakeTrainers({"t0": UnavailableError("TRAINER_GONE", "down")})
    cache = TokenizerCache(directory("t0"), trainers)
    with pytest.raises(UnavailableError):
        asyncio.run(cache.files(MODEL))
    with pytest.raises(NotFoundError):
        asyncio.run(cache.files("other/model"))
