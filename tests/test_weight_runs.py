"""The weight store belongs to one run.

In one process (a notebook kernel), a run's trainer pushes weights and its
policy serves them; a later or concurrent run with its own store starts from
its own model and never sees the other run's versions. Real processes: a
trainer that takes a real step, Policy services on the transformers engine.
"""

import asyncio
import functools

import pytest
import torch
from test_grpo_actors import make_episodes

from forge_lite.actors.policy import Policy
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.loss import grpo_loss

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 16}
PROBE = "What is 12 + 30?"


async def start_run(store: WeightStore, lr: float):
    """A trainer and a one-replica policy service sharing ``store``."""
    trainer, policy = await asyncio.gather(
        RLTrainer.options(procs=1).as_actor(
            model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": lr}, training={"seq_len": 256},
            loss=functools.partial(grpo_loss, beta=0.0), weight_store=store,
        ),
        Policy.options(num_replicas=1).as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY, weight_store=store
        ),
    )
    return trainer, policy


async def train_step(trainer, seed: int) -> None:
    """One real training step on a made-up batch (beta 0: no reference needed)."""
    torch.manual_seed(seed)
    episodes = make_episodes([1.0, -1.0, 0.5, -0.5])
    for episode in episodes:
        episode.ref_logprobs = torch.zeros(len(episode.response_tokens))  # beta 0: unused
    inputs, targets = grpo_collate(episodes, dp_size=1)
    await trainer.train_step.call_one(inputs, targets)


async def train_and_sync(trainer, policy, version: int, seed: int) -> None:
    """One real training step, then the tutorial's weight sync to ``version``."""
    await train_step(trainer, seed)
    await trainer.push_weights.call_one(policy_version=version)
    await policy.update_weights.fanout(policy_version=version)


async def greedy_answer(policy) -> list[int]:
    return (await policy.generate.route(PROBE))[0].token_ids.tolist()


async def test_a_new_policy_after_a_run_starts_from_its_model():
    first_store = WeightStore()
    trainer, policy = await start_run(first_store, lr=1e-2)
    try:
        original = await greedy_answer(policy)
        await train_and_sync(trainer, policy, version=1, seed=0)
        assert await policy.get_version.route() == 1
        trained = await greedy_answer(policy)
        assert trained != original  # the run's step did change the weights
    finally:
        await asyncio.gather(policy.shutdown(), RLTrainer.shutdown(trainer))
        first_store.close()

    # A learner re-runs the notebook from the top: a new store, a new policy.
    # So does one who forgets the store: that policy cannot load anything.
    second_store = WeightStore()
    fresh, storeless = await asyncio.gather(
        Policy.options(num_replicas=1).as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY, weight_store=second_store
        ),
        Policy.options(num_replicas=1).as_service(engine_config={"backend": "transformers"}, sampling_config=GREEDY),
    )
    try:
        for service in (fresh, storeless):
            assert await service.get_version.route() == 0
            assert await greedy_answer(service) == original
        with pytest.raises(RuntimeError, match="no weight store.*weight_store=store"):
            await storeless.update_weights.route(1)
        assert await storeless.get_version.route() == 0  # the replica stays healthy
    finally:
        await asyncio.gather(fresh.shutdown(), storeless.shutdown())
        second_store.close()


async def test_two_runs_at_the_same_time_keep_their_own_versions():
    stores = [WeightStore(), WeightStore()]
    runs = await asyncio.gather(start_run(stores[0], lr=1e-2), start_run(stores[1], lr=3e-2))
    try:
        original = await greedy_answer(runs[0][1])
        # Both publish version 1, from different steps, at the same time.
        await asyncio.gather(*(train_and_sync(t, p, version=1, seed=s) for s, (t, p) in enumerate(runs)))
        answers = [await greedy_answer(policy) for _, policy in runs]
        assert answers[0] != answers[1] and original not in answers
        for store, (trainer, policy) in zip(stores, runs):
            assert store.versions() == [1]
            assert await policy.get_version.route() == 1
        # Each policy holds its own run's version 1, not the other's.
        a, b = stores[0].get(1), stores[1].get(1)
        assert any(not torch.equal(a[name], b[name]) for name in a)
        # A replica that joins run 0 (respawned after a failure) serves run 0's version.
        policy = runs[0][1]
        await policy.kill_replica(0)
        await policy.wait_for_state(0, "HEALTHY", timeout=120)
        assert await policy.get_version.route() == 1
        assert await greedy_answer(policy) == answers[0]
    finally:
        await asyncio.gather(*(p.shutdown() for _, p in runs), *(RLTrainer.shutdown(t) for t, _ in runs))
        for store in stores:
            store.close()
