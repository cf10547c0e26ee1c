"""checkpoint_paths.py: parsing, names and tenant-scoped storage keys."""

from __future__ import annotations

import pytest

from tunemesh_common.checkpoints.paths import (
    CheckpointKind,
    CheckpointPath,
    auto_name,
    check_name,
    run_id,
    storage_prefix,
    tenant_segment,
)
from tunemesh.errors import InvalidArgumentError

NAME_128 = "n" + "x" * 127

VALID_PATHS = [
    ("tunemesh://runs/abc/state/step-10", CheckpointKind.STATE, "abc", "step-10"),
    ("tunemesh://runs/r-1.2_b/sampler/v1.0_final", CheckpointKind.SAMPLER, "r-1.2_b", "v1.0_final"),
    ("tunemesh://runs/abc/sampler/auto-000003", CheckpointKind.SAMPLER, "abc", "auto-000003"),
    ("tunemesh://imports/my-adapter", CheckpointKind.IMPORTED, "", "my-adapter"),
    (f"tunemesh://runs/{NAME_128}/state/{NAME_128}", CheckpointKind.STATE, NAME_128, NAME_128),
]


@pytest.mark.parametrize("path, kind, run, name", VALID_PATHS)
def test_parse_reads_the_parts_and_round_trips(path, kind, run, name):
    parsed = CheckpointPath.parse(path)
    assert (parsed.kind, parsed.run_id, parsed.name) == (kind, run, name)
    assert parsed.run == (f"runs/{run}" if run else "")
    assert str(parsed) == path
    assert CheckpointPath.parse(str(parsed)) == parsed


def test_constructors_build_the_same_paths_as_parse():
    assert CheckpointPath.for_run("runs/abc", CheckpointKind.STATE, "step-10") == CheckpointPath.parse(
        "tunemesh://runs/abc/state/step-10"
    )
    assert str(CheckpointPath.for_run("runs/abc", CheckpointKind.SAMPLER, auto_name(3))) == (
        "tunemesh://runs/abc/sampler/auto-000003"
    )
    assert str(CheckpointPath.imported("my-adapter")) == "tunemesh://imports/my-adapter"


def test_constructors_check_their_parts():
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.for_run("runs/abc", CheckpointKind.STATE, "../x")
    assert err.value.reason == "BAD_CHECKPOINT_NAME"
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.for_run("runs/../x", CheckpointKind.STATE, "x")
    assert err.value.reason == "BAD_RUN_NAME"
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.imported("auto-000001")  # imports are user-named
    assert err.value.reason == "BAD_CHECKPOINT_NAME"


