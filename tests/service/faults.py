"""Fault injection for the worker tests: a store (or media store) with scripted outages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwenserve.errors import ServiceUnavailable

OK = "ok"
"""The call goes through."""
DOWN = "down"
"""The call raises ServiceUnavailable without reaching the store (Redis refused it)."""
LOST = "lost"
"""The call is applied, then raises ServiceUnavailable (the reply was lost on the way)."""


class Flaky:
    """Wraps a store or media store; ``script("complete", DOWN, DOWN)`` makes the next two
    ``complete`` calls fail, later ones go through. ``calls`` counts calls per method."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._scripts: dict[str, list[str]] = {}
        self.calls: dict[str, int] = {}

    def script(self, method: str, *outcomes: str) -> None:
        self._scripts.setdefault(method, []).extend(outcomes)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            pending = self._scripts.get(name)
            outcome = pending.pop(0) if pending else OK
            if outcome == OK:
                return attr(*args, **kwargs)
            if outcome == LOST:
                attr(*args, **kwargs)
            raise ServiceUnavailable(f"{name}: the store is unreachable (injected)", field="store")

        wrapped: Callable[..., Any] = call
        return wrapped
