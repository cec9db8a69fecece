"""What a service did, as a stream of typed events.

Every routing decision, result, failure, state change and session change is
published here. The dashboard, the metrics, the tests and the benchmarks all
read this one stream, so what a learner sees is exactly what happened.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    """Something a service did; ``time`` is when (``time.time()``, seconds)."""

    time: float = field(default_factory=time.time, kw_only=True)


@dataclass(frozen=True)
class RequestRouted(Event):
    """Fires when a request is handed to a replica, before it is sent (each retry fires again, with ``attempt`` + 1)."""

    request_id: int
    endpoint: str
    replica: int
    session: str | None
    router: str
    reason: str  # "round robin → 2", "session s-1 pinned → 1", ...
    attempt: int = 0
    host: str | None = None  # where the replica runs: "local", "host1", "host0+host1"


@dataclass(frozen=True)
class RequestFinished(Event):
    """Fires when a replica's answer (or failure) comes back; ``ok`` is False for an
    exception from the endpoint or a dead replica, ``latency_s`` in seconds."""

    request_id: int
    endpoint: str
    replica: int
    session: str | None
    latency_s: float
    ok: bool
    error_type: str | None = None
    result: Any = field(default=None, repr=False)

    @property
    def replica_failed(self) -> bool:
        """The replica failed (its process died or stopped answering), as
        opposed to the endpoint's own code raising: a failure to count against
        the replica, not a request it served."""
        return self.error_type == "ReplicaFailure"


@dataclass(frozen=True)
class RequestRetried(Event):
    """Fires when a request whose replica failed is sent again, to another replica."""

    request_id: int
    endpoint: str
    failed_replica: int
    error: str
    attempt: int


@dataclass(frozen=True)
class ReplicaStateChanged(Event):
    """Fires when a replica moves between HEALTHY, OVERLOADED, FAILED, RECOVERING
    and STOPPED (``old`` is None when it is created); ``reason`` says why."""

    replica: int
    old: str | None
    new: str
    reason: str
    host: str | None = None  # where the replica runs (None before it is placed)


@dataclass(frozen=True)
class HostStateChanged(Event):
    """Fires when a host of the cluster is lost (no answer within the probe
    deadline) or is up again; only when the cluster is more than this machine."""

    host: str  # "host1"
    old: str | None
    new: str  # "UP" or "LOST"
    reason: str
    where: str = ""  # "10.0.0.3:26600"


@dataclass(frozen=True)
class SessionStarted(Event):
    """Fires when a session's first request pins it to a replica."""

    session: str
    replica: int


@dataclass(frozen=True)
class SessionMoved(Event):
    """Fires when a session's replica failed or restarted and the session is
    pinned to another; its state on the old replica is gone."""

    session: str
    old_replica: int
    new_replica: int
    reason: str


@dataclass(frozen=True)
class SessionEnded(Event):
    """Fires when a session ends (its ``with`` block exits, or ``terminate_session``)."""

    session: str
    replica: int | None


@dataclass(frozen=True)
class ServiceStopped(Event):
    """Fires once, when ``shutdown()`` has stopped every replica."""

    name: str


Listener = Callable[[Event], None]


class CallbackWarning(RuntimeWarning):
    """Code the kit called on the user's behalf raised; the kit carried on."""


def callback_name(callback: Callable) -> str:
    """``module.qualname`` of a function, a bound method or a callable object."""
    target = getattr(callback, "__func__", callback)  # a bound method: its function
    name = getattr(target, "__qualname__", None) or type(callback).__qualname__
    module = getattr(target, "__module__", None) or type(callback).__module__
    return f"{module}.{name}"


class CallbackErrors:
    """Calls code the kit runs for the user, so that its errors cannot break the kit.

    A subscriber, a listener or a redraw is the user's code: when it raises,
    the kit keeps its own bookkeeping and calls the next one. Each failing
    callback is reported once, with a ``CallbackWarning`` naming it and its
    error; it keeps being called, and its later errors are not reported again
    (an error on every event would bury the notebook in warnings).
    """

    def __init__(self, role: str):
        self.role = role  # "event subscriber", "recorder listener", ...
        self._reported: list[Callable] = []

    def call(self, callback: Callable, *args: Any) -> None:
        try:
            callback(*args)
        except Exception as error:
            self.report(callback, error)

    def report(self, callback: Callable, error: BaseException) -> None:
        if callback in self._reported:
            return
        self._reported.append(callback)
        warnings.warn(
            f"{self.role} {callback_name(callback)} raised {type(error).__name__}: {error}; "
            f"forge_lite carried on and keeps calling it; its later errors are not reported",
            CallbackWarning,
            stacklevel=3,
        )


class EventStream:
    """Publish/subscribe with a bounded history.

    ``subscribe(fn)`` calls ``fn(event)`` synchronously for each new event
    (keep it cheap) and returns a function that unsubscribes. ``async for
    event in stream`` yields events from now on. ``history()`` returns the
    last ``maxlen`` events, for late subscribers.

    A subscriber that raises does not stop the event: the others still get
    it, and whoever published it (the service, routing a request) carries on.
    The error is reported once per subscriber (see ``CallbackErrors``).
    """

    def __init__(self, maxlen: int = 2000):
        self._history: deque[Event] = deque(maxlen=maxlen)
        self._listeners: list[Listener] = []
        self._errors = CallbackErrors("event subscriber")

    def publish(self, event: Event) -> None:
        self._history.append(event)
        for listener in tuple(self._listeners):
            self._errors.call(listener, event)

    def subscribe(self, listener: Listener, replay: bool = False) -> Callable[[], None]:
        """Call ``listener(event)`` for every event from now on (with
        ``replay=True``, first for the ``event_history`` events kept, oldest
        first); returns an unsubscribe function. A listener that raises is
        reported once (CallbackWarning) and never breaks the service."""
        if replay:
            for event in tuple(self._history):
                self._errors.call(listener, event)
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def history(self, kind: type | None = None) -> list[Event]:
        events = list(self._history)
        return events if kind is None else [e for e in events if isinstance(e, kind)]

    async def __aiter__(self):
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=self._history.maxlen or 0)

        def enqueue(event: Event) -> None:
            if queue.full():  # a slow reader loses the oldest, never blocks the service
                queue.get_nowait()
            queue.put_nowait(event)

        unsubscribe = self.subscribe(enqueue)
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, ServiceStopped):
                    return
        finally:
            unsubscribe()
