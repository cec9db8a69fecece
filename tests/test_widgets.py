"""ServiceDashboard state on a real service: cards, routing log, sessions, KV."""

from __future__ import annotations

import asyncio
import os

import pytest

import forge_lite  # noqa: F401
from forge_lite import ForgeActor
from monarch.actor import endpoint

from forge_lite.controller.service.events import ReplicaStateChanged
from widgets import ServiceDashboard
from widgets.service_view import SHOW_FAILED_S, STALE_FAILURE_S, ServiceView


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
        assert len(fig.axes) == 3
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
    finally:
        await svc.shutdown()


async def test_training_dashboard_follows_the_recorder():
    from forge_lite.grpo.recorder import MetricsRecorder
    from widgets import TrainingDashboard

    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder, redraw_interval=0.05)
    assert "waiting for the first step" in dash._header.value
    for step in range(3):
        recorder.record_step(
            step=step, reward_mean=0.2 * step, accuracy=0.1 * step, loss=1.0 / (step + 1), kl=0.01 * step,
            trainer_version=step + 1, episode_ages=(0, 1), buffer_size=4 - step, tokens_per_s=100.0,
            step_time_s=1.0, time_split_s={"generate": 0.6, "train": 0.3, "sync": 0.1},
        )
        recorder.record_versions(step=step, trainer_version=step + 1, replica_versions=(step + 1, step))
    await asyncio.sleep(0.2)
    assert dash.redraws == 1  # six records in one tick: one redraw
    assert "step 2: reward 0.400" in dash._header.value
    assert recorder.series("reward_mean") == [0.0, 0.2, 0.4]
    fig = dash.snapshot()
    reward_line = fig.axes[0].get_lines()[0]
    assert list(reward_line.get_ydata()) == [0.0, 0.2, 0.4]
    mean_line = fig.axes[0].get_lines()[1]  # the 10-step mean drawn over it
    assert list(mean_line.get_ydata()) == pytest.approx([0.0, 0.1, 0.2])
    assert len(dash._plot.value) > 1000  # a PNG was drawn
    assert repr(dash) == "TrainingDashboard(GRPO run)"


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
