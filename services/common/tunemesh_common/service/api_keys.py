"""API keys: how they are made, stored, checked and reloaded.

A key reads `tml-<id>-<secret>`: `id` (12 hex digits) is public and names the key's
record, `secret` is 32 random bytes (base64url). The scheduler keeps no key, only a salted
scrypt hash of each, in a keys file (JSON, written by `tunemesh keys`):

    {"version": 1, "keys": [{"id": "3f9a0c1d2b4e", "tenant": "alice",
      "kdf": {"name": "scrypt", "n": 16384, "r": 8, "p": 1, "dklen": 32},
      "salt": "<base64>", "hash": "<base64>", "created": "2025-01-01T00:00:00Z", "revoked": false}]}

A presented key is hashed against the one record its id names and compared in constant
time (`hmac.compare_digest`); a key that verified once is remembered by its SHA-256 (the
KDF is not run again for it), until its record changes (a reload keeps the other keys
remembered) or `forget` drops it. The file is re-read when its
mtime, size or inode changes (looked at most every `check_every_s`); a file that does not
parse leaves the last good keys in force, logged with the reason. Failed attempts are
counted per caller address (`throttle.FailureThrottle`): a caller over the limit is
refused before any KDF runs, except with a key that already verified. One caller's keys
that have not verified are checked one at a time, so guesses sent in parallel meet the
limit as sequential ones do (each waits for the verdict on the one before).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

from tunemesh.errors import ResourceExhaustedError, UnauthenticatedError
from tunemesh_common.service.throttle import FailureThrottle

log = logging.getLogger(__name__)

PREFIX = "tml-"  # the official Tinker SDK refuses keys without it
FILE_VERSION = 1
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_SALT_BYTES, _SECRET_BYTES = 16, 32
CACHE_SIZE = 4096  # verified keys remembered (least recently used forgotten first)


class KeyFileError(ValueError):
    """A keys file that cannot be used, and why."""


@dataclasses.dataclass(frozen=True)
class Kdf:
    """scrypt's parameters (memory 128 * r * n bytes: 16 MiB by default)."""

    name: str = "scrypt"
    n: int = 1 << 14
    r: int = 8
    p: int = 1
    dklen: int = 32

    def derive(self, key: str, salt: bytes) -> bytes:
        return hashlib.scrypt(key.encode(), salt=salt, n=self.n, r=self.r, p=self.p, dklen=self.dklen,
                              maxmem=256 * self.r * self.n * self.p + (1 << 20))

    def check(self) -> None:
        """Refuses parameters that are not scrypt's or would make a check weak or huge."""
        if self.name != "scrypt":
            raise KeyFileError(f"kdf {self.name!r} is not supported (scrypt only)")
        if not (1 << 10 <= self.n <= 1 << 20 and self.n & (self.n - 1) == 0):
            raise KeyFileError(f"scrypt n={self.n} must be a power of two in [2^10, 2^20]")
        if not (1 <= self.r <= 32 and 1 <= self.p <= 16 and 16 <= self.dklen <= 64):
            raise KeyFileError(f"scrypt r={self.r}, p={self.p}, dklen={self.dklen} out of range")


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What the scheduler knows of one key: never the key itself."""

    id: str
    tenant: str
    salt: bytes
    hash: bytes
    kdf: Kdf = Kdf()
    created: str = ""  # ISO 8601, UTC
    revoked: bool = False

    def matches(self, key: str) -> bool:
        """Whether `key` is this record's key (the KDF, then a constant-time compare)."""
        return hmac.compare_digest(self.kdf.derive(key, self.salt), self.hash)