HOSTILE_PATHS = [
    "",
    "tunemesh://",
    "tunemesh://runs/../state/x",
    "tunemesh://runs/a/state/..",
    "tunemesh://runs/a/state/../../b/state/x",
    "tunemesh://runs/a/state/x..y",
    "tunemesh://imports/..",
    "tunemesh://imports/.hidden",
    "tunemesh://runs/a/state/x/extra",
    "tunemesh://runs/a/other/x",
    "tunemesh://runs/a/imports/x",
    "tunemesh://runs/a/state",
    "tunemesh://runs/a",
    "tunemesh://imports",
    "tunemesh://imports/a/b",
    "tunemesh://state/x",
    "tunemesh:///abs",
    "tunemesh:///runs/a/state/x",
    "tunemesh://runs/a/state/x/",
    "tunemesh://runs//state/x",
    "tunemesh://runs/a//state/x",
    "tunemesh://runs/a/state/",
    "/etc/passwd",
    "file:///etc/passwd",
    "runs/a/state/x",
    "TUNEMESH://runs/a/state/x",
    "tunemesh:/runs/a/state/x",
    " tunemesh://runs/a/state/x",
    "tunemesh://runs/a/state/%2e%2e",
    "tunemesh://runs/a/state/x%00",
    "tunemesh://runs/a%2fb/state/x",
    "tunemesh://runs/a/state/x\x00",
    "tunemesh://runs/a\x00/state/x",
    "tunemesh://runs/a/state/x\\..\\..\\y",
    "tunemesh://runs\\a\\state\\x",
    "tunemesh://runs/a/state/x y",
    "tunemesh://runs/a/state/x\t",
    "tunemesh://runs/a/state/x\n",
    "tunemesh://runs/a/state/ x",
    "tunemesh://runs/a/state/-x",
    "tunemesh://runs/a/state/_x",
    "tunemesh://runs/a/state/~",
    "tunemesh://runs/a/state/x:y",
    "tunemesh://runs/a/state/x?y=1",
    "tunemesh://runs/a/state/x#y",
    "tunemesh://runs/a/state/*",
    "tunemesh://runs/a/state/" + "n" * 129,
    "tunemesh://runs/" + "r" * 129 + "/state/x",
    "tunemesh://runs/a/state/x" + "/" * 600,
    "tunemesh://imports/" + "x" * 600,
    "tunemesh://runs/a/state/\uff0e\uff0e",  # fullwidth full stops
    "tunemesh://runs/\uff41/state/x",  # fullwidth 'a'
    "tunemesh://runs/a/state/\u2024\u2024",  # one dot leader, twice
    "tunemesh://runs/a\u2215b/state/x",  # division slash
    "tunemesh://runs/a/state/caf\u00e9",
    "tunemesh://runs/a/state/\u0430",  # cyrillic a
    "tunemesh://runs/a/state/x\u200b",  # zero-width space
    "tunemesh://runs/a/state/x\u00a0",  # no-break space
    "tunemesh://runs/a/state/\U0001f600",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_parse_refuses_hostile_paths(path):
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.parse(path)
    assert err.value.reason == "BAD_CHECKPOINT_PATH"


@pytest.mark.parametrize("path", [None, b"tunemesh://runs/a/state/x", 7, ["tunemesh://imports/x"]])
def test_parse_refuses_non_strings(path):
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.parse(path)
    assert err.value.reason == "BAD_CHECKPOINT_PATH"


def test_parse_refuses_a_path_over_the_length_limit():
    path = "tunemesh://runs/a/state/" + "x" * 500
    assert len(path) > 512
    with pytest.raises(InvalidArgumentError) as err:
        CheckpointPath.parse(path)
    assert err.value.reason == "BAD_CHECKPOINT_PATH"
    assert len(err.value.message) < 400  # the echoed path is truncated


@pytest.mark.parametrize("name", ["step-10", "v1.0_final", "0", "A.b-c_d", NAME_128, "x.y.z", "auto", "Auto-000001"])
def test_check_name_accepts_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", ".x", "-x", "_x", "a..b", "a/b", "a\\b", "a b", "a\x00", "a%2e", "n" * 129, "\uff41", "a\n"],
)
def test_check_name_refuses_invalid_names(name):
    with pytest.raises(InvalidArgumentError) as err:
        check_name(name, user=False)
    assert err.value.reason == "BAD_CHECKPOINT_NAME"


def test_auto_names_are_reserved_for_the_service():
    with pytest.raises(InvalidArgumentError) as err:
        check_name("auto-000001")
    assert err.value.reason == "BAD_CHECKPOINT_NAME"
    assert "reserved" in err.value.message
    assert check_name("auto-000001", user=False) == "auto-000001"


def test_auto_name_pads_the_seq_id_and_is_a_valid_service_name():
    assert auto_name(7) == "auto-000007"
    assert auto_name(1234567) == "auto-1234567"
    assert check_name(auto_name(7), user=False) == "auto-000007"
    assert auto_name(7) != auto_name(70)


def test_run_id_accepts_runs_slash_id():
    assert run_id("runs/abc") == "abc"
    assert run_id("runs/r-1.2_b") == "r-1.2_b"


