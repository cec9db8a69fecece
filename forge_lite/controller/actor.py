"""ForgeActor: a Monarch Actor that knows how to deploy itself.

The tutorial writes ``Policy.options(procs=1, num_replicas=4).as_service(...)``
and ``Trainer.options(procs=1).as_actor(...)``. ``options`` returns a
configured subclass (so two services of one class never share settings),
``as_actor`` spawns one ProcMesh with the actor on each process, and
``as_service`` spawns ``num_replicas`` of those behind a router.

Three things fixed here when the class is defined:
- a class that mixes sync and async endpoints (the tutorial's ForgeCounter),
  which Monarch 0.7 refuses: every endpoint of a ForgeActor is made async. A
  sync body still runs to completion before the actor takes its next message,
  as it would in Monarch.
- an endpoint named like an ActorMesh attribute (``stop``, ``size``...): Monarch
  only says so at spawn time; here the class definition fails, naming it.
- an exception that cannot be rebuilt on the caller's side (its ``__init__``
  takes other arguments than it stores) would reach the caller as a TypeError
  about ``__init__``; every endpoint sends such an exception as a RemoteError
  with the original's name and message (``forge_lite.controller.errors``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from monarch._src.actor.actor_mesh import ActorMesh
from monarch._src.actor.concurrent import _ConcurrentEndpointProperty
from monarch._src.actor.endpoint import EndpointProperty
from monarch.actor import Actor, endpoint

from forge_lite.controller import gpus as _gpus
from forge_lite.controller import procs as _procs
from forge_lite.controller.actor_handle import PortableMesh
from forge_lite.controller.errors import portable
from forge_lite.controller.spawn import spawn_actor_mesh
from forge_lite.controller.service_config import ServiceConfig

# Attributes of Monarch's ActorMesh; an endpoint with one of these names would
# be shadowed on the handle.
RESERVED_NAMES = frozenset(n for n in dir(ActorMesh) if not n.startswith("_"))

_LAYOUT_KEYS = ("procs", "hosts", "with_gpus", "gpu_share", "num_replicas", "mesh_name", "on_hosts")


def _portable_endpoint(prop: EndpointProperty) -> EndpointProperty:
    """The same endpoint with an async body whose exceptions reach the caller
    intact (see ``forge_lite.controller.errors``). A sync body is called from
    the async one, so it still runs to completion before the next message.

    Endpoints with an explicit response port send their own errors: unchanged.
    """
    if isinstance(prop, _ConcurrentEndpointProperty):
        # Monarch wraps the body of a concurrent endpoint in a task launcher;
        # wrap the body itself (``__wrapped__``) and launch that instead.
        body = prop._method.__wrapped__
        if inspect.signature(body) == inspect.signature(prop._method):
            return prop  # the body takes the response port itself
        return _ConcurrentEndpointProperty(
            EndpointProperty(_raising_portable(body), prop._propagator, explicit_response_port=False)
        )
    if prop._explicit_response_port:
        return prop
    return EndpointProperty(
        _raising_portable(prop._method),
        propagator=prop._propagator,
        explicit_response_port=False,
        instrument=prop._instrument,
    )


def _raising_portable(method):
    is_async = inspect.iscoroutinefunction(method)

    @functools.wraps(method)  # keeps the signature Monarch checks calls against
    async def body(self, *args, **kwargs):
        try:
            if is_async:
                return await method(self, *args, **kwargs)
            return method(self, *args, **kwargs)
        except Exception as error:
            converted = portable(error)
            if converted is error:
                raise
            raise converted from None

    body._forge_portable = True
    return body


class ForgeActor(Actor):
    """Base class for every actor and service of the kit.

    Class attributes are the deployment defaults; ``options()`` overrides them.
    ``setup`` is where heavy initialisation goes (loading a model): it runs
    after ``__init__`` on every process, and its errors reach the caller of
    ``as_actor`` / ``as_service`` with their original type.
    """

    procs: int = 1
    hosts: int | None = None
    with_gpus: bool = False
    gpu_share: float = 1.0  # with with_gpus: the share of one GPU each process takes
    num_replicas: int = 1
    mesh_name: str | None = None
    on_hosts: tuple | None = None  # host names/indices of the cluster to place on; None: anywhere
    service_config: ServiceConfig = ServiceConfig()
    # A light actor (one that runs no model: the dataset, the replay buffer)
    # sets this: started with as_actor on this machine with one process and
    # no GPU, it lives on the caller's one shared process of light actors
    # instead of starting a process of its own (each process imports torch
    # again). A service's replicas always get processes of their own.
    shares_process: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name == "setup" and inspect.isfunction(value):
                # `async def setup(self)` without @endpoint still overrides setup.
                value = endpoint(value)
            if not isinstance(value, EndpointProperty):
                continue
            if name in RESERVED_NAMES:
                raise TypeError(
                    f"{cls.__name__}.{name}: an endpoint cannot be named {name!r}, which "
                    f"Monarch's ActorMesh already uses ({', '.join(sorted(RESERVED_NAMES))}). "
                    "Rename the endpoint."
                )
            if not getattr(value._method, "_forge_portable", False):
                value = _portable_endpoint(value)
            setattr(cls, name, value)

    @endpoint
    async def setup(self) -> None:
        """Heavy initialisation; runs once on every process after __init__."""

    @classmethod
    async def caller_defaults(cls, args: tuple, kwargs: dict) -> dict:
        """The constructor's keyword arguments, with what the calling process
        supplies when the caller left it out; ``as_actor`` and ``as_service``
        call it once, and a respawned replica gets the same arguments.

        Here: ``kwargs`` unchanged. The Policy and the RLTrainer fill in the
        kernel's default weight store (``forge_lite.actors.default_store``).
        """
        return kwargs

    # ------------------------------------------------------------ configure

    @classmethod
    def options(
        cls,
        *,
        procs: int | None = None,
        hosts: int | None = None,
        with_gpus: bool | None = None,
        gpu_share: float | None = None,
        num_replicas: int | None = None,
        mesh_name: str | None = None,
        on_hosts: str | int | list | tuple | None = None,
        **service_settings: Any,
    ) -> type:
        """A subclass of ``cls`` with these deployment settings.

        ``procs`` processes per host, ``hosts`` hosts per replica (None: 1;
        more than one needs a cluster, see ``forge_lite.attach_cluster``),
        ``num_replicas`` replicas (services), ``with_gpus`` one GPU per
        process; ``gpu_share`` (with ``with_gpus``, on this machine) the share
        of one GPU each process takes instead, so a learner's policy,
        reference and trainer can share the one GPU a workshop gives them
        (0.3 + 0.2 + 0.5: the kit keeps the count, each process must keep to
        its share itself, e.g. vLLM's ``gpu_memory_utilization``). ``on_hosts`` names the cluster's hosts to place on (``"host1"``,
        ``1``, or a list of them; None: anywhere, least-occupied first): each
        replica goes to the least occupied of them, and a replica whose host
        is lost runs elsewhere until it is back. Other keys are service
        settings (see ``ServiceConfig``), e.g. ``router="least_loaded"``.

        Raises ValueError for a count below 1, a ``gpu_share`` outside (0, 1]
        or a malformed ``on_hosts``,
        and TypeError for an unknown key. Whether the cluster has ``hosts`` hosts
        (and the hosts ``on_hosts`` names) is checked when the actor or
        service starts, not here: the cluster may change.
        """
        if not (isinstance(cls, type) and issubclass(cls, ForgeActor)):
            raise TypeError(
                f"options() needs a ForgeActor subclass, got {cls!r}; "
                "define your actor as `class MyActor(ForgeActor): ...`"
            )
        unknown = sorted(set(service_settings) - set(ServiceConfig.keys()))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.options() got unknown key(s) {unknown}; "
                f"valid keys: {list(_LAYOUT_KEYS) + ServiceConfig.keys()}"
            )
        layout = {
            "procs": cls.procs if procs is None else procs,
            "hosts": cls.hosts if hosts is None else hosts,
            "with_gpus": cls.with_gpus if with_gpus is None else bool(with_gpus),
            "gpu_share": cls.gpu_share if gpu_share is None else gpu_share,
            "num_replicas": cls.num_replicas if num_replicas is None else num_replicas,
            "mesh_name": cls.mesh_name if mesh_name is None else mesh_name,
            "on_hosts": cls.on_hosts if on_hosts is None else host_names(on_hosts),
        }
        for key in ("procs", "num_replicas"):
            value = layout[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        share = layout["gpu_share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"gpu_share must be a number in (0, 1] (the share of one GPU each process "
                             f"takes), got {share!r}")
        hosts = layout["hosts"]
        if hosts is not None and (not isinstance(hosts, int) or isinstance(hosts, bool) or hosts < 1):
            raise ValueError(f"hosts must be None or an integer >= 1, got {hosts!r}")
        settings = {**vars(cls.service_config), **service_settings}
        configured = type(
            cls.__name__,
            (cls,),
            {
                **layout,
                "service_config": ServiceConfig(**settings),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_forge_configured": True,
            },
        )
        return configured

    @classmethod
    def actor_class(cls) -> type:
        """The user's class itself, without the subclasses options() makes.

        That class is what gets spawned: it pickles by reference (or, for a
        class defined in a notebook, by value) like any class the user wrote.
        """
        for klass in cls.__mro__:
            if not vars(klass).get("_forge_configured", False):
                return klass
        return cls

    # ------------------------------------------------------------ deploy

    @classmethod
    async def as_actor(cls, *args: Any, **kwargs: Any):
        """Spawn ``procs`` processes (on each of ``hosts`` hosts) with one actor
        each; return the ActorMesh. A light actor (``shares_process``) with
        one process on this machine goes on the caller's shared process of
        light actors instead.

        Use Monarch's adverbs on the result: ``await actor.ep.call_one(...)``.
        An exception the endpoint raises reaches the caller as itself (not
        wrapped in Monarch's ActorError), its remote traceback as a note, as
        through a service.
        On a cluster the actor goes to the least-occupied hosts (of
        ``on_hosts``, when given), and a mesh over several hosts has the
        dimensions ``hosts`` and ``procs``. Raises ValueError when ``hosts``
        exceeds the cluster's hosts or ``on_hosts`` names a host it lacks.
        """
        from forge_lite.controller import cluster as _cluster

        kwargs = await cls.caller_defaults(args, kwargs)
        name = cls.mesh_name or cls.actor_class().__name__.lower()
        cluster = _cluster.current()
        prefer = None  # the hosts on_hosts chooses: validated before anything starts
        if cls.on_hosts is not None:
            prefer = cluster.choose_among(cls.on_hosts, cls.hosts or 1,
                                          f"{cls.__name__}.options(on_hosts={list(cls.on_hosts)})")
        if cluster.is_local and cls.shares_process and cls.procs == 1 and (cls.hosts or 1) == 1 \
                and not cls.with_gpus and cls.on_hosts is None:
            processes = await _procs.acquire_shared()
        elif cluster.is_local:
            cluster.check(cls.hosts or 1, f"{cls.__name__}.options(hosts={cls.hosts})")
            gpus = _gpus.reserve_gpus(cls.procs, f"{cls.__name__}", cls.gpu_share) if cls.with_gpus else None
            try:
                processes = await _procs.spawn_processes(cls.procs, name, gpus, gpu_share=cls.gpu_share)
            except BaseException:
                _gpus.release_gpus(gpus or [], cls.gpu_share)
                raise
        else:
            if cls.with_gpus and cls.gpu_share < 1:
                raise ValueError(f"{cls.__name__}: gpu_share={cls.gpu_share} shares a GPU of this machine; "
                                 "on a cluster each process takes a whole GPU (leave gpu_share at 1)")
            placement = cluster.place(cls.hosts or 1, cls.procs, cls.with_gpus,
                                      f"{cls.__name__}.options(hosts={cls.hosts})", prefer=prefer)
            processes = await _procs.spawn_processes(cls.procs, name, placement=placement)
        mesh = PortableMesh.of(await spawn_actor_mesh(cls, processes, name, args, kwargs))
        _handles[id(mesh)] = (mesh, processes)
        return mesh

    @classmethod
    async def as_service(cls, *args: Any, **kwargs: Any):
        """Spawn ``num_replicas`` replicas behind a router; return the service."""
        from forge_lite.controller.service import Service

        return await Service.start(cls, args, await cls.caller_defaults(args, kwargs))

    @classmethod
    async def shutdown(cls, handle: Any) -> None:
        """Stop what ``as_actor`` (or ``as_service``) returned; safe to repeat.

        A light actor on the shared process is stopped alone; the process
        goes with the last actor on it (or when the caller exits).
        """
        if hasattr(handle, "shutdown") and not isinstance(handle, ActorMesh):
            await handle.shutdown()
            return
        entry = _handles.pop(id(handle), None)
        if entry is not None:
            await _procs.release_processes(entry[1], entry[0])


def host_names(on_hosts) -> tuple:
    """``on_hosts`` as a tuple of host names and indices; ValueError otherwise."""
    names = (on_hosts,) if isinstance(on_hosts, (str, int)) else on_hosts
    if not isinstance(names, (list, tuple)) or not names or any(
        isinstance(n, bool) or not isinstance(n, (str, int)) or (isinstance(n, int) and n < 0) for n in names
    ):
        raise ValueError(f"on_hosts must be a host name ('host1'), an index >= 0, or a non-empty list of them; "
                         f"got {on_hosts!r}")
    return tuple(names)


def processes_of(handle: Any) -> _procs.Processes | None:
    """The processes ``as_actor`` started for ``handle`` (their pids, and on
    a cluster their ``placement``); None for a mesh it did not start."""
    entry = _handles.get(id(handle))
    return entry[1] if entry else None


# id(ActorMesh) -> (ActorMesh, Processes). The mesh is kept alive with its
# entry so the id cannot be reused while registered.
_handles: dict[int, tuple[Any, _procs.Processes]] = {}
