"""The service layer on real Monarch processes: routing, sessions, failover,
the circuit breaker, overload, routers, scaling, events and metrics.

Services are shared across tests where a test leaves them as it found them
(module-scoped fixtures); tests that break or reshape a service make their
own. Every wait is for a state or an event, never a fixed sleep.
"""

import asyncio
import contextlib
import importlib
import os
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import count_children, wait_for_children, wait_for_exit
from monarch.actor import endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller.service import (
    FanoutError,
    NoHealthyReplicaError,
    Router,
    ServiceShutdownError,
)
from forge_lite.controller.service.events import (
    ReplicaStateChanged,
    RequestFinished,
    RequestRetried,
    RequestRouted,
    ServiceStopped,
    SessionEnded,
    SessionMoved,
    SessionStarted,
)

pytestmark = pytest.mark.timeout(120)


def this_replica() -> int:
    # Each replica's processes get their index in the environment.
    return int(os.environ["FORGE_LITE_REPLICA"])


class InventoryError(Exception):
    """A user-defined error: it must reach the caller as itself."""


class Worker(ForgeActor):
    def __init__(self, start: int = 0):
        self.value = start

    @endpoint
    async def replica(self) -> int:
        return this_replica()

    @endpoint
    async def echo(self, x, delay: float = 0.0):
        await asyncio.sleep(delay)
        return x, this_replica()

    @endpoint
    async def fail(self, message: str):
        raise InventoryError(message)

    @endpoint
    async def fail_on(self, index: int, message: str) -> int:
        if this_replica() == index:
            raise InventoryError(message)
        return this_replica()

    @endpoint
    async def die_if(self, marker: str) -> int:
        # Dies while "<marker>.<replica index>" exists: a crash the test can
        # switch on and off for one replica.
        if os.path.exists(f"{marker}.{this_replica()}"):
            os._exit(3)
        return this_replica()

    @endpoint
    async def hold(self, gate: str) -> int:
        """Stay busy while the file ``gate`` exists."""
        while os.path.exists(gate):
            await asyncio.sleep(0.01)
        return this_replica()

    @endpoint
    async def handle(self, prompt: str) -> int:
        return this_replica()

    @endpoint
    async def pid(self) -> int:
        return os.getpid()


from tutorial_actors import ForgeCounter  # noqa: E402  (the tutorial's class, verbatim)


class HighestIndex(Router):
    """A custom router: always the highest-numbered replica that has room."""

    name = "highest"

    def choose(self, request, candidates):
        pick = max(candidates, key=lambda r: r.index)
        return pick, f"highest index → {pick.index}"


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def recording(service):
    """Every event the service publishes while the block runs."""
    events = []
    unsubscribe = service.events.subscribe(events.append)
    try:
        yield events
    finally:
        unsubscribe()


async def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def states_of(events, replica: int) -> list[str]:
    return [e.new for e in events if isinstance(e, ReplicaStateChanged) and e.replica == replica]


def became_healthy(events, replica: int) -> bool:
    return "HEALTHY" in states_of(events, replica)


def in_order(sequence: list, wanted: list) -> bool:
    """Does ``wanted`` appear in ``sequence`` in this order (gaps allowed)?"""
    remaining = iter(sequence)
    return all(item in remaining for item in wanted)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def children_at_start():
    return count_children()


@pytest.fixture(scope="module")
async def svc():
    service = await Worker.options(procs=1, num_replicas=3).as_service()
    yield service
    await service.shutdown()


@pytest.fixture(scope="module")
async def routed():
    """Three replicas for the router tests; each test sets the router it needs."""
    service = await Worker.options(num_replicas=3).as_service()
    yield service
    await service.shutdown()


@pytest.fixture(scope="module")
async def fragile():
    """Three replicas whose processes get killed; each test leaves them HEALTHY."""
    service = await Worker.options(num_replicas=3).as_service()
    yield service
    await service.shutdown()


# ---------------------------------------------------------------- the tutorial


