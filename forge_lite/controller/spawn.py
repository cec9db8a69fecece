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

    On failure the processes are stopped and the error is re-raised: the
    original exception for ``setup``, and for ``__init__`` (which Monarch
    reports as a supervision failure, with the traceback in its text) a
    RuntimeError saying so.
    """
    try:
        mesh = processes.mesh.spawn(actor_name, cls.actor_class(), *args, **kwargs)
        try:
            await mesh.setup.call()
        except ActorError as e:
            raise remote_exception(e) from None
        except RuntimeError as e:
            if "Supervision" in type(e).__name__ or "aborted" in str(e):
                raise RuntimeError(
                    f"{cls.__name__}(...) failed while starting on its process:\n{e}"
                ) from None
            raise
    except BaseException:
        await _procs.stop_processes(processes)
        raise
    return mesh
