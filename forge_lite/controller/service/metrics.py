"""Per-replica and per-service numbers, folded from the event stream.

Nothing here asks the replicas anything: every number is computed from the
events the service published, so the dashboard, ``svc.metrics()`` and the
routing log can never disagree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from forge_lite.controller.service.events import (
    Event,
    EventStream,
    HostStateChanged,
    ReplicaStateChanged,
    RequestFinished,
    RequestRouted,
    SessionEnded,
    SessionMoved,
    SessionStarted,
)

LATENCY_WINDOW = 512  # recent latencies kept per replica for p50/p95


@dataclass
class ReplicaMetrics:
    index: int
    state: str = "RECOVERING"
    reason: str = ""
    host: str | None = None  # "local", "host1", "host0+host1"
    requests: int = 0
    failures: int = 0
    in_flight: int = 0
    sessions: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict:
        p50, p95 = self.percentile(0.5), self.percentile(0.95)
        return {
            "index": self.index,
            "state": self.state,
            "reason": self.reason,
            "host": self.host,
            "requests": self.requests,
            "failures": self.failures,
            "in_flight": self.in_flight,
            "sessions": self.sessions,
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p95_ms": None if p95 is None else p95 * 1e3,
        }


class ServiceMetrics:
    """Subscribes to a service's events and keeps running totals."""

    def __init__(self, events: EventStream):
        self.replicas: dict[int, ReplicaMetrics] = {}
        self.session_pins: dict[str, int] = {}
        self.hosts: dict[str, dict] = {}  # "host1" -> {"state", "reason", "where"}
        events.subscribe(self.observe, replay=True)

    def _replica(self, index: int) -> ReplicaMetrics:
        if index not in self.replicas:
            self.replicas[index] = ReplicaMetrics(index)
        return self.replicas[index]

    def observe(self, event: Event) -> None:
        if isinstance(event, RequestRouted):
            self._replica(event.replica).in_flight += 1
        elif isinstance(event, RequestFinished):
            r = self._replica(event.replica)
            r.in_flight -= 1
            if event.replica_failed:
                r.failures += 1
            else:
                r.requests += 1
                r.latencies.append(event.latency_s)
        elif isinstance(event, ReplicaStateChanged):
            r = self._replica(event.replica)
            r.state, r.reason = event.new, event.reason
            if event.host is not None:
                r.host = event.host
        elif isinstance(event, HostStateChanged):
            self.hosts[event.host] = {"state": event.new, "reason": event.reason, "where": event.where}
        elif isinstance(event, SessionStarted):
            self._move_session(event.session, event.replica)
        elif isinstance(event, SessionMoved):
            self._move_session(event.session, event.new_replica)
        elif isinstance(event, SessionEnded):
            self._move_session(event.session, None)

    def _move_session(self, session: str, replica: int | None) -> None:
        old = self.session_pins.pop(session, None)
        if old is not None:
            self._replica(old).sessions -= 1
        if replica is not None:
            self.session_pins[session] = replica
            self._replica(replica).sessions += 1

    def _hosts(self, replicas: list[dict]) -> dict:
        """Each host's state and the replicas on it (a replica over two hosts
        is listed under both); hosts no event named are UP."""
        hosts = {name: {**info, "replicas": []} for name, info in self.hosts.items()}
        for r in replicas:
            if r["host"] is None or r["state"] == "STOPPED":
                continue
            for name in r["host"].split("+"):
                hosts.setdefault(name, {"state": "UP", "reason": "", "where": "", "replicas": []})
                hosts[name]["replicas"].append(r["index"])
        return hosts

    def snapshot(self) -> dict:
        replicas = [self.replicas[i].as_dict() for i in sorted(self.replicas)]
        return {
            "replicas": replicas,
            "hosts": self._hosts(replicas),
            "sessions": len(self.session_pins),
            "healthy": sum(r["state"] in ("HEALTHY", "OVERLOADED") for r in replicas),
            "requests": sum(r["requests"] for r in replicas),
        }
