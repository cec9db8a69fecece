"""What every rollout ends with, and the window it reports to.

The single-turn rollout (``forge_lite.grpo.loop.rollout_group``) and the
multi-turn one (``forge_lite.grpo.multiturn.rollout_env_group``) make their
groups differently, but once a group's rewards are known they finish it the
same way (``finish_group``): count it in the ``RolloutWindow``, leave it out
if ``skip_uniform_groups`` says so, and otherwise set each episode's reward,
reference logprobs, behaviour KL and advantage, and add the episodes to the
replay buffer.

``RolloutWindow`` is what the rollout tasks did since the last training
step (rewards, tokens, groups, seconds per phase); ``record_step`` turns it
into the step's record. ``timed`` is the one way a phase's seconds are
measured, by the rollouts and by the training loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Awaitable, TypeVar

import torch

from forge_lite.rl.episode import Episode, Group
from forge_lite.rl.loss import response_kl

# For the annotations only: services.py imports every actor's module, which
# multiturn.py's helpers (imported by notebook 06 on their own) do not need.
if TYPE_CHECKING:
    from forge_lite.grpo.config import GRPOConfig
    from forge_lite.grpo.services import RunComponents

# With skip_uniform_groups, this many skipped groups in a row means the reward
# cannot tell responses apart (the thinking reward on a model that always
# thinks, say): the buffer would never fill and the trainer would wait forever.
MAX_UNIFORM_IN_A_ROW = 100

T = TypeVar("T")


async def timed(seconds: dict[str, float], phase: str, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, adding the seconds it took to ``seconds[phase]``."""
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started


def with_reference(group: Group, config: GRPOConfig) -> list[Episode]:
    """The episodes the reference model scores: every one, or (with
    ``ref_model.kl_samples``, when beta is 0) the first kl_samples; none
    with kl_samples 0 (no reference model)."""
    return group.episodes[: config.ref_model.kl_samples]


async def reference_logprobs(s: RunComponents, config: GRPOConfig, group: Group) -> torch.Tensor:
    """The reference model's logprobs of the responses ``with_reference``
    picks, ``[len(those episodes), response_len]``, in one call.

    As padded episode tensors: the request ends at column request_len for
    every row (docs/tutorial_differences.md#max-req-tokens). A multi-turn
    response is scored whole, environment tokens too: the loss masks them,
    and scoring them costs less than cutting the rows apart.

    Without a reference model (``ref_model.kl_samples: 0``): an empty
    ``[0, response_len]`` tensor, and no call.
    """
    episodes = with_reference(group, config)
    if not episodes:
        return torch.empty(0, config.response_len)
    tokens = torch.stack([torch.cat([e.request_tensor, e.response_tensor]) for e in episodes])
    mask = torch.stack([torch.cat([e.request_mask, e.response_mask]) for e in episodes])
    return await s.ref_model.forward.route(
        tokens, max_req_tokens=config.data.request_len, return_logprobs=True, attention_mask=mask
    )


async def finish_group(
    s: RunComponents, config: GRPOConfig, window: RolloutWindow, group: Group, rewards: list[float],
    correct: list[bool], tokens: int, ref_logprobs: torch.Tensor | None = None,
) -> Group:
    """The end of a rollout: ``group`` scored, into the replay buffer.

    ``rewards`` and ``correct`` hold one value per episode (its reward, and
    whether its answer was right); ``tokens`` is how many response tokens
    the model generated for the group. They are counted in ``window``
    whether or not the group reaches the buffer. A group whose rewards are
    all equal stops there with ``config.skip_uniform_groups`` (RuntimeError
    after ``MAX_UNIFORM_IN_A_ROW`` in a row, see ``RolloutWindow.skip_uniform``).

    ``ref_logprobs``: the reference's logprobs of ``with_reference(group,
    config)`` (``reference_logprobs``), when the caller asked for them
    alongside the rewards; None: asked here, once the group is known to be
    kept (the "reference" phase). Each episode gets its reward, reference
    logprobs (cut to its response), behaviour KL (over the model's tokens)
    and advantage (the ComputeAdvantages actor); returns ``group``.
    """
    window.record_group(rewards, correct, tokens)
    if config.skip_uniform_groups and window.skip_uniform(rewards):
        return group

    for episode, reward in zip(group.episodes, rewards):
        episode.reward = reward
    if ref_logprobs is None:
        ref_logprobs = await timed(window.seconds, "reference", reference_logprobs(s, config, group))
    for episode, row in zip(with_reference(group, config), ref_logprobs):
        episode.ref_logprobs = row[: len(episode.response_tokens)]
        episode.behaviour_kl = behaviour_kl(episode)
    advantages = await s.compute_advantages.compute.call_one(group)
    for episode, advantage in zip(group.episodes, advantages):
        episode.advantage = advantage
    await s.replay_buffer.extend.call_one(group.episodes)  # `add` for each, in one call
    window.buffered(len(group.episodes))
    return group


