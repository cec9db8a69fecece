"""Multi-turn episodes: only the model's tokens are trained on; trajectories
played on real services keep their turns on one replica (and its KV cache),
survive their replica's death, and train in a short GRPO run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from conftest import count_children, wait_for_children
from faulty_envs import NaNOnTurnTwoEnv, NoObservationEnv, OneFailsEnv, SlowRetryEnv

from forge_lite.actors.hf_model import load_causal_lm
from forge_lite.actors.policy import Policy
from forge_lite.controller.service import FanoutError
from forge_lite.controller.service.events import RequestFinished, RequestRouted, SessionMoved
from forge_lite.envs.actor import EnvironmentActor
from forge_lite.grpo.multiturn import Trajectory, Turn, cache_summary, evaluate_env, play_trajectory, tokenizer_for
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.episode import Episode
from forge_lite.rl.logprobs import causal_lm_logits, response_logprobs
from forge_lite.rl.loss import grpo_loss, response_kl



def never_right(index: int) -> dict:
    """A problem whose target no answer matches: every turn is wrong, so a retry
    trajectory always plays all its turns. Each index its own question, so no
    trajectory finds another's conversation in a cache."""
    return {"question": f"What is {10 + index} + 35?", "answer": "#### 999999"}


# ---------------------------------------------------------------- masks (no processes)


def multi_turn_episode(advantage: float = 1.0) -> Episode:
    """Prompt [1, 2, 3]; response: model [10, 11], environment [20, 21, 22], model [12]."""
    episode = Episode("e", "prompt", policy_version=0, pad_id=0, request_len=5, response_len=8)
    episode.request_tokens = [1, 2, 3]
    episode.response_tokens = [10, 11, 20, 21, 22, 12]
    episode.response_model_mask = [True, True, False, False, False, True]
    episode.advantage = advantage
    episode.ref_logprobs = torch.zeros(6)
    return episode


def test_model_mask_marks_the_model_tokens_only():
    episode = multi_turn_episode()
    assert episode.model_mask.tolist() == [True, True, False, False, False, True, False, False]
    assert episode.response_mask.tolist() == [True] * 6 + [False] * 2
    single = multi_turn_episode()
    single.response_model_mask = None  # a single-turn episode: every response token is the model's
    assert torch.equal(single.model_mask, single.response_mask)
    single.response_model_mask = [True, False]
    with pytest.raises(ValueError, match="one flag per response token"):
        _ = single.model_mask


def test_collate_attends_to_environment_tokens_but_trains_on_model_tokens():
    inputs, targets = grpo_collate([multi_turn_episode(), multi_turn_episode(-1.0)])
    assert inputs[0]["attention_mask"][0].tolist() == [0, 0, 1, 1, 1] + [1] * 6 + [0, 0]
    assert targets[0]["padding_mask"][0].tolist() == [True, True, False, False, False, True, False, False]