async def test_tutorial_counter_demo_with_real_values(capsys):
    counter_service = await ForgeCounter.options(procs=1, num_replicas=4).as_service(initial_value=0)
    try:
        await counter_service.increment.route()
        await counter_service.increment.route()
        await counter_service.increment.route()
        results = await counter_service.increment.fanout()
        print(f"All replica values: {results}")
        # docs/tutorial_differences.md#counter-values: round robin sends the three routes to 0, 1, 2.
        assert "All replica values: [2, 2, 2, 1]" in capsys.readouterr().out
        assert sum(results) == 7

        async with counter_service.session():
            await counter_service.reset.route()
            values = [await counter_service.increment.route() for _ in range(3)]
            final_value = await counter_service.get_value.route()
        assert values == [1, 2, 3]
        assert final_value == 3
    finally:
        await counter_service.shutdown()


# ---------------------------------------------------------------- round robin, fanout


async def test_round_robin_visits_replicas_in_order(svc):
    with recording(svc) as events:
        visited = [await svc.replica.route() for _ in range(7)]
    assert all(b == (a + 1) % 3 for a, b in zip(visited, visited[1:])), visited
    routed = [e for e in events if isinstance(e, RequestRouted)]
    assert [e.replica for e in routed] == visited
    assert all(e.router == "round_robin" for e in routed)


async def test_fanout_returns_every_replica_in_order_and_leaves_round_robin_alone(svc):
    before = await svc.replica.route()
    everyone = await svc.replica.fanout()
    after = await svc.replica.route()
    assert everyone == [0, 1, 2]
    assert everyone.replicas == [0, 1, 2]
    assert after == (before + 1) % 3


# ---------------------------------------------------------------- sessions


async def test_session_pins_gathered_tasks_but_not_other_services(svc, routed):
    routed.set_router("round_robin")
    async with svc.session() as session_id:
        gathered = await asyncio.gather(*(svc.replica.route() for _ in range(8)))
        started_inside = asyncio.create_task(svc.replica.route())
        elsewhere = [await routed.replica.route() for _ in range(3)]
        late = await started_inside
    assert len(set(gathered)) == 1
    assert late == gathered[0]
    assert sorted(elsewhere) == [0, 1, 2]  # the other service still balances
    assert session_id not in svc.service.sessions
    # Outside the block the pin is gone.
    assert sorted([await svc.replica.route() for _ in range(3)]) == [0, 1, 2]


async def test_explicit_session_ids_pin_and_spread(svc):
    with recording(svc) as events:
        first = [await svc.replica.route(sess_id="user-a") for _ in range(3)]
        second = [await svc.replica.route(sess_id="user-b") for _ in range(3)]
        svc.terminate_session("user-a")
        svc.terminate_session("user-b")
    assert len(set(first)) == 1 and len(set(second)) == 1
    # A new session goes to the replica with the fewest sessions.
    assert first[0] != second[0]
    started = {e.session: e.replica for e in events if isinstance(e, SessionStarted)}
    assert started == {"user-a": first[0], "user-b": second[0]}
    ended = [e.session for e in events if isinstance(e, SessionEnded)]
    assert ended == ["user-a", "user-b"]


async def test_start_and_terminate_session(svc):
    session_id = svc.start_session()
    try:
        pinned = {await svc.replica.route(sess_id=session_id) for _ in range(4)}
        assert len(pinned) == 1
        assert svc.metrics()["sessions"] >= 1
    finally:
        svc.terminate_session(session_id)
    assert session_id not in svc.service.sessions
    # docs/tutorial_differences.md#session-end: ending a session drops the pin, nothing else.
    assert all(str(r.state) == "HEALTHY" for r in svc.replicas)


async def test_session_context_accepts_a_chosen_id(svc):
    async with svc.session("conversation-7") as session_id:
        assert session_id == "conversation-7"
        assert len({await svc.replica.route() for _ in range(3)}) == 1
        assert svc.metrics()["sessions"] >= 1


