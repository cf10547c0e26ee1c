"""api_keys.py: key format, the hashed keys file, reload on change, the verified-key cache
and throttled failures (the clock is passed in; no sleeps)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os

import pytest

from tunemesh.errors import ResourceExhaustedError, UnauthenticatedError
from tunemesh_common.service import api_keys
from tunemesh_common.service.api_keys import KeyAuthenticator, KeyFileError, KeyRecord, KeyRing
from tunemesh_common.service.throttle import FailureThrottle

FAST = api_keys.Kdf(n=1 << 10, r=8, p=1)  # the smallest accepted scrypt: fast tests


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Every KDF check made (KeyRecord.matches), by key id."""
    calls: list[str] = []
    real = KeyRecord.matches

    def matches(self, key: str) -> bool:
        calls.append(self.id)
        return real(self, key)

    monkeypatch.setattr(KeyRecord, "matches", matches)
    return calls


def test_a_new_key_is_tml_id_secret_and_only_its_salted_hash_is_kept():
    key, record = api_keys.new_key("alice", kdf=FAST)
    prefix, key_id, secret = key.split("-", 2)
    assert prefix == "tml" and key_id == record.id and len(key_id) == 12 and len(secret) >= 43
    assert api_keys.key_id_of(key) == record.id
    assert record.tenant == "alice" and record.created.endswith("Z") and not record.revoked
    assert record.matches(key) and not record.matches(key[:-1] + ("A" if key[-1] != "A" else "B"))
    again = api_keys.hash_key(key, "alice", kdf=FAST)
    assert again.salt != record.salt and again.hash != record.hash and again.matches(key)  # salted
    other, _ = api_keys.new_key("alice", kdf=FAST)
    assert other != key


@pytest.mark.parametrize("key", ["key-a", "tml-demo-alice", "tml-0123456789ab", "tml-0123456789AB-x", ""])
def test_a_key_without_an_id_is_named_by_its_digest(key):
    key_id = api_keys.key_id_of(key)
    assert key_id.startswith("inline-") and key_id == api_keys.key_id_of(key) != api_keys.key_id_of(key + "x")


def test_the_keys_file_round_trips_and_holds_no_key(tmp_path):
    key, record = api_keys.new_key("alice", kdf=FAST)
    path = tmp_path / "keys.json"
    api_keys.write_key_file(path, [record, dataclasses.replace(api_keys.new_key("bob", kdf=FAST)[1], revoked=True)])
    assert key not in path.read_text() and key.split("-", 2)[2] not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = api_keys.read_key_file(path)
    assert loaded[0] == record and loaded[1].revoked
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and set(raw["keys"][0]) == {"id", "tenant", "kdf", "salt", "hash", "created", "revoked"}
    assert raw["keys"][0]["kdf"] == {"name": "scrypt", "n": 1024, "r": 8, "p": 1, "dklen": 32}


def _record_json(**changes) -> str:
    item = api_keys._record_to_json(api_keys.new_key("alice", kdf=FAST)[1]) | changes
    return json.dumps({"version": 1, "keys": [item]})


@pytest.mark.parametrize("text, why", [
    ("{", "not JSON"),
    ('{"tml-demo-alice": "alice"}', "plain-text keys"),
    ('{"version": 2, "keys": []}', "expected"),
    ('{"version": 1, "keys": [1]}', "not an object"),
    (_record_json(id="XYZ"), "12 lowercase hex"),
    (_record_json(tenant=""), "tenant"),
    (_record_json(kdf={"name": "md5"}), "md5"),
    (_record_json(kdf={"name": "scrypt", "n": 3}), "power of two"),
    (_record_json(kdf={"name": "scrypt", "n": 1 << 30}), "power of two"),
    (_record_json(salt="%%%"), "malformed"),
    (_record_json(hash=base64.b64encode(b"short").decode()), "dklen"),
    (_record_json(revoked="no"), "revoked"),
])
def test_a_malformed_keys_file_says_why(text, why):
    with pytest.raises(KeyFileError, match=why):
        api_keys.parse_key_file(text)


def test_duplicate_ids_are_refused():
    item = api_keys._record_to_json(api_keys.new_key("alice", kdf=FAST)[1])
    with pytest.raises(KeyFileError, match="twice"):
        api_keys.parse_key_file(json.dumps({"version": 1, "keys": [item, item]}))


def test_a_ring_without_keys_or_with_a_bad_file_refuses_to_start(tmp_path):
    with pytest.raises(KeyFileError, match="no API keys"):
        KeyRing()
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing(tmp_path / "absent.json")


def _authenticator(path, clock, **throttle) -> KeyAuthenticator:
    return KeyAuthenticator(KeyRing(path, check_every_s=2.0), FailureThrottle(**throttle), clock=clock)