def key_id_of(key: str) -> str:
    """The record a presented key names: the `<id>` of `tml-<id>-<secret>`. A key without
    one (an inline development key) is named by a digest of itself."""
    key_id, sep, secret = key.removeprefix(PREFIX).partition("-")
    if key.startswith(PREFIX) and sep and secret and _KEY_ID.fullmatch(key_id):
        return key_id
    return "inline-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def hash_key(key: str, tenant: str, *, created: str = "", kdf: Kdf = Kdf()) -> KeyRecord:
    """The record of an existing key, with a fresh salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    return KeyRecord(key_id_of(key), tenant, salt, kdf.derive(key, salt), kdf, created)


def new_key(tenant: str, *, now: datetime.datetime | None = None, kdf: Kdf = Kdf()) -> tuple[str, KeyRecord]:
    """A fresh key for `tenant` and its record (show the key once; store the record)."""
    if not tenant or not tenant.strip():
        raise ValueError("a key needs a tenant")
    key = f"{PREFIX}{secrets.token_hex(6)}-{secrets.token_urlsafe(_SECRET_BYTES)}"
    created = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return key, hash_key(key, tenant, created=created, kdf=kdf)


# the keys file --------------------------------------------------------------------------


def render_key_file(records: Iterable[KeyRecord]) -> str:
    return json.dumps({"version": FILE_VERSION, "keys": [_record_to_json(r) for r in records]}, indent=2) + "\n"


def parse_key_file(text: str) -> list[KeyRecord]:
    """The records of a keys file; KeyFileError says what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise KeyFileError(f"not JSON: {err}") from None
    if isinstance(raw, dict) and "keys" not in raw and raw and all(isinstance(v, str) for v in raw.values()):
        raise KeyFileError("it holds plain-text keys ({\"key\": \"tenant\"}), which are no longer accepted: "
                           "make hashed ones with `tunemesh keys create --tenant T --file FILE`")
    if not isinstance(raw, dict) or raw.get("version") != FILE_VERSION or not isinstance(raw.get("keys"), list):
        raise KeyFileError(f'expected {{"version": {FILE_VERSION}, "keys": [...]}}')
    records = [_record_from_json(item, index) for index, item in enumerate(raw["keys"])]
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise KeyFileError(f"key id {record.id} appears twice")
        seen.add(record.id)
    return records


def read_key_file(path: Path) -> list[KeyRecord]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise KeyFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return parse_key_file(text)
    except KeyFileError as err:
        raise KeyFileError(f"{path}: {err}") from None


