"""`tunemesh keys create | list | revoke` on a keys file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunemesh_common.service import api_keys
from tunemesh_local import cli


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, capsys) -> None:
    path = tmp_path / "prod" / "api_keys.json"
    code, out, err = _run(capsys, "create", "--tenant", "acme", "--file", str(path))
    key = out.strip()
    assert code == 0 and key.startswith("tml-") and out.count("tml-") == 1 and "shown only now" in err
    (record,) = api_keys.read_key_file(path)
    assert record.tenant == "acme" and record.matches(key) and key not in path.read_text()
    code, out, _ = _run(capsys, "create", "--tenant", "globex", "--file", str(path))
    assert code == 0 and [r.tenant for r in api_keys.read_key_file(path)] == ["acme", "globex"]


def test_list_shows_ids_tenants_created_revoked_and_never_a_secret(tmp_path: Path, capsys) -> None:
    path = tmp_path / "api_keys.json"
    _, out, _ = _run(capsys, "create", "--tenant", "acme", "--file", str(path))
    key = out.strip()
    key_id = api_keys.key_id_of(key)
    code, out, _ = _run(capsys, "list", "--file", str(path))
    assert code == 0 and key_id in out and "acme" in out and "tml-" not in out and key.split("-", 2)[2] not in out
    code, out, _ = _run(capsys, "revoke", key_id, "--file", str(path))
    assert code == 0 and f"revoked key {key_id} of tenant acme" in out
    code, out, _ = _run(capsys, "list", "--json", "--file", str(path))
    rows = json.loads(out)
    assert rows == [{"id": key_id, "tenant": "acme", "created": rows[0]["created"], "revoked": True}]
    assert api_keys.read_key_file(path)[0].revoked


def test_the_default_file_is_the_local_meshs_and_errors_exit_1(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TUNEMESH_STATE_DIR", str(tmp_path))
    code, out, _ = _run(capsys, "create", "--tenant", "carol")
    assert code == 0 and api_keys.read_key_file(tmp_path / "api_keys.json")[0].tenant == "carol"
    code, _, err = _run(capsys, "revoke", "0123456789ab")
    assert code == 1 and "no key '0123456789ab'" in err
    (tmp_path / "bad.json").write_text('{"key": "tenant"}')
    code, _, err = _run(capsys, "list", "--file", str(tmp_path / "bad.json"))
    assert code == 1 and "plain-text keys" in err
    code, out, _ = _run(capsys, "list", "--file", str(tmp_path / "absent.json"))
    assert code == 0 and out.strip() == "no keys"