@pytest.mark.parametrize(
    "run", ["abc", "runs/", "runs", "runs/a/b", "runs/..", "runs/.x", "/runs/a", "run/a", "Runs/a", "runs/a b", ""]
)
def test_run_id_refuses_other_shapes(run):
    with pytest.raises(InvalidArgumentError) as err:
        run_id(run)
    assert err.value.reason == "BAD_RUN_NAME"


def _is_safe_segment(segment: str) -> bool:
    return (
        0 < len(segment) <= 128
        and segment.isascii()
        and segment[0].isalnum()
        and all(c.isalnum() or c in "._-" for c in segment)
        and ".." not in segment
    )


HOSTILE_TENANTS = [
    "",
    "alice/../bob",
    "alice/bob",
    "..",
    ".",
    "a@example.com",
    "tenant with spaces",
    "\u00e9quipe",
    "\uff41lice",
    "x\x00y",
    "t" * 200,
    "h-abc",
    "h-" + "0" * 40,
]
TENANTS = ["alice", "bob", "Alice", "tenant-1.prod", "runs", "imports", "H-abc", *HOSTILE_TENANTS]


@pytest.mark.parametrize("tenant", TENANTS)
def test_tenant_segment_is_one_safe_segment(tenant):
    segment = tenant_segment(tenant)
    assert _is_safe_segment(segment)
    assert segment == tenant_segment(tenant)  # stable


@pytest.mark.parametrize("tenant", HOSTILE_TENANTS)
def test_unsafe_tenants_get_the_digest_form(tenant):
    segment = tenant_segment(tenant)
    assert segment.startswith("h-") and len(segment) == 42
    assert segment != tenant


def test_safe_tenants_keep_their_name():
    assert tenant_segment("alice") == "alice"
    assert tenant_segment("tenant-1.prod") == "tenant-1.prod"


def test_a_tenant_named_like_a_digest_does_not_take_another_tenants_digest():
    digest = tenant_segment("alice/bob")
    assert tenant_segment(digest) != digest


def test_no_two_tenants_share_a_segment():
    segments = [tenant_segment(t) for t in TENANTS]
    assert len(set(segments)) == len(TENANTS)


PATHS = [CheckpointPath.parse(p) for p, *_ in VALID_PATHS]


@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("tenant", TENANTS)
def test_storage_key_starts_with_the_tenant_segment(path, tenant):
    key = path.storage_key(tenant)
    assert key.startswith(tenant_segment(tenant) + "/")
    assert all(_is_safe_segment(s) for s in key.split("/"))
    assert key.endswith(f"/{path.kind}/{path.name}")


def test_storage_keys_of_two_tenants_never_collide():
    keys = {(t, str(p)): p.storage_key(t) for t in TENANTS for p in PATHS}
    assert len(set(keys.values())) == len(keys)


def test_storage_key_layout():
    assert CheckpointPath.parse("tunemesh://runs/abc/state/s1").storage_key("alice") == "alice/runs/abc/state/s1"
    assert CheckpointPath.parse("tunemesh://imports/ad").storage_key("alice") == "alice/imports/ad"


@pytest.mark.parametrize("tenant", TENANTS)
def test_storage_prefixes_are_path_prefixes_of_the_keys(tenant):
    for path in PATHS:
        key = path.storage_key(tenant)
        assert key.startswith(storage_prefix(tenant) + "/")
        if path.run:
            assert key.startswith(storage_prefix(tenant, path.run) + "/")


def test_a_run_prefix_does_not_cover_a_run_whose_id_extends_it():
    key = CheckpointPath.parse("tunemesh://runs/abc2/state/x").storage_key("alice")
    prefix = storage_prefix("alice", "runs/abc")
    assert prefix == "alice/runs/abc"
    assert not key.startswith(prefix + "/")


def test_storage_prefix_checks_the_run():
    with pytest.raises(InvalidArgumentError) as err:
        storage_prefix("alice", "runs/../bob")
    assert err.value.reason == "BAD_RUN_NAME"