def test_a_verified_key_is_not_hashed_again_and_a_wrong_one_always_is(tmp_path, counted):
    key, record = api_keys.new_key("alice", kdf=FAST)
    api_keys.write_key_file(tmp_path / "k.json", [record])
    auth = _authenticator(tmp_path / "k.json", Clock())

    async def scenario():
        tenants = [await auth(bearer(key), "ipv4:10.0.0.1:1") for _ in range(5)]
        for _ in range(3):
            with pytest.raises(UnauthenticatedError, match="not valid"):
                await auth(bearer(key[:-2] + "zz"), "ipv4:10.0.0.2:1")  # same id, wrong secret
        return tenants

    assert asyncio.run(scenario()) == ["alice"] * 5
    assert counted == [record.id] * 4  # one KDF for the good key, one per wrong attempt


def test_unknown_ids_and_missing_keys_cost_no_kdf(tmp_path, counted):
    _, record = api_keys.new_key("alice", kdf=FAST)
    api_keys.write_key_file(tmp_path / "k.json", [record])
    auth = _authenticator(tmp_path / "k.json", Clock())

    async def scenario():
        with pytest.raises(UnauthenticatedError) as missing:
            await auth({}, "p")
        with pytest.raises(UnauthenticatedError) as unknown:
            await auth(bearer(api_keys.new_key("alice", kdf=FAST)[0]), "p")
        return missing.value.reason, unknown.value.reason

    assert asyncio.run(scenario()) == ("MISSING_API_KEY", "INVALID_API_KEY")
    assert counted == []


def test_the_file_is_reloaded_on_change_revoking_even_a_cached_key(tmp_path, caplog):
    path, clock = tmp_path / "k.json", Clock()
    alice, alice_record = api_keys.new_key("alice", kdf=FAST)
    bob, bob_record = api_keys.new_key("bob", kdf=FAST)
    api_keys.write_key_file(path, [alice_record])
    auth = _authenticator(path, clock)

    async def tenant(key: str) -> str:
        try:
            return await auth(bearer(key), "ipv4:10.0.0.1:5")
        except UnauthenticatedError as err:
            return err.reason

    async def scenario():
        seen = [await tenant(alice), await tenant(bob)]
        api_keys.write_key_file(path, [alice_record, bob_record])
        clock.now += 1.0
        seen.append(await tenant(bob))  # not looked at yet (at most every 2 s)
        clock.now += 1.5
        seen.append(await tenant(bob))  # reloaded: bob's new key works
        api_keys.write_key_file(path, [dataclasses.replace(alice_record, revoked=True), bob_record])
        clock.now += 2.5
        seen += [await tenant(alice), await tenant(bob)]  # alice's cached key is revoked too
        path.write_text('{"version": 1, "keys": [')  # a half-written or broken file
        os.utime(path, ns=(1, 1))
        clock.now += 2.5
        with caplog.at_level(logging.ERROR):
            seen.append(await tenant(bob))  # the last good keys stay
        return seen

    assert asyncio.run(scenario()) == ["alice", "INVALID_API_KEY", "INVALID_API_KEY", "bob",
                                       "INVALID_API_KEY", "bob", "bob"]
    assert "keeping the last good API keys (2)" in caplog.text and "not JSON" in caplog.text


def test_failures_from_one_address_block_it_but_not_others_nor_known_keys(tmp_path, counted):
    path, clock = tmp_path / "k.json", Clock()
    alice, alice_record = api_keys.new_key("alice", kdf=FAST)
    bob, bob_record = api_keys.new_key("bob", kdf=FAST)
    api_keys.write_key_file(path, [alice_record, bob_record])
    auth = _authenticator(path, clock, max_failures=3, window_s=60, block_s=30)
    attacker, other = "ipv4:10.0.0.66:4000", "ipv4:10.0.0.7:5000"

    async def outcome(key: str, peer: str) -> str:
        try:
            return await auth(bearer(key), peer)
        except (UnauthenticatedError, ResourceExhaustedError) as err:
            return f"{err.reason}: {err.message}" if err.reason == "AUTH_THROTTLED" else err.reason

    async def scenario():
        seen = [await outcome(alice, attacker)]  # alice's key verified from that address
        seen += [await outcome(bob[:-2] + "zz", f"ipv4:10.0.0.66:{port}") for port in (1, 2, 3, 4)]
        kdf_runs = len(counted)
        seen += [await outcome(bob, attacker),  # a good but unverified key waits too
                 await outcome(alice, attacker),  # a verified one passes
                 await outcome(bob, other)]  # other addresses are unaffected
        clock.now += 31
        seen.append(await outcome(bob, attacker))
        return seen, kdf_runs

    seen, kdf_runs = asyncio.run(scenario())
    assert seen[:4] == ["alice", "INVALID_API_KEY", "INVALID_API_KEY", "INVALID_API_KEY"]
    assert seen[4] == seen[5] == "AUTH_THROTTLED: too many failed API key attempts from this address; retry in 30 s"
    assert seen[6:] == ["alice", "bob", "bob"]
    assert kdf_runs == 4  # a blocked attempt runs no KDF