def test_an_environment_token_never_gets_a_gradient():
    """Through the trainer's own path (logits -> response_logprobs -> grpo_loss)
    with the shipped model: the logits that predict an environment token get
    exactly zero gradient, those that predict a model token do not, and the
    loss is the same whatever the environment tokens' logprobs are."""
    model = load_causal_lm(None, "float32", "cpu")
    inputs, targets = grpo_collate([multi_turn_episode(), multi_turn_episode(-0.5)])
    tokens, mask = inputs[0]["tokens"], inputs[0]["attention_mask"]
    logits = causal_lm_logits(model, tokens, mask)
    logits.retain_grad()
    request_len = tokens.shape[1] - targets[0]["response"].shape[1]
    logprobs = response_logprobs(logits, tokens, request_len)
    loss = grpo_loss(logprobs, targets[0]["ref_logprobs"], targets[0]["advantages"],
                     targets[0]["padding_mask"], beta=0.1)
    loss.backward()
    # logits[:, i] predicts token i + 1: response token j is predicted at request_len - 1 + j.
    grad = logits.grad[:, request_len - 1 : -1].abs().sum(dim=-1)
    model_tokens = targets[0]["padding_mask"]
    assert (grad[~model_tokens] == 0).all()
    assert (grad[model_tokens] > 0).all()

    # Whatever the environment tokens' logprobs (and reference logprobs) hold, inf and NaN
    # included, the loss and its gradient at the model's tokens are the same.
    poisoned = logprobs.detach().clone().requires_grad_(True)
    clean = logprobs.detach().clone().requires_grad_(True)
    ref = targets[0]["ref_logprobs"].clone()
    with torch.no_grad():
        poisoned[~model_tokens] = float("nan")
    ref_poisoned = ref.clone()
    ref_poisoned[~model_tokens] = float("inf")
    args = (targets[0]["advantages"], model_tokens)
    a = grpo_loss(clean, ref, *args, beta=0.1)
    b = grpo_loss(poisoned, ref_poisoned, *args, beta=0.1)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    assert torch.equal(clean.grad, poisoned.grad) and (clean.grad[~model_tokens] == 0).all()


def test_the_reported_kl_counts_the_model_tokens_only():
    ref = torch.tensor([0.0, 0.0, -5.0, -5.0])
    behaviour = torch.tensor([0.0, 0.0, 0.0, 0.0])  # env tokens carry a placeholder 0
    model = torch.tensor([True, True, False, False])
    assert response_kl(ref, behaviour, model) == 0.0
    assert response_kl(ref, behaviour) > 0  # without the mask the environment's tokens would count


def test_a_trajectory_becomes_an_episode_with_its_mask_and_truncation_flag():
    def turn(index, replica, cached, reusable):
        return Turn(index, "a", "o", 0.0, 10, cached, reusable, 2, replica, 3, "stop", 0.0, 0.0)

    trajectory = Trajectory(
        "t", {"question": "q", "answer": "#### 1"}, "prompt", [1, 2, 3], response_ids=[10, 11, 20, 12],
        model_mask=[True, True, False, True], logprobs=[-0.1, -0.2, 0.0, -0.3],
        turns=[turn(1, 0, 0, 0), turn(2, 0, 9, 9), turn(3, 1, 2, 11)], truncated=True,
    )
    episode = trajectory.episode(pad_id=0, request_len=4, response_len=6)
    assert episode.truncated and episode.policy_version == 3
    assert episode.model_mask.tolist() == [True, True, False, True, False, False]
    summary = cache_summary([trajectory])
    assert (summary["turns"], summary["cached_tokens"], summary["reusable_tokens"]) == (2, 11, 20)
    assert summary["same_replica"] == 0.5


def test_the_config_names_an_environment_and_its_budget():
    from forge_lite.grpo.config import GRPOConfig, load_config

    single = GRPOConfig()
    assert single.env.name is None and single.response_len == single.policy.max_tokens
    tool = load_config(Path(__file__).resolve().parents[1] / "configs" / "grpo_tool_tiny.yaml")
    assert tool.env.name == "calculator" and tool.response_len == tool.env.response_len
    with pytest.raises(ValueError, match="env.name must be one of"):
        GRPOConfig.from_dict({"env": {"name": "chess"}})
    with pytest.raises(ValueError, match="policy.router"):
        GRPOConfig.from_dict({"policy": {"router": "random"}})
    with pytest.raises(ValueError, match="env.response_len"):
        GRPOConfig.from_dict({"env": {"name": "retry", "response_len": 1}})


# ---------------------------------------------------------------- on real services


@pytest.fixture(scope="module")
async def services(store):
    """A 2-replica Policy (the shipped model, greedy) and a retry environment service."""
    policy, env = await asyncio.gather(
        Policy.options(procs=1, num_replicas=2).as_service(
            engine_config={"backend": "transformers"},
            sampling_config={"temperature": 0.0, "max_tokens": 24}, weight_store=store,
        ),
        EnvironmentActor.options(procs=1, num_replicas=1).as_service(env="retry", max_turns=3),
    )
    yield policy, env
    await policy.shutdown()
    await env.shutdown()


