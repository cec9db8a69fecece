"""The GRPO loop: rollouts and training running side by side on services.

The tutorial's "asynchronous coordination", whole. Two kinds of task share
the controller's event loop:

- ``num_rollout_tasks`` rollout loops (``rollout_loop``). Each takes a
  problem, samples a group of responses from the policy service, scores them
  (reward service) while the reference service computes its logprobs, turns
  the rewards into advantages and adds the episodes to the replay buffer;
  ``prompts_per_rollout`` such groups at a time. A group's last steps are
  ``forge_lite.grpo.rollout.finish_group``, which the multi-turn rollout
  shares.
- one training loop (``train_loop``). It samples a batch from the buffer,
  takes an optimizer step, publishes the weights as the next version and has
  every policy replica load them (``fanout``), going on to its next batch
  while they do.

Neither waits for the other: the replay buffer sits between them, and its
``max_policy_age`` bounds how stale the data the trainer learns from may be.
With ``skip_uniform_groups`` a group whose responses all got the same reward
never reaches the buffer: its advantages are all 0, so it would only take
batch slots from groups that teach something (DAPO's "dynamic sampling").

What a step reports (``record_step``): reward mean and accuracy (the share
of responses with the right number in the answer tag) over every response
scored since the previous step, skipped groups too, so they follow the
policy, not the batch's selection (the batch's, when no group finished in
between). The episodes' ages and the KL describe the batch the step trained
on. The KL is the loss's k3 estimate between the reference model and the
*behaviour* policy (the logprobs the engine reported when it sampled each
response), averaged per response and then over the batch; the trainer's
``train_step`` returns the loss and the clip fraction. The zero-std fraction
is the share of the groups scored since the previous step whose rewards were
all equal. Throughput and the time split describe
what the rollout tasks did since the previous step (their
``RolloutWindow``, in ``forge_lite.grpo.rollout``); their phases run
concurrently, so they can add up to more than the step's wall time.

Starting and stopping the services is ``forge_lite.grpo.services``; a whole
run (``GRPORun``, ``run_grpo``) is ``forge_lite.grpo.run``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from forge_lite.actors.weights import WeightStore
from forge_lite.controller.errors import FanoutError, ReplicaFailure
from forge_lite.grpo.checkpoint import checkpoint_due, save_if_due
from forge_lite.rl.collate import grpo_collate
from forge_lite.grpo.config import GRPOConfig
from forge_lite.rl.episode import Episode, Group
from forge_lite.grpo.evaluation import is_correct
from forge_lite.grpo.multiturn import rollout_env_group
from forge_lite.grpo.recorder import PHASES, MetricsRecorder
from forge_lite.grpo.rollout import RolloutWindow, finish_group, reference_logprobs, timed
from forge_lite.grpo.services import RunComponents


# ---------------------------------------------------------------- rollouts


async def rollout_loop(s: RunComponents, config: GRPOConfig, pad_id: int, window: RolloutWindow) -> None:
    """Rollouts until cancelled, ``config.prompts_per_rollout`` groups at a
    time; each round waits while the buffer already holds
    ``config.batches_ahead`` batches (see ``RolloutWindow.room``). With
    ``config.env.name`` set, each group is a multi-turn one (``forge_lite.grpo.multiturn.rollout_env_group``).

    The groups of a round start together: an idle policy replica waits until
    requests stop arriving (``BATCH_GAP_S`` in ``forge_lite.actors.policy``),
    so they are prefilled and start decoding together. Both engines batch
    continuously (the transformers engine's decoding batch is
    ``forge_lite/actors/engines/kv_batch.py``): a request that arrives while
    others decode joins them at the next token step, so groups share decode
    steps whether or not they started in the same round or task. What
    ``prompts_per_rollout`` sets is how many groups a task keeps in flight.
    (The tiny config's one loop of 6 groups was measured against 2 loops of
    1, a quarter less policy CPU per training step, when the transformers
    engine still ran whole batches; benchmarks/grpo_vs_trl.py has the whole
    run's numbers.)
    """
    rollout = rollout_group if config.env.name is None else rollout_env_group
    while True:
        await window.room(config.batches_ahead * config.batch_size)
        await asyncio.gather(*(rollout(s, config, pad_id, window) for _ in range(config.prompts_per_rollout)))


async def rollout_group(s: RunComponents, config: GRPOConfig, pad_id: int, window: RolloutWindow) -> Group:
    """One prompt, ``group_size`` scored episodes with advantages, into the buffer
    (unless ``skip_uniform_groups`` and every reward is the same; ``finish_group``)."""
    sample = await s.dataloader.sample.call_one()
    request, target = sample["request"], sample["target"]
    completions = await timed(window.seconds, "generate", s.policy.generate.route(request, n=config.group_size))
    group = Group.from_completions(
        completions, request, target, pad_id, config.data.request_len, config.policy.max_tokens
    )
    # The reference scores the responses while the reward does.
    rewards, ref_logprobs = await asyncio.gather(
        timed(window.seconds, "reward", score(s, group)),
        timed(window.seconds, "reference", reference_logprobs(s, config, group)),
    )
    correct = [is_correct(e.request, e.response, e.target) for e in group.episodes]
    tokens = sum(len(c.token_ids) for c in completions)
    return await finish_group(s, config, window, group, rewards, correct, tokens, ref_logprobs)


async def score(s: RunComponents, group: Group) -> list[float]:
    """Every response's reward: ``evaluate_response`` for each, in one call."""
    first = group.episodes[0]  # one prompt and one target for the whole group
    return await s.reward_actor.evaluate_responses.route(
        prompt=first.request, responses=[e.response for e in group.episodes], target=first.target
    )


# ---------------------------------------------------------------- training


async def train_loop(
    s: RunComponents, config: GRPOConfig, recorder: MetricsRecorder, window: RolloutWindow,
    rollouts: list[asyncio.Task], store: WeightStore, start_step: int = 0,
    after_step: Callable[[int], Awaitable[None]] | None = None, after_every: int = 1,
) -> None:
    """Training steps ``start_step`` to ``config.steps - 1``, each publishing a new
    policy version (a resumed run starts at its checkpoint's step, and version).

    The policy replicas load each new version while the trainer goes on to
    its next batch (``load_version``): a replica loads only once the
    generations it is running finish, and the trainer need not wait for
    that. It does wait before publishing the next version, so the replicas
    are never more than one version behind the trainer (the buffer's
    ``max_policy_age`` bounds what the trainer learns from either way); the
    step's "sync" time is that wait plus the publishing.

    ``after_step(steps_done)``, when given, is awaited after every
    ``after_every``-th step (and its checkpoint), once every replica serves
    that step's weights, before the next batch is sampled: ``GRPORun``
    evaluates there.
    """
    version = start_step  # the weights the trainer holds, and every replica serves at the start
    loading: asyncio.Task | None = None  # the replicas loading the newest version
    try:
        for step in range(start_step, config.steps):
            episodes = await next_batch(s.replay_buffer, version, rollouts, window)
            # One chunk per trainer process; every process returns the whole batch's loss.
            inputs, targets = grpo_collate(episodes, dp_size=config.trainer.procs,
                                           mask_truncated=config.loss.mask_truncated)
            seconds: dict[str, float] = {}
            trained = await timed(seconds, "train", s.trainer.train_step.call(inputs, targets, with_metrics=True))
            if loading is not None:
                await timed(seconds, "sync", loading)
            await timed(seconds, "sync", s.trainer.push_weights.call(policy_version=version + 1))
            version += 1
            loading = asyncio.ensure_future(load_version(s, store, recorder, step, version))
            await record_step(recorder, s, step, version, episodes, first(trained), seconds, window.take())
            steps_done = step + 1
            after_due = after_step is not None and steps_done % after_every == 0
            if checkpoint_due(config, steps_done) or after_due:
                await loading  # the checkpoint and the evaluation see the replicas on this version
            await save_if_due(s, config, recorder, steps_done, version)  # every config.checkpoint_every steps
            if after_due:
                await after_step(steps_done)
        if loading is not None:
            await loading
    finally:
        if loading is not None and not loading.done():
            loading.cancel()


async def load_version(
    s: RunComponents, store: WeightStore, recorder: MetricsRecorder, step: int, version: int
) -> None:
    """Every policy replica loads ``version`` (``sync_weights``; the trainer
    has published it), and the versions they serve are recorded."""
    recorder.record_versions(step, version, await sync_weights(s, store, version))


async def next_batch(
    replay_buffer, version: int, rollouts: list[asyncio.Task], window: RolloutWindow
) -> list[Episode]:
    """The next batch of episodes, waiting for rollouts to fill the buffer.

    A rollout task that failed would leave the trainer waiting forever, so
    its error is raised here.
    """
    while True:
        for task in rollouts:
            if task.done():
                task.result()  # raises the rollout's error
        batch = await replay_buffer.sample.call_one(curr_policy_version=version)
        if batch is not None:
            episodes = [episode for chunk in batch for episode in chunk]
            window.taken(len(episodes))
            return episodes
        # Too few young enough episodes: the buffer dropped stale ones, so
        # count what it really holds (and let the rollouts go on).
        window.taken(window.in_buffer - await replay_buffer.numel.call_one())
        await asyncio.sleep(0.01)


async def sync_weights(s: RunComponents, store: WeightStore, version: int) -> list[int]:
    """The tutorial's weight sync, once the trainer has published ``version``
    (``push_weights``, in ``train_loop``): every policy replica loads it;
    then older versions leave the store (every replica serves the new one,
    and for a 1.7B model in bf16 each is 3.4 GB). Returns the version each
    live replica serves.

    A replica that dies during the sync is left out (``tolerate_lost_replicas``);
    one that was respawning and joined during the fanout loaded the version
    before, so it gets this one in a second fanout.
    """
    await tolerate_lost_replicas(s.policy.update_weights.fanout(policy_version=version))
    served = await replica_versions(s)
    if any(v != version for v in served):
        await tolerate_lost_replicas(s.policy.update_weights.fanout(policy_version=version))
        served = await replica_versions(s)
    # An ActorWeightStore drops old versions itself (its server keeps the newest 2).
    if isinstance(store, WeightStore):
        for old in store.versions()[:-1]:
            store.drop(old)
    return served


async def tolerate_lost_replicas(fanout: Awaitable[list]) -> list:
    """The answers of a fanout to the policy replicas, leaving out a replica
    that died (or whose host was lost) during it.

    Such a replica is respawned by its service, and a replica that joins a
    running service loads the newest version itself, so the run goes on. An
    error an endpoint raised (a bad weight file, say) is raised here.
    """
    try:
        return await fanout
    except FanoutError as error:
        if not all(isinstance(failure, ReplicaFailure) for failure in error.failures.values()):
            raise
        return [error.results[index] for index in sorted(error.results)]


async def replica_versions(s: RunComponents) -> list[int]:
    """The weight version each live policy replica serves."""
    return await tolerate_lost_replicas(s.policy.get_version.fanout())


def first(values):
    """One rank's value: data-parallel ranks all return the batch's loss."""
    return next(iter(values.values()))


async def record_step(
    recorder: MetricsRecorder, s: RunComponents, step: int, version: int, episodes: list[Episode],
    trained: dict, seconds: dict[str, float], rollouts: RolloutWindow,
) -> None:
    """Record what training step ``step`` did (see the module docstring);
    ``trained`` is what ``train_step(..., with_metrics=True)`` returned."""
    rewards, correct = rollouts.rewards, rollouts.correct
    if not rewards:  # no group finished since the last step: describe the batch
        rewards = [e.reward for e in episodes]
        correct = [is_correct(e.request, e.response, e.target) for e in episodes]
    recorder.record_step(
        step=step,
        reward_mean=sum(rewards) / len(rewards),
        accuracy=sum(correct) / len(correct),
        loss=trained["loss"],
        kl=mean_kl(episodes),
        trainer_version=version,
        episode_ages=tuple(version - e.policy_version for e in episodes),
        buffer_size=await s.replay_buffer.numel.call_one(),
        tokens_per_s=rollouts.tokens / rollouts.wall_s,
        step_time_s=rollouts.wall_s,
        # A phase no rollout reached since the last step (all paused) took 0 s.
        time_split_s={**dict.fromkeys(PHASES, 0.0), **rollouts.seconds, **seconds},
        skipped_groups=rollouts.skipped_groups,
        clip_fraction=trained["clip_fraction"],
        zero_std_fraction=rollouts.uniform_groups / rollouts.groups if rollouts.groups else float("nan"),
    )


def mean_kl(episodes: list[Episode]) -> float:
    """The batch's KL to the reference: the mean over the responses the
    reference scored (every one, or a sample with ``ref_model.kl_samples``);
    NaN when it scored none (``ref_model.kl_samples: 0``: no reference model)."""
    kls = [e.behaviour_kl for e in episodes if e.behaviour_kl is not None]
    return sum(kls) / len(kls) if kls else float("nan")
