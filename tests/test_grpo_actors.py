"""The GRPO actors on real Monarch processes, with the model the kit ships.

The reference model and the trainer are checked against each other: with
identical weights they must give identical logprobs for a response, whether
it arrives unpadded (the reference model, as the tutorial calls it) or
padded in a collated batch (the trainer). If they disagreed, the KL term
would push the policy away from the model it started as.
"""

from __future__ import annotations

import math

import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.actors.hf_model import load_causal_lm, resolve_model
from forge_lite.actors.reference_model import ReferenceModel
from forge_lite.actors.replay_buffer import ReplayBuffer
from forge_lite.actors.trainer import RLTrainer, TrainingConfig, build_optimizer, merge_dp_chunks
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.data.rewards import MathReward, ThinkingReward
from forge_lite.grpo import ComputeAdvantages, DatasetActor, Episode, Group, RewardActor
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.logprobs import causal_lm_logits, response_logprobs

REQUEST_LEN, RESPONSE_LEN = 12, 8


def make_episodes(advantages, pad_id=0):
    """Episodes with prompts and responses of different lengths, as a rollout gives."""
    generator = torch.Generator().manual_seed(0)
    episodes = []
    for i, advantage in enumerate(advantages):
        episode = Episode(f"e{i}", "prompt", 0, pad_id, REQUEST_LEN, RESPONSE_LEN, "3")
        episode.request_tokens = torch.randint(3, 400, (6 + i,), generator=generator).tolist()
        episode.response_tokens = torch.randint(3, 400, (RESPONSE_LEN - i,), generator=generator).tolist()
        episode.ref_logprobs = torch.zeros(len(episode.response_tokens))  # tests that need real ones set them
        episode.reward = 0.0
        episode.advantage = advantage
        episodes.append(episode)
    return episodes


def unpadded(episode: Episode) -> torch.Tensor:
    return torch.tensor(episode.request_tokens + episode.response_tokens).unsqueeze(0)


# ---------------------------------------------------------------- light actors


async def test_reward_actor_scores_the_tutorial_example():
    rewards = await RewardActor.options(procs=1).as_actor(
        reward_functions=[MathReward(), ThinkingReward()]
    )
    try:
        untagged = await rewards.evaluate_response.call_one(
            prompt="What is 15% of 240?", response="15% of 240 is 36", target="36"
        )
        tagged = await rewards.evaluate_response.call_one(
            "What is 15% of 240?", "<think>15% of 240 = 36</think><answer>36</answer>", "36"
        )
        # A whole group in one call scores each response as evaluate_response does.
        group = await rewards.evaluate_responses.call_one(
            "What is 15% of 240?", ["15% of 240 is 36", "<think>15% of 240 = 36</think><answer>36</answer>",
                                    "<think>no</think><answer>35</answer>"], "36"
        )
    finally:
        await RewardActor.shutdown(rewards)
    assert untagged == pytest.approx(0.05)
    assert tagged == 1.0
    assert group == [untagged, tagged, 0.5]


async def test_reward_actor_without_functions_is_refused():
    with pytest.raises(ValueError, match="at least one reward function"):
        await RewardActor.options(procs=1).as_actor(reward_functions=[])


async def test_compute_advantages_actor():
    group = Group.new_group(0, 3, "prompt", 0, 0, 4, 4, target="3")
    for episode, reward in zip(group.episodes, [1.0, 0.0, 0.5]):
        episode.reward = reward
    advantages_actor = await ComputeAdvantages.options(procs=1).as_actor()
    try:
        advantages = await advantages_actor.compute.call_one(group)
    finally:
        await ComputeAdvantages.shutdown(advantages_actor)
    # mean 0.5, sample std 0.5
    assert advantages == pytest.approx([0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), 0.0])


