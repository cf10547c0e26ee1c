"""A scripted fake of the scheduler's public API (`core.Upstream`) for core and app tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FakeStub:
    """Stub methods by name, answered by the fake's handlers."""

    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake

    def __getattr__(self, method: str) -> Callable[..., Any]:
        async def invoke(request: Any) -> Any:
            self._fake.calls.append((method, request))
            handler = self._fake.handlers.get(method)
            if handler is None:
                raise AssertionError(f"unexpected call {method}")
            result = handler(request)
            return await result if hasattr(result, "__await__") else result

        invoke.__name__ = method
        return invoke


class FakeUpstream:
    """`core.Upstream`: `handlers[method](request)` answers (or raises a TunemeshError);
    `calls` records (method, request) in order, `keys` the API key of each call."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any], Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.keys: list[str] = []
        stub = FakeStub(self)
        self.sessions = self.training = self.operations = self.checkpoints = self.sampling = stub

    async def call(self, caller: Any, method: Any, request: Any, timeout: float | None = None) -> Any:
        self.keys.append(caller.api_key)
        return await method(request)

    def requests(self, method: str) -> list[Any]:
        return [request for name, request in self.calls if name == method]