@pytest.mark.slow
async def test_a_session_serves_every_turn_from_one_replica_with_cached_tokens(services):
    policy, env = services
    tokenizer = tokenizer_for(None)
    trajectories = await asyncio.gather(*(
        play_trajectory(policy, env, tokenizer, never_right(i), response_len=200, max_tokens=24)
        for i in range(4)
    ))
    for trajectory in trajectories:
        assert len(trajectory.turns) == 3 and trajectory.done and not trajectory.truncated
        assert len({turn.replica for turn in trajectory.turns}) == 1
        assert all(turn.cached_tokens > 0 for turn in trajectory.turns[1:])
        # What the model wrote and what the environment wrote, in order, masked apart.
        assert sum(trajectory.model_mask) == sum(turn.new_tokens for turn in trajectory.turns)
        assert trajectory.retokenized_turns == 0
    assert len({t.turns[0].replica for t in trajectories}) == 2  # sessions spread over the replicas
    summary = cache_summary(trajectories)
    assert summary["of_reusable"] == 1.0 and summary["same_replica"] == 1.0

    # Without sessions, round robin moves each turn: less of the prompt comes from the cache.
    unpinned = await asyncio.gather(*(
        play_trajectory(policy, env, tokenizer, never_right(i), response_len=200, max_tokens=24, sessions=False)
        for i in range(10, 13)
    ))
    assert cache_summary(unpinned)["of_reusable"] < summary["of_reusable"]


@pytest.mark.slow
async def test_a_trajectory_past_its_budget_is_cut_and_flagged(services):
    policy, env = services
    trajectory = await play_trajectory(
        policy, env, tokenizer_for(None), never_right(20), response_len=30, max_tokens=24
    )
    assert trajectory.truncated and not trajectory.done
    assert len(trajectory.response_ids) == 30
    assert trajectory.episode(0, 96, 30).truncated
    assert await env.open_episodes.fanout() == [0]  # the environment closed it


@pytest.mark.slow
async def test_a_trajectory_whose_replica_dies_moves_and_finishes(services):
    policy, env = services
    await env.slow_replica(0, 1.5)  # time between turn 1 and turn 2 to kill the replica
    killed: list[int] = []

    def kill_after_first_turn(event) -> None:
        if isinstance(event, RequestFinished) and event.session is not None and not killed:
            killed.append(event.replica)
            asyncio.get_running_loop().create_task(policy.kill_replica(event.replica))

    unsubscribe = policy.events.subscribe(kill_after_first_turn)
    try:
        trajectory = await play_trajectory(
            policy, env, tokenizer_for(None), never_right(30), response_len=200, max_tokens=24
        )
    finally:
        unsubscribe()
        await env.slow_replica(0, 0)
    assert trajectory.done and len(trajectory.turns) == 3
    assert trajectory.turns[0].replica == killed[0]
    assert all(turn.replica != killed[0] for turn in trajectory.turns[1:])
    moved = [e for e in policy.events.history(SessionMoved) if e.session == trajectory.session]
    assert moved and moved[0].old_replica == killed[0]
    await policy.wait_for_state(killed[0], "HEALTHY", timeout=60)


# ---------------------------------------------------------------- abandoned and failed trajectories


@pytest.fixture(scope="module")
async def slow_env():
    """Two replicas of an environment that takes SlowRetryEnv.DELAY_S over every
    reset and step: a call is still running there when its caller is cancelled."""
    env = await EnvironmentActor.options(procs=1, num_replicas=2).as_service(env=SlowRetryEnv, max_turns=2)
    yield env
    await env.shutdown()


