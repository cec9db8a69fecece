"""Dashboard state: the ServiceDashboard on a real service (cards, routing log,
sessions, KV) and on a stand-in that publishes events (which panels a service
gets), and the TrainingDashboard on a recorder (header, series, legibility)."""

from __future__ import annotations

import asyncio
import os

import pytest

import forge_lite  # noqa: F401
from forge_lite import ForgeActor
from monarch.actor import endpoint

from forge_lite.controller.service.events import (
    HostStateChanged,
    ReplicaStateChanged,
    RequestFinished,
    RequestRouted,
)
from forge_lite.grpo.recorder import MetricsRecorder
from forge_lite.widgets import ServiceDashboard, TrainingDashboard
from forge_lite.widgets.service_dashboard import collapse
from forge_lite.widgets.service_view import SHOW_FAILED_S, STALE_FAILURE_S, RoutingRow, ServiceView
from forge_lite.widgets.throttle import Throttle


class Echo(ForgeActor):
    @endpoint
    def where(self, prompt: str = "") -> int:
        return int(os.environ["FORGE_LITE_REPLICA"])


async def _states_of(dashboard, index: int) -> list[str]:
    return [e.new for e in dashboard.service.events.history() if getattr(e, "replica", None) == index and hasattr(e, "new")]


@pytest.mark.timeout(180)
async def test_dashboard_follows_routing_sessions_and_a_killed_replica():
    svc = await Echo.options(num_replicas=3).as_service()
    try:
        dash = ServiceDashboard(svc)
        assert [c.state for _, c in sorted(dash.view.cards.items())] == ["HEALTHY"] * 3
        assert "fl-replica-healthy" in dash._cards.value
        # This machine alone: no host label, no groups, no host to kill.
        assert {c.host for c in dash.view.cards.values()} == {"local"}
        assert "fl-host" not in dash._cards.value and " on local" not in dash._cards.value
        assert "kill host" not in dash._buttons

        assert [await svc.where.route() for _ in range(3)] == [0, 1, 2]
        rows = list(dash.view.rows)[-3:]
        assert [(r.replica, r.reason) for r in rows] == [
            (0, "round robin → 0"), (1, "round robin → 1"), (2, "round robin → 2")
        ]

        async with svc.session() as sid:
            pinned = {await svc.where.route() for _ in range(3)}
        assert len(pinned) == 1
        session_rows = [r for r in dash.view.rows if r.session == sid]
        assert len(session_rows) == 3 and f"session {sid}" in session_rows[-1].reason

        await svc.kill_replica(1)
        await svc.wait_for_state(1, "FAILED", timeout=60)
        await svc.wait_for_state(1, "HEALTHY", timeout=60)
        await asyncio.sleep(0.3)  # let the throttled redraw run
        states = await _states_of(dash, 1)
        assert states[-3:] == ["FAILED", "RECOVERING", "HEALTHY"]
        card = dash.view.cards[1]
        assert card.state == "HEALTHY" and card.reason.startswith("respawned in")
        await asyncio.sleep(SHOW_FAILED_S + 0.3)  # the failure stays drawn a moment, then the redraw
        assert "fl-replica-healthy" in dash._cards.value and "respawned in" in dash._cards.value
        assert "fl-replica-failed" not in dash._cards.value
        assert dash.view.failures and dash.view.failures[-1][1] == 1

        await svc.scale(4)
        await asyncio.sleep(0.3)
        assert sorted(dash.view.cards) == [0, 1, 2, 3] and dash.view.cards[3].state == "HEALTHY"

        # Throttled: many events, few redraws.
        before = dash.redraws
        await asyncio.gather(*(svc.where.route() for _ in range(200)))
        await asyncio.sleep(0.3)
        assert 1 <= dash.redraws - before < 100

        fig = dash.snapshot()
        assert len(fig.axes) == 2  # replicas and strip: Echo returns no completions, so no KV panel
        assert not dash.kv_shown and dash._kv not in dash.children and "KV" not in dash._header.value
        assert repr(dash) == "ServiceDashboard(Echo service)"
    finally:
        await svc.shutdown()
    assert dash.view.stopped and all(b.disabled for b in dash._controls.children)


