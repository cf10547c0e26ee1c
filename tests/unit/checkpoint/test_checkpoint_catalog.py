"""CheckpointCatalog over a real FilesystemStore: writes, reads, tenants, listing, TTL,
deletion, user metadata and PEFT imports."""

from __future__ import annotations

import hashlib
import json
import pathlib
import time

import pytest
from tunemesh_checkpoint.catalog import CheckpointCatalog, CheckpointRecord, CheckpointSpec
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.lora import peft_format
from tunemesh_common.checkpoints.paths import MAX_TTL_S, CheckpointKind, CheckpointPath
from tunemesh.errors import AlreadyExistsError, DataLossError, InvalidArgumentError, NotFoundError

CONFIG, WEIGHTS, OPTIMIZER = peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE, peft_format.OPTIMIZER_FILE
LORA = {"rank": 8, "alpha": 16.0, "train_attn": True, "train_mlp": True, "train_unembed": False,
        "train_experts": False, "seed": 3}
STATE = "tunemesh://runs/r1/state/step-10"
SAMPLER = "tunemesh://runs/r1/sampler/step-10"
BASE = "Qwen/Qwen3-0.6B"


@pytest.fixture
def now() -> list[float]:
    """A fake clock starting at the real time, so wall-clock and clock times agree at first."""
    return [time.time()]


@pytest.fixture
def store(tmp_path: pathlib.Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "ckpt", fsync=False)


@pytest.fixture
def catalog(store: FilesystemStore, now: list[float]) -> CheckpointCatalog:
    return CheckpointCatalog(store, clock=lambda: now[0])


def spec(path: str = STATE, **overrides) -> CheckpointSpec:
    fields = {"path": CheckpointPath.parse(path), "base_model": BASE, "lora": LORA, "step": 10,
              "has_optimizer_state": CheckpointPath.parse(path).kind is CheckpointKind.STATE}
    fields.update(overrides)
    return CheckpointSpec(**fields)


def contents(seed: str, optimizer: bool) -> dict[str, bytes]:
    """Distinct bytes per file and seed, each long enough to span several small chunks."""
    files = {CONFIG: json.dumps({"r": 8, "seed": seed}).encode(), WEIGHTS: (seed.encode() + bytes(range(256))) * 3}
    if optimizer:
        files[OPTIMIZER] = (b"adam-" + seed.encode()) * 50
    return files


def write(catalog: CheckpointCatalog, tenant: str, path: str, seed: str = "a", **overrides) -> CheckpointRecord:
    """Writes `path` with contents(seed); files are sent as several chunks each."""
    checkpoint = spec(path, **overrides)
    files = contents(seed, checkpoint.has_optimizer_state)
    return catalog.write(tenant, checkpoint, [(n, [d[:10], d[10:]]) for n, d in files.items()])


def read_all(catalog: CheckpointCatalog, tenant: str, path: str, chunk_size: int = 7) -> dict[str, bytes]:
    """Reassembles a read, checking offsets are contiguous and chunks bounded."""
    _, chunks = catalog.read(tenant, path, chunk_size)
    files: dict[str, bytearray] = {}
    for name, offset, chunk in chunks:
        data = files.setdefault(name, bytearray())
        assert offset == len(data) and 0 < len(chunk) <= chunk_size
        data += chunk
    return {name: bytes(data) for name, data in files.items()}


def expect(error: type, reason: str, call, *args, **kwargs):
    with pytest.raises(error) as raised:
        call(*args, **kwargs)
    assert raised.value.reason == reason
    return raised.value


def paths(records: list[CheckpointRecord]) -> list[str]:
    return [str(r.path) for r in records]


def assert_no_checkpoint_left(catalog: CheckpointCatalog, store: FilesystemStore, tenant: str = "alice") -> None:
    assert catalog.list(tenant) == ([], "")
    assert store.list("") == []
    assert list((store.root / "staging").iterdir()) == []


# --- writing and reading ---------------------------------------------------------------


