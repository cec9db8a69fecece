"""Code the kit calls for the user can fail without breaking the kit.

Event subscribers, recorder listeners, dashboard redraws and buttons, and a
user's Router are the user's code. When one raises, the request being routed
still gets its answer (or, for a router, exactly that one request fails with
the router's error), no replica slot stays taken, no waiting request hangs,
and nothing reaches the kernel's event loop. A failing subscriber or listener
is reported once, as a CallbackWarning naming it.

Real services on real Monarch processes. Every wait has a timeout, so a hang
fails the test instead of hanging the run.
"""

import asyncio
import contextlib
import os
import time
from types import SimpleNamespace

import pytest
from monarch.actor import endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller.service import RoundRobin, Router
from forge_lite.controller.service.events import (
    CallbackWarning,
    Event,
    ReplicaStateChanged,
    RequestFinished,
    RequestRouted,
)

pytestmark = pytest.mark.timeout(180)

HANG = 30.0  # seconds: longer than any request here takes, short enough for CI


class Worker(ForgeActor):
    @endpoint
    async def echo(self, x, delay: float = 0.0):
        await asyncio.sleep(delay)
        return x, int(os.environ["FORGE_LITE_REPLICA"])

    @endpoint
    async def hold(self, gate: str) -> int:
        """Stay busy while the file ``gate`` exists."""
        while os.path.exists(gate):
            await asyncio.sleep(0.01)
        return int(os.environ["FORGE_LITE_REPLICA"])

    @endpoint
    async def cache_report(self) -> list:
        # Looks like a list of Completions to the dashboard (it has
        # num_cached_tokens) but lacks prompt_ids: the dashboard's event
        # handler raises on it.
        return [SimpleNamespace(num_cached_tokens=3)]


# ---------------------------------------------------------------- helpers


async def within(awaitable, seconds: float = HANG):
    """Await, failing the test if it takes longer than ``seconds`` (a hang)."""
    return await asyncio.wait_for(awaitable, seconds)


async def wait_until(condition, what: str, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def busy_with_waiters(svc, gate: str, waiting: int):
    """Both replicas held busy by ``hold(gate)`` and ``waiting`` requests queued behind them."""
    busy = [asyncio.create_task(svc.hold.route(gate)) for _ in range(2)]
    await wait_until(lambda: [r.in_flight for r in svc.replicas] == [1, 1], "both replicas busy")
    queued = [asyncio.create_task(svc.echo.route(i)) for i in range(waiting)]
    await wait_until(lambda: len(svc.service._waiters) == waiting, f"{waiting} waiting requests")
    return busy, queued


def callback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CallbackWarning)]


def assert_idle(svc) -> None:
    """No slot taken and nobody waiting: nothing leaked."""
    assert [r.in_flight for r in svc.replicas] == [0] * len(svc.replicas)
    assert not svc.service._waiters
    assert all(r["in_flight"] == 0 for r in svc.metrics()["replicas"])


