"""API keys through the launcher's gateway as `tunemesh up` runs it (hashed keys only, no
development keys): the gateway verifies keys against the mesh's keys file before any call
carries them, so a client guessing keys is refused and throttled at the gateway, and the
scheduler, which every gateway call reaches from the gateway's one address, never counts
those guesses against that address. Clients on other loopback addresses (127.0.0.2-4
guess; 127.0.0.1 is the user) then leave the user able to get in with a key it never used
before."""

from __future__ import annotations

import secrets
import ssl

import httpx
import pytest

from tunemesh_local import launcher

pytestmark = pytest.mark.e2e

GUESSES = 6  # per guessing client: past the gateway's limit per client (4 a minute)
GUESSERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # together over the scheduler's allowance per address (10)


@pytest.fixture(scope="module")
def mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory):
    with start_mesh(tmp_path_factory.mktemp("gateway-keys"), gateway=True, dev_keys=False) as running:
        yield running


def capabilities(mesh, key: str, source: str) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source, verify=ssl.create_default_context(cafile=mesh.ca_file))
    with httpx.Client(transport=transport, trust_env=False, timeout=60) as client:
        return client.get(f"{mesh.gateway_url}/api/v1/get_server_capabilities", headers={"X-API-Key": key})


def test_guesses_are_stopped_at_the_gateway_and_a_new_key_from_elsewhere_still_works(mesh):
    keys = launcher.client_keys(mesh)
    alice_key, bob_key = keys["alice"], keys["bob"]
    assert capabilities(mesh, alice_key, "127.0.0.2").status_code == 200  # verified once from there

    prefix = alice_key[: alice_key.rindex("-") + 1]  # a real key id: each guess costs a KDF
    for source in GUESSERS:  # several clients, each past the gateway's own limit
        statuses = [capabilities(mesh, prefix + secrets.token_urlsafe(32), source).status_code
                    for _ in range(GUESSES)]
        assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses) == {401, 429}
    assert capabilities(mesh, alice_key, "127.0.0.2").status_code == 200  # a key that verified still passes
    # bob's key has never been seen: had the guesses reached the scheduler (a gateway that
    # only tallies failures per client passes 4 per client on: 12 here), the gateway's
    # address would be throttled there (AUTH_THROTTLED, 429) for every Tinker user.
    reply = capabilities(mesh, bob_key, "127.0.0.1")
    assert reply.status_code == 200, reply.text