def test_write_of_a_state_checkpoint_returns_its_record(catalog):
    before = time.time()
    record = write(catalog, "alice", STATE, ttl_seconds=0)
    after = time.time()
    files = contents("a", optimizer=True)
    assert str(record.path) == STATE
    assert (record.path.kind, record.path.run, record.path.name) == (CheckpointKind.STATE, "runs/r1", "step-10")
    assert (record.base_model, record.lora, record.step) == (BASE, LORA, 10)
    assert record.has_optimizer_state and record.expire_time is None and record.user_metadata == {}
    assert {f.name: (f.size, f.sha256) for f in record.files} == {
        n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()
    }
    assert record.size_bytes == sum(len(d) for d in files.values())
    assert before <= record.create_time <= after


def test_write_of_a_sampler_checkpoint_holds_two_files(catalog):
    record = write(catalog, "alice", SAMPLER, seed="s", step=7)
    assert record.path.kind is CheckpointKind.SAMPLER and record.step == 7
    assert not record.has_optimizer_state
    assert sorted(f.name for f in record.files) == [CONFIG, WEIGHTS]
    assert record.size_bytes == sum(len(d) for d in contents("s", optimizer=False).values())


@pytest.mark.parametrize("path", [STATE, SAMPLER])
def test_get_returns_what_write_returned(catalog, path):
    record = write(catalog, "alice", path, user_metadata={"note": "x"})
    assert catalog.get("alice", path) == record


@pytest.mark.parametrize("path", [STATE, SAMPLER])
def test_read_streams_every_file_exactly_in_several_chunks(catalog, path):
    record = write(catalog, "alice", path, seed="r")
    expected = contents("r", optimizer=record.has_optimizer_state)
    assert all(len(d) > 7 for d in expected.values())  # so each file spans several chunks
    returned, _ = catalog.read("alice", path, 7)
    assert returned == record
    assert read_all(catalog, "alice", path, chunk_size=7) == expected


def test_read_of_a_tampered_blob_fails_with_data_loss(catalog, store):
    record = write(catalog, "alice", SAMPLER)
    blob = store.root / "objects" / record.path.storage_key("alice") / WEIGHTS
    blob.write_bytes(b"X" + blob.read_bytes()[1:])
    with pytest.raises(DataLossError):
        read_all(catalog, "alice", SAMPLER)


def test_a_second_write_to_the_same_path_is_refused_and_the_first_is_intact(catalog):
    first = write(catalog, "alice", STATE, seed="first")
    expect(AlreadyExistsError, "CHECKPOINT_EXISTS", write, catalog, "alice", STATE, seed="second", step=11)
    assert catalog.get("alice", STATE) == first
    assert read_all(catalog, "alice", STATE) == contents("first", optimizer=True)


SNAPSHOT = "tunemesh://runs/r1/state/snapshot-000000000016"


def test_a_snapshot_written_again_with_the_same_files_is_the_same_snapshot(catalog, store):
    """A step re-sent after its run moved asks again for the snapshot the old trainer may
    already have written: the same bytes answer with the existing record."""
    first = write(catalog, "alice", SNAPSHOT, seed="s")
    again = write(catalog, "alice", SNAPSHOT, seed="s")
    assert again == first
    assert read_all(catalog, "alice", SNAPSHOT) == contents("s", optimizer=True)
    assert list((store.root / "staging").iterdir()) == []


def test_a_snapshot_written_again_with_other_files_is_a_divergence(catalog):
    first = write(catalog, "alice", SNAPSHOT, seed="s")
    expect(DataLossError, "SNAPSHOT_DIVERGED", write, catalog, "alice", SNAPSHOT, seed="t")
    assert catalog.get("alice", SNAPSHOT) == first
    assert read_all(catalog, "alice", SNAPSHOT) == contents("s", optimizer=True)


# --- required files --------------------------------------------------------------------


def test_a_state_checkpoint_with_optimizer_state_needs_the_optimizer_file(catalog, store):
    files = contents("a", optimizer=False)
    expect(InvalidArgumentError, "BAD_CHECKPOINT_FILES", catalog.write, "alice", spec(STATE),
           [(n, [d]) for n, d in files.items()])
    assert_no_checkpoint_left(catalog, store)


def test_a_sampler_checkpoint_refuses_an_optimizer_file(catalog, store):
    files = contents("a", optimizer=True)
    expect(InvalidArgumentError, "BAD_CHECKPOINT_FILES", catalog.write, "alice", spec(SAMPLER),
           [(n, [d]) for n, d in files.items()])
    assert_no_checkpoint_left(catalog, store)


