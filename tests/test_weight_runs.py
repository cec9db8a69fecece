"""The weight store belongs to one run.

In one process (a notebook kernel), a run's trainer pushes weights and its
policy serves them; a later or concurrent run with its own store starts from
its own model and never sees the other run's versions. Without a store, the
tutorial's calls run as printed through the process's default store. Real processes: a
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
    # So does one who gives no store: that policy gets this process's default
    # store, which the run above (with its own store) never published to.
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
        with pytest.raises(KeyError, match="weight version 41 is not in the store"):
            await storeless.update_weights.route(41)
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


# ---------------------------------------------------------------- the tutorial's weight sync, as printed


async def test_the_tutorials_weight_sync_runs_as_printed():
    """No ``weight_store=`` anywhere: the trainer and the policy of this
    process meet in its default store, and the policy serves the trainer's weights."""
    from forge_lite.actors.default_store import default_weight_store

    trainer, policy = await asyncio.gather(
        RLTrainer.options(procs=1).as_actor(
            model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": 1e-2}, training={"seq_len": 256},
        ),
        Policy.options(procs=1, num_replicas=2).as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY
        ),
    )
    store = await default_weight_store()
    try:
        original = await greedy_answer(policy)
        await train_step(trainer, seed=0)
        # The tutorial's real_weight_sync(trainer, policy, step=0):
        await trainer.push_weights.call_one(policy_version=0 + 1)
        await policy.update_weights.fanout(policy_version=0 + 1)
        assert await policy.get_version.route() == 1
        assert await policy.get_version.fanout() == [1, 1]
        trained = (await trainer.state_dict.call_one())["model"]
        published = store.get(1)
        assert all(torch.equal(published[name], trained[name].to(published[name].dtype)) for name in published)
        first_answer = await greedy_answer(policy)
        assert first_answer != original  # the replicas serve the trained weights

        # The production loop's form: `.call(step + 1)`, then a fanout.
        await train_step(trainer, seed=1)
        await trainer.push_weights.call(2)
        await policy.update_weights.fanout(2)
        assert await policy.get_version.fanout() == [2, 2]
        assert store.versions()[-1] == 2

        # A replica respawned inside the running service comes back at the version it serves.
        await policy.kill_replica(1)
        await policy.wait_for_state(1, "HEALTHY", timeout=120)
        assert await policy.get_version.fanout() == [2, 2]

        # A new Policy service starts at version 0 with its model's weights,
        # though the default store holds version 2.
        fresh = await Policy.options(num_replicas=1).as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY
        )
        try:
            assert await fresh.get_version.route() == 0
            assert await greedy_answer(fresh) == original
            await fresh.update_weights.route(2)  # and loads a version when asked
            assert await fresh.get_version.route() == 2
        finally:
            await fresh.shutdown()
    finally:
        await asyncio.gather(policy.shutdown(), RLTrainer.shutdown(trainer))


async def test_the_default_store_takes_the_newest_trainer_and_refuses_the_older():
    """A learner re-runs the trainer's cell: the new trainer's first push
    drops the old one's versions; the old trainer pushing again is an error
    that says how to run two trainers side by side. Explicit stores stay apart."""
    from forge_lite.actors.default_store import default_weight_store

    spec = dict(model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": 1e-2}, training={"seq_len": 256})
    older, newer = await asyncio.gather(
        RLTrainer.options(procs=1).as_actor(**spec), RLTrainer.options(procs=1).as_actor(**spec)
    )
    separate = WeightStore()
    own = await RLTrainer.options(procs=1).as_actor(**spec, weight_store=separate)
    store = await default_weight_store()
    try:
        await older.push_weights.call_one(5)
        await older.push_weights.call_one(6)
        assert store.versions()[-2:] == [5, 6]
        await newer.push_weights.call_one(1)
        assert store.versions() == [1]  # the older trainer's run is gone from the store
        with pytest.raises(RuntimeError, match=r"newer RLTrainer.*weight_store=store"):
            await older.push_weights.call_one(7)
        assert store.versions() == [1]  # nothing of the refused push was published
        await newer.push_weights.call_one(2)
        assert store.versions() == [1, 2]
        # A trainer with its own store publishes there only.
        await own.push_weights.call_one(9)
        assert separate.versions() == [9] and store.versions() == [1, 2]
    finally:
        await asyncio.gather(*(RLTrainer.shutdown(t) for t in (older, newer, own)))
        separate.close()