def behaviour_kl(episode: Episode) -> float:
    """The KL between the reference and the policy that sampled ``episode``'s
    response (its ``behaviour_logprobs``), over the tokens the model wrote."""
    model_tokens = episode.response_model_mask  # None: every response token (single-turn)
    return response_kl(
        episode.ref_logprobs, torch.as_tensor(episode.behaviour_logprobs),
        None if model_tokens is None else torch.as_tensor(model_tokens, dtype=torch.bool),
    )


class RolloutWindow:
    """What the rollout tasks did since the last training step.

    The rollouts write to it through its methods (``record_group``,
    ``skip_uniform``, ``buffered``, ``timed(window.seconds, ...)``), the
    training loop through ``taken`` and ``take``.
    """

    def __init__(self, in_buffer: int = 0) -> None:
        self.uniform_in_a_row = 0  # groups skipped since one reached the buffer (not per step)
        # Episodes in the buffer that no step has taken yet (not per step):
        # a resumed run's buffer is not empty.
        self.in_buffer = in_buffer
        self._room_changed = asyncio.Event()
        self._running = asyncio.Event()  # cleared by pause(): no new round of groups starts
        self._running.set()
        self._start()

    def _start(self) -> None:
        self.started = time.perf_counter()
        self.wall_s = 0.0  # set by take()
        self.seconds: dict[str, float] = defaultdict(float)  # per phase, summed over tasks
        self.tokens = 0  # response tokens generated
        self.rewards: list[float] = []  # of every response scored
        self.correct: list[bool] = []
        self.skipped_groups = 0  # groups left out of the buffer (all rewards equal)
        self.groups = 0  # groups scored
        self.uniform_groups = 0  # of those, groups whose rewards were all equal

    async def room(self, episodes: int) -> None:
        """Wait while the buffer holds ``episodes`` or more that no step has
        taken (``batches_ahead * batch_size``), or while the window is paused.

        Rollouts far beyond what the trainer takes would only wait in the
        buffer and age out, while on a few cores their generation takes CPU
        from the trainer. One batch ahead leaves each waiting for the other:
        the next round starts only once the trainer has taken the batch, and
        the trainer's next step waits for that round. Two batches ahead let
        the tiny config run 1.10-1.17x the steps per minute, for about the
        same groups started per step (``benchmarks/loop_cpu.py``).
        """
        while True:
            await self._running.wait()
            while self.in_buffer >= episodes:
                self._room_changed.clear()
                await self._room_changed.wait()
            if self._running.is_set():  # not paused while it waited for room
                return

    def pause(self) -> None:
        """No new round of groups starts until ``resume()`` (the groups already
        generating finish): a held-out evaluation then has the policy to itself."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def buffered(self, count: int) -> None:
        """``count`` episodes entered the buffer."""
        self.in_buffer += count

    def taken(self, count: int) -> None:
        """``count`` episodes left the buffer (sampled, or dropped as stale)."""
        self.in_buffer = max(0, self.in_buffer - count)
        self._room_changed.set()

    def record_group(self, rewards: list[float], correct: list[bool], tokens: int) -> None:
        """One scored group (whether or not it reaches the buffer): its
        rewards, which answers were right, and its generated tokens."""
        self.tokens += tokens
        self.rewards.extend(rewards)
        self.correct.extend(correct)
        self.groups += 1
        self.uniform_groups += len(set(rewards)) == 1

    def skip_uniform(self, rewards: list[float]) -> bool:
        """True (and counted) if every reward is the same; an error after
        MAX_UNIFORM_IN_A_ROW such groups in a row."""
        if len(set(rewards)) > 1:
            self.uniform_in_a_row = 0
            return False
        self.skipped_groups += 1
        self.uniform_in_a_row += 1
        if self.uniform_in_a_row >= MAX_UNIFORM_IN_A_ROW:
            raise RuntimeError(
                f"the last {self.uniform_in_a_row} groups each got one reward for all their "
                f"responses (this one: {rewards[0]}), so skip_uniform_groups left every one of them "
                f"out and the trainer has nothing to learn from; use reward functions that tell "
                f"responses apart, or set skip_uniform_groups=false"
            )
        return True

    def take(self) -> RolloutWindow:
        """What was recorded so far (``wall_s`` set); starts a new window."""
        taken = copy.copy(self)
        taken.wall_s = time.perf_counter() - self.started
        self._start()  # new counters; `taken` keeps the old ones
        return taken