def test_a_sampler_checkpoint_cannot_declare_optimizer_state(catalog, store):
    expect(InvalidArgumentError, "BAD_CHECKPOINT_KIND", write, catalog, "alice", SAMPLER, has_optimizer_state=True)
    assert_no_checkpoint_left(catalog, store)


@pytest.mark.parametrize("name", ["README.md", "../adapter_config.json", "manifest.json", "optimizer.pt"])
def test_unknown_file_names_are_refused(catalog, store, name):
    files = [(CONFIG, [b"{}"]), (name, [b"x"]), (WEIGHTS, [b"w"])]
    expect(InvalidArgumentError, "BAD_CHECKPOINT_FILES", catalog.write, "alice", spec(SAMPLER), files)
    assert_no_checkpoint_left(catalog, store)


def test_a_checkpoint_must_name_its_base_model(catalog, store):
    expect(InvalidArgumentError, "MISSING_BASE_MODEL", write, catalog, "alice", SAMPLER, base_model="")
    assert_no_checkpoint_left(catalog, store)


def test_a_state_checkpoint_without_optimizer_state_holds_two_files(catalog):
    record = write(catalog, "alice", STATE, has_optimizer_state=False)
    assert sorted(f.name for f in record.files) == [CONFIG, WEIGHTS] and not record.has_optimizer_state


# --- tenants ---------------------------------------------------------------------------


def test_another_tenant_sees_nothing_of_alices_checkpoint(catalog):
    write(catalog, "alice", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, "bob", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.read, "bob", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.delete, "bob", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.set_ttl, "bob", STATE, 60)
    assert catalog.list("bob") == ([], "")
    assert catalog.list("bob", run="runs/r1") == ([], "")
    record = catalog.get("alice", STATE)
    assert record.expire_time is None
    assert read_all(catalog, "alice", STATE) == contents("a", optimizer=True)


def test_two_tenants_own_the_same_path_independently(catalog):
    alice = write(catalog, "alice", SAMPLER, seed="alice", step=1)
    bob = write(catalog, "bob", SAMPLER, seed="bob", step=2)
    assert alice.path == bob.path and alice.files != bob.files
    assert (catalog.get("alice", SAMPLER).step, catalog.get("bob", SAMPLER).step) == (1, 2)
    assert read_all(catalog, "alice", SAMPLER) == contents("alice", optimizer=False)
    assert read_all(catalog, "bob", SAMPLER) == contents("bob", optimizer=False)
    catalog.delete("bob", SAMPLER)
    assert catalog.get("alice", SAMPLER) == alice
    assert paths(catalog.list("alice")[0]) == [SAMPLER]


@pytest.mark.parametrize("bob", ["bob", "h-bob", "bob/../alice", "Bob"])
def test_tenant_names_that_resemble_alice_reach_nothing_of_hers(catalog, bob):
    write(catalog, "alice", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, bob, STATE)
    assert catalog.list(bob) == ([], "")


# --- listing ---------------------------------------------------------------------------


FIVE = [
    "tunemesh://runs/r1/sampler/s1",
    "tunemesh://runs/r1/state/a",
    "tunemesh://runs/r1/state/b",
    "tunemesh://runs/r10/sampler/s1",
    "tunemesh://runs/r2/state/c",
]


@pytest.fixture
def five(catalog) -> list[str]:
    for path in reversed(FIVE):
        write(catalog, "alice", path)
    return FIVE


def test_list_by_run_and_of_the_whole_tenant(catalog, five):
    write(catalog, "bob", "tunemesh://runs/r1/state/z")
    assert paths(catalog.list("alice", run="runs/r1")[0]) == five[:3]
    assert paths(catalog.list("alice", run="runs/r10")[0]) == five[3:4]
    assert paths(catalog.list("alice", run="runs/r3")[0]) == []
    assert paths(catalog.list("alice")[0]) == five
    assert paths(catalog.list("bob")[0]) == ["tunemesh://runs/r1/state/z"]


def test_list_returns_records_equal_to_get(catalog, five):
    records, _ = catalog.list("alice")
    assert records == [catalog.get("alice", p) for p in five]