async def test_replay_buffer_actor_returns_inputs_and_targets():
    buffer = await ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1)
    try:
        for episode in make_episodes([1.0, -1.0, 0.5]):
            await buffer.add.call_one(episode)
        assert await buffer.numel.call_one() == 3
        inputs, targets = await buffer.sample.call_one(curr_policy_version=0)
        assert await buffer.numel.call_one() == 1
        assert await buffer.sample.call_one(curr_policy_version=0, batch_size=None) is None
        state = await buffer.state_dict.call_one()
        await buffer.clear.call_one()
        assert await buffer.numel.call_one() == 0
        await buffer.load_state_dict.call_one(state)
        assert await buffer.evict.call_one(curr_policy_version=2) == 1
    finally:
        await ReplayBuffer.shutdown(buffer)
    assert inputs[0]["tokens"].shape == (2, REQUEST_LEN + RESPONSE_LEN)
    assert targets[0]["advantages"].shape == (2, 1)


async def test_replay_buffer_actor_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_policy_age"):
        await ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=-1)


@pytest.mark.parametrize("streaming", [False, True])
async def test_dataset_actor_serves_formatted_problems_epoch_after_epoch(streaming):
    dataset = await DatasetActor.options(procs=1).as_actor(data_split="test", streaming=streaming)
    try:
        pad_id = await dataset.pad_token.call_one()
        first_epoch = [await dataset.sample.call_one() for _ in range(200)]  # the test split's size
        second_epoch = [await dataset.sample.call_one() for _ in range(200)]
    finally:
        await DatasetActor.shutdown(dataset)
    sample = first_epoch[0]
    assert set(sample) == {"request", "target", "question", "answer"}
    assert sample["question"] in sample["request"]  # the question, in the chat template
    assert sample["request"] != sample["question"]
    assert sample["answer"].endswith(f"#### {sample['target']}")
    assert float(sample["target"]) == int(sample["target"])  # a bare number
    assert isinstance(pad_id, int)
    # a new epoch serves the same problems in a new order
    questions = [s["question"] for s in first_epoch]
    assert sorted(questions) == sorted(s["question"] for s in second_epoch)
    assert questions != [s["question"] for s in second_epoch]


async def test_dataset_actor_offline_hub_path_says_what_to_do(monkeypatch):
    # Child processes inherit the environment: they see the hub as offline
    # and fail at once, as they would without a network (after retries).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"'openai/gsm8k'.*DatasetActor\(\) with no path"):
        await DatasetActor.options(procs=1).as_actor(path="openai/gsm8k", revision="main")


# ---------------------------------------------------------------- model specs


def test_model_specs_resolve(monkeypatch):
    shipped = {"name": "qwen3", "flavor": "tiny", "hf_assets_path": DEFAULT_MODEL}
    assert resolve_model(shipped) == resolve_model(None) == DEFAULT_MODEL
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The tutorial's dict names a hub model; offline it fails at once, naming it.
    with pytest.raises(FileNotFoundError, match=r"Qwen/Qwen3-0\.0B-not-a-model.*DEFAULT_MODEL"):
        resolve_model({"name": "qwen3", "flavor": "0.0B-not-a-model"})
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen3-0.0B-not-a-model"):
        resolve_model({"name": "qwen3", "flavor": "1.7B", "hf_assets_path": "hf://Qwen/Qwen3-0.0B-not-a-model"})
    with pytest.raises(ValueError, match="hf_assets_path"):
        resolve_model({"name": "llama3"})


# ---------------------------------------------------------------- model actors


@pytest.fixture(scope="module")
async def reference():
    """The shipped model as a ReferenceModel actor, shared by the tests below."""
    actor = await ReferenceModel.options(procs=1).as_actor(model=DEFAULT_MODEL)
    yield actor
    await ReferenceModel.shutdown(actor)