async def test_a_session_that_has_ended_stays_ended(svc, tmp_path):
    """Tasks started inside a session block that route after it exited (a
    straggler), and explicit ids routed after terminate_session, route as if
    they had no session and leave no pin behind."""
    svc.set_router("round_robin")
    before = len(svc.service.sessions)
    release = asyncio.Event()

    async def straggler():
        await release.wait()
        return await svc.replica.route()

    with recording(svc) as events:
        async with svc.session() as session_id:
            pinned = await svc.replica.route()
            stragglers = [asyncio.create_task(straggler()) for _ in range(6)]
        release.set()
        late = await asyncio.gather(*stragglers)
        assert len(svc.service.sessions) == before  # no pin re-created per straggler
        assert session_id not in svc.service.sessions
        assert sorted(set(late)) == [0, 1, 2]  # balanced, not pinned to `pinned`

        # An explicit id after terminate_session: the same.
        svc.start_session("user-z")
        assert len({await svc.replica.route(sess_id="user-z") for _ in range(3)}) == 1
        svc.terminate_session("user-z")
        assert sorted(set([await svc.replica.route(sess_id="user-z") for _ in range(6)])) == [0, 1, 2]
        assert "user-z" not in svc.service.sessions and len(svc.service.sessions) == before
    starts = [e.session for e in events if isinstance(e, SessionStarted)]
    assert starts.count(session_id) == 1 and starts.count("user-z") == 1
    assert pinned in (0, 1, 2)

    # Starting an ended id again opens it again, on purpose.
    svc.start_session("user-z")
    try:
        assert len({await svc.replica.route(sess_id="user-z") for _ in range(3)}) == 1
    finally:
        svc.terminate_session("user-z")


async def test_a_request_waiting_for_room_when_its_session_ends_leaves_no_pin(tmp_path):
    service = await Worker.options(num_replicas=1, max_concurrent_requests=1).as_service()
    gate = tmp_path / "gate"
    gate.touch()
    try:
        busy = asyncio.create_task(service.hold.route(str(gate)))  # takes the only slot
        while service.service.replicas[0].in_flight < 1:
            await asyncio.sleep(0.01)
        async with service.session() as session_id:
            waiting = asyncio.create_task(service.replica.route())
            await asyncio.sleep(0.2)  # it is queued for room, in the session
        gate.unlink()  # the session has ended; now the slot frees up
        assert await busy == 0 and await waiting == 0
        assert session_id not in service.service.sessions and len(service.service.sessions) == 0
    finally:
        await service.shutdown()


# ---------------------------------------------------------------- errors raised to the caller


async def test_user_exception_keeps_type_message_and_replica_health(svc):
    with recording(svc) as events:
        with pytest.raises(InventoryError, match="out of widgets"):
            await svc.fail.route("out of widgets")
    finished = [e for e in events if isinstance(e, RequestFinished)]
    assert len(finished) == 1 and finished[0].error_type == "InventoryError"
    assert not [e for e in events if isinstance(e, (RequestRetried, ReplicaStateChanged))]
    assert all(str(r.state) == "HEALTHY" for r in svc.replicas)
    assert await svc.replica.route() in (0, 1, 2)


async def test_fanout_failure_names_the_replica_and_keeps_the_others_results(svc):
    with pytest.raises(FanoutError) as info:
        await svc.fail_on.fanout(1, "bad shard")
    error = info.value
    assert "replica 1" in str(error) and "bad shard" in str(error)
    assert list(error.failures) == [1]
    assert isinstance(error.failures[1], InventoryError)
    assert error.results == {0: 0, 2: 2}


def test_the_controller_exceptions_live_in_errors_and_keep_their_old_import_paths():
    # One module answers "what can route raise"; notebooks and docs written
    # before it still import these names from the service modules.
    errors = importlib.import_module("forge_lite.controller.errors")
    old_places = {
        "forge_lite.controller.service": ["FanoutError", "NoHealthyReplicaError", "ServiceShutdownError"],
        "forge_lite.controller.service.service": ["FanoutError", "NoHealthyReplicaError", "ServiceShutdownError"],
        "forge_lite.controller.service.replica": ["UserError", "ReplicaFailure", "HostLost"],
    }
    for module, names in old_places.items():
        for name in names:
            assert getattr(importlib.import_module(module), name) is getattr(errors, name), (module, name)
            assert getattr(errors, name).__module__ == "forge_lite.controller.errors"
            assert f"``{name}``" in errors.__doc__, f"errors.py's docstring does not say when {name} is raised"