@contextlib.contextmanager
def loop_errors():
    """What reaches the event loop's exception handler (the kernel's log) meanwhile."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


@contextlib.contextmanager
def router(svc, chosen):
    """Route with ``chosen`` inside the block, round robin again after it."""
    svc.set_router(chosen)
    try:
        yield svc.service.router  # set_router keeps a copy: this is the one in use
    finally:
        svc.set_router("round_robin")


@pytest.fixture(scope="module")
async def svc():
    """Two replicas of one slot each: a leaked slot shows up as a hang fast."""
    service = await Worker.options(num_replicas=2, max_concurrent_requests=1).as_service()
    yield service
    await service.shutdown()


@pytest.fixture
def gates(tmp_path):
    """Files that keep ``hold`` requests busy; removed at the end whatever happens."""
    made = []

    def gate(name: str) -> str:
        path = tmp_path / name
        path.touch()
        made.append(path)
        return str(path)

    yield gate
    for path in made:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- event subscribers


@pytest.mark.parametrize("fails_on", [RequestRouted, RequestFinished, Event], ids=["routed", "finished", "every"])
async def test_a_raising_subscriber_does_not_break_routing(svc, fails_on):
    def flaky_subscriber(event):
        if isinstance(event, fails_on):
            raise KeyError(f"no handler for {type(event).__name__}")

    seen = []
    with pytest.warns(CallbackWarning) as caught:
        stop_flaky = svc.events.subscribe(flaky_subscriber)
        stop_seen = svc.events.subscribe(seen.append)  # after the failing one
        try:
            sequential = [await within(svc.echo.route(i)) for i in range(5)]
            concurrent = await within(asyncio.gather(*(svc.echo.route(i, delay=0.02) for i in range(8))))
        finally:
            stop_flaky()
            stop_seen()

    assert [x for x, _ in sequential] == list(range(5))
    assert [x for x, _ in concurrent] == list(range(8))
    assert_idle(svc)
    # The other subscriber saw every request routed and finished.
    routed = [e.request_id for e in seen if isinstance(e, RequestRouted)]
    finished = [e.request_id for e in seen if isinstance(e, RequestFinished) and e.ok]
    assert len(routed) == 13 and sorted(routed) == sorted(finished)
    # Reported once, by name, though it raised on many events.
    reports = callback_warnings(caught)
    assert len(reports) == 1, reports
    assert "flaky_subscriber" in reports[0] and "KeyError" in reports[0]
    # And the service keeps serving afterwards, on both replicas.
    after = await within(asyncio.gather(svc.echo.route("a"), svc.echo.route("b")))
    assert [x for x, _ in after] == ["a", "b"] and sorted(r for _, r in after) == [0, 1]


async def test_a_subscriber_failing_on_replayed_history_is_subscribed_and_reported_once(svc):
    calls = []

    def strict_subscriber(event):
        calls.append(event)
        raise ValueError("strict subscriber rejects everything")

    history = len(svc.events.history())
    with pytest.warns(CallbackWarning) as caught:
        stop = svc.events.subscribe(strict_subscriber, replay=True)  # must not raise
        replayed = len(calls)
        try:
            results = [await within(svc.echo.route(i)) for i in range(3)]
        finally:
            stop()
    assert replayed == history > 0
    assert [x for x, _ in results] == [0, 1, 2]
    assert len(calls) >= replayed + 6  # still called: routed and finished for each request
    assert len(callback_warnings(caught)) == 1
    assert_idle(svc)


async def test_a_raising_subscriber_while_requests_wait_for_a_slot(svc, gates):
    """Every replica full, requests waiting: a subscriber failing on each
    event must not stop a freed slot from reaching the waiting requests."""
    def broken_subscriber(event):
        raise RuntimeError("dashboard went away")

    with pytest.warns(CallbackWarning) as caught:
        stop = svc.events.subscribe(broken_subscriber)
        try:
            gate = gates("busy")
            busy, waiting = await busy_with_waiters(svc, gate, 6)
            os.unlink(gate)
            assert sorted(await within(asyncio.gather(*busy))) == [0, 1]
            assert [x for x, _ in await within(asyncio.gather(*waiting))] == list(range(6))
        finally:
            stop()
    assert len(callback_warnings(caught)) == 1
    assert_idle(svc)


# ---------------------------------------------------------------- routers


class AlwaysRaises(Router):
    name = "always_raises"

    def choose(self, request, candidates):
        raise LookupError(f"no route table loaded for request {request.id}")


class RaisesOnce(Router):
    name = "raises_once"

    def __init__(self):
        self.raised = False

    def choose(self, request, candidates):
        if not self.raised:
            self.raised = True
            raise ConnectionError("route table still loading")
        pick = min(candidates, key=lambda r: r.index)
        return pick, f"lowest free → {pick.index}"


class RejectsPoison(Router):
    """Raises for requests whose first argument is "poison"."""

    name = "rejects_poison"

    def choose(self, request, candidates):
        if request.args and request.args[0] == "poison":
            raise LookupError(f"no route for request {request.id}")
        pick = min(candidates, key=lambda r: r.index)
        return pick, f"lowest free → {pick.index}"


class WrongAnswer(Router):
    """A router with a bug: it answers with something other than
    (one of the candidates, a reason)."""

    name = "wrong_answer"

    def __init__(self, mistake: str):
        self.mistake = mistake

    def choose(self, request, candidates):
        first = min(candidates, key=lambda r: r.index)
        return {
            "none": None,
            "index": first.index,  # the index, not the replica
            "index_and_reason": (first.index, "first"),
            "replica_without_reason": first,
        }[self.mistake]


class StickyToFirst(Router):
    """A router with a bug: it keeps the first replica it saw, even when that
    replica is full and no longer among the candidates."""

    name = "sticky"

    def __init__(self):
        self.first = None

    def choose(self, request, candidates):
        if self.first is None:
            self.first = min(candidates, key=lambda r: r.index)
        return self.first, f"sticky → {self.first.index}"


class ForgetsBadly(RoundRobin):
    name = "forgets_badly"

    def forget_replica(self, index):
        raise RuntimeError(f"cannot forget replica {index}")


async def test_a_router_that_always_raises_fails_each_request_with_its_error(svc, gates):
    gate = gates("busy")
    busy, queued = await busy_with_waiters(svc, gate, 4)  # routed, then queued, by round robin
    seen = []
    with router(svc, AlwaysRaises()), contextlib.ExitStack() as stack:
        stack.callback(svc.events.subscribe(seen.append))
        # Slots free up while requests wait: each waiter asks the router and
        # fails with its error; the requests that freed the slots do not.
        os.unlink(gate)
        assert sorted(await within(asyncio.gather(*busy))) == [0, 1]
        outcomes = await within(asyncio.gather(*queued, return_exceptions=True))
        assert all(isinstance(o, LookupError) for o in outcomes), outcomes
        # Nobody waiting: each request fails at once, sequential or concurrent.
        for _ in range(3):
            with pytest.raises(LookupError, match="no route table loaded"):
                await within(svc.echo.route("x"))
        outcomes = await within(asyncio.gather(*(svc.echo.route(i) for i in range(5)), return_exceptions=True))
        assert all(isinstance(o, LookupError) for o in outcomes), outcomes
        assert not [e for e in seen if isinstance(e, RequestRouted)]  # no slot was ever taken
        assert_idle(svc)
    assert [x for x, _ in [await within(svc.echo.route(i)) for i in range(3)]] == [0, 1, 2]
    assert_idle(svc)


async def test_a_router_that_raises_once_fails_only_that_request(svc, gates):
    # Once, for a waiting request: the first waiter served fails, the rest go through.
    gate = gates("busy")
    busy, queued = await busy_with_waiters(svc, gate, 4)
    with router(svc, RaisesOnce()):
        os.unlink(gate)
        assert sorted(await within(asyncio.gather(*busy))) == [0, 1]
        outcomes = await within(asyncio.gather(*queued, return_exceptions=True))
    assert isinstance(outcomes[0], ConnectionError), outcomes
    assert [x for x, _ in outcomes[1:]] == [1, 2, 3]
    assert_idle(svc)

    # Once, with nobody waiting: that request fails, the next ones work.
    with router(svc, RaisesOnce()):
        with pytest.raises(ConnectionError, match="still loading"):
            await within(svc.echo.route("first"))
        assert_idle(svc)
        assert await within(svc.echo.route("second")) == ("second", 0)
        results = await within(asyncio.gather(*(svc.echo.route(i, delay=0.02) for i in range(6))))
        assert [x for x, _ in results] == list(range(6))
    assert_idle(svc)


async def test_a_router_raising_concurrently_fails_only_its_own_requests(svc):
    with router(svc, RejectsPoison()):
        args = ["a", "poison", "b", "poison", "c", "d"]
        outcomes = await within(
            asyncio.gather(*(svc.echo.route(x, delay=0.02) for x in args), return_exceptions=True)
        )
    for x, outcome in zip(args, outcomes):
        if x == "poison":
            assert isinstance(outcome, LookupError), outcome
        else:
            assert outcome[0] == x
    assert_idle(svc)


async def test_a_router_raising_for_a_waiting_request_fails_only_that_waiter(svc, gates):
    """The router is asked for waiting requests when a slot frees (the drain):
    its error must fail the waiter being served, not the request that freed
    the slot, and the waiters behind it must still be served."""
    gate = gates("busy")
    with router(svc, RejectsPoison()):
        busy = [asyncio.create_task(svc.hold.route(gate)) for _ in range(2)]
        await wait_until(lambda: [r.in_flight for r in svc.replicas] == [1, 1], "both replicas busy")
        args = ["a", "poison", "b", "poison", "poison", "c"]
        waiting = [asyncio.create_task(svc.echo.route(x, delay=0.05)) for x in args]
        await wait_until(lambda: len(svc.service._waiters) == len(args), "every request waiting")
        os.unlink(gate)
        assert sorted(await within(asyncio.gather(*busy))) == [0, 1]  # the requests that freed the slots
        outcomes = await within(asyncio.gather(*waiting, return_exceptions=True))
    for x, outcome in zip(args, outcomes):
        if x == "poison":
            assert isinstance(outcome, LookupError), outcome
        else:
            assert outcome[0] == x, outcome
    assert_idle(svc)
    assert sorted(x for x, _ in await within(asyncio.gather(svc.echo.route(1), svc.echo.route(2)))) == [1, 2]


@pytest.mark.parametrize(
    "mistake, error, shown",
    [
        ("none", TypeError, "returned None"),
        ("index", TypeError, "returned 0"),
        ("index_and_reason", ValueError, "returned 0"),
        ("replica_without_reason", TypeError, "Replica object"),
    ],
)
async def test_a_router_answering_with_a_non_candidate_is_a_clear_error(svc, mistake, error, shown):
    with router(svc, WrongAnswer(mistake)):
        for _ in range(2):  # each request, not just the first
            with pytest.raises(error) as info:
                await within(svc.echo.route("x"))
            assert "WrongAnswer.choose" in str(info.value) and shown in str(info.value)
        assert_idle(svc)
    assert await within(svc.echo.route("after")) == ("after", 0)


async def test_a_router_picking_a_full_replica_is_refused(svc, gates):
    gate = gates("busy")
    with router(svc, StickyToFirst()):
        busy = asyncio.create_task(svc.hold.route(gate))  # the sticky replica, now full
        await wait_until(lambda: svc.replicas[0].in_flight == 1, "replica 0 busy")
        with pytest.raises(ValueError, match=r"StickyToFirst\.choose returned .*not one of its candidates"):
            await within(svc.echo.route("x"))
        assert [r.in_flight for r in svc.replicas] == [1, 0]  # never over the limit
        os.unlink(gate)
        assert await within(busy) == 0
    assert_idle(svc)


@pytest.mark.slow
async def test_a_router_whose_forget_replica_raises_does_not_stop_recovery(svc):
    with router(svc, ForgetsBadly()), loop_errors() as errors, pytest.warns(CallbackWarning) as caught:
        seen = []
        stop = svc.events.subscribe(seen.append)
        try:
            await within(svc.kill_replica(1), 60)
            await within(wait_until(
                lambda: any(isinstance(e, ReplicaStateChanged) and e.replica == 1 and e.new == "HEALTHY"
                            for e in seen), "replica 1 back", 60), 70)
        finally:
            stop()
        assert sorted(x for x, _ in await within(asyncio.gather(*(svc.echo.route(i) for i in range(4))))) == [0, 1, 2, 3]
        assert await within(svc.echo.fanout("all")) == [("all", 0), ("all", 1)]
    reports = callback_warnings(caught)
    assert len(reports) == 1 and "ForgetsBadly.forget_replica" in reports[0], reports
    assert errors == []
    assert_idle(svc)


# ---------------------------------------------------------------- recorder and dashboards


def step_values(step: int, **changes) -> dict:
    values = dict(
        step=step, reward_mean=0.5, accuracy=0.5, loss=1.0, kl=0.0, trainer_version=step + 1,
        episode_ages=(0,), buffer_size=4, tokens_per_s=100.0, step_time_s=1.0,
        time_split_s={"generate": 0.5, "train": 0.5},
    )
    return values | changes


async def test_a_failing_recorder_listener_and_redraw_do_not_stop_the_run():
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.widgets import TrainingDashboard

    recorder = MetricsRecorder()
    received = []

    def broken_listener(record):
        raise ValueError("progress bar closed")

    with loop_errors() as errors, pytest.warns(CallbackWarning) as caught:
        recorder.subscribe(broken_listener)
        recorder.subscribe(received.append)  # after the failing one
        dash = TrainingDashboard(recorder, redraw_interval=0.05)
        # A step whose tokens_per_s is missing: the dashboard's redraw raises on it, twice.
        for step in (0, 1):
            recorder.record_step(**step_values(step, tokens_per_s=None))
            await asyncio.sleep(0.15)
        recorder.record_step(**step_values(2))
        recorder.record_versions(step=2, trainer_version=3, replica_versions=(3, 2))
        await asyncio.sleep(0.7)  # past the header's half-second redraw interval

    assert [s.step for s in recorder.steps] == [0, 1, 2] and len(recorder.versions) == 1
    assert received == recorder.steps + recorder.versions
    assert "last step: reward 0.500" in dash._header.value  # a later redraw worked
    assert errors == []  # nothing reached the event loop
    reports = callback_warnings(caught)
    assert any("broken_listener" in r and "ValueError" in r for r in reports)
    assert any("TrainingDashboard._redraw" in r and "TypeError" in r for r in reports)
    # Each failing callback reported once, though the redraws failed on two steps.
    names = [r.split(" raised")[0] for r in reports]
    assert len(names) == len(set(names)) and len(reports) <= 3, reports
    dash.detach()


async def test_a_failing_dashboard_does_not_break_routing_and_its_buttons_show_errors():
    from forge_lite.widgets import ServiceDashboard

    service = await Worker.options(num_replicas=1, max_concurrent_requests=1).as_service()
    try:
        with loop_errors() as errors:
            dash = ServiceDashboard(service, redraw_interval=0.02)
            with pytest.warns(CallbackWarning) as caught:
                answers = await within(asyncio.gather(*(service.cache_report.route() for _ in range(4))))
                echoed = [await within(service.echo.route(i)) for i in range(3)]
            assert len(answers) == 4 and echoed == [(0, 0), (1, 0), (2, 0)]
            assert_idle(service)
            warned = callback_warnings(caught)
            assert len(warned) == 1 and "ServiceDashboard._on_event" in warned[0], warned
            # The dashboard still follows the requests after its own error.
            assert [r.endpoint for r in dash.view.rows][-3:] == ["echo"] * 3
            assert errors == []
    finally:
        await service.shutdown()

    # Shut down: the buttons are disabled, but a click from a stale front end
    # still runs the handler. Its error is shown in the dashboard.
    with loop_errors() as errors:
        dash._buttons["kill"].click()
        await wait_until(lambda: dash._control_error.value, "the kill button's error", 10)
    assert "kill failed" in dash._control_error.value
    assert "ServiceShutdownError" in dash._control_error.value
    assert errors == []
