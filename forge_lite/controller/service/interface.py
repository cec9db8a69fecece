"""What ``as_service()`` returns: endpoints with ``route`` and ``fanout``.

``svc.generate.route(prompt)`` sends to one replica, ``svc.get_version.fanout()``
to all. Monarch's own adverbs (``call_one``, ``call``, ``choose``,
``broadcast``, ``stream``) address actors, not services; on a service they
raise an error that says which adverb to use instead. What each call can
raise, and when, is listed in ``forge_lite.controller.errors``.
"""

from __future__ import annotations

from typing import Any

from forge_lite.controller.spawn import endpoint_names
from forge_lite.controller.service.sessions import session_scope

_ACTOR_ADVERBS = ("call_one", "call", "choose", "broadcast", "stream")


class ServiceEndpoint:
    """One endpoint of a service."""

    def __init__(self, service, name: str):
        self._service = service
        self.name = name

    async def route(self, *args: Any, sess_id: str | None = None, **kwargs: Any) -> Any:
        """Call the endpoint on one replica; return what it returned.

        The replica is the session's (inside ``async with svc.session():``,
        or ``sess_id=``) or the router's choice among those with room; when
        every replica has ``max_concurrent_requests`` in flight the call
        waits its turn. If the replica's process dies or stops answering,
        the call runs again on another replica (up to ``max_retries`` times).

        Raises the endpoint's own exception as itself (not retried; the
        replica stays healthy); NoHealthyReplicaError when no replica can take
        it (all failed, retries used up, or ``request_timeout`` seconds
        passed); ServiceShutdownError after ``shutdown()``; TypeError for
        arguments that do not fit the endpoint's signature.

        Example: ``completions = await policy.generate.route("What is 2+2?")``.
        """
        return await self._service.route(self.name, args, kwargs, sess_id=sess_id)

    async def fanout(self, *args: Any, **kwargs: Any) -> list:
        """Call the endpoint on every replica that is up, at once.

        Returns a list of the results in replica order; its ``.replicas``
        says which replicas answered (a replica already down when the call
        starts is left out). No retries: it is a call to each replica.

        Raises FanoutError if any replica's call failed (its endpoint raised,
        or its process died), naming the replicas, with the other replicas'
        answers in ``.results``; NoHealthyReplicaError if no replica is up.

        Example: ``await policy.update_weights.fanout(3)``, then
        ``await policy.get_version.fanout()`` gives ``[3, 3]``.
        """
        return await self._service.fanout(self.name, args, kwargs)

    def __getattr__(self, adverb: str):
        if adverb in _ACTOR_ADVERBS:
            def wrong_adverb(*args: Any, **kwargs: Any):
                raise NotImplementedError(
                    f"{self.name}.{adverb}() is an actor adverb; services use "
                    f"{self.name}.route() (one replica) or {self.name}.fanout() (every replica)."
                )
            return wrong_adverb
        raise AttributeError(f"service endpoint {self.name!r} has no attribute {adverb!r}; use route() or fanout()")

    def __call__(self, *args: Any, **kwargs: Any):
        raise TypeError(
            f"call a service endpoint with an adverb: await svc.{self.name}.route(...) "
            f"or await svc.{self.name}.fanout(...)"
        )

    def __repr__(self) -> str:
        return f"<ServiceEndpoint {self._service.name}.{self.name}>"