@pytest.mark.parametrize("adverb", ["call_one", "call", "choose", "broadcast", "stream"])
def test_actor_adverbs_on_a_service_say_what_to_use(svc, adverb):
    with pytest.raises(NotImplementedError) as info:
        getattr(svc.replica, adverb)()
    message = str(info.value)
    assert adverb in message and "route()" in message and "fanout()" in message


def test_unknown_endpoint_lists_the_real_ones(svc):
    with pytest.raises(AttributeError) as info:
        svc.generate
    assert "generate" in str(info.value)
    assert "echo" in str(info.value) and "replica" in str(info.value)


# ---------------------------------------------------------------- watching, teaching controls


async def test_metrics_agree_with_the_requests_made(svc):
    before = svc.metrics()
    visited = [await svc.replica.route() for _ in range(6)]
    await svc.replica.fanout()
    failing_replica = (visited[-1] + 1) % 3  # round robin is deterministic
    with pytest.raises(InventoryError):
        await svc.fail.route("counted too")
    after = svc.metrics()

    expected = Counter(visited)
    for index in range(3):
        expected[index] += 1  # the fanout
    expected[failing_replica] += 1
    for old, new in zip(before["replicas"], after["replicas"]):
        assert new["requests"] - old["requests"] == expected[new["index"]]
        assert new["in_flight"] == 0
        assert new["failures"] == old["failures"]
        assert new["p50_ms"] is not None and new["p50_ms"] <= new["p95_ms"]
    assert after["requests"] - before["requests"] == 6 + 3 + 1
    assert after["healthy"] == 3


async def test_slow_replica_delays_only_that_replica(svc):
    await svc.slow_replica(1, 0.3)
    try:
        with recording(svc) as events:
            assert await svc.replica.fanout() == [0, 1, 2]
    finally:
        await svc.slow_replica(1, 0)
    latency = {e.replica: e.latency_s for e in events if isinstance(e, RequestFinished)}
    assert latency[1] >= 0.3
    with pytest.raises(ValueError, match="seconds"):
        await svc.slow_replica(0, -1)
    with pytest.raises(IndexError, match="replicas 0..2"):
        await svc.slow_replica(3, 0.1)


# ---------------------------------------------------------------- routers


async def test_least_loaded_avoids_the_busy_replica(routed, tmp_path):
    routed.set_router("least_loaded")
    gate = tmp_path / "busy"
    gate.touch()
    busy = asyncio.create_task(routed.hold.route(str(gate)))
    try:
        await wait_until(lambda: any(r.in_flight for r in routed.replicas), "the busy request")
        busy_replica = next(r.index for r in routed.replicas if r.in_flight)
        quick = [await routed.replica.route() for _ in range(6)]
    finally:
        gate.unlink()
    assert await busy == busy_replica
    assert busy_replica not in quick
    assert sorted(set(quick)) == sorted({0, 1, 2} - {busy_replica})


async def test_prefix_router_sends_follow_ups_where_their_prefix_went(routed):
    routed.set_router("prefix")
    story = "once upon a time a replica kept a cache of every prompt it had seen. " * 3
    prompts = [f"conversation {i}: {story}" for i in range(3)]
    with recording(routed) as events:
        # Sent together, the first turns find no prefix and spread by load.
        first_turn = await asyncio.gather(*(routed.handle.route(prompt=p) for p in prompts))
        follow_ups = [await routed.handle.route(prompt=p + " And then what happened?") for p in prompts]
        positional = [await routed.handle.route(p + " Tell me more.") for p in prompts]
    assert sorted(first_turn) == [0, 1, 2]
    assert follow_ups == first_turn
    assert positional == first_turn
    reasons = [e.reason for e in events if isinstance(e, RequestRouted)]
    assert all("prefix match" in r for r in reasons[3:]), reasons