def test_guesses_sent_in_parallel_meet_the_limit_as_sequential_ones_do(tmp_path, counted):
    path = tmp_path / "k.json"
    alice, alice_record = api_keys.new_key("alice", kdf=FAST)
    api_keys.write_key_file(path, [alice_record])
    auth = _authenticator(path, Clock(), max_failures=3, window_s=60, block_s=30)
    guesses = [alice[:-4] + f"{i:04d}" for i in range(12)]  # alice's id, wrong secrets: each costs a KDF

    async def outcome(key: str, peer: str) -> str:
        try:
            return await auth(bearer(key), peer)
        except (UnauthenticatedError, ResourceExhaustedError) as err:
            return err.reason

    async def scenario():
        attack = [outcome(key, f"ipv4:10.0.0.66:{port}") for port, key in enumerate(guesses)]
        # alice's first calls, in parallel from her own address: one KDF, all admitted
        mine = [outcome(alice, "ipv4:10.0.0.7:1") for _ in range(4)]
        return await asyncio.gather(*attack), await asyncio.gather(*mine)

    attack, mine = asyncio.run(scenario())
    assert attack == ["INVALID_API_KEY"] * 3 + ["AUTH_THROTTLED"] * 9
    assert mine == ["alice"] * 4
    assert len(counted) == 3 + 1  # the throttled guesses ran no KDF; alice's key was hashed once
    assert auth._turns == {}  # no lock outlives its callers


def test_a_reload_keeps_verified_keys_whose_record_did_not_change_and_forget_drops_one(tmp_path, counted):
    path, clock = tmp_path / "k.json", Clock()
    alice, alice_record = api_keys.new_key("alice", kdf=FAST)
    bob, bob_record = api_keys.new_key("bob", kdf=FAST)
    api_keys.write_key_file(path, [alice_record, bob_record])
    auth = _authenticator(path, clock)

    async def scenario():
        await auth(bearer(alice), "p")
        await auth(bearer(bob), "p")
        before = len(counted)
        _, carol_record = api_keys.new_key("carol", kdf=FAST)
        api_keys.write_key_file(path, [alice_record, dataclasses.replace(bob_record, revoked=True), carol_record])
        clock.now += 2.5  # reloaded at the next call
        seen = [await auth(bearer(alice), "p")]  # unchanged record: still remembered, no KDF
        after_reload = len(counted) - before
        with pytest.raises(UnauthenticatedError):
            await auth(bearer(bob), "p")  # its record changed (revoked)
        auth.forget(alice)
        seen.append(await auth(bearer(alice), "p"))  # verified again
        return seen, after_reload, counted[before:]

    seen, after_reload, kdfs = asyncio.run(scenario())
    assert seen == ["alice", "alice"] and after_reload == 0
    assert kdfs == [alice_record.id]  # bob's revoked record costs no KDF; alice's once, after forget


def test_a_check_abandoned_by_its_caller_counts_as_a_failure(tmp_path, monkeypatch):
    """A caller that cancels each guess while its KDF runs must still meet the limit."""
    import threading

    path = tmp_path / "k.json"
    alice, record = api_keys.new_key("alice", kdf=FAST)
    api_keys.write_key_file(path, [record])
    auth = _authenticator(path, Clock(), max_failures=2, window_s=60, block_s=30)
    started, release = threading.Event(), threading.Event()

    def slow_matches(self, key: str) -> bool:  # a KDF that runs until the test lets it end
        started.set()
        release.wait(10)
        return False

    monkeypatch.setattr(KeyRecord, "matches", slow_matches)

    async def scenario():
        for _ in range(2):
            started.clear()
            task = asyncio.ensure_future(auth(bearer(alice[:-2] + "zz"), "ipv4:10.0.0.66:1"))
            while not started.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        release.set()
        with pytest.raises(ResourceExhaustedError) as blocked:
            await auth(bearer(alice), "ipv4:10.0.0.66:2")
        return blocked.value.reason

    assert asyncio.run(scenario()) == "AUTH_THROTTLED"


def test_inline_development_keys(counted):
    auth = KeyAuthenticator.inline({"key-a": "tenant-a", "tml-demo-bob": "bob"})
    assert asyncio.run(auth(bearer("tml-demo-bob"))) == "bob"
    assert asyncio.run(auth({"x-api-key": "key-a"})) == "tenant-a"
    with pytest.raises(UnauthenticatedError):
        asyncio.run(auth(bearer("key-b")))
    assert auth.ring.tenants() == {"tenant-a", "bob"}


@pytest.mark.parametrize("peer, source", [
    ("ipv4:10.1.2.3:50051", "ipv4:10.1.2.3"),
    ("ipv6:[::1]:50051", "ipv6:[::1]"),
    ("ipv6:%5B::1%5D:443", "ipv6:%5B::1%5D"),
    ("unix:/tmp/sock", "unix:/tmp/sock"),
    ("", ""),
])
def test_the_source_is_the_address_without_its_port(peer, source):
    assert api_keys.source_of(peer) == source