def test_pagination_gives_every_checkpoint_once_in_key_order(catalog, five):
    seen, token, pages = [], "", 0
    while pages < 10:  # bounded: a token that never advances must fail, not hang
        records, token = catalog.list("alice", page_size=2, page_token=token)
        seen += paths(records)
        pages += 1
        assert len(records) == (2 if token else 1)
        if not token:
            break
    assert seen == five and pages == 3
    keys = [CheckpointPath.parse(p).storage_key("alice") for p in seen]
    assert keys == sorted(keys)


def test_pagination_ends_without_an_empty_page(catalog, five):
    first, token = catalog.list("alice", run="runs/r1", page_size=2)
    last, end = catalog.list("alice", run="runs/r1", page_size=2, page_token=token)
    assert paths(first + last) == five[:3] and token and end == ""
    exact, token = catalog.list("alice", page_size=5)
    assert paths(exact) == five and token == ""


@pytest.mark.parametrize("token", ["abc", "not-a-token", "____", "%%%%", "!!!!", "=", "gA=="])
def test_a_bad_page_token_is_refused(catalog, five, token):
    expect(InvalidArgumentError, "INVALID_PAGE_TOKEN", catalog.list, "alice", page_size=2, page_token=token)


def test_a_negative_page_size_is_refused(catalog, five):
    expect(InvalidArgumentError, "INVALID_PAGE_SIZE", catalog.list, "alice", page_size=-1)


def test_list_of_a_bad_run_name_is_refused(catalog, five):
    expect(InvalidArgumentError, "BAD_RUN_NAME", catalog.list, "alice", run="runs/../bob")


# --- TTL and expiry --------------------------------------------------------------------


def test_ttl_at_write_sets_the_expire_time(catalog, now):
    record = write(catalog, "alice", SAMPLER, ttl_seconds=60)
    assert record.expire_time == now[0] + 60
    assert catalog.get("alice", SAMPLER).expire_time == now[0] + 60


def test_an_expired_checkpoint_is_gone_before_the_sweep(catalog, store, now):
    write(catalog, "alice", SAMPLER, ttl_seconds=60)
    write(catalog, "alice", STATE)
    now[0] += 59.5
    assert catalog.get("alice", SAMPLER).expire_time is not None
    now[0] += 0.5  # exactly at expire_time
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, "alice", SAMPLER)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.read, "alice", SAMPLER)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.set_ttl, "alice", SAMPLER, 0)
    assert paths(catalog.list("alice")[0]) == [STATE]
    assert len(store.list("")) == 2  # still stored until the sweep


def test_sweep_deletes_expired_checkpoints_of_every_tenant(catalog, store, now):
    write(catalog, "alice", SAMPLER, ttl_seconds=10)
    write(catalog, "bob", SAMPLER, ttl_seconds=20)
    write(catalog, "bob", STATE, ttl_seconds=1000)
    write(catalog, "carol", STATE)
    assert catalog.sweep() == 0
    now[0] += 30
    assert catalog.sweep() == 2
    keys = [m.key for m in store.list("")]
    assert keys == [CheckpointPath.parse(STATE).storage_key(t) for t in ("bob", "carol")]
    assert catalog.sweep() == 0


def test_set_ttl_sets_and_clears_the_expiry(catalog, now):
    record = write(catalog, "alice", SAMPLER, ttl_seconds=60)
    now[0] += 30
    extended = catalog.set_ttl("alice", SAMPLER, 120)
    assert extended.expire_time == now[0] + 120
    assert extended.create_time == record.create_time and extended.files == record.files
    cleared = catalog.set_ttl("alice", SAMPLER, 0)
    assert cleared.expire_time is None and catalog.get("alice", SAMPLER) == cleared
    now[0] += 100 * 365 * 24 * 3600
    assert catalog.sweep() == 0
    assert catalog.get("alice", SAMPLER) == cleared


def test_set_ttl_on_a_checkpoint_without_ttl_makes_it_expire(catalog, now):
    write(catalog, "alice", STATE)
    catalog.set_ttl("alice", STATE, 5)
    now[0] += 5
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, "alice", STATE)
    assert catalog.sweep() == 1