@pytest.mark.slow
async def test_reference_logprobs_match_the_trainers_computation(reference):
    episodes = make_episodes([1.0, -1.0, 0.5, 0.0])
    unpadded_logprobs = [
        await reference.forward.call_one(
            unpadded(e), max_req_tokens=len(e.request_tokens), return_logprobs=True
        )
        for e in episodes
    ]
    logits = await reference.forward.call_one(
        unpadded(episodes[0]), len(episodes[0].request_tokens), return_logprobs=False
    )
    # An actor's endpoint error arrives as itself, as through a service.
    with pytest.raises(ValueError, match="max_req_tokens=14 must be"):
        await reference.forward.call_one(unpadded(episodes[0]), 14)

    assert unpadded_logprobs[0].shape == (1, RESPONSE_LEN)
    assert logits.shape[:2] == (1, RESPONSE_LEN)
    response = torch.tensor(episodes[0].response_tokens)[None, :, None]
    from_logits = logits.log_softmax(-1).gather(-1, response).squeeze(-1)
    assert torch.allclose(from_logits, unpadded_logprobs[0], atol=1e-5)  # row i: token i

    # The trainer's path: collated (left- and right-padded) batch, same weights.
    for episode, logprobs in zip(episodes, unpadded_logprobs):
        episode.ref_logprobs = logprobs[0]
    inputs, targets = merge_dp_chunks(*grpo_collate(episodes, dp_size=2))
    model = load_causal_lm(DEFAULT_MODEL)
    with torch.no_grad():
        trainer_logprobs = response_logprobs(
            causal_lm_logits(model, inputs["tokens"], inputs["attention_mask"]),
            inputs["tokens"],
            REQUEST_LEN,
        )
    mask = targets["padding_mask"]
    assert torch.allclose(trainer_logprobs[mask], targets["ref_logprobs"][mask], atol=1e-5)


@pytest.mark.slow
async def test_trainer_steps_and_publishes_weights(reference, tmp_path):
    store = WeightStore(str(tmp_path))
    advantages = [1.0, -0.5, 0.5, 0.2]
    episodes = make_episodes(advantages)
    trainer = await RLTrainer.options(procs=1).as_actor(
        model={"name": "qwen3", "flavor": "tiny", "hf_assets_path": DEFAULT_MODEL},
        optimizer={"name": "AdamW", "lr": 1e-3},
        training={"local_batch_size": 2, "seq_len": 64, "max_norm": 1.0},
        weight_store=store,
    )
    try:
        for episode in episodes:
            logprobs = await reference.forward.call_one(unpadded(episode), len(episode.request_tokens))
            episode.ref_logprobs = logprobs[0]
        await trainer.push_weights.call_one(policy_version=0)
        inputs, targets = grpo_collate(episodes, dp_size=2)
        first_loss = await trainer.train_step.call_one(inputs, targets)
        await trainer.push_weights.call_one(1)
        second_loss = await trainer.train_step.call_one(inputs, targets)
    finally:
        await RLTrainer.shutdown(trainer)

    # Same weights as the reference, so the KL term is 0 and the loss is
    # -mean(A) exactly: the trainer's logprobs match the reference's.
    assert first_loss == pytest.approx(-sum(advantages) / len(advantages), abs=1e-6)
    assert math.isfinite(second_loss) and second_loss > first_loss  # KL > 0 once they differ
    assert store.versions() == [0, 1]
    before, after = store.get(0), store.get(1)
    shipped = load_causal_lm(DEFAULT_MODEL).state_dict()
    assert set(before) == set(shipped)  # Hugging Face parameter names
    assert all(torch.equal(before[name], shipped[name]) for name in shipped)
    assert any(not torch.equal(before[name], after[name]) for name in before)


async def test_trainer_refuses_unknown_settings():
    with pytest.raises(ValueError, match="unknown training option"):
        await RLTrainer.options(procs=1).as_actor(training={"batch": 2})


def test_optimizer_is_built_from_its_config():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([weight], {"name": "SGD", "lr": 0.5})
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="torch.optim"):
        build_optimizer([weight], {"name": "Adamm", "lr": 0.5})


def test_learning_rate_warms_up_then_falls_to_zero():
    schedule = TrainingConfig(warmup_steps=4, decay_steps=100)
    assert schedule.lr_factor(0) == pytest.approx(0.2)  # 1/5 of lr on the first step
    assert schedule.lr_factor(4) == pytest.approx(0.96)  # warmed up, 4% into the decay
    assert schedule.lr_factor(50) == pytest.approx(0.5)
    assert schedule.lr_factor(100) == 0.0 and schedule.lr_factor(150) == 0.0
    assert TrainingConfig().lr_factor(10_000) == 1.0  # no warm-up, no decay: constant
