"""Sticky sessions: which replica a conversation is pinned to.

``async with service.session():`` sets a context variable, so every ``route``
of that service inside the block, and in tasks started inside it, carries the
session id; other services are not affected. A session owns no replica: it
is a pin, chosen (least loaded) at its first request and moved to a healthy
replica if its replica fails. Ending a session only drops the pin.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import AsyncIterator

# service id -> session id, for the current task and the tasks it starts.
_active: contextvars.ContextVar[dict[int, str]] = contextvars.ContextVar(
    "forge_lite_sessions", default={}
)


def current_session(service_id: int) -> str | None:
    return _active.get().get(service_id)


class SessionTable:
    """Session id -> pinned (replica index, replica generation), None until first use.

    The generation tells a pin to a respawned replica (whose state is new)
    from a pin to the same process as before.
    """

    def __init__(self) -> None:
        self._pins: dict[str, tuple[int, int] | None] = {}
        self._ids = itertools.count(1)

    def start(self, session_id: str | None = None) -> str:
        session_id = session_id or f"s-{next(self._ids)}"
        self._pins.setdefault(session_id, None)
        return session_id

    def end(self, session_id: str) -> tuple[int, int] | None:
        return self._pins.pop(session_id, None)

    def pinned(self, session_id: str) -> tuple[int, int] | None:
        return self._pins.get(session_id)

    def pin(self, session_id: str, replica: tuple[int, int]) -> None:
        self._pins[session_id] = replica

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._pins

    def counts(self) -> dict[int, int]:
        """Sessions pinned to each replica."""
        counts: dict[int, int] = {}
        for pin in self._pins.values():
            if pin is not None:
                counts[pin[0]] = counts.get(pin[0], 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._pins)


@contextlib.asynccontextmanager
async def session_scope(service_id: int, session_id: str, on_exit) -> AsyncIterator[str]:
    token = _active.set({**_active.get(), service_id: session_id})
    try:
        yield session_id
    finally:
        _active.reset(token)
        on_exit(session_id)