async def test_custom_router(routed):
    routed.set_router(HighestIndex())
    with recording(routed) as events:
        assert [await routed.replica.route() for _ in range(3)] == [2, 2, 2]
    decisions = [e for e in events if isinstance(e, RequestRouted)]
    assert all(e.router == "highest" and e.reason == "highest index → 2" for e in decisions)


async def test_custom_router_through_options():
    service = await Worker.options(num_replicas=2, router=HighestIndex()).as_service()
    try:
        assert [await service.replica.route() for _ in range(2)] == [1, 1]
    finally:
        await service.shutdown()


# ---------------------------------------------------------------- overload and waiting


async def test_overloaded_replica_makes_requests_wait_not_fail():
    service = await Worker.options(num_replicas=1, max_concurrent_requests=1).as_service()
    try:
        with recording(service) as events:
            results = await asyncio.gather(*(service.echo.route(i, delay=0.05) for i in range(5)))
        assert results == [(i, 0) for i in range(5)]
        assert "OVERLOADED" in states_of(events, 0)
        assert str(service.replicas[0].state) == "HEALTHY"
        # Never more than max_concurrent_requests in flight.
        in_flight, most = 0, 0
        for e in events:
            if isinstance(e, RequestRouted):
                in_flight += 1
                most = max(most, in_flight)
            elif isinstance(e, RequestFinished):
                in_flight -= 1
        assert most == 1
    finally:
        await service.shutdown()