def test_a_failure_is_drawn_even_when_the_replica_recovered_before_the_redraw():
    view = ServiceView(capacity=1)
    for t, old, new in [(0.0, None, "HEALTHY"), (10.0, "HEALTHY", "FAILED"),
                        (10.01, "FAILED", "RECOVERING"), (10.5, "RECOVERING", "HEALTHY")]:
        view.observe(ReplicaStateChanged(replica=0, old=old, new=new, reason=new.lower(), time=t))
    card = view.cards[0]
    assert card.state == "HEALTHY"
    # The first redraw comes 3 s late (a busy kernel): it still shows the failure,
    # for SHOW_FAILED_S from then, and says what the replica is now.
    assert card.shown_state(13.0) == "FAILED" and card.failure_lingering(13.0)
    assert card.shown_state(13.0 + SHOW_FAILED_S - 0.1) == "FAILED"
    assert card.shown_state(13.0 + SHOW_FAILED_S + 0.1) == "HEALTHY"
    assert not card.failure_lingering(13.0 + SHOW_FAILED_S + 0.1)

    # A dashboard opened long after a failure (its history replayed) does not replay it.
    late = ServiceView(capacity=1)
    for event in [ReplicaStateChanged(replica=0, old=None, new="FAILED", reason="killed", time=0.0),
                  ReplicaStateChanged(replica=0, old="FAILED", new="HEALTHY", reason="back", time=1.0)]:
        late.observe(event)
    assert late.cards[0].shown_state(STALE_FAILURE_S + 5) == "HEALTHY"


@pytest.mark.timeout(120)
async def test_kill_button_kills_the_chosen_replica():
    svc = await Echo.options(num_replicas=2).as_service()
    try:
        dash = ServiceDashboard(svc)
        dash._replica_pick.value = 1
        dash._buttons["kill"].click()
        await svc.wait_for_state(1, "FAILED", timeout=60)
        await svc.wait_for_state(1, "HEALTHY", timeout=60)
        assert dash.view.cards[1].reason.startswith("respawned")
        dash._buttons["router"].value = "least_loaded"
        assert svc.service.router.name == "least_loaded"
        svc.set_router("prefix")  # from code: the dropdown follows
        dash._redraw()
        assert dash._buttons["router"].value == "prefix" and svc.service.router.name == "prefix"
    finally:
        await svc.shutdown()


async def test_training_dashboard_follows_the_recorder():
    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder, redraw_interval=0.05)
    assert "waiting for the first step" in dash.header_text()
    recorder.record_status(total_steps=10, state="training", heldout_before=0.645)
    for step in range(3):
        record(recorder, step, reward_mean=0.2 * step, accuracy=0.1 * step)
        recorder.record_versions(step=step, trainer_version=step + 1, replica_versions=(step + 1, step))
    await asyncio.sleep(0.2)
    assert dash.redraws == 1  # seven records in one tick: one redraw
    assert recorder.series("reward_mean") == [0.0, 0.2, 0.4]
    fig = dash.snapshot()
    learning = fig.axes[0]
    # The two series differ: each is drawn, raw (faint) then its 10-step mean.
    labels = learning.get_legend_handles_labels()[1]
    assert labels[:2] == ["sampled accuracy", "reward mean"] and "held-out before: 0.645" in labels
    lines = learning.get_lines()
    assert list(lines[2].get_ydata()) == [0.0, 0.2, 0.4]
    assert list(lines[3].get_ydata()) == pytest.approx([0.0, 0.1, 0.2])
    assert len(dash._plot.value) > 1000  # a PNG was drawn
    assert repr(dash) == "TrainingDashboard(GRPO run)"