class ServiceInterface:
    """The handle to a running service: what ``as_service()`` returns.

    Each endpoint of the actor class is an attribute with ``route`` (one
    replica) and ``fanout`` (every replica): ``await svc.increment.route()``.
    ``session()`` pins routes to one replica; ``events``, ``replicas`` and
    ``metrics()`` show what the service does; ``kill_replica``,
    ``slow_replica`` and ``scale`` change it while it runs; ``shutdown()``
    stops it. An unknown endpoint name is an AttributeError that lists the
    endpoints.
    """

    def __init__(self, service):
        self._service = service
        self._endpoints = {
            name: ServiceEndpoint(service, name)
            for name in endpoint_names(service.actor_cls)
            if name != "setup"
        }

    def __getattr__(self, name: str) -> ServiceEndpoint:
        endpoints = self.__dict__.get("_endpoints", {})
        if name in endpoints:
            return endpoints[name]
        raise AttributeError(
            f"{self._service.actor_cls.__name__} service has no endpoint {name!r}; "
            f"its endpoints are: {', '.join(sorted(endpoints))}"
        )

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._endpoints))

    # sessions -------------------------------------------------------------

    def session(self, session_id: str | None = None):
        """``async with svc.session() as sid:``: every ``route`` of this service
        inside it (in this task and the tasks it starts) goes to one replica,
        the least loaded when the session's first request is routed, so the
        replica's state (a KV cache, a counter) is the session's.

        If that replica fails, the session moves to another one (a
        ``SessionMoved`` event says why; state on the old replica is gone).
        Other services are not pinned. ``session_id`` names the session (a
        fresh id by default). Raises ServiceShutdownError after shutdown.
        """
        sid = self._service.start_session(session_id)
        return session_scope(self._service.id, sid, self._service.terminate_session)

    def start_session(self, session_id: str | None = None) -> str:
        """Start a session without a ``with`` block; returns its id, to pass
        as ``route(..., sess_id=id)``. End it with ``terminate_session``."""
        return self._service.start_session(session_id)

    def terminate_session(self, session_id: str) -> None:
        """End a session: its pin is dropped (the replica itself is untouched)."""
        self._service.terminate_session(session_id)

    # watching -------------------------------------------------------------

    @property
    def events(self):
        """The service's EventStream: ``svc.events.subscribe(fn)`` calls ``fn``
        with every event (routing, finishes, retries, state changes, sessions)."""
        return self._service.events

    @property
    def replicas(self):
        """The replicas (each with ``index``, ``state``, ``reason``, ``in_flight``, ``pids``)."""
        return list(self._service.replicas)

    @property
    def name(self) -> str:
        """The service's name, e.g. ``"policy0"`` (actor class, lower case, and a number)."""
        return self._service.name

    @property
    def service(self):
        """The controller behind this handle (for widgets and the curious)."""
        return self._service

    def metrics(self) -> dict:
        """Counts from the event stream: ``{"replicas": [per-replica dicts],
        "sessions": int, "healthy": int, "requests": int}``."""
        return self._service.metrics.snapshot()

    # teaching controls ----------------------------------------------------

    async def kill_replica(self, index: int) -> None:
        """SIGKILL replica ``index``'s processes, as a crash would; returns once
        the service has noticed (the replica is FAILED; it respawns in the
        background). Requests in flight on it are retried on other replicas.
        Raises IndexError for a replica that does not exist."""
        await self._service.kill_replica(index)

    async def kill_host(self, index: int) -> None:
        """SIGKILL host ``index`` of the cluster (its worker and every process
        on it), as a machine losing power would; returns once the service has
        noticed (its probe missed; benchmarks/hosts.py measures how soon). Every replica there is FAILED,
        its requests retried on other hosts, and it respawns on a host that
        is up. Raises ValueError when the cluster is this machine alone and
        IndexError for a host that does not exist."""
        await self._service.kill_host(index)

    async def slow_replica(self, index: int, seconds: float) -> None:
        """Hold every request to replica ``index`` ``seconds`` longer (0 ends it),
        like a slow network or a busy GPU. Raises ValueError for seconds < 0."""
        await self._service.slow_replica(index, seconds)

    async def scale(self, num_replicas: int) -> None:
        """Grow to ``num_replicas`` (new replicas start, and serve once HEALTHY),
        or shrink: the highest-numbered replicas stop taking requests, finish
        the ones in flight, and stop. Raises ValueError for num_replicas < 1."""
        await self._service.scale(num_replicas)

    async def wait_for_state(self, index: int, state: str, timeout: float = 60.0) -> None:
        """Wait until replica ``index`` is in ``state`` ("HEALTHY", "FAILED", ...),
        or passes through it. Raises TimeoutError after ``timeout`` seconds,
        saying the state it is in instead."""
        await self._service.wait_for_state(index, state, timeout)

    def set_router(self, router) -> None:
        """Switch the router of the running service (a name or a Router)."""
        from forge_lite.controller.service.router import make_router

        self._service.router = make_router(router)

    async def shutdown(self) -> None:
        """Stop every replica's processes; safe to call twice. Calls after it
        raise ServiceShutdownError; requests waiting for a replica get it too."""
        await self._service.shutdown()

    def __repr__(self) -> str:
        states = [str(r.state) for r in self._service.replicas]
        return f"<Service {self._service.actor_cls.__name__}: {len(states)} replicas {states}>"