class NoEquality:
    """An argument whose == refuses to answer, as a tensor's bool() does."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        raise TypeError("NoEquality cannot be compared")

    __hash__ = object.__hash__


@pytest.mark.parametrize("make", [
    lambda i: torch.tensor([i, i + 1]),  # == is element-wise; bool() of it raises
    lambda i: np.array([i, i + 1]),
    lambda i: NoEquality(i),
], ids=["tensor", "ndarray", "no-equality"])
async def test_requests_waiting_in_line_may_carry_any_argument(make):
    # The requests wait in line for the one slot; finding one among the others
    # must not compare their arguments.
    service = await Worker.options(num_replicas=1, max_concurrent_requests=1).as_service()
    try:
        results = await asyncio.gather(*(service.echo.route(make(i), delay=0.02) for i in range(5)))
        values = [r.value if isinstance(r, NoEquality) else list(r.tolist()) for r, _ in results]
        assert values == [i if make(0).__class__ is NoEquality else [i, i + 1] for i in range(5)]
    finally:
        await service.shutdown()


async def test_request_timeout_raises_no_healthy_replica(tmp_path):
    service = await Worker.options(
        num_replicas=1, max_concurrent_requests=1, request_timeout=0.5
    ).as_service()
    gate = tmp_path / "busy"
    gate.touch()
    try:
        busy = asyncio.create_task(service.hold.route(str(gate)))
        await wait_until(lambda: service.replicas[0].in_flight == 1, "the busy request")
        with pytest.raises(NoHealthyReplicaError, match="request_timeout"):
            await service.replica.route()
        gate.unlink()
        assert await busy == 0
        assert await service.replica.route() == 0
    finally:
        if gate.exists():
            gate.unlink()
        await service.shutdown()


async def test_cancelled_waiter_gives_back_the_replica_it_was_handed(tmp_path):
    """A caller cancelled (a notebook interrupt, a user's wait_for) just after a
    waiting request was handed a replica must not keep that replica's slot."""
    service = await Worker.options(num_replicas=1, max_concurrent_requests=1).as_service()
    gate = tmp_path / "busy"
    gate.touch()
    try:
        busy = asyncio.create_task(service.hold.route(str(gate)))
        await wait_until(lambda: service.replicas[0].in_flight == 1, "the busy request")
        waiting = asyncio.create_task(service.replica.route())
        # The controller's queue of waiting requests (private, watched only here).
        await wait_until(lambda: service.service._waiters, "the second request to wait")
        loop = asyncio.get_running_loop()

        def cancel_when_handed_over(event):
            # The busy request's end is published just before its slot goes to
            # the waiting request; a cancel queued now lands between that
            # hand-over and the waiting request resuming.
            if isinstance(event, RequestFinished):
                loop.call_soon(waiting.cancel)

        unsubscribe = service.events.subscribe(cancel_when_handed_over)
        gate.unlink()
        assert await busy == 0
        with pytest.raises(asyncio.CancelledError):
            await waiting
        unsubscribe()
        assert service.replicas[0].in_flight == 0
        assert await asyncio.wait_for(service.replica.route(), 30) == 0
    finally:
        if gate.exists():
            gate.unlink()
        await service.shutdown()


# ---------------------------------------------------------------- failures and recovery


@pytest.mark.slow
async def test_killed_replica_under_load_loses_no_request(fragile):
    old_pids = fragile.replicas[1].pids
    with recording(fragile) as events:
        tasks = [asyncio.create_task(fragile.echo.route(i, delay=0.05)) for i in range(200)]
        await wait_until(
            lambda: fragile.replicas[1].in_flight > 0 and sum(t.done() for t in tasks) >= 20,
            "requests in flight on replica 1",
        )
        await fragile.kill_replica(1)
        results = await asyncio.gather(*tasks)
        await wait_until(lambda: became_healthy(events, 1), "replica 1 to respawn")

    assert [x for x, _ in results] == list(range(200))
    assert in_order(states_of(events, 1), ["FAILED", "RECOVERING", "HEALTHY"])
    retried = [e for e in events if isinstance(e, RequestRetried)]
    assert retried and all(e.failed_replica == 1 for e in retried)
    assert await wait_for_exit(old_pids) == []
    assert fragile.replicas[1].pids != old_pids
    assert fragile.metrics()["replicas"][1]["failures"] >= 1
    assert await fragile.replica.fanout() == [0, 1, 2]


@pytest.mark.slow
async def test_killed_single_replica_requests_wait_for_the_respawn():
    service = await Worker.options(num_replicas=1, max_concurrent_requests=2).as_service()
    try:
        with recording(service) as events:
            # Two requests in flight on the replica, four waiting for a slot.
            tasks = [asyncio.create_task(service.echo.route(i, delay=0.5)) for i in range(6)]
            await wait_until(lambda: service.replicas[0].in_flight == 2, "two requests in flight")
            await service.kill_replica(0)
            results = await asyncio.gather(*tasks)
        assert results == [(i, 0) for i in range(6)]
        assert in_order(states_of(events, 0), ["FAILED", "RECOVERING", "HEALTHY"])
        assert len([e for e in events if isinstance(e, RequestRetried)]) == 2
    finally:
        await service.shutdown()


@pytest.mark.slow
async def test_session_moves_off_a_killed_replica(fragile):
    with recording(fragile) as events:
        async with fragile.session() as session_id:
            first = await fragile.replica.route()
            await fragile.kill_replica(first)
            after_kill = await fragile.replica.route()
            again = await fragile.replica.route()
        await wait_until(lambda: became_healthy(events, first), f"replica {first} to respawn")
    assert again == after_kill
    moved = [e for e in events if isinstance(e, SessionMoved) and e.session == session_id]
    assert len(moved) == 1 and moved[0].old_replica == first
    assert moved[0].new_replica == after_kill


@pytest.mark.slow
async def test_fanout_names_a_replica_whose_process_died(fragile, tmp_path):
    marker = tmp_path / "crash"
    (tmp_path / "crash.2").touch()
    with recording(fragile) as events:
        with pytest.raises(FanoutError) as info:
            await fragile.die_if.fanout(str(marker))
        (tmp_path / "crash.2").unlink()
        # Replica 2 is respawning: a fanout now leaves it out and says so.
        partial = await fragile.replica.fanout()
        await wait_until(lambda: became_healthy(events, 2), "replica 2 to respawn")
    assert list(info.value.failures) == [2]
    assert "replica 2" in str(info.value) and "exited with code 3" in str(info.value)
    assert info.value.results == {0: 0, 1: 1}
    assert partial == [0, 1] and partial.replicas == [0, 1]
    assert await fragile.replica.fanout() == [0, 1, 2]


@pytest.mark.slow
async def test_circuit_breaker_opens_after_repeated_crashes_and_closes_after_cooldown(tmp_path):
    service = await Worker.options(num_replicas=1, failure_threshold=2, cooldown=1.0).as_service()
    marker = tmp_path / "crash"
    (tmp_path / "crash.0").touch()
    try:
        with recording(service) as events:
            # Crash, respawn, crash again: two in a row open the breaker, and
            # with no other replica the request has nowhere to go.
            with pytest.raises(NoHealthyReplicaError, match="circuit open"):
                await service.die_if.route(str(marker))
            assert str(service.replicas[0].state) == "FAILED"
            with pytest.raises(NoHealthyReplicaError):
                await service.replica.fanout()
            (tmp_path / "crash.0").unlink()
            await service.wait_for_state(0, "HEALTHY", timeout=60)
            assert await service.die_if.route(str(marker)) == 0
        reasons = [e.reason for e in events if isinstance(e, ReplicaStateChanged)]
        assert any("circuit open" in r for r in reasons)
        assert any("cooldown over" in r for r in reasons)
        assert in_order(states_of(events, 0), ["FAILED", "RECOVERING", "HEALTHY", "FAILED", "RECOVERING", "HEALTHY"])
        assert len([e for e in events if isinstance(e, RequestRetried)]) == 2
    finally:
        await service.shutdown()


@pytest.mark.slow
async def test_scale_up_and_down_while_requests_keep_succeeding():
    service = await Worker.options(num_replicas=2).as_service()
    answered: list[int] = []
    keep_going = True

    async def traffic():
        while keep_going:
            answered.append(await service.replica.route())

    try:
        with recording(service) as events:
            load = asyncio.create_task(traffic())
            await service.scale(3)
            await wait_until(lambda: 2 in answered, "a request served by the new replica")
            removed_pids = service.replicas[1].pids + service.replicas[2].pids
            await service.scale(1)
            settled = len(answered)
            await wait_until(lambda: len(answered) >= settled + 5, "requests after scaling down")
            keep_going = False
            await load  # raises if any request failed
        assert len(service.replicas) == 1
        assert set(answered[settled:]) == {0}
        assert states_of(events, 1)[-1] == "STOPPED" and states_of(events, 2)[-1] == "STOPPED"
        assert await wait_for_exit(removed_pids) == []
        with pytest.raises(ValueError, match="num_replicas"):
            await service.scale(0)
    finally:
        keep_going = False
        await service.shutdown()


@pytest.mark.slow
async def test_scale_down_during_recovery_leaves_no_process():
    before = count_children()
    service = await Worker.options(num_replicas=2).as_service()
    try:
        removed = service.replicas[1]
        await service.kill_replica(1)
        await service.wait_for_state(1, "RECOVERING", timeout=60)
        # Removed while its fresh processes are starting: they must not stay.
        await service.scale(1)
        await wait_until(lambda: not removed.recovering, "the interrupted respawn to end")
        assert len(service.replicas) == 1
        assert str(removed.state) == "STOPPED"
        assert await wait_for_exit(removed.pids) == []
        assert await wait_for_children(before + 1, timeout=10) <= before + 1
    finally:
        await service.shutdown()
    assert await wait_for_children(before) <= before


# ---------------------------------------------------------------- shutdown (keep last)


async def test_shutdown_is_final_idempotent_and_leaves_no_process(svc, routed, fragile, children_at_start):
    with recording(svc) as events:
        await svc.shutdown()
        await svc.shutdown()
    assert [type(e) for e in events].count(ServiceStopped) == 1
    assert all(str(r.state) == "STOPPED" for r in svc.replicas)
    with pytest.raises(ServiceShutdownError, match="shut down"):
        await svc.replica.route()
    with pytest.raises(RuntimeError, match="shut down"):
        await svc.replica.fanout()
    with pytest.raises(ServiceShutdownError, match="shut down"):
        svc.session()
    await routed.shutdown()
    await fragile.shutdown()
    assert await wait_for_children(children_at_start) <= children_at_start
