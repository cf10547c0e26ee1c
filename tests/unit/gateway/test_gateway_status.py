"""gRPC status -> HTTP status the SDK acts on, and failed futures' categories."""

from __future__ import annotations

import pytest

from tunemesh.errors import Code, error_for
from tunemesh_gateway import status

SDK_RETRIES = {408, 409, 429} | set(range(500, 600))  # what the SDK re-sends for minutes


@pytest.mark.parametrize("code", list(Code)[1:])
def test_every_code_has_a_status_and_a_detail(code):
    err = error_for(code, "SOME_REASON", "what happened")
    assert 400 <= status.http_status(err) < 600
    assert status.detail(err) == "SOME_REASON: what happened"


def test_caller_errors_fail_at_once_and_capacity_errors_are_retried():
    http = {code: status.http_status(error_for(code, "R", "m")) for code in Code if code != Code.OK}
    for code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS, Code.OUT_OF_RANGE):
        assert http[code] == 400  # never 409: the SDK would re-send a duplicate create for 5 minutes
    assert (http[Code.UNAUTHENTICATED], http[Code.PERMISSION_DENIED], http[Code.NOT_FOUND]) == (401, 403, 404)
    assert http[Code.RESOURCE_EXHAUSTED] == 429 and http[Code.UNAVAILABLE] in SDK_RETRIES
    assert 409 not in http.values()


def test_failed_futures_name_the_caller_or_the_server():
    assert status.failed_future(3, "TOKEN_OUT_OF_RANGE", "token 9") == {
        "error": "TOKEN_OUT_OF_RANGE: token 9", "category": "user"}
    assert {status.failed_future(c, "R", "m")["category"] for c in (5, 6, 9, 11)} == {"user"}
    assert {status.failed_future(c, "R", "m")["category"] for c in (8, 13, 14)} == {"server"}
    assert status.failed_future(13, "", "")["error"]  # never an empty message


def test_gateway_errors_carry_their_status():
    assert (status.Unsupported("x").status, status.Unsupported("x").detail) == (400, "unsupported: x")
    assert status.Gone("expired").status == 410
