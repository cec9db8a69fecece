"""Putting an actor class on processes: what ``as_actor`` and every service
replica do, below both (so the service layer need not import the
user-facing ForgeActor module, which imports it).
"""

from __future__ import annotations

from monarch._src.actor.endpoint import EndpointProperty
from monarch.actor import ActorError

from forge_lite.controller import procs as _procs
from forge_lite.controller.errors import remote_exception


def endpoint_names(cls: type) -> list[str]:
    """Names of every endpoint of an actor class, inherited ones included."""
    return sorted(
        name for name in dir(cls) if isinstance(getattr(cls, name, None), EndpointProperty)
    )


async def spawn_actor_mesh(cls: type, processes: _procs.Processes, actor_name: str, args, kwargs):
    """Spawn ``cls`` on every process of ``processes`` and run its setup.

    On failure the processes are given back (``release_processes``: stopped,
    or on the shared process of light actors, only this actor) and the error
    is re-raised: the original exception for ``setup``, and for ``__init__``
    (which Monarch reports as a supervision failure, with the traceback in
    its text) a RuntimeError saying so.
    """
    mesh = None
    try:
        mesh = processes.mesh.spawn(actor_name, cls.actor_class(), *args, **kwargs)
        try:
            await mesh.setup.call()
        except ActorError as e:
            raise remote_exception(e) from None
        except RuntimeError as e:
            if "Supervision" in type(e).__name__ or "aborted" in str(e):
                # Monarch spawns no more actors on a process where one failed to start.
                processes.closed = True
                raise RuntimeError(
                    f"{cls.__name__}(...) failed while starting on its process:\n{e}"
                ) from None
            raise
    except BaseException:
        await _procs.release_processes(processes, mesh)
        raise
    return mesh