@pytest.mark.parametrize("ttl", [-1, MAX_TTL_S + 1])
def test_set_ttl_refuses_a_ttl_out_of_range(catalog, ttl):
    record = write(catalog, "alice", SAMPLER, ttl_seconds=60)
    expect(InvalidArgumentError, "BAD_TTL", catalog.set_ttl, "alice", SAMPLER, ttl)
    assert catalog.get("alice", SAMPLER) == record


@pytest.mark.parametrize("ttl", [-1, MAX_TTL_S + 1])
def test_write_refuses_a_ttl_out_of_range(catalog, store, ttl):
    expect(InvalidArgumentError, "BAD_TTL", write, catalog, "alice", SAMPLER, ttl_seconds=ttl)
    assert_no_checkpoint_left(catalog, store)


def test_the_longest_ttl_is_accepted(catalog, now):
    write(catalog, "alice", SAMPLER)
    assert catalog.set_ttl("alice", SAMPLER, MAX_TTL_S).expire_time == now[0] + MAX_TTL_S


def test_a_checkpoint_written_with_ttl_zero_never_expires(catalog, now):
    record = write(catalog, "alice", STATE, ttl_seconds=0)
    now[0] += 50 * 365 * 24 * 3600
    assert catalog.sweep() == 0
    assert catalog.get("alice", STATE) == record


# --- deletion --------------------------------------------------------------------------


def test_delete_then_get_and_delete_again_are_not_found(catalog, store):
    write(catalog, "alice", STATE)
    write(catalog, "alice", SAMPLER)
    catalog.delete("alice", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, "alice", STATE)
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.delete, "alice", STATE)
    assert paths(catalog.list("alice")[0]) == [SAMPLER]
    assert [m.key for m in store.list("")] == [CheckpointPath.parse(SAMPLER).storage_key("alice")]


def test_get_of_a_malformed_path_is_invalid(catalog):
    expect(InvalidArgumentError, "BAD_CHECKPOINT_PATH", catalog.get, "alice", "tunemesh://runs/r1/state/../x")


# --- user metadata ---------------------------------------------------------------------


def test_user_metadata_round_trips(catalog):
    labels = {"experiment": "lr-sweep", "note": "ünïcode ✓", "empty": "", "k" * 4096: "v" * 4096}
    labels.update({f"key{i}": str(i) for i in range(60)})
    assert len(labels) == 64
    record = write(catalog, "alice", STATE, user_metadata=labels)
    assert record.user_metadata == labels
    assert catalog.get("alice", STATE).user_metadata == labels
    assert catalog.list("alice")[0][0].user_metadata == labels


@pytest.mark.parametrize("labels", [
    {f"key{i}": "v" for i in range(65)},
    {"k": "v" * 4097},
    {"k" * 4097: "v"},
])
def test_user_metadata_over_its_limits_is_refused(catalog, store, labels):
    expect(InvalidArgumentError, "BAD_USER_METADATA", write, catalog, "alice", STATE, user_metadata=labels)
    assert_no_checkpoint_left(catalog, store)