def record(recorder, step, **values):
    """A plausible StepRecord for ``step``; ``values`` override its fields."""
    fields = dict(
        step=step, reward_mean=0.5, accuracy=0.5, loss=0.01, kl=0.001 * step, trainer_version=step + 1,
        episode_ages=(1, 2), buffer_size=8, tokens_per_s=100.0, step_time_s=1.0,
        time_split_s={"generate": 0.6, "reward": 0.1, "reference": 0.2, "train": 0.3, "sync": 0.1},
        time=1000.0 + 2.0 * step,  # one step every 2 s
    )
    fields.update(values)
    return recorder.record_step(**fields)


async def test_training_header_shows_progress_time_left_and_the_held_out_accuracy():
    # Async: with a running loop the dashboard's redraws are throttled (without
    # one, each of the 198 steps below would draw the figure).
    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder)
    recorder.record_status(total_steps=400, state="evaluating")
    dash._redraw()
    assert "scoring the held-out problems before training" in dash.header_text()
    recorder.record_status(state="training", heldout_before=0.645)
    for step in range(198):
        record(recorder, step, loss=-0.00001)
    dash._redraw()
    text = dash.header_text()
    # 202 steps left at 2 s each.
    assert "step 198/400, about 6 min 44 s left" in text
    assert "held-out accuracy (greedy): before 0.645, after: measured when training ends" in text
    assert "loss 0.0000" in text and "-0.0000" not in text  # never a negative zero
    assert "<progress value='198' max='400'" in dash._header.value

    redraws = dash.redraws
    recorder.record_status(state="finished", heldout_after=0.78)
    assert dash.redraws == redraws + 1  # the end of the run is drawn at once
    assert "finished: step 198/400" in dash.header_text() and "before 0.645, after 0.780" in dash.header_text()
    labels = dash.figure().axes[0].get_legend_handles_labels()[1]
    assert "held-out before: 0.645" in labels and "held-out after: 0.780" in labels

    recorder.record_status(state="interrupted")
    assert "interrupted at step 198/400" in dash.header_text() and "await run.shutdown()" in dash.header_text()
    dash.detach()


def test_training_figure_is_legible_and_draws_only_what_carries_information():
    recorder = MetricsRecorder()
    recorder.record_status(total_steps=300, state="training", heldout_before=0.6)
    for step in range(300):
        # The math reward alone: the reward mean is the accuracy. Spiky losses.
        record(recorder, step, reward_mean=0.5 + 0.001 * (step % 7), accuracy=0.5,
               loss=(-1) ** step * 0.2)
        recorder.record_versions(step=step, trainer_version=step + 1, replica_versions=(step + 1,))
    dash = TrainingDashboard(recorder)
    fig = dash.figure()
    learning, drift, staleness, timing, loss_axis = fig.axes
    # One line for two that coincide, and the legend says so.
    labels = learning.get_legend_handles_labels()[1]
    assert not any(label.startswith("reward mean") for label in labels)
    assert any("reward mean: the same" in label for label in labels)
    # A lag that is always 0 is named, not drawn.
    assert not staleness.collections
    assert "replica lag after a\nsync: always 0" in staleness.get_legend_handles_labels()[1]
    # The loss is a 20-step mean: the ±0.2 spikes average out.
    assert max(abs(y) for y in loss_axis.get_lines()[0].get_ydata()[20:]) <= 0.02
    # Every axis is labelled, every legend sits outside the axes, fonts >= 9 pt.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    for ax in (learning, drift, staleness, timing, loss_axis):
        assert ax.get_ylabel(), f"unlabelled axis: {ax.get_title()}"
    for ax in (learning, drift, staleness, timing):
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
        assert all(text.get_fontsize() >= 9 for text in legend.get_texts())
    assert timing.get_xlabel() == "training step"

    # A replica that lags is drawn.
    recorder.record_versions(step=300, trainer_version=301, replica_versions=(300,))
    assert dash.figure().axes[2].collections


