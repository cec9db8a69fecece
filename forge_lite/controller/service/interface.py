"""What ``as_service()`` returns: endpoints with ``route`` and ``fanout``.

``svc.generate.route(prompt)`` sends to one replica, ``svc.get_version.fanout()``
to all. Monarch's own adverbs (``call_one``, ``call``, ``choose``,
``broadcast``, ``stream``) address actors, not services; on a service they
raise an error that says which adverb to use instead.
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
        """Call one replica (load balanced, or the session's); retried on another
        replica if this one dies. Returns what the endpoint returned."""
        return await self._service.route(self.name, args, kwargs, sess_id=sess_id)

    async def fanout(self, *args: Any, **kwargs: Any) -> list:
        """Call every replica that is up; results in replica order
        (``.replicas`` on the result says which)."""
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
    """The handle to a running service."""

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
        """``async with svc.session():`` pins this service's routes to one replica."""
        sid = self._service.start_session(session_id)
        return session_scope(self._service.id, sid, self._service.terminate_session)

    def start_session(self, session_id: str | None = None) -> str:
        return self._service.start_session(session_id)

    def terminate_session(self, session_id: str) -> None:
        self._service.terminate_session(session_id)

    # watching -------------------------------------------------------------

    @property
    def events(self):
        return self._service.events

    @property
    def replicas(self):
        return list(self._service.replicas)

    @property
    def name(self) -> str:
        return self._service.name

    @property
    def service(self):
        """The controller behind this handle (for widgets and the curious)."""
        return self._service

    def metrics(self) -> dict:
        return self._service.metrics.snapshot()

    # teaching controls ----------------------------------------------------

    async def kill_replica(self, index: int) -> None:
        await self._service.kill_replica(index)

    async def slow_replica(self, index: int, seconds: float) -> None:
        await self._service.slow_replica(index, seconds)

    async def scale(self, num_replicas: int) -> None:
        await self._service.scale(num_replicas)

    async def wait_for_state(self, index: int, state: str, timeout: float = 60.0) -> None:
        await self._service.wait_for_state(index, state, timeout)

    def set_router(self, router) -> None:
        """Switch the router of the running service (a name or a Router)."""
        from forge_lite.controller.service.router import make_router

        self._service.router = make_router(router)

    async def shutdown(self) -> None:
        await self._service.shutdown()

    def __repr__(self) -> str:
        states = [str(r.state) for r in self._service.replicas]
        return f"<Service {self._service.actor_cls.__name__}: {len(states)} replicas {states}>"