# --- PEFT imports ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> pathlib.Path:
    """A real PEFT LoRA adapter (r=4, alpha=8 on q_proj and v_proj) of a tiny Qwen3."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    base = transformers.AutoModelForCausalLM.from_config(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("peft_adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture
def peft_files(peft_dir) -> dict[str, bytes]:
    return {name: (peft_dir / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def test_import_of_a_peft_adapter(catalog, peft_files):
    record = catalog.import_peft("alice", "my-adapter", BASE, peft_files, user_metadata={"src": "hub"})
    assert str(record.path) == "tunemesh://imports/my-adapter"
    assert record.path.kind is CheckpointKind.IMPORTED and record.path.run == ""
    assert record.lora == {"rank": 4, "alpha": 8.0, "train_attn": True, "train_mlp": False, "train_unembed": False,
                           "train_experts": False, "seed": 0}
    assert (record.base_model, record.step, record.has_optimizer_state) == (BASE, 0, False)
    assert record.user_metadata == {"src": "hub"} and record.expire_time is None
    assert catalog.get("alice", "tunemesh://imports/my-adapter") == record
    assert paths(catalog.list("alice")[0]) == ["tunemesh://imports/my-adapter"]
    assert catalog.list("alice", run="runs/r1") == ([], "")


def test_import_normalizes_the_config_and_keeps_the_weights(catalog, peft_files):
    assert json.loads(peft_files[CONFIG])["base_model_name_or_path"] != BASE
    catalog.import_peft("alice", "my-adapter", BASE, peft_files)
    stored = read_all(catalog, "alice", "tunemesh://imports/my-adapter", chunk_size=1000)
    assert stored[WEIGHTS] == peft_files[WEIGHTS]
    config = json.loads(stored[CONFIG])
    assert config["base_model_name_or_path"] == BASE
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    parsed = peft_format.parse_config(stored[CONFIG])
    assert (parsed.rank, parsed.alpha) == (4, 8.0)


def test_an_import_with_ttl_expires(catalog, peft_files, now):
    record = catalog.import_peft("alice", "tmp", BASE, peft_files, ttl_seconds=10)
    assert record.expire_time == now[0] + 10
    now[0] += 10
    expect(NotFoundError, "CHECKPOINT_NOT_FOUND", catalog.get, "alice", "tunemesh://imports/tmp")


def test_an_import_name_is_immutable_per_tenant(catalog, peft_files):
    first = catalog.import_peft("alice", "my-adapter", BASE, peft_files)
    expect(AlreadyExistsError, "CHECKPOINT_EXISTS", catalog.import_peft, "alice", "my-adapter", "other/model", peft_files)
    assert catalog.get("alice", "tunemesh://imports/my-adapter") == first
    assert catalog.import_peft("bob", "my-adapter", "other/model", peft_files).base_model == "other/model"


def _with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


@pytest.mark.parametrize("change, reason", [
    (lambda f: {CONFIG: f[CONFIG]}, "BAD_CHECKPOINT_FILES"),
    (lambda f: {WEIGHTS: f[WEIGHTS]}, "BAD_CHECKPOINT_FILES"),
    (lambda f: {**f, "README.md": b"# adapter"}, "BAD_CHECKPOINT_FILES"),
    (lambda f: {**f, OPTIMIZER: b"state"}, "BAD_CHECKPOINT_FILES"),
    (lambda f: _with_config(f, use_dora=True), "UNSUPPORTED_ADAPTER_CONFIG"),
    (lambda f: _with_config(f, peft_type="IA3"), "BAD_ADAPTER_CONFIG"),
    (lambda f: _with_config(f, r=8), "BAD_ADAPTER_WEIGHTS"),
    (lambda f: {**f, CONFIG: b"not json"}, "BAD_ADAPTER_CONFIG"),
    (lambda f: {**f, WEIGHTS: b"\x00garbage, not a safetensors file"}, "BAD_SAFETENSORS"),
    (lambda f: {**f, WEIGHTS: f[WEIGHTS][:-1]}, "BAD_SAFETENSORS"),
], ids=["no-weights", "no-config", "readme", "optimizer", "dora", "not-lora", "rank-mismatch", "config-not-json",
        "garbage-weights", "truncated-weights"])
def test_import_refuses_bad_adapters(catalog, store, peft_files, change, reason):
    expect(InvalidArgumentError, reason, catalog.import_peft, "alice", "bad", BASE, change(peft_files))
    assert_no_checkpoint_left(catalog, store)


def test_import_needs_a_base_model(catalog, store, peft_files):
    expect(InvalidArgumentError, "MISSING_BASE_MODEL", catalog.import_peft, "alice", "x", "", peft_files)
    assert_no_checkpoint_left(catalog, store)


@pytest.mark.parametrize("name", ["../x", "auto-1", "", ".hidden", "a/b", "a b", "x" * 129])
def test_import_refuses_bad_names(catalog, store, peft_files, name):
    expect(InvalidArgumentError, "BAD_CHECKPOINT_NAME", catalog.import_peft, "alice", name, BASE, peft_files)
    assert_no_checkpoint_left(catalog, store)


def test_import_refuses_bad_ttl_and_metadata(catalog, store, peft_files):
    expect(InvalidArgumentError, "BAD_TTL", catalog.import_peft, "alice", "x", BASE, peft_files, ttl_seconds=-5)
    labels = {str(i): "" for i in range(65)}
    expect(InvalidArgumentError, "BAD_USER_METADATA", catalog.import_peft, "alice", "x", BASE, peft_files,
           user_metadata=labels)
    assert_no_checkpoint_left(catalog, store)