def test_a_redraw_that_changes_nothing_is_skipped():
    recorder = MetricsRecorder()
    record(recorder, 0)
    dash = TrainingDashboard(recorder)
    drawn = dash._plot.value
    dash._plot.value = b""
    dash._redraw_plot()
    assert dash._plot.value == b""  # nothing new: not drawn again
    record(recorder, 1)
    dash._redraw_plot()
    assert dash._plot.value and dash._plot.value != drawn


async def test_an_expensive_redraw_waits_longer():
    import time

    def slow():
        time.sleep(0.05)

    throttle = Throttle(slow, interval=0.01, max_share=0.1)
    throttle()
    await asyncio.sleep(0.1)
    assert throttle.runs == 1 and throttle._gap == 0.01  # the first run (imports, caches) is not counted
    throttle()
    await asyncio.sleep(0.1)
    assert throttle.runs == 2 and throttle._gap >= 0.5  # 0.05 s of work, at most 10% of the time
    throttle()
    await asyncio.sleep(0.2)
    assert throttle.runs == 2  # still waiting
    throttle.flush()  # a last state that must not wait
    assert throttle.runs == 3 and throttle._pending is None
    assert Throttle(lambda: None, interval=0.2)._gap == 0.2  # a cheap redraw: the interval


# ---------------------------------------------------------------- without processes


class FakeController:
    """What a ServiceDashboard reads from a service controller, and nothing else."""

    def __init__(self, actor_name: str, replicas: int):
        from types import SimpleNamespace

        self.actor_cls = type(actor_name, (), {})
        self.config = SimpleNamespace(max_concurrent_requests=4)
        self.router = SimpleNamespace(name="round_robin")
        self.replicas = [SimpleNamespace(index=i) for i in range(replicas)]
        self.cluster = forge_lite.cluster()  # this machine alone


class FakeService:
    """A service's handle as a dashboard sees it: its events, metrics and router.
    The tests using it are async so that redraws are throttled on the loop,
    as in a kernel, instead of drawn at every event."""

    def __init__(self, actor_name: str = "Policy", replicas: int = 2):
        from forge_lite.controller.service.events import EventStream

        self.service = FakeController(actor_name, replicas)
        self.events = EventStream()
        for i in range(replicas):
            self.events.publish(ReplicaStateChanged(replica=i, old=None, new="HEALTHY", reason="started"))

    @property
    def replicas(self):
        return self.service.replicas

    def metrics(self) -> dict:
        return {"replicas": [{"index": r.index, "p50_ms": 1.0, "sessions": 0} for r in self.replicas]}

    def set_router(self, name: str) -> None:
        from types import SimpleNamespace

        self.service.router = SimpleNamespace(name=name)

    def route(self, i: int, replica: int, session=None, router="round_robin", reason=None, version=None,
              prompt=10, cached=0) -> None:
        """Publish one request, routed and finished (with a completion if ``version`` is given)."""
        from types import SimpleNamespace

        self.events.publish(RequestRouted(request_id=i, endpoint="generate", replica=replica, session=session,
                                          router=router, reason=reason or f"{router} → {replica}"))
        result = None
        if version is not None:
            result = [SimpleNamespace(prompt_ids=[0] * prompt, num_cached_tokens=cached, generator_version=version)]
        self.events.publish(RequestFinished(request_id=i, endpoint="generate", replica=replica, session=session,
                                            latency_s=0.01, ok=True, result=result))


async def test_a_service_that_does_not_generate_gets_no_kv_panel():
    counter = FakeService("ForgeCounter", replicas=3)
    dash = ServiceDashboard(counter)
    for i in range(6):
        counter.route(i, i % 3)
    dash._redraw()
    assert dash._kv not in dash.children and "KV" not in dash._header.value
    assert "weights" not in dash._cards.value
    assert len(dash.snapshot().axes) == 2  # no empty KV plot