async def assert_released(policy, env, episode_id: str, before: list[int]) -> None:
    """Everything the trajectory held is given back: its episode (on every
    replica: the id is refused with a KeyError naming it), both services'
    session pins and every in-flight slot."""
    assert await env.open_episodes.fanout() == before
    with pytest.raises(FanoutError) as refused:  # on every replica, the one that held it included
        await env.step.fanout(episode_id, "<answer>1</answer>")
    assert not refused.value.results
    assert all(isinstance(e, KeyError) and repr(episode_id) in str(e) for e in refused.value.failures.values())
    assert len(env.service.sessions) == 0 and len(policy.service.sessions) == 0
    assert [r.in_flight for r in env.replicas + policy.replicas] == [0] * 4


def cancel_at(task_box: list, endpoint: str, occurrence: int = 1):
    """An event listener that cancels ``task_box[0]`` when the ``occurrence``-th
    request to ``endpoint`` is handed to a replica (sent the moment after)."""
    seen = []

    def listener(event) -> None:
        if isinstance(event, RequestRouted) and event.endpoint == endpoint:
            seen.append(event)
            if len(seen) == occurrence:
                task_box[0].cancel()

    listener.seen = seen
    return listener


@pytest.mark.slow
@pytest.mark.parametrize(
    "endpoint, occurrence",
    [("reset", 1), ("generate", 1), ("step", 1), ("generate", 2), ("step", 2)],  # step 2 scores the answer
    ids=["reset", "generate-1", "step-1", "generate-2", "step-2-reward"],
)
async def test_a_trajectory_cancelled_at_any_await_releases_what_it_held(services, slow_env, endpoint, occurrence):
    policy, _ = services
    env = slow_env
    before = await env.open_episodes.fanout()
    task_box: list = []
    listener = cancel_at(task_box, endpoint, occurrence)
    unsubscribe = [service.events.subscribe(listener) for service in (policy, env)]
    try:
        task = asyncio.ensure_future(play_trajectory(
            policy, env, tokenizer_for(None), never_right(40), response_len=200, max_tokens=24,
            episode_id=f"cancelled-{endpoint}-{occurrence}",
        ))
        task_box.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        for stop in unsubscribe:
            stop()
    assert len(listener.seen) == occurrence  # cancelled where the test meant, not elsewhere
    await assert_released(policy, env, f"cancelled-{endpoint}-{occurrence}", before)


@pytest.mark.slow
@pytest.mark.parametrize("timeout", [0.1, 0.45, 0.8])
async def test_a_trajectory_whose_caller_times_out_releases_what_it_held(services, slow_env, timeout):
    """``asyncio.wait_for`` running out, as an interrupted notebook cell: at
    0.1 s the reset is still running on the replica; later, a generate or a
    step. Every timeout is below the 3 x DELAY_S (0.9 s) the environment
    alone takes over a trajectory, so each one fires."""
    policy, _ = services
    env = slow_env
    before = await env.open_episodes.fanout()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(play_trajectory(
            policy, env, tokenizer_for(None), never_right(41), response_len=200, max_tokens=24,
            episode_id=f"timed-out-{timeout}",
        ), timeout)
    await assert_released(policy, env, f"timed-out-{timeout}", before)


