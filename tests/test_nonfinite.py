"""Non-finite numbers never flow silently into training.

Two ways a NaN reaches the weights, and the checks that stop each:

- A reward of NaN or +-inf. It is refused where it enters: by the
  RewardActor (naming the reward function and the response), by
  group_advantages (naming its index), and by the replay buffer (naming the
  episode and the field), so no non-finite number is stored for training.
- Whatever sits at a masked position of the logprobs. The loss, its KL and
  its gradient must not depend on it: the batch with -inf, +inf, NaN or
  1e30 there gives exactly the loss and gradient of the batch with ordinary
  values there.
"""

from __future__ import annotations

import math

import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.actors.replay_buffer import LocalReplayBuffer, ReplayBuffer
from forge_lite.data.rewards import MathReward
from forge_lite.grpo import Episode, RewardActor
from forge_lite.rl.advantages import group_advantages
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.loss import response_kl as rollout_k3_kl
from forge_lite.rl.loss import grpo_loss, k3_kl

NAN, INF = float("nan"), float("inf")
NON_FINITE = [NAN, INF, -INF]


# ---------------------------------------------------------------- rewards into advantages


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", [0, 1, 3])
def test_group_advantages_name_a_non_finite_reward(bad, index):
    rewards = [1.0, 0.0, 0.5, 0.0]
    rewards[index] = bad
    with pytest.raises(ValueError, match=rf"reward {index} of the group is {bad}"):
        group_advantages(rewards)


@pytest.mark.parametrize("rewards", [[NAN], [INF, INF], [-INF, -INF, -INF]])
def test_group_advantages_refuse_non_finite_groups_that_used_to_short_circuit(rewards):
    # A group of one and a group of equal rewards skip the formula; they are
    # checked all the same (they were [0.0] and [0.0, 0.0] before).
    with pytest.raises(ValueError, match="reward 0 of the group is"):
        group_advantages(rewards)


@pytest.mark.parametrize("rewards", [[1e308, -1e308], [1e308, 1e308, -1e308]])
def test_group_advantages_refuse_rewards_too_large_to_standardise(rewards):
    # Finite, but the std (or the mean) overflows: the advantages would be
    # 0.0 (a silent "no signal") or NaN.
    with pytest.raises(ValueError, match="too large to standardise"):
        group_advantages(rewards)


def test_group_advantages_of_finite_rewards_are_unchanged():
    assert group_advantages([1.0, 0.0]) == pytest.approx([0.7070, -0.7070], abs=1e-4)


# ---------------------------------------------------------------- the RewardActor


def reward_from_target(prompt: str, response: str, target: str) -> float:
    """A broken reward function: scores whatever the target says, NaN and inf included."""
    return float(target)


async def test_reward_actor_names_the_function_and_response_of_a_non_finite_score():
    rewards = await RewardActor.options(procs=1).as_actor(
        reward_functions=[MathReward(), reward_from_target]
    )
    try:
        # A finite score passes through (MathReward 0.0, ours 0.5).
        assert await rewards.evaluate_response.call_one("q", "no answer", "1.0") == 0.5
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError) as caught:
                await rewards.evaluate_response.call_one("q", f"response scored {bad}", bad)
            message = str(caught.value)
            assert "reward_from_target" in message
            assert f"scored {float(bad)}" in message
            assert f"response scored {bad}" in message
        # The actor keeps serving after a refusal.
        assert await rewards.evaluate_response.call_one("q", "<answer>3</answer>", "3") == 2.0
    finally:
        await RewardActor.shutdown(rewards)


def reward_of_kind(prompt: str, response: str, target: str):
    """A reward function that returns the value the target names, whatever its type."""
    import numpy as np

    return {"text": "1.0", "none": None, "list": [1.0], "dict": {"reward": 1.0}, "complex": 1j,
            "tensor of one": torch.tensor([1.0]), "numpy text": np.array("1.0"),
            "int": 1, "bool": True, "numpy float32": np.float32(0.5), "0-d tensor": torch.tensor(0.25),
            "0-d array": np.array(0.75)}[target]