async def test_kv_panel_appears_with_the_first_completion_unless_turned_off():
    policy = FakeService()
    dash = ServiceDashboard(policy)
    hidden = ServiceDashboard(policy, show_kv=False)  # a notebook that has not taught the KV cache yet
    assert dash._kv not in dash.children
    for i, session in enumerate(["s-10", "s-2", "s-1"]):
        policy.route(i, i % 2, session=session, version=0, prompt=40, cached=30)
    dash._redraw()
    hidden._redraw()
    assert dash._kv in dash.children and "of prompt tokens from the KV cache" in dash._header.value
    # Sessions in order, as a person counts.
    kv = dash._kv.value
    assert kv.index("session s-1<") < kv.index("session s-2<") < kv.index("session s-10<")
    assert len(dash.snapshot().axes) == 3
    assert hidden._kv not in hidden.children and "KV" not in hidden._header.value + hidden._cards.value
    assert "weights v0" in hidden._cards.value
    assert len(hidden.snapshot().axes) == 2


async def test_every_card_of_a_generating_service_has_a_weights_line():
    policy = FakeService(replicas=2)
    dash = ServiceDashboard(policy)
    policy.route(0, 0, version=3)
    # Replica 1 was just added (scale +1): no completion yet, but the line is there.
    dash._redraw()
    assert "weights v3" in dash._cards.value
    assert dash._cards.value.count("weights") == 2 and "weights: shown after its first completion" in dash._cards.value


async def test_routing_log_collapses_repeats_and_the_header_agrees_with_the_rows():
    policy = FakeService(replicas=1)
    dash = ServiceDashboard(policy)
    for i in range(12):
        policy.route(i, 0)
    dash._redraw()
    assert dash._log.value.count("<tr>") == 2  # the heading and one row for twelve requests
    assert "generate (×12)" in dash._log.value
    assert "router: round_robin)" in dash._header.value

    policy.set_router("prefix")  # switched after the last request: the rows are round robin's
    dash._redraw()
    assert "router: prefix; the rows below were routed by round_robin" in dash._header.value
    policy.route(12, 0, router="prefix", reason="prefix → 0 (longest prefix)")
    dash._redraw()
    assert "router: prefix)" in dash._header.value


def test_the_strip_spans_the_whole_run_however_long():
    view = ServiceView(capacity=1, max_points=100)
    for i in range(1000):
        view.add_point((float(i), 0, None))
    assert len(view.points) <= 100 and view.stride > 1
    assert view.points[0][0] == 0.0 and view.points[-1][0] >= 1000 - view.stride
    gaps = {b[0] - a[0] for a, b in zip(view.points, view.points[1:])}
    assert gaps == {float(view.stride)}  # evenly thinned


def test_collapse_merges_only_consecutive_equal_rows():
    rows = [RoutingRow(t, "generate", r, None, f"round robin → {r}") for t, r in enumerate([0, 0, 1, 0])]
    assert [(first.replica, count) for first, _, count in collapse(rows)] == [(0, 2), (1, 1), (0, 1)]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_kv_counters_rise_with_a_sticky_conversation_on_the_policy(tmp_path, monkeypatch):
    from forge_lite.actors.policy import Policy

    policy = await Policy.options(num_replicas=2).as_service(
        engine_config={"backend": "transformers"},
        sampling_config={"max_tokens": 8, "temperature": 0.0},
    )
    try:
        dash = ServiceDashboard(policy)
        prompt = "What is 12 + 30?"
        async with policy.session() as sid:
            for turn in range(3):
                completions = await policy.generate.route(prompt)
                prompt = prompt + completions[0].text + f" And what is {turn} + 7?"
        await asyncio.sleep(0.3)
        session_kv = dash.view.kv_by_session[sid]
        assert session_kv.cached_tokens > 0 and session_kv.prompt_tokens > session_kv.cached_tokens
        pinned = completions[0].replica
        card = dash.view.cards[pinned]
        assert card.cached_tokens == session_kv.cached_tokens and card.weight_version == 0
        assert dash.view.kv_total.hit_rate > 0 and "KV hits" in dash._cards.value
    finally:
        await policy.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_an_interrupted_run_keeps_its_steps_and_says_how_to_go_on(tmp_path, capsys):
    # Kernel > Interrupt cancels the task running the cell: the same as task.cancel() here.
    from forge_lite.grpo import GRPORun, load_config

    config = load_config(None, [
        "steps=1000", "group_size=2", "batch_size=4", "num_rollout_tasks=2", "eval_samples=2",
        "policy.backend=transformers", "policy.max_tokens=16", "data.request_len=96",
        f"output_dir={tmp_path}", "progress=false",
    ])
    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder)
    run = await GRPORun(config, recorder).start()
    try:
        training = asyncio.create_task(run.train())
        while len(recorder.steps) < 2 and not training.done():
            await asyncio.sleep(0.1)
        training.cancel()
        result = await training  # not a CancelledError: the steps so far
        taken = len(recorder.steps)
        assert taken >= 2 and len(result.recorder.steps) == taken and result.eval_accuracy_after is None
        assert run.start_step == taken and recorder.status.state == "interrupted"
        printed = capsys.readouterr().out
        assert f"GRPO: interrupted at step {taken} of 1000" in printed
        assert "`result = await run.train()`" in printed and "`await run.shutdown()`" in printed
        dash._redraw()
        assert f"interrupted at step {taken}/1000" in dash.header_text()
        # The services are still up: the dashboards stay live.
        assert run.services is not None and all(r.state == "HEALTHY" for r in run.services.policy.replicas)
    finally:
        await run.shutdown()
        dash.detach()


