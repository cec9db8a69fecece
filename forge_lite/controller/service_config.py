"""The settings of a service. The router defaults to round robin, as in the tutorial;
the other defaults are the kit's own choices (each field's comment says what it controls)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ServiceConfig:
    """Everything ``options(...)`` accepts beyond the process layout."""

    # A replica with this many requests in flight is OVERLOADED: the router
    # prefers others, and when all are full requests wait in order.
    max_concurrent_requests: int = 10
    # Seconds between active health probes of every replica.
    health_poll_rate: float = 1.0
    # How many times a request is retried on another replica after an
    # infrastructure failure (a dead process), not after a user exception.
    max_retries: int = 2
    # Consecutive infrastructure failures that open a replica's circuit breaker.
    failure_threshold: int = 3
    # Seconds an open breaker keeps a replica out before one probe decides.
    cooldown: float = 5.0
    # Longest wait, in seconds, for a replica to take a request; None = forever.
    request_timeout: float | None = None
    # "round_robin", "least_loaded", "prefix", or a Router instance.
    router: object = "round_robin"
    # Respawn a failed replica in the background.
    auto_respawn: bool = True
    # Events kept in memory for late subscribers and widgets.
    event_history: int = 2000

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.health_poll_rate <= 0:
            raise ValueError(f"health_poll_rate must be > 0 seconds, got {self.health_poll_rate}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds or None, got {self.request_timeout}")
