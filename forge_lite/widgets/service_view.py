"""The state behind a ServiceDashboard, folded from the service's events.

Plain Python, no widgets: what each replica card says (and which host it
runs on), the recent routing decisions, the replica × time strip, and the
KV-cache counters. The dashboard renders this; tests assert on it. Every collection is bounded; the strip
still covers the whole life of the service (see ``ServiceView.add_point``).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from forge_lite.controller.service.events import (
    Event,
    HostStateChanged,
    ReplicaStateChanged,
    RequestFinished,
    RequestRetried,
    RequestRouted,
    ServiceStopped,
    SessionMoved,
)

def natural_key(text: str) -> list:
    """Sort "s-2" before "s-10" (and "host2" before "host10"), as a person would."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


STATE_COLOURS = {
    "HEALTHY": "#2e7d32",
    "OVERLOADED": "#ef6c00",
    "FAILED": "#c62828",
    "RECOVERING": "#1565c0",
    "STOPPED": "#616161",
}
FLASH_S = 2.0  # how long a card stays highlighted after its state changes
# A replica can go FAILED -> RECOVERING -> HEALTHY in under a second, faster
# than the dashboard may redraw; its card says FAILED this long from the first
# drawing that shows the failure, so a person (or a browser test) sees it.
SHOW_FAILED_S = 2.0
STALE_FAILURE_S = 30.0  # a failure first drawn later than this is not shown again


@dataclass
class Card:
    """What one replica card shows."""

    index: int
    state: str = "RECOVERING"
    host: str | None = None  # "local", "host1", "host0+host1"; None until placed
    reason: str = "starting"
    changed_at: float = 0.0
    failed_at: float | None = None
    failure_drawn_at: float | None = None  # when a drawing first showed the latest failure
    in_flight: int = 0
    capacity: int = 0
    served: int = 0
    p50_ms: float | None = None
    sessions: int = 0
    weight_version: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def shown_state(self, now: float) -> str:
        """The state to draw now. Call it when drawing: a failure is drawn for
        SHOW_FAILED_S from the first drawing that shows it, even when the
        replica has already recovered by then."""
        if self.failed_at is None or self.state in ("FAILED", "STOPPED"):
            return self.state
        if self.failure_drawn_at is None:
            if now - self.failed_at > STALE_FAILURE_S:  # e.g. replayed history: old news
                return self.state
            self.failure_drawn_at = now
        if now - self.failure_drawn_at < SHOW_FAILED_S:
            return "FAILED"
        return self.state

    def failure_lingering(self, now: float) -> bool:
        """True while the card still says FAILED for a replica that has moved on."""
        return self.state not in ("FAILED", "STOPPED") and self.shown_state(now) == "FAILED"

    def css_class(self, now: float) -> str:
        return f"fl-replica-{self.shown_state(now).lower()}"

    @property
    def kv_hit_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def flashing(self, now: float) -> bool:
        return now - self.changed_at < FLASH_S


@dataclass
class HostInfo:
    """What the view knows of one host of the cluster, from HostStateChanged."""

    name: str
    state: str = "UP"
    reason: str = ""
    where: str = ""  # "10.0.0.3:26600"


@dataclass
class RoutingRow:
    time: float
    endpoint: str
    replica: int
    session: str | None
    reason: str
    router: str | None = None  # the router that decided; None for a retry or a moved session