def test_cards_are_grouped_by_host_only_when_replicas_run_on_several():
    def started(view, replica, host):
        view.observe(ReplicaStateChanged(replica=replica, old=None, new="RECOVERING", reason="starting", host=host))
        view.observe(ReplicaStateChanged(replica=replica, old="RECOVERING", new="HEALTHY", reason="up", host=host))

    local = ServiceView(capacity=1)
    for i in range(2):
        started(local, i, "local")
    assert not local.on_several_hosts and local.groups() == [(None, [local.cards[0], local.cards[1]])]

    view = ServiceView(capacity=1)
    for name, where in [("host0", "10.0.0.2:26600"), ("host1", "10.0.0.3:26600"), ("host10", "10.0.0.4:26600")]:
        view.observe(HostStateChanged(host=name, old=None, new="UP", reason="attached", where=where))
    for replica, host in [(0, "host10"), (1, "host1"), (2, "host0"), (3, "host1")]:
        started(view, replica, host)
    assert view.on_several_hosts
    assert [(h, [c.index for c in cards]) for h, cards in view.groups()] == [
        ("host0", [2]), ("host1", [1, 3]), ("host10", [0])]  # host1 before host10, as a person sorts
    assert view.host_label("host1") == "host1 (10.0.0.3:26600)"

    # host1 is lost: its replicas fail, respawn on host0; the lost host stays, empty.
    view.observe(HostStateChanged(host="host1", old="UP", new="LOST", reason="no answer", where="10.0.0.3:26600"))
    for replica in (1, 3):
        view.observe(ReplicaStateChanged(replica=replica, old="HEALTHY", new="FAILED", reason="host1 lost",
                                         host="host1"))
    assert [(h, [c.state for c in cards]) for h, cards in view.groups()][1] == ("host1", ["FAILED", "FAILED"])
    for replica in (1, 3):
        view.observe(ReplicaStateChanged(replica=replica, old="RECOVERING", new="HEALTHY", reason="respawned",
                                         host="host0"))
    assert [(h, [c.index for c in cards]) for h, cards in view.groups()] == [
        ("host0", [1, 2, 3]), ("host1", []), ("host10", [0])]
    assert view.host_label("host1") == "host1 (10.0.0.3:26600) LOST"
    # A request routed says where too (a card first seen through routing).
    view.observe(RequestRouted(request_id=1, endpoint="e", replica=4, session=None, router="round_robin",
                               reason="round robin → 4", host="host0+host10"))
    assert view.cards[4].host == "host0+host10" and view.host_label("host0+host10") == "host0+host10"
