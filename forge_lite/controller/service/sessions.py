"""Sticky sessions: which replica a conversation is pinned to.

``async with service.session():`` sets a context variable, so every ``route``
of that service inside the block, and in tasks started inside it, carries the
session id; other services are not affected. A session owns no replica: it
is a pin, chosen (least loaded) at its first request and moved to a healthy
replica if its replica fails. Ending a session only drops the pin.

A session that has ended stays ended: a task started inside the block that
routes after the block exited (a straggler) routes as if it had no session,
and leaves no pin behind. Without that, each straggler would re-create the
ended session's pin, which no ``terminate_session`` ever removes.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
from typing import AsyncIterator

#: Ended session ids remembered, so a late request naming one is not taken as
#: a new session. Bounded: a long-running service ends many sessions.
ENDED_REMEMBERED = 4096


class _Scope:
    """One ``async with service.session()`` block; ``open`` until it exits.
    The tasks started inside share this object through the context variable,
    so they see the block end."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.open = True


# service id -> the session scope, for the current task and the tasks it starts.
_active: contextvars.ContextVar[dict[int, _Scope]] = contextvars.ContextVar(
    "forge_lite_sessions", default={}
)


def current_session(service_id: int) -> str | None:
    """The session id this task routes ``service_id`` under: None outside a
    session block, and None once the block has exited."""
    scope = _active.get().get(service_id)
    return scope.session_id if scope is not None and scope.open else None


class SessionTable:
    """Session id -> pinned (replica index, replica generation), None until first use.

    The generation tells a pin to a respawned replica (whose state is new)
    from a pin to the same process as before.
    """

    def __init__(self) -> None:
        self._pins: dict[str, tuple[int, int] | None] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ids = itertools.count(1)

    def start(self, session_id: str | None = None) -> str:
        """Open a session (a fresh id by default); starting an ended id again reopens it."""
        session_id = session_id or f"s-{next(self._ids)}"
        self._ended.pop(session_id, None)
        self._pins.setdefault(session_id, None)
        return session_id

    def end(self, session_id: str) -> tuple[int, int] | None:
        """Close a session; returns its pin (None if it never routed)."""
        if session_id in self._pins:
            self._ended[session_id] = None
            while len(self._ended) > ENDED_REMEMBERED:
                self._ended.popitem(last=False)
        return self._pins.pop(session_id, None)

    def has_ended(self, session_id: str) -> bool:
        """Was this session ended (and not started again)?"""
        return session_id in self._ended

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
    scope = _Scope(session_id)
    token = _active.set({**_active.get(), service_id: scope})
    try:
        yield session_id
    finally:
        scope.open = False  # tasks started inside see it too: they route without the session
        _active.reset(token)
        on_exit(session_id)
