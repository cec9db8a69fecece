"""RLTrainer with procs=2: data-parallel training on real processes (gloo on CPU).

The claim that matters: two ranks, each stepping on half the batch, end with
the weights one process gets from the whole batch, and both report the whole
batch's loss. The rest is the contract with the controller: a batch must come
in one chunk per rank, and shutting the trainer down leaves no process behind.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from conftest import count_children, pid_alive, wait_for_children, wait_for_exit
from forge_lite.actors.hf_model import load_causal_lm
from forge_lite.actors.trainer import RLTrainer
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.controller.actor import processes_of
from forge_lite.grpo import Episode
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.logprobs import causal_lm_logits, response_logprobs

REQUEST_LEN, RESPONSE_LEN = 12, 8

# Plain SGD, so that the weights move by lr times the gradient and two runs
# whose gradients agree to float rounding agree to about the same. Adam's
# first step is lr * g / |g| per element: a gradient near zero flips sign
# with rounding and moves its weight by a full lr either way.
SGD = {"name": "SGD", "lr": 0.1}


def make_episodes(advantages: list[float]) -> list[Episode]:
    """Episodes of different lengths whose ref_logprobs are the shipped model's."""
    generator = torch.Generator().manual_seed(0)
    model = load_causal_lm(DEFAULT_MODEL)
    episodes = []
    for i, advantage in enumerate(advantages):
        episode = Episode(f"e{i}", "prompt", 0, 0, REQUEST_LEN, RESPONSE_LEN, "3")
        episode.request_tokens = torch.randint(3, 400, (6 + i,), generator=generator).tolist()
        episode.response_tokens = torch.randint(
            3, 400, (RESPONSE_LEN - i,), generator=generator
        ).tolist()
        tokens = torch.tensor(episode.request_tokens + episode.response_tokens).unsqueeze(0)
        with torch.no_grad():
            logits = causal_lm_logits(model, tokens)
        episode.ref_logprobs = response_logprobs(logits, tokens, len(episode.request_tokens))[0]
        episode.reward = 0.0
        episode.advantage = advantage
        episodes.append(episode)
    return episodes


@pytest.mark.slow
async def test_two_ranks_take_the_step_one_process_takes_on_the_whole_batch(store):
    # Each rank's half has its own mean advantage (-0.25 and -0.35), so a
    # rank that reported its own loss instead of the batch's would show.
    advantages = [1.0, -0.5, 0.5, 0.2]
    episodes = make_episodes(advantages)
    whole = grpo_collate(episodes, dp_size=1)
    halves = grpo_collate(episodes, dp_size=2)
    # No gradient clipping: it rescales the gradient to max_norm, which would
    # hide a gradient off by a constant factor (e.g. not undoing DDP's average).
    training = {"seq_len": 64, "max_norm": float("inf")}
    settings = dict(model=DEFAULT_MODEL, optimizer=SGD, training=training, weight_store=store)

    single = await RLTrainer.options(procs=1).as_actor(**settings)
    try:
        single_loss = await single.train_step.call_one(*whole)
        await single.push_weights.call_one(policy_version=1)
    finally:
        await RLTrainer.shutdown(single)

    # local_batch_size=1: each rank accumulates two micro-batches before DDP
    # reduces the gradients, which must not change the step either.
    ddp_settings = {**settings, "training": {**training, "local_batch_size": 1}}
    ddp = await RLTrainer.options(procs=2).as_actor(**ddp_settings)
    try:
        losses = await ddp.train_step.call(*halves)
        await ddp.push_weights.call(policy_version=2)
        assert store.versions() == [1, 2]  # written by the time the call returned
    finally:
        await RLTrainer.shutdown(ddp)

    # Same weights as the reference, so the KL term is 0 and the loss is -mean(A).
    assert single_loss == pytest.approx(-sum(advantages) / len(advantages), abs=1e-6)
    rank_losses = list(losses.values())
    assert len(rank_losses) == 2 and rank_losses[0] == rank_losses[1]
    assert rank_losses[0] == pytest.approx(single_loss, abs=1e-6)

    shipped = load_causal_lm(DEFAULT_MODEL).state_dict()
    one_process, two_ranks = store.get(1), store.get(2)
    assert set(two_ranks) == set(shipped)  # Hugging Face names, no DDP "module." prefix
    moved = max((one_process[name] - shipped[name]).abs().max().item() for name in shipped)
    differ = max((one_process[name] - two_ranks[name]).abs().max().item() for name in shipped)
    assert moved > 1e-3  # the step did something to compare
    assert differ < 1e-5


@pytest.mark.slow
async def test_a_batch_needs_one_equal_chunk_per_rank():
    episodes = make_episodes([1.0, -1.0, 0.5, 0.0])
    trainer = await RLTrainer.options(procs=2).as_actor(
        model=DEFAULT_MODEL, optimizer=SGD, training={"seq_len": 64}
    )
    try:
        for dp_size in (1, 4):
            # The error is raised by both ranks, before either waits for the other.
            with pytest.raises(ValueError) as caught:
                await trainer.train_step.call(*grpo_collate(episodes, dp_size=dp_size))
            error = caught.value
            assert f"{dp_size} dp chunk(s)" in str(error) and "2 ranks" in str(error)
            assert "dp_size=2" in str(error)
        # two chunks, but of 3 and 1 sequences
        three_in, three_out = grpo_collate(episodes[:3])
        one_in, one_out = grpo_collate(episodes[3:])
        with pytest.raises(ValueError, match=r"\[3, 1\] sequences"):
            await trainer.train_step.call(three_in + one_in, three_out + one_out)
        # and the ranks are still in step: a right batch trains
        losses = await trainer.train_step.call(*grpo_collate(episodes, dp_size=2))
        assert len(set(losses.values())) == 1
    finally:
        await RLTrainer.shutdown(trainer)


@pytest.mark.slow
async def test_two_trainers_start_side_by_side_and_leave_no_process():
    before = count_children()
    # Started together: each trainer's ranks meet at a port of their own.
    started = await asyncio.gather(
        *(
            RLTrainer.options(procs=2).as_actor(model=DEFAULT_MODEL, training={"seq_len": 64})
            for _ in range(2)
        ),
        return_exceptions=True,
    )
    # Each trainer's own ranks, alive (a count of all children would also see
    # a process of an earlier test that is still exiting).
    ranks = [pid for t in started if not isinstance(t, BaseException) for pid in processes_of(t).pids]
    running = [pid for pid in ranks if pid_alive(pid)]
    for trainer in started:
        if not isinstance(trainer, BaseException):
            await RLTrainer.shutdown(trainer)
    errors = [trainer for trainer in started if isinstance(trainer, BaseException)]
    assert not errors
    assert len(set(running)) == 4  # both trainers' two ranks
    assert await wait_for_exit(running) == []
    assert await wait_for_children(before) <= before