@dataclass
class KVCounter:
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, prompt: int, cached: int) -> None:
        self.prompt_tokens += prompt
        self.cached_tokens += cached

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def hit_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass
class ServiceView:
    """Folds events into dashboard state; ``observe`` is the only writer."""

    capacity: int
    max_rows: int = 50
    max_points: int = 2000
    cards: dict[int, Card] = field(default_factory=dict)
    rows: deque = field(default_factory=deque)
    points: list = field(default_factory=list)  # (time, replica, session): every `stride`-th request
    stride: int = 1  # 1: the strip holds every request
    routed: int = 0  # requests routed so far
    failures: deque = field(default_factory=deque)  # (time, replica)
    kv_by_replica: dict[int, KVCounter] = field(default_factory=dict)
    kv_by_session: dict[str, KVCounter] = field(default_factory=dict)
    kv_total: KVCounter = field(default_factory=KVCounter)
    hosts: dict[str, HostInfo] = field(default_factory=dict)  # the cluster's hosts, by name
    stopped: bool = False
    started_at: float | None = None  # time of the first event: the strip's zero
    version: int = 0  # bumped on every change: the renderer redraws when it moves

    def __post_init__(self) -> None:
        self.rows = deque(maxlen=self.max_rows)
        self.failures = deque(maxlen=self.max_points)

    def add_point(self, point: tuple) -> None:
        """Keep a routed request for the strip, from the first to the last.

        A bounded deque would keep only the last ``max_points`` requests: a
        long run's strip would start halfway through. Instead, when the strip
        is full, every other point goes and from then on one request in
        twice as many is kept: the strip always spans the whole run, evenly
        thinned (``stride`` says how much).
        """
        self.routed += 1
        if (self.routed - 1) % self.stride:
            return
        self.points.append(point)
        if len(self.points) > self.max_points:
            self.points = self.points[::2]
            self.stride *= 2

    def card(self, index: int) -> Card:
        if index not in self.cards:
            self.cards[index] = Card(index, capacity=self.capacity)
        return self.cards[index]

    def observe(self, event: Event) -> None:
        self.version += 1
        if self.started_at is None:
            self.started_at = event.time
        if isinstance(event, RequestRouted):
            card = self.card(event.replica)
            card.in_flight += 1
            card.host = event.host or card.host
            self.rows.append(RoutingRow(event.time, event.endpoint, event.replica, event.session,
                                        event.reason, event.router))
            self.add_point((event.time, event.replica, event.session))
        elif isinstance(event, RequestFinished):
            card = self.card(event.replica)
            card.in_flight = max(0, card.in_flight - 1)
            if not event.replica_failed:
                card.served += 1
            self._count_kv(event)
        elif isinstance(event, ReplicaStateChanged):
            card = self.card(event.replica)
            card.state, card.reason, card.changed_at = event.new, event.reason, event.time
            card.host = event.host or card.host  # a respawn may have moved it to another host
            if event.new == "FAILED":
                card.failed_at, card.failure_drawn_at = event.time, None
                self.failures.append((event.time, event.replica))
        elif isinstance(event, RequestRetried):
            self.rows.append(
                RoutingRow(event.time, event.endpoint, event.failed_replica, None,
                           f"failed on replica {event.failed_replica} ({event.error}); retrying")
            )
        elif isinstance(event, SessionMoved):
            self.rows.append(RoutingRow(event.time, "(session)", event.new_replica, event.session, event.reason))
        elif isinstance(event, HostStateChanged):
            self.hosts[event.host] = HostInfo(event.host, event.new, event.reason, event.where)
        elif isinstance(event, ServiceStopped):
            self.stopped = True

    @property
    def on_several_hosts(self) -> bool:
        """True when the replicas run on more than one host: then the cards are grouped."""
        return len({c.host for c in self.cards.values() if c.host is not None}) > 1

    def groups(self) -> list[tuple[str | None, list[Card]]]:
        """The cards by host, ``[(host, cards)]``, hosts in name order ("host2"
        before "host10"), cards by index; one group of every card (host None)
        when the replicas run on one host. A lost host is a group of its own,
        empty once its replicas have moved: the learner sees where they left."""
        cards = [c for _, c in sorted(self.cards.items())]
        if not self.on_several_hosts:
            return [(None, cards)]
        lost = {name for name, info in self.hosts.items() if info.state != "UP"}
        names = sorted({c.host or "?" for c in cards} | lost, key=natural_key)
        return [(name, [c for c in cards if (c.host or "?") == name]) for name in names]

    def host_label(self, name: str) -> str:
        """``host1 (10.0.0.3:26600)``, ``host1 (10.0.0.3:26600) LOST``, or the name
        alone when no HostStateChanged said more (``host0+host1``: a replica over two)."""
        info = self.hosts.get(name)
        if info is None:
            return name
        label = f"{name} ({info.where})" if info.where else name
        return label if info.state == "UP" else f"{label} {info.state}"

    def _count_kv(self, event: RequestFinished) -> None:
        """Count prompt tokens served from cache, from Completions (Policy.generate)."""
        result = event.result
        if not isinstance(result, list) or not result or not hasattr(result[0], "num_cached_tokens"):
            return
        first = result[0]  # n samples of one prompt share its prompt tokens: count once
        prompt, cached = len(first.prompt_ids), int(first.num_cached_tokens)
        card = self.card(event.replica)
        card.prompt_tokens += prompt
        card.cached_tokens += cached
        card.weight_version = getattr(first, "generator_version", card.weight_version)
        self.kv_by_replica.setdefault(event.replica, KVCounter()).add(prompt, cached)
        if event.session is not None:
            self.kv_by_session.setdefault(event.session, KVCounter()).add(prompt, cached)
        self.kv_total.add(prompt, cached)

    def refresh_from(self, metrics: dict) -> None:
        """Take latency and session counts from the service's metrics."""
        for m in metrics["replicas"]:
            card = self.card(m["index"])
            card.p50_ms, card.sessions = m["p50_ms"], m["sessions"]