@pytest.mark.slow
async def test_a_trajectory_cancelled_again_while_closing_still_closes(services, slow_env):
    """The close runs even when the caller stops waiting for it: the second
    cancel lands while the close is held 0.5 s before it is sent."""
    policy, _ = services
    env = slow_env
    before = await env.open_episodes.fanout()
    task_box: list = []
    first = cancel_at(task_box, "generate")  # the episode is open on its replica by then
    again = cancel_at(task_box, "close")
    unsubscribe = [policy.events.subscribe(first), env.events.subscribe(again)]
    for index in range(2):
        await env.slow_replica(index, 0.5)
    try:
        task = asyncio.ensure_future(play_trajectory(
            policy, env, tokenizer_for(None), never_right(42), response_len=200, max_tokens=24,
            episode_id="cancelled-twice",
        ))
        task_box.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(again.seen) >= 1  # the second cancel came while the close was held
        deadline = asyncio.get_running_loop().time() + 10
        while await env.open_episodes.fanout() != before and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
    finally:
        for stop in unsubscribe:
            stop()
        for index in range(2):
            await env.slow_replica(index, 0)
    await assert_released(policy, env, "cancelled-twice", before)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env_class, message",
    [(NaNOnTurnTwoEnv, r"^NaNOnTurnTwoEnv.step on turn 2 .*reward is nan"),
     (NoObservationEnv, r"^NoObservationEnv.step on turn 1 .*observation is None, expected str")],
)
async def test_an_environment_breaking_the_contract_fails_its_trajectory_naming_it(services, env_class, message):
    """A NaN reward never becomes a trajectory's return, and an observation of
    None never reaches the tokenizer: the rollout gets the environment's
    ValueError, and the trajectory's episode is closed."""
    policy, _ = services
    env = await EnvironmentActor.options(procs=1, num_replicas=1).as_service(env=env_class)
    try:
        with pytest.raises(ValueError, match=message):
            await play_trajectory(policy, env, tokenizer_for(None), never_right(43), response_len=200,
                                  max_tokens=24, episode_id="broken")
        assert await env.open_episodes.fanout() == [0]
        with pytest.raises(KeyError, match="'broken'"):
            await env.step.route("broken", "<answer>1</answer>")
    finally:
        await env.shutdown()


@pytest.mark.slow
async def test_when_one_trajectory_fails_its_siblings_stop_and_close_their_episodes(services):
    """A group's (or an evaluation's) trajectories are played together: when
    one fails, the others are cancelled, close their episodes, and send no
    further step, before the error reaches the caller (``all_or_none``)."""
    policy, _ = services
    env = await EnvironmentActor.options(procs=1, num_replicas=2).as_service(env=OneFailsEnv, max_turns=2)
    steps = []
    unsubscribe = env.events.subscribe(
        lambda e: steps.append(e) if isinstance(e, RequestRouted) and e.endpoint == "step" else None)
    try:
        before = await env.open_episodes.fanout()
        problems = [{"question": "Please fail.", "answer": "#### 1"}] + [never_right(50 + i) for i in range(3)]
        with pytest.raises(ValueError, match="OneFailsEnv fails on 'Please fail.'"):
            await evaluate_env(policy, env, problems, model=None, response_len=200, max_tokens=24)
        assert await env.open_episodes.fanout() == before  # every sibling closed its episode
        sent = len(steps)
        await asyncio.sleep(3 * SlowRetryEnv.DELAY_S)  # long enough for a sibling's next turn
        assert len(steps) == sent <= 4, "a sibling played on after the group failed"
    finally:
        unsubscribe()
        await env.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_five_step_multi_turn_grpo_run_records_every_step_and_leaves_no_process(tmp_path):
    from forge_lite.grpo.multiturn import read_trajectories
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.grpo.run import run_grpo

    before = count_children()
    recorder = MetricsRecorder()
    result = await run_grpo({
        "steps": 5, "group_size": 4, "batch_size": 8, "eval_samples": 8, "output_dir": str(tmp_path),
        "policy": {"backend": "transformers", "max_tokens": 24, "num_replicas": 2},
        "trainer": {"lr": 1e-4, "beta": 0.0}, "ref_model": {"kl_samples": 1},
        "data": {"request_len": 96},
        "env": {"name": "retry", "max_turns": 2, "response_len": 96},
    }, recorder=recorder)
    assert [s.step for s in recorder.steps] == [0, 1, 2, 3, 4]
    assert 0.0 <= result.eval_accuracy_before <= 1.0 and result.eval_accuracy_after is not None
    trajectories = read_trajectories(tmp_path)
    assert len(trajectories) >= 5 * 8
    assert any(len(t["turns"]) == 2 for t in trajectories)  # some needed the second turn
    assert await wait_for_children(before) <= before