@pytest.mark.parametrize("kind", ["text", "none", "list", "dict", "complex", "tensor of one", "numpy text"])
async def test_reward_actor_refuses_a_score_that_is_not_a_number(kind):
    """A reward function returning the string "1.0" (or None, a list, ...) is
    a TypeError naming the function and the response, not a reward of 1.0."""
    rewards = await RewardActor.options(procs=1).as_actor(reward_functions=[reward_of_kind])
    try:
        with pytest.raises(TypeError) as caught:
            await rewards.evaluate_responses.call_one("q", [f"a response of kind {kind}"], kind)
        message = str(caught.value)
        assert "reward_of_kind" in message and f"a response of kind {kind}" in message
        assert "must be a real number" in message
    finally:
        await RewardActor.shutdown(rewards)


async def test_reward_actor_takes_every_kind_of_real_number():
    rewards = await RewardActor.options(procs=1).as_actor(reward_functions=[reward_of_kind])
    try:
        scores = [await rewards.evaluate_response.call_one("q", "r", kind)
                  for kind in ("int", "bool", "numpy float32", "0-d tensor", "0-d array")]
    finally:
        await RewardActor.shutdown(rewards)
    assert scores == [1.0, 1.0, 0.5, 0.25, 0.75] and all(type(s) is float for s in scores)


# ---------------------------------------------------------------- the replay buffer


def make_episode(episode_id="e", reward=1.0, advantage=0.5, ref_logprobs=(-1.0, -2.0)):
    episode = Episode(episode_id, "a prompt", 0, 0, 4, 3, "3")
    episode.request_tokens = [5, 6, 7]
    episode.response_tokens = [8, 9]
    episode.ref_logprobs = torch.tensor(ref_logprobs)
    episode.reward = reward
    episode.advantage = advantage
    return episode


# (what is wrong with the episode, what the error says about it)
BAD_EPISODES = [
    (dict(reward=NAN), r"has reward=nan"),
    (dict(reward=INF), r"has reward=inf"),
    (dict(advantage=-INF), r"has advantage=-inf"),
    (dict(advantage=NAN), r"has advantage=nan"),
    (dict(ref_logprobs=(-1.0, -INF)), r"has ref_logprobs .* \{1: -inf\}"),
    (dict(ref_logprobs=(NAN, -1.0)), r"has ref_logprobs .* \{0: nan\}"),
]
BAD_IDS = [f"{name}={value}" for settings, _ in BAD_EPISODES for name, value in settings.items()]


@pytest.mark.parametrize("settings, message", BAD_EPISODES, ids=BAD_IDS)
def test_replay_buffer_refuses_a_non_finite_episode(settings, message):
    buffer = LocalReplayBuffer(batch_size=1, max_policy_age=1)
    with pytest.raises(ValueError, match=rf"episode 'bad' {message}"):
        buffer.add(make_episode("bad", **settings))
    assert buffer.size() == 0
    buffer.add(make_episode("good"))  # a finite one still goes in
    assert buffer.size() == 1


@pytest.mark.parametrize("settings, message", BAD_EPISODES, ids=BAD_IDS)
def test_collate_refuses_a_non_finite_episode(settings, message):
    # The collate builds the loss's tensors, so it checks too: episodes can
    # reach it without passing through a buffer.
    with pytest.raises(ValueError, match=rf"episode 'bad' {message}"):
        grpo_collate([make_episode("good"), make_episode("bad", **settings)])


def test_an_episode_without_advantage_yet_is_still_accepted():
    buffer = LocalReplayBuffer(batch_size=1, max_policy_age=1)
    buffer.add(make_episode(advantage=None))  # None is "not set yet", not non-finite
    assert buffer.size() == 1


async def test_replay_buffer_actor_refuses_a_non_finite_episode():
    buffer = await ReplayBuffer.options(procs=1).as_actor(batch_size=1, max_policy_age=1)
    try:
        with pytest.raises(ValueError, match=r"episode 'bad' has advantage=nan"):
            await buffer.add.call_one(make_episode("bad", advantage=NAN))
        assert await buffer.numel.call_one() == 0
    finally:
        await ReplayBuffer.shutdown(buffer)


