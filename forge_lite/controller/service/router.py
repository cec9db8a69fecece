"""Routers: which replica takes the next request, and why.

A router sees the request and the replicas that can take it now (healthy,
with room), and returns one of them with a short human-readable reason; the
reason is what the dashboard's routing log shows. Sessions are handled before
the router is asked (see ``sessions.py``). To write your own, subclass
``Router`` and pass an instance: ``options(router=MyRouter())``.

A router is the user's code, so the service guards the call: when ``choose``
raises, or returns anything but ``(one of the candidates, reason)``, that one
request fails with the error and no replica slot is taken; the next request
asks the router again.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol


class ReplicaView(Protocol):
    """What a router may read about a replica."""

    index: int
    in_flight: int
    requests_served: int


# eq=False: a request is one call, equal only to itself. Field equality
# would compare the call's arguments, and a tensor or an array answers ==
# element-wise (bool() of that raises), so finding a request among those
# waiting in line would fail for exactly the calls a model service gets.
@dataclass(eq=False)
class Request:
    """One call being routed."""

    endpoint: str
    args: tuple
    kwargs: dict
    session: str | None = None
    id: int = 0
    attempt: int = 0
    failed_replicas: list[int] = field(default_factory=list)

    def prompt_text(self) -> str | None:
        """The prompt, when the call carries one (first str argument or ``prompt=``)."""
        prompt = self.kwargs.get("prompt", self.args[0] if self.args else None)
        return prompt if isinstance(prompt, str) else None


class Router:
    """Interface: pick one of ``candidates`` (never empty) for ``request``."""

    name = "router"

    def choose(self, request: Request, candidates: list[ReplicaView]) -> tuple[ReplicaView, str]:
        """Return ``(replica, reason)``; ``replica`` must be one of ``candidates``."""
        raise NotImplementedError

    def forget_replica(self, index: int) -> None:
        """The replica at ``index`` restarted: anything known about it is stale."""


class RoundRobin(Router):
    """Replicas in index order, skipping those that cannot take a request.

    Deterministic on purpose: three routed calls on four idle replicas go to
    0, 1, 2, and a learner can predict that.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request, candidates):
        ordered = sorted(candidates, key=lambda r: (r.index < self._next, r.index))
        pick = ordered[0]
        self._next = pick.index + 1
        return pick, f"round robin → {pick.index}"


class LeastLoaded(Router):
    """The replica with the fewest requests in flight (ties: fewest served)."""

    name = "least_loaded"

    def choose(self, request, candidates):
        pick = min(candidates, key=lambda r: (r.in_flight, r.requests_served, r.index))
        return pick, f"least loaded ({pick.in_flight} in flight) → {pick.index}"


class PrefixAware(Router):
    """Send a prompt where its longest prefix was served before.

    An engine's prefix cache holds the key/value tensors of prompts it has
    seen, so a follow-up turn (previous prompt + reply + new question) is
    cheapest on the replica that served the previous turn. This router keeps,
    per replica, the hashes of the prompt prefixes it served, in blocks of
    ``block_chars`` characters (a stand-in for the engine's token blocks),
    chained so that a block's hash names everything before it too. It picks
    the replica with the most matching leading blocks, unless the
    least-loaded replica matches as much (then it takes it) or the best one
    has ``max_imbalance`` more requests in flight: then load wins. Calls without a text prompt are balanced by load.
    """

    name = "prefix"

    def __init__(self, block_chars: int = 64, max_imbalance: int = 4, max_blocks: int = 20_000):
        self.block_chars = block_chars
        self.max_imbalance = max_imbalance
        self.max_blocks = max_blocks
        self._seen: dict[int, OrderedDict[bytes, None]] = {}
        self._fallback = LeastLoaded()

    def _block_hashes(self, text: str) -> list[bytes]:
        hashes, running = [], hashlib.blake2b(digest_size=8)
        for start in range(0, len(text) - self.block_chars + 1, self.block_chars):
            running.update(text[start : start + self.block_chars].encode())
            hashes.append(running.copy().digest())
        return hashes

    def _matched_blocks(self, index: int, hashes: list[bytes]) -> int:
        seen = self._seen.get(index, {})
        count = 0
        for h in hashes:
            if h not in seen:
                break
            count += 1
        return count

    def _remember(self, index: int, hashes: list[bytes]) -> None:
        seen = self._seen.setdefault(index, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:  # bounded memory: forget the oldest
            seen.popitem(last=False)

    def choose(self, request, candidates):
        text = request.prompt_text()
        if text is None:
            return self._fallback.choose(request, candidates)
        hashes = self._block_hashes(text)
        least = min(candidates, key=lambda r: (r.in_flight, r.requests_served, r.index))
        best = max(candidates, key=lambda r: (self._matched_blocks(r.index, hashes), -r.in_flight))
        matched = self._matched_blocks(best.index, hashes)
        # A prefix the least-loaded replica holds as well (a shared system
        # prompt) is no reason to pile onto another replica.
        if matched <= self._matched_blocks(least.index, hashes):
            best, matched = least, self._matched_blocks(least.index, hashes)
        if matched == 0:
            pick, reason = least, f"no prefix match, least loaded → {least.index}"
        elif best.in_flight - least.in_flight > self.max_imbalance:
            pick = least
            reason = f"prefix match on {best.index} too busy, least loaded → {least.index}"
        else:
            pick = best
            reason = f"prefix match {matched * self.block_chars} chars → {best.index}"
        self._remember(pick.index, hashes)
        return pick, reason

    def forget_replica(self, index: int) -> None:
        self._seen.pop(index, None)


ROUTERS = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "prefix": PrefixAware}


def make_router(spec: Any) -> Router:
    """A router from a name in ROUTERS, or a copy of a Router instance (each
    service keeps its own routing state)."""
    if isinstance(spec, Router):
        return copy.deepcopy(spec)
    if isinstance(spec, str) and spec in ROUTERS:
        return ROUTERS[spec]()
    raise ValueError(f"unknown router {spec!r}; use one of {sorted(ROUTERS)} or a Router instance")