def write_key_file(path: Path, records: Iterable[KeyRecord]) -> None:
    """Replace `path` atomically (a reader sees the old file or the new one), mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render_key_file(records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _record_to_json(record: KeyRecord) -> dict:
    return {"id": record.id, "tenant": record.tenant, "kdf": dataclasses.asdict(record.kdf),
            "salt": base64.b64encode(record.salt).decode(), "hash": base64.b64encode(record.hash).decode(),
            "created": record.created, "revoked": record.revoked}


def _record_from_json(item: object, index: int) -> KeyRecord:
    where = f"keys[{index}]"
    if not isinstance(item, dict):
        raise KeyFileError(f"{where} is not an object")
    try:
        key_id, tenant, kdf = item["id"], item["tenant"], Kdf(**item["kdf"])
        salt, digest = base64.b64decode(item["salt"], validate=True), base64.b64decode(item["hash"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise KeyFileError(f"{where}: missing or malformed field ({err})") from None
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeyFileError(f"{where}: id must be 12 lowercase hex digits")
    if not isinstance(tenant, str) or not tenant.strip():
        raise KeyFileError(f"{where}: tenant must be a non-empty string")
    if not isinstance(item.get("revoked", False), bool) or not isinstance(item.get("created", ""), str):
        raise KeyFileError(f"{where}: revoked must be a boolean and created a string")
    try:
        kdf.check()
    except KeyFileError as err:
        raise KeyFileError(f"{where}: {err}") from None
    if len(digest) != kdf.dklen or len(salt) < 8:
        raise KeyFileError(f"{where}: hash must be dklen bytes and salt at least 8")
    return KeyRecord(key_id, tenant, salt, digest, kdf, item.get("created", ""), item.get("revoked", False))


# the scheduler's side -------------------------------------------------------------------


class KeyRing:
    """Key id -> record: a keys file's (re-read when it changes) plus fixed records."""

    def __init__(self, path: Path | None = None, fixed: Iterable[KeyRecord] = (), check_every_s: float = 2.0) -> None:
        self._path, self._check_every_s = path, check_every_s
        self._fixed = {r.id: r for r in fixed}
        self._from_file: dict[str, KeyRecord] = {}
        self._signature: tuple | None = None
        self._checked_at = float("-inf")
        if path is not None:
            self._from_file = {r.id: r for r in read_key_file(path)}  # a bad file at start: refuse to start
            self._signature = _signature(path)
        if not self._from_file and not self._fixed:
            raise KeyFileError("no API keys")

    def __len__(self) -> int:
        return len({**self._from_file, **self._fixed})

    def tenants(self) -> set[str]:
        return {r.tenant for r in {**self._from_file, **self._fixed}.values() if not r.revoked}

    def get(self, key_id: str) -> KeyRecord | None:
        return self._fixed.get(key_id) or self._from_file.get(key_id)

    def refresh(self, now: float) -> bool:
        """Re-read the file if `check_every_s` passed and it changed; True if the keys changed.
        A file that does not parse (or vanished) keeps the last good keys, logged."""
        if self._path is None or now - self._checked_at < self._check_every_s:
            return False
        self._checked_at = now
        signature = _signature(self._path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            records = {r.id: r for r in read_key_file(self._path)}
        except KeyFileError as err:
            log.error("keeping the last good API keys (%d): %s", len(self._from_file), err)
            return False
        changed = records != self._from_file
        self._from_file = records
        if changed:
            log.info("API keys reloaded from %s: %d keys, %d revoked", self._path, len(records),
                     sum(r.revoked for r in records.values()))
        return changed


def _signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


class KeyAuthenticator:
    """The scheduler's authenticator: `await auth(metadata, peer)` -> tenant.

    A key that verified before is matched by its SHA-256 (constant-time compare, no KDF);
    any other key costs one KDF run, off the event loop, and counts against its caller's
    address when it fails."""

    def __init__(self, ring: KeyRing, throttle: FailureThrottle | None = None,
                 clock: Callable[[], float] = time.monotonic, cache_size: int = CACHE_SIZE) -> None:
        self.ring, self._clock, self._cache_size = ring, clock, cache_size
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self._verified: OrderedDict[str, tuple[bytes, KeyRecord]] = OrderedDict()  # key id -> (sha256, record)
        self._turns: dict[str, list] = {}  # caller address -> [lock, holders and waiters]

    @classmethod
    def inline(cls, keys: Mapping[str, str], **kwargs) -> KeyAuthenticator:
        """Development keys given in plain text (`{"key": "tenant"}`), hashed here."""
        return cls(KeyRing(fixed=[hash_key(k, t) for k, t in keys.items()]), **kwargs)

    async def __call__(self, metadata: Mapping[str, str], peer: str = "") -> str:
        return await self.authenticate(api_key_from_metadata(metadata), peer)

    async def authenticate(self, key: str, peer: str = "") -> str:
        now = self._clock()
        if self.ring.refresh(now):  # keep the keys whose record did not change
            self._verified = OrderedDict((k, v) for k, v in self._verified.items() if self.ring.get(k) == v[1])
        if not key:
            raise UnauthenticatedError("MISSING_API_KEY", "send `authorization: Bearer <api key>`")
        key_id, digest = key_id_of(key), hashlib.sha256(key.encode()).digest()
        record = self.ring.get(key_id)
        cached = self._verified.get(key_id)
        if cached is not None and cached[1] == record and hmac.compare_digest(cached[0], digest):
            self._verified.move_to_end(key_id)
            return record.tenant
        source = source_of(peer)
        async with self._turn(source):  # this caller's earlier unverified keys are judged first
            cached = self._verified.get(key_id)  # verified while this call waited its turn?
            if cached is not None and cached[1] == record and hmac.compare_digest(cached[0], digest):
                return record.tenant
            wait_s = self.throttle.blocked_for(source, self._clock())
            if wait_s > 0:
                raise ResourceExhaustedError("AUTH_THROTTLED", f"too many failed API key attempts from this "
                                                               f"address; retry in {wait_s:.0f} s")
            try:
                valid = record is not None and not record.revoked and await asyncio.to_thread(record.matches, key)
            except asyncio.CancelledError:  # an abandoned check counts: cancelling must not dodge the limit
                self.throttle.failed(source, self._clock())
                raise
            if not valid:
                self.throttle.failed(source, self._clock())
                raise UnauthenticatedError("INVALID_API_KEY", "the API key is not valid")
        self._verified[key_id] = (digest, record)
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return record.tenant

    def forget(self, key: str) -> None:
        """Verify `key` again (KDF, throttle) the next time it comes."""
        self._verified.pop(key_id_of(key), None)

    @contextlib.asynccontextmanager
    async def _turn(self, source: str) -> AsyncIterator[None]:
        """Hold `source`'s one verification slot (its lock lives while anyone holds or waits for it)."""
        entry = self._turns.setdefault(source, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._turns[source]


def api_key_from_metadata(metadata: Mapping[str, str]) -> str:
    """Read `authorization: Bearer KEY` or `x-api-key: KEY`."""
    auth = metadata.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return metadata.get("x-api-key", "").strip()


def source_of(peer: str) -> str:
    """A caller's address without its port: `ipv4:10.0.0.7:51234` -> `ipv4:10.0.0.7`."""
    kind, sep, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and sep:
        host, colon, port = rest.rpartition(":")
        return f"{kind}:{host}" if colon and port.isdigit() else peer
    return peer
