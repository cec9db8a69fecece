"""The service layer: replicas behind a router, sessions, health, events.

Read in this order: ``interface.py`` (what the caller sees), ``service.py``
(the controller: a request's life), ``replica.py``, ``router.py``,
``sessions.py``, ``hosts.py`` (placing replicas, and hosts lost and back),
``controls.py`` (kill, slow, scale: the teaching controls), ``events.py``,
``metrics.py``. What each call raises: ``forge_lite.controller.errors``.

What a notebook needs is imported from here: ``Service``, the routers, and
the events a service emits (``service.events.subscribe(...)``).
"""

from forge_lite.controller.errors import FanoutError, NoHealthyReplicaError, ServiceShutdownError
from forge_lite.controller.service_config import ServiceConfig
from forge_lite.controller.service.events import (
    Event, EventStream, HostStateChanged, ReplicaStateChanged, RequestFinished, RequestRetried, RequestRouted,
    ServiceStopped, SessionEnded, SessionMoved, SessionStarted,
)
from forge_lite.controller.service.interface import ServiceEndpoint, ServiceInterface
from forge_lite.controller.service.replica import ReplicaState
from forge_lite.controller.service.router import LeastLoaded, PrefixAware, Request, RoundRobin, Router
from forge_lite.controller.service.service import FanoutResult, Service

__all__ = [
    "ServiceConfig", "ServiceEndpoint", "ServiceInterface", "ReplicaState",
    "Router", "RoundRobin", "LeastLoaded", "PrefixAware", "Request",
    "Service", "FanoutError", "FanoutResult", "NoHealthyReplicaError", "ServiceShutdownError",
    # the events (events.py)
    "EventStream", "Event", "RequestRouted", "RequestFinished", "RequestRetried", "ReplicaStateChanged",
    "HostStateChanged", "SessionStarted", "SessionMoved", "SessionEnded", "ServiceStopped",
]
