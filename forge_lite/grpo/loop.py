"""The GRPO loop: rollouts and training running side by side on services.

The tutorial's "asynchronous coordination", whole. Every component starts at
once (``asyncio.gather``); then two kinds of task share the controller's event
loop:

- ``num_rollout_tasks`` rollout loops. Each takes a problem, samples a group
  of responses from the policy service, scores them (reward service) while
  the reference service computes its logprobs, turns the rewards into
  advantages and adds the episodes to the replay buffer.
- one training loop. It samples a batch from the buffer, takes an optimizer
  step, publishes the weights as the next version and has every policy
  replica load them (``fanout``).

Neither waits for the other: the replay buffer sits between them, and its
``max_policy_age`` bounds how stale the data the trainer learns from may be.
With ``skip_uniform_groups`` a group whose responses all got the same reward
never reaches the buffer: its advantages are all 0, so it would only take
batch slots from groups that teach something (DAPO's "dynamic sampling").
Before and after training the policy answers held-out problems greedily;
that accuracy is what the run is judged by.

Reward mean and accuracy (the share of responses with the right number in
the answer tag) describe every response scored since the previous step,
skipped groups too, so they follow the policy, not the batch's selection
(the batch's, when no group finished in between). The episodes' ages and the
KL describe the batch the step trained on. The KL is the k3 estimate the loss uses, averaged
per response and then over the batch, computed between the reference model
and the *behaviour* policy (the logprobs the engine reported when it sampled
each response, one weight version or so behind the trainer): the trainer's
``train_step`` returns only the loss. Throughput and the time split describe
what the rollout tasks did since the previous step; their phases run
concurrently, so they can add up to more than the step's wall time.

From a notebook, in one call or one step per cell (``GRPORun``)::

    recorder = MetricsRecorder()
    result = await run_grpo(load_config("configs/grpo_tiny.yaml"), recorder=recorder)

From a terminal: ``python -m forge_lite.grpo --config configs/grpo_tiny.yaml``.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from forge_lite.actors.policy import Policy
from forge_lite.actors.reference_model import ReferenceModel
from forge_lite.actors.replay_buffer import ReplayBuffer
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors.weights import WeightStore
from forge_lite.controller import ForgeActor
from forge_lite.data.rewards import MathReward, ThinkingReward
from forge_lite.grpo.advantages import ComputeAdvantages
from forge_lite.grpo.collate import grpo_collate
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.episode import Episode, Group
from forge_lite.grpo.loss import grpo_loss, k3_kl as k3_kl_per_token
from forge_lite.grpo.recorder import MetricsRecorder, trailing_mean
from forge_lite.grpo.reward_actor import RewardActor

REWARD_FUNCTIONS = {"math": MathReward, "thinking": ThinkingReward}

# Accuracy is judged by the math reward alone, whatever the run is rewarded with.
_MATH = MathReward()


def is_correct(request: str, response: str, target: str) -> bool:
    """The right number in the first ``<answer>`` tag (MathReward's full score)."""
    return _MATH(request, response, target) == 1.0


# ---------------------------------------------------------------- services


@dataclass
class Services:
    """Every actor and service of a run (``eval_data`` is gone once read)."""

    dataloader: Any
    policy: Any
    trainer: Any
    replay_buffer: Any
    compute_advantages: Any
    ref_model: Any
    reward_actor: Any
    eval_data: Any = None


async def start_services(config: GRPOConfig, store: WeightStore) -> Services:
    """Start every component concurrently; on any failure stop those that started.

    ``store`` is the run's weight store: the trainer publishes to it, the
    policy replicas load from it."""
    c = config
    response_len = c.policy.max_tokens
    starts = {
        "dataloader": DatasetActor.options(procs=1).as_actor(
            path=c.data.path, revision=c.data.revision, data_split=c.data.train_split,
            streaming=c.data.streaming, model=c.model,
        ),
        "policy": Policy.options(
            procs=1, num_replicas=c.policy.num_replicas, with_gpus=c.policy.with_gpus,
            max_concurrent_requests=c.policy.max_concurrent_requests,
        ).as_service(
            engine_config={"model": c.model, "backend": c.policy.backend, **c.policy.engine},
            sampling_config={
                "n": c.group_size, "max_tokens": c.policy.max_tokens,
                "temperature": c.policy.temperature, "top_p": c.policy.top_p,
            },
            weight_store=store,
        ),
        "trainer": RLTrainer.options(procs=c.trainer.procs, with_gpus=c.trainer.with_gpus).as_actor(
            model=c.model,
            optimizer={"name": c.trainer.optimizer, "lr": c.trainer.lr, "weight_decay": c.trainer.weight_decay},
            training={
                "local_batch_size": c.trainer.local_batch_size,
                "seq_len": c.data.request_len + response_len,
                "max_norm": c.trainer.max_norm,
                "warmup_steps": c.trainer.warmup_steps,
                "decay_steps": c.steps if c.trainer.lr_decay else None,
                "dtype": c.trainer.dtype,
            },
            loss=functools.partial(grpo_loss, beta=c.trainer.beta),
            weight_store=store,
        ),
        # collate=None: the loop wants the Episodes themselves, to report their
        # rewards and ages; it collates them for the trainer itself.
        "replay_buffer": ReplayBuffer.options(procs=1).as_actor(
            batch_size=c.batch_size, max_policy_age=c.max_policy_age, dp_size=1, collate=None
        ),
        "compute_advantages": ComputeAdvantages.options(procs=1).as_actor(),
        "ref_model": ReferenceModel.options(
            procs=1, num_replicas=c.reference.num_replicas, with_gpus=c.reference.with_gpus
        ).as_service(model=c.model, dtype=c.reference.dtype),
        "reward_actor": RewardActor.options(procs=1, num_replicas=c.reward.num_replicas).as_service(
            reward_functions=[REWARD_FUNCTIONS[name]() for name in c.reward.functions]
        ),
    }
    if c.eval_samples:
        starts["eval_data"] = DatasetActor.options(procs=1).as_actor(
            path=c.data.path, revision=c.data.revision, data_split=c.data.eval_split,
            streaming=c.data.streaming, model=c.model,
        )
    tasks = {name: asyncio.ensure_future(start) for name, start in starts.items()}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        # One failed (or Ctrl-C): stop the starts still running (a cancelled
        # start stops its own processes), then whatever had already started.
        for task in tasks.values():
            task.cancel()
        await asyncio.wait(tasks.values())
        await shutdown_all(
            [t.result() for t in tasks.values() if not t.cancelled() and t.exception() is None]
        )
        raise
    return Services(**{name: task.result() for name, task in tasks.items()})


async def shutdown_all(handles) -> None:
    """Stop actors and services alike (``ForgeActor.shutdown`` takes either).

    One after another: measured on 2 cores, the seven components of a run stop
    in about 8 s in turn, while stopping them all at once ran into the 10 s
    stop timeout, after which their processes are killed instead.
    """
    for handle in handles:
        if handle is None:
            continue
        try:
            await ForgeActor.shutdown(handle)
        except Exception as error:
            print(f"warning: a component did not shut down cleanly: {error!r}", file=sys.stderr)


# ---------------------------------------------------------------- rollouts


class RolloutWindow:
    """What the rollout tasks did since the last training step."""

    def __init__(self) -> None:
        self.uniform_in_a_row = 0  # groups skipped since one reached the buffer (not per step)
        self._start()

    def _start(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # per phase, summed over tasks
        self.tokens = 0  # response tokens generated
        self.rewards: list[float] = []  # of every response scored
        self.correct: list[bool] = []
        self.skipped_groups = 0  # groups left out of the buffer (all rewards equal)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def take(self) -> RolloutWindow:
        """What was recorded so far; starts a new window."""
        taken = copy.copy(self)
        self._start()  # new counters; `taken` keeps the old ones
        return taken


# With skip_uniform_groups, this many skipped groups in a row means the reward
# cannot tell responses apart (the thinking reward on a model that always
# thinks, say): the buffer would never fill and the trainer would wait forever.
MAX_UNIFORM_IN_A_ROW = 100


def k3_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over one response's tokens (``[T]`` each) of the loss's KL estimate,
    ``forge_lite.grpo.loss.k3_kl``; in float64, for the tiny KLs of nearly equal models."""
    every_token = torch.ones_like(logprobs, dtype=torch.bool)
    return float(k3_kl_per_token(ref_logprobs.double(), logprobs.double(), every_token).mean())


async def rollout_group(
    s: Services, config: GRPOConfig, pad_id: int, window: RolloutWindow, behaviour_kl: dict
) -> Group:
    """One prompt, ``group_size`` scored episodes with advantages, into the buffer
    (unless ``skip_uniform_groups`` and every reward is the same)."""
    sample = await s.dataloader.sample.call_one()
    request, target = sample["request"], sample["target"]

    started = time.perf_counter()
    completions = await s.policy.generate.route(request, n=config.group_size)
    window.add("generate", time.perf_counter() - started)
    window.tokens += sum(len(c.token_ids) for c in completions)

    # One generate call ran on one weight version: the group's.
    group = Group.new_group(
        uuid.uuid4().hex[:8], config.group_size, request, completions[0].generator_version,
        pad_id, config.data.request_len, config.policy.max_tokens, target,
    )
    for episode, completion in zip(group.episodes, completions):
        episode.response = completion.text
        episode.request_tokens = completion.prompt_ids.tolist()
        episode.response_tokens = completion.token_ids.tolist()

    async def score() -> list[float]:
        started = time.perf_counter()
        rewards = await asyncio.gather(*(
            s.reward_actor.evaluate_response.route(prompt=request, response=c.text, target=target)
            for c in completions
        ))
        window.add("reward", time.perf_counter() - started)
        return rewards

    async def reference() -> torch.Tensor:
        # The whole group in one call, as padded episode tensors: the request
        # ends at column request_len for every row (docs/tutorial_differences.md#max-req-tokens).
        started = time.perf_counter()
        tokens = torch.stack([torch.cat([e.request_tensor, e.response_tensor]) for e in group.episodes])
        mask = torch.stack([torch.cat([e.request_mask, e.response_mask]) for e in group.episodes])
        logprobs = await s.ref_model.forward.route(
            tokens, max_req_tokens=config.data.request_len, return_logprobs=True, attention_mask=mask
        )
        window.add("reference", time.perf_counter() - started)
        return logprobs

    rewards, ref_logprobs = await asyncio.gather(score(), reference())
    window.rewards.extend(rewards)
    window.correct.extend(is_correct(request, c.text, target) for c in completions)
    if config.skip_uniform_groups and len(set(rewards)) == 1:
        window.skipped_groups += 1
        window.uniform_in_a_row += 1
        if window.uniform_in_a_row >= MAX_UNIFORM_IN_A_ROW:
            raise RuntimeError(
                f"the last {window.uniform_in_a_row} groups each got one reward for all their "
                f"responses (this one: {rewards[0]}), so skip_uniform_groups left every one of them "
                f"out and the trainer has nothing to learn from; use reward functions that tell "
                f"responses apart, or set skip_uniform_groups=false"
            )
        return group
    window.uniform_in_a_row = 0
    for episode, completion, reward, row in zip(group.episodes, completions, rewards, ref_logprobs):
        episode.reward = reward
        episode.ref_logprobs = row[: len(completion.token_ids)]
        behaviour_kl[episode.episode_id] = (
            episode.policy_version, k3_kl(episode.ref_logprobs, completion.logprobs)
        )

    advantages = await s.compute_advantages.compute.call_one(group)
    for episode, advantage in zip(group.episodes, advantages):
        episode.advantage = advantage
    for episode in group.episodes:
        await s.replay_buffer.add.call_one(episode)
    return group


async def rollout_loop(s: Services, config: GRPOConfig, pad_id: int, window, behaviour_kl) -> None:
    """Rollouts, one group after another, until cancelled."""
    while True:
        await rollout_group(s, config, pad_id, window, behaviour_kl)


# ---------------------------------------------------------------- training


async def next_batch(replay_buffer, version: int, rollouts: list[asyncio.Task]) -> list[Episode]:
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
            return [episode for chunk in batch for episode in chunk]
        await asyncio.sleep(0.05)


async def train_loop(
    s: Services, config: GRPOConfig, recorder: MetricsRecorder, window: RolloutWindow,
    behaviour_kl: dict, rollouts: list[asyncio.Task], store: WeightStore, progress,
) -> None:
    """``config.steps`` training steps, each publishing a new policy version."""
    version = 0  # the weights the trainer holds, and every replica serves at the start
    last = time.perf_counter()
    for step in range(config.steps):
        episodes = await next_batch(s.replay_buffer, version, rollouts)
        # One chunk per trainer process; every process returns the whole batch's loss.
        inputs, targets = grpo_collate(episodes, dp_size=config.trainer.procs)

        started = time.perf_counter()
        losses = await s.trainer.train_step.call(inputs, targets)
        loss = next(iter(losses.values()))
        trained = time.perf_counter()
        await s.trainer.push_weights.call(policy_version=version + 1)
        await s.policy.update_weights.fanout(policy_version=version + 1)
        synced = time.perf_counter()
        version += 1
        # Every replica serves the new version now; older files are dead weight
        # (for a 1.7B model in bf16, 3.4 GB each).
        for old in store.versions()[:-1]:
            store.drop(old)
        recorder.record_versions(step, version, await s.policy.get_version.fanout())

        now = time.perf_counter()
        rollouts_done = window.take()
        seconds = dict(rollouts_done.seconds, train=trained - started, sync=synced - trained)
        rewards, correct = rollouts_done.rewards, rollouts_done.correct
        if not rewards:  # no group finished since the last step: describe the batch
            rewards = [e.reward for e in episodes]
            correct = [is_correct(e.request, e.response, e.target) for e in episodes]
        record = recorder.record_step(
            step=step,
            reward_mean=sum(rewards) / len(rewards),
            accuracy=sum(correct) / len(correct),
            loss=loss,
            kl=sum(behaviour_kl.pop(e.episode_id)[1] for e in episodes) / len(episodes),
            trainer_version=version,
            episode_ages=tuple(version - e.policy_version for e in episodes),
            buffer_size=await s.replay_buffer.numel.call_one(),
            tokens_per_s=rollouts_done.tokens / (now - last),
            step_time_s=now - last,
            time_split_s=seconds,
            skipped_groups=rollouts_done.skipped_groups,
        )
        last = now
        # Episodes the buffer evicted unused never come back for their KL.
        oldest_kept = version - 1 - config.max_policy_age
        for episode_id in [k for k, (v, _) in behaviour_kl.items() if v < oldest_kept]:
            del behaviour_kl[episode_id]
        progress.set_postfix(
            reward=f"{record.reward_mean:.3f}", acc=f"{record.accuracy:.2f}",
            loss=f"{record.loss:.4f}", kl=f"{record.kl:.4f}", refresh=False,
        )
        progress.update(1)


# ---------------------------------------------------------------- evaluation


async def load_eval_problems(eval_data, count: int) -> list[dict]:
    """The first ``count`` problems the held-out split serves (the same every run)."""
    return [await eval_data.sample.call_one() for _ in range(count)]


async def evaluate(policy, problems: list[dict], max_tokens: int) -> float:
    """Greedy accuracy of the policy service on ``problems``.

    All requests go out at once: the replicas share them, and each Policy
    batches what it has queued.
    """
    answers = await asyncio.gather(*(
        policy.generate.route(p["request"], n=1, temperature=0.0, max_tokens=max_tokens)
        for p in problems
    ))
    right = sum(is_correct(p["request"], a[0].text, p["target"]) for p, a in zip(problems, answers))
    return right / len(problems)


# ---------------------------------------------------------------- the run


@dataclass
class GRPOResult:
    """What ``run_grpo`` returns: the recorded steps, held-out accuracy, where files went."""

    config: GRPOConfig
    recorder: MetricsRecorder
    eval_accuracy_before: float | None
    eval_accuracy_after: float | None
    startup_s: float  # starting every service
    train_s: float  # from the first rollout to the last training step
    wall_s: float  # from start() to the end of the last evaluation
    output_dir: str
    curve_path: str = ""
    metrics_path: str = ""
    files: dict = field(default_factory=dict)

    @property
    def steps_per_min(self) -> float:
        return 60 * len(self.recorder.steps) / self.train_s

    @property
    def rollout_tokens_per_s(self) -> float:
        steps = self.recorder.steps
        return sum(s.tokens_per_s * s.step_time_s for s in steps) / sum(s.step_time_s for s in steps)

    def first_last(self, name: str, k: int = 10) -> tuple[float, float]:
        """Mean of a metric over the first ``k`` and the last ``k`` steps."""
        values = self.recorder.series(name)
        k = max(1, min(k, len(values) // 2 or 1))
        return sum(values[:k]) / k, sum(values[-k:]) / k

    def mean_time_split(self) -> dict[str, float]:
        """Mean seconds per step in each phase."""
        totals: dict[str, float] = defaultdict(float)
        for record in self.recorder.steps:
            for phase, seconds in record.time_split_s.items():
                totals[phase] += seconds
        return {phase: totals[phase] / len(self.recorder.steps) for phase in PHASES if phase in totals}

    def summary(self) -> str:
        steps = len(self.recorder.steps)
        k = max(1, min(10, steps // 2 or 1))
        lines = [
            f"GRPO: {steps} steps in {self.train_s:.0f} s ({self.steps_per_min:.1f} steps/min), "
            f"services started in {self.startup_s:.0f} s, whole run {self.wall_s:.0f} s",
            f"{'':24}{'first ' + str(k):>10}{'last ' + str(k):>10}",
        ]
        for name, label, digits in (
            ("reward_mean", "reward mean", 3), ("accuracy", "sampled accuracy", 3),
            ("loss", "loss", 4), ("kl", "KL to the reference", 4),
            ("tokens_per_s", "rollout tokens/s", 0), ("step_time_s", "seconds/step", 2),
        ):
            first, last = self.first_last(name, k)
            lines.append(f"{label:24}{first:10.{digits}f}{last:10.{digits}f}")
        ages = [a for s in self.recorder.steps for a in s.episode_ages]
        lines.append(f"{'episode age (versions)':24}{'mean ' + format(sum(ages) / len(ages), '.2f'):>20}"
                     f"  (1 = sampled by the weights the step started from)")
        if self.config.skip_uniform_groups:
            skipped = sum(s.skipped_groups for s in self.recorder.steps)
            lines.append(f"{'groups skipped':24}{skipped:>10}  (every response got the same reward)")
        split = self.mean_time_split()
        lines.append("mean seconds per step: " + ", ".join(f"{p} {v:.2f}" for p, v in split.items()))
        if self.eval_accuracy_before is not None:
            lines.append(
                f"held-out greedy accuracy ({self.config.eval_samples} problems): "
                f"{self.eval_accuracy_before:.3f} -> {self.eval_accuracy_after:.3f}"
            )
        lines.append(f"reward curve: {self.curve_path}")
        return "\n".join(lines)


PHASES = ("generate", "reward", "reference", "train", "sync")


def as_config(config: GRPOConfig | dict | str | os.PathLike | None) -> GRPOConfig:
    """A GRPOConfig from a config, a dict of its fields, or a YAML path."""
    if isinstance(config, GRPOConfig):
        return config
    if config is None or isinstance(config, dict):
        return GRPOConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a GRPOConfig, a dict or a YAML path, got {type(config).__name__}")


def make_output_dir(output_dir: str | None) -> Path:
    """``output_dir``, or a fresh ``<tmp>/forge_lite_runs/grpo-<time>-<id>``."""
    if output_dir is None:
        root = Path(tempfile.gettempdir()) / "forge_lite_runs"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("grpo-%Y%m%d-%H%M%S-"), dir=root))
    path = Path(output_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def show_progress(setting: bool | None) -> bool:
    return sys.stderr.isatty() if setting is None else setting


class GRPORun:
    """One GRPO run, in the steps a notebook takes one cell at a time.

    ``run_grpo`` does all of it in one call; a notebook starts the services,
    shows dashboards on them, trains, and shuts down in separate cells::

        run = await GRPORun(config, recorder).start()
        ServiceDashboard(run.services.policy)
        result = await run.train()
        await run.shutdown()
    """

    def __init__(self, config: GRPOConfig | dict | str | None = None,
                 recorder: MetricsRecorder | None = None) -> None:
        self.config = as_config(config)
        self.recorder = MetricsRecorder() if recorder is None else recorder
        self.services: Services | None = None
        self.eval_problems: list[dict] = []
        self.startup_s = 0.0
        self._began = 0.0
        self.store: WeightStore | None = None
        self._previous_environment: dict[str, str | None] = {}
        self._rollouts: list[asyncio.Task] = []

    async def start(self) -> GRPORun:
        """Start every service (stopping them all again if one fails); returns self."""
        config = self.config
        self.output_dir = make_output_dir(config.output_dir)
        self._began = time.perf_counter()
        # A weight store of this run's own, handed to its trainer and policy.
        self.store = WeightStore()
        environment = {}
        if config.threads_per_process is not None:
            environment["OMP_NUM_THREADS"] = str(config.threads_per_process)
        self._previous_environment = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)  # for this run's processes (respawned replicas too)
        try:
            print(f"GRPO: starting services (output in {self.output_dir})", flush=True)
            self.services = await start_services(config, self.store)
            self.startup_s = time.perf_counter() - self._began
            self.pad_id = await self.services.dataloader.pad_token.call_one()
            if self.services.eval_data is not None:
                self.eval_problems = await load_eval_problems(self.services.eval_data, config.eval_samples)
                await DatasetActor.shutdown(self.services.eval_data)
                self.services.eval_data = None
            print(f"GRPO: services ready in {self.startup_s:.0f} s", flush=True)
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def evaluate(self) -> float | None:
        """Greedy accuracy on the held-out problems (None when eval_samples is 0)."""
        if not self.eval_problems:
            return None
        return await evaluate(self.services.policy, self.eval_problems, self.config.policy.max_tokens)

    async def train(self) -> GRPOResult:
        """Held-out accuracy, ``config.steps`` training steps, held-out accuracy again."""
        if self.services is None:
            raise RuntimeError("GRPORun.train(): call `await run.start()` first")
        config = self.config
        accuracy_before = await self.evaluate()
        if accuracy_before is not None:
            print(f"GRPO: held-out greedy accuracy before training: {accuracy_before:.3f}", flush=True)
        began = time.perf_counter()
        window, behaviour_kl = RolloutWindow(), {}
        self._rollouts = [
            asyncio.create_task(rollout_loop(self.services, config, self.pad_id, window, behaviour_kl))
            for _ in range(config.num_rollout_tasks)
        ]
        try:
            with tqdm(total=config.steps, desc="GRPO", unit="step", dynamic_ncols=True,
                      disable=not show_progress(config.progress)) as progress:
                await train_loop(self.services, config, self.recorder, window, behaviour_kl,
                                 self._rollouts, self.store, progress)
        finally:
            await cancel_all(self._rollouts)
        train_s = time.perf_counter() - began
        accuracy_after = await self.evaluate()

        result = GRPOResult(
            config=config, recorder=self.recorder, eval_accuracy_before=accuracy_before,
            eval_accuracy_after=accuracy_after, startup_s=self.startup_s, train_s=train_s,
            wall_s=time.perf_counter() - self._began, output_dir=str(self.output_dir),
        )
        write_outputs(result, self.output_dir)
        print(result.summary(), flush=True)
        return result

    async def shutdown(self) -> None:
        """Stop every service and actor, delete the run's weights; safe to call twice."""
        await cancel_all(self._rollouts)
        if self.services is not None:
            await shutdown_all(vars(self.services).values())
            self.services = None
        if self.store is not None:
            self.store.close()
            self.store = None
        for name, value in self._previous_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._previous_environment = {}


async def run_grpo(
    config: GRPOConfig | dict | str | None = None, recorder: MetricsRecorder | None = None
) -> GRPOResult:
    """Train with GRPO as ``config`` says; every service is stopped when it returns or fails."""
    run = GRPORun(config, recorder)
    try:
        await run.start()
        result = await run.train()
    finally:
        await run.shutdown()
    return result


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- outputs


def write_outputs(result: GRPOResult, output_dir: Path) -> None:
    """The config, one JSON line per step, the reward curve and the summary."""
    config_path = output_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
    metrics_path = output_dir / "metrics.jsonl"
    with open(metrics_path, "w") as out:
        for record in result.recorder.steps:
            out.write(json.dumps(record.as_dict()) + "\n")
    result.metrics_path = str(metrics_path)
    result.curve_path = str(output_dir / "reward_curve.png")
    plot_reward_curve(result, result.curve_path)
    summary_path = output_dir / "summary.txt"
    summary_path.write_text(result.summary() + "\n")
    result.files = {"config": str(config_path), "metrics": str(metrics_path),
                    "curve": result.curve_path, "summary": str(summary_path)}


def plot_reward_curve(result: GRPOResult, path: str) -> None:
    """Reward mean and sampled accuracy per step with their 10-step means, and the
    held-out accuracy before and after."""
    from matplotlib.figure import Figure

    recorder = result.recorder
    steps = recorder.series("step")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    # Dashed accuracy: with the math reward alone the two curves coincide.
    for name, label, colour, style in (("reward_mean", "reward mean", "#2e7d32", "-"),
                                       ("accuracy", "sampled accuracy", "#1565c0", "--")):
        values = recorder.series(name)
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, trailing_mean(values, 10), color=colour, linewidth=2, linestyle=style,
                label=f"{label} (10-step mean)")
    if result.eval_accuracy_before is not None:
        ax.axhline(result.eval_accuracy_before, color="#757575", linestyle=":",
                   label=f"held-out greedy accuracy before ({result.eval_accuracy_before:.2f})")
        ax.axhline(result.eval_accuracy_after, color="black", linestyle="--",
                   label=f"held-out greedy accuracy after ({result.eval_accuracy_after:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO on " + (result.config.model or "the shipped model"))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
