"""The handle ``as_actor`` returns: Monarch's ActorMesh, with an endpoint's
exception raised as itself.

Monarch delivers an exception raised in an endpoint wrapped in its
``ActorError`` (``error.exception`` is the original). A service's ``route``
already raises the original, so a learner who moves a call from an actor to
a service, or back, would catch different things. This mesh unwraps it: for
``call_one``, ``call``, ``choose`` and ``stream``, ``except ValueError`` catches
the endpoint's ValueError, and the traceback from the actor's process is a
note on it (``forge_lite.controller.errors.remote_exception``). A dead
process is still Monarch's supervision error: that is not the endpoint's.

Everything else is Monarch's own: slicing, ``broadcast``, passing the handle
to another actor (the copy unwraps too).
"""

from __future__ import annotations

from typing import Any, Iterator

from monarch._src.actor.actor_mesh import ActorMesh
from monarch.actor import ActorError

from forge_lite.controller.errors import remote_exception


class PortableCall:
    """One call in flight: awaitable, ``get()``-able and ``as_asyncio()``-able
    like Monarch's Future, raising the endpoint's exception itself."""

    def __init__(self, future: Any):
        self._future = future

    async def _result(self) -> Any:
        try:
            return await self._future
        except ActorError as error:
            raise remote_exception(error) from None

    def __await__(self):
        return self._result().__await__()

    def as_asyncio(self):
        """An asyncio task resolving to the result (needs a running event loop)."""
        import asyncio

        return asyncio.ensure_future(self._result())

    def get(self, timeout: float | None = None) -> Any:
        """Block for the result (``timeout`` in seconds); avoid inside an event loop."""
        try:
            return self._future.get(timeout)
        except ActorError as error:
            raise remote_exception(error) from None

    result = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future, name)


class PortableEndpoint:
    """An endpoint of a `PortableMesh`: Monarch's adverbs, exceptions unwrapped."""

    def __init__(self, endpoint: Any):
        self._endpoint = endpoint

    def call_one(self, *args: Any, **kwargs: Any) -> PortableCall:
        return PortableCall(self._endpoint.call_one(*args, **kwargs))

    def call(self, *args: Any, **kwargs: Any) -> PortableCall:
        return PortableCall(self._endpoint.call(*args, **kwargs))

    def choose(self, *args: Any, **kwargs: Any) -> PortableCall:
        return PortableCall(self._endpoint.choose(*args, **kwargs))

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[PortableCall]:
        return (PortableCall(future) for future in self._endpoint.stream(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:  # broadcast, and Monarch's internals
        return getattr(self._endpoint, name)

    def __repr__(self) -> str:
        return f"PortableEndpoint({self._endpoint!r})"


class PortableMesh(ActorMesh):
    """Monarch's ActorMesh whose endpoints raise an endpoint's exception as itself."""

    @classmethod
    def of(cls, mesh: ActorMesh) -> "PortableMesh":
        """The same actors behind this handle type (nothing is spawned)."""
        return cls(mesh._class, mesh._mesh_name, mesh._inner, mesh._shape, mesh._proc_mesh)

    def _endpoint(self, name, impl, propagator) -> Any:
        return PortableEndpoint(super()._endpoint(name, impl, propagator))

    def _new_with_shape(self, shape) -> "PortableMesh":
        return PortableMesh.of(super()._new_with_shape(shape))

    def __reduce_ex__(self, protocol: Any):
        return PortableMesh, ActorMesh.__reduce_ex__(self, protocol)[1]