def test_ref_logprobs_must_cover_every_response_token():
    # Fewer logprobs than tokens: the zero padding would stand in for the
    # reference's logprobs of real tokens, silently.
    with pytest.raises(ValueError, match="1 ref_logprobs for 2 response_tokens"):
        make_episode(ref_logprobs=(-1.0,)).padded_ref_logprobs
    with pytest.raises(ValueError, match="3 ref_logprobs for 2 response_tokens"):
        make_episode(ref_logprobs=(-1.0, -1.0, -1.0)).padded_ref_logprobs


# ---------------------------------------------------------------- masked positions


def masked_batch():
    """A [3, 5] batch: rows with 4, 2 and 0 real tokens, ordinary values everywhere."""
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 5, generator=generator) * 3
    ref_logprobs = -torch.rand(3, 5, generator=generator) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([[0.7], [-1.2], [0.4]])
    return logprobs, ref_logprobs, advantages, mask


def loss_and_gradient(logprobs, ref_logprobs, advantages, mask, beta):
    logprobs = logprobs.clone().requires_grad_(True)
    loss = grpo_loss(logprobs, ref_logprobs, advantages, mask, beta=beta)
    loss.backward()
    return loss.detach(), logprobs.grad


FILLERS = [-INF, INF, NAN, 1e30, -1e30]


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("where", ["logprobs", "ref_logprobs", "both"])
@pytest.mark.parametrize("filler", FILLERS, ids=["-inf", "inf", "nan", "1e30", "-1e30"])
def test_masked_positions_do_not_change_the_loss_or_its_gradient(filler, where, beta):
    logprobs, ref_logprobs, advantages, mask = masked_batch()
    expected_loss, expected_grad = loss_and_gradient(logprobs, ref_logprobs, advantages, mask, beta)
    assert torch.isfinite(expected_loss) and torch.isfinite(expected_grad).all()

    if where in ("logprobs", "both"):
        logprobs = logprobs.masked_fill(~mask, filler)
    if where in ("ref_logprobs", "both"):
        ref_logprobs = ref_logprobs.masked_fill(~mask, filler)
    loss, grad = loss_and_gradient(logprobs, ref_logprobs, advantages, mask, beta)

    assert torch.equal(loss, expected_loss)
    assert torch.equal(grad, expected_grad)
    assert grad[~mask].eq(0).all()  # nothing flows back into a masked position


@pytest.mark.parametrize("filler", FILLERS, ids=["-inf", "inf", "nan", "1e30", "-1e30"])
def test_masked_positions_do_not_change_the_kl(filler):
    logprobs, ref_logprobs, _, mask = masked_batch()
    expected = k3_kl(ref_logprobs, logprobs, mask)
    kl = k3_kl(ref_logprobs.masked_fill(~mask, filler), logprobs.masked_fill(~mask, -filler), mask)
    assert torch.equal(kl, expected)
    assert kl[~mask].eq(0).all() and (kl[mask] > 0).all()


def test_the_rollouts_kl_is_the_loss_kl():
    # loop.k3_kl (the reported KL) is the mean of loss.k3_kl over a response's
    # tokens, in float64; nearly equal models give a tiny KL, never below 0.
    logprobs, ref_logprobs, _, _ = masked_batch()
    every = torch.ones(5, dtype=torch.bool)
    expected = k3_kl(ref_logprobs[0].double(), logprobs[0].double(), every).mean().item()
    assert rollout_k3_kl(ref_logprobs[0], logprobs[0]) == expected
    assert rollout_k3_kl(ref_logprobs[0], logprobs[0]) == pytest.approx(
        (torch.exp(ref_logprobs[0] - logprobs[0]) - (ref_logprobs[0] - logprobs[0]) - 1)
        .mean().item(), rel=1e-5,
    )
    nearly = ref_logprobs[0].double() + 1e-9
    assert 0 <= rollout_k3_kl(ref_logprobs[0].double(), nearly) < 1e-15
    assert math.isfinite(rollout_k3_kl(ref_logprobs[0], logprobs[0]))
