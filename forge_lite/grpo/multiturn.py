"""Multi-turn GRPO rollouts: the policy and an environment take turns, one session per trajectory.

A single-turn rollout asks the policy for a group of responses to one
prompt. Here each of the group's trajectories is a conversation
(``play_trajectory``)::

    prompt = env.reset(problem)
    repeat: turn = policy.generate(conversation so far)      # the model's tokens
            observation, reward, done = env.step(turn)       # the environment's
    until done, the environment's turn limit, or the response budget

and the trajectory becomes one Episode: its request is the first prompt, its
response every token after it, model turns and environment turns in order,
with ``response_model_mask`` True on the model's tokens only, so the loss,
its KL term and the reported KL never touch what the environment wrote. The
group's trajectories share the problem; their returns (the sum of their
step rewards) become advantages within the group, as in single-turn GRPO.

Sessions. Turn k+1's prompt is turn k's prompt plus turn k's tokens plus
the environment's answer. The replica that served turn k holds the KV of
everything up to its last token in its prefix cache, so if turn k+1 goes
there, only the environment's answer is new work. ``async with
policy.session():`` pins every turn of a trajectory to one replica (the
environment's calls are always in a session of their own: its episode state
lives on one replica). With ``sessions=False`` the policy's router picks a
replica for every turn: round robin often sends turn 2 elsewhere, where
only what a sibling trajectory left there is cached (a group's trajectories
share the prompt, and sometimes their first turns). Each ``Turn`` records ``cached_tokens`` (the
Completion's ``num_cached_tokens``) beside ``reusable_tokens``, the most a
cache holding the previous turn could have served (none when the weights
changed in between: a weight update empties every replica's cache);
``cache_summary`` adds them up over turns 2 and later.

Budget. ``response_len`` bounds the tokens after the prompt, model's and
environment's together (``env.response_len`` in the config): each turn may
generate at most what is left (and ``policy.max_tokens``). A trajectory
that reaches it before the environment says done is cut there, marked
``truncated`` on the Trajectory and its Episode, and scored with the
rewards it earned until then.

Tokens. The policy takes text, so each turn's prompt is the conversation's
ids decoded; the engine tokenizes it again. A BPE tokenizer can merge
differently across a turn boundary; when the engine's ids differ from the
trajectory's, the trajectory keeps the ids the model and environment really
produced (what the trainer learns from) and counts the turn in
``retokenized_turns``.

Abandoned trajectories. A trajectory that fails, or is cancelled
(``task.cancel()``, a caller's ``asyncio.wait_for`` running out, an
interrupted notebook cell), closes its episode on the environment before
it ends (``close_episode``): otherwise each one would stay open on its
replica, and a later step with its id would still play.

Every trajectory of a run is appended to ``<output_dir>/trajectories.jsonl``
(``read_trajectories`` loads them back).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable

from forge_lite.actors.hf_model import load_tokenizer
from forge_lite.data.prompts import extract_target
from forge_lite.grpo.rollout import finish_group, timed
from forge_lite.rl.episode import Episode, Group

TRAJECTORIES_FILE = "trajectories.jsonl"
# The runs (output_dir, response_len) already told that a trajectory was cut.
_TOLD: set[tuple] = set()
# Closes of abandoned episodes still under way. The event loop holds tasks
# weakly: without this, a close whose trajectory stopped waiting for it
# (cancelled twice) could be collected before it ran.
_CLOSING: set[asyncio.Future] = set()


@dataclass
class Turn:
    """One model turn, and the environment's answer to it."""

    index: int  # 1 for the first turn
    action: str  # what the model wrote (its text, special tokens left out)
    observation: str  # the environment's answer ("" when the episode ended)
    reward: float  # this step's reward
    prompt_tokens: int  # the prompt this turn continued, as the engine tokenized it
    cached_tokens: int  # of those, served from the replica's prefix KV cache
    # The most a cache holding the previous turn could serve: 0 on turn 1, and
    # after a weight update (KV of other weights is no use).
    reusable_tokens: int
    new_tokens: int  # tokens the model generated
    replica: int | None  # the policy replica that served the turn
    policy_version: int  # the weights that generated it
    stop_reason: str | None  # "stop" (end of turn) or "length" (max_tokens or the budget)
    generate_s: float  # seconds waiting for the policy
    env_s: float  # seconds waiting for the environment
    info: dict = field(default_factory=dict)  # the environment's info for this step


@dataclass
class Trajectory:
    """A whole conversation of one episode: its tokens, masks, turns and return."""

    episode_id: str
    problem: dict
    prompt: str
    prompt_ids: list[int]  # the first prompt's tokens
    response_ids: list[int] = field(default_factory=list)  # every token after it
    model_mask: list[bool] = field(default_factory=list)  # per response token: the model's?
    logprobs: list[float] = field(default_factory=list)  # per response token: the sampler's (0.0 on env tokens)
    turns: list[Turn] = field(default_factory=list)
    reward: float = 0.0  # the return: the sum of the step rewards
    correct: bool = False  # the environment's last word on the answer
    done: bool = False  # the environment ended the episode
    truncated: bool = False  # cut at response_len before the environment said done
    retokenized_turns: int = 0  # turns whose prompt the engine tokenized differently
    session: str | None = None  # the policy session (None without sessions)

    @property
    def policy_version(self) -> int:
        """The oldest weights that wrote any turn: the age the replay buffer checks."""
        return min(turn.policy_version for turn in self.turns)

    def episode(self, pad_id: int, request_len: int, response_len: int, target: Any = None) -> Episode:
        """This trajectory as an Episode for the replay buffer (``response_model_mask`` set)."""
        episode = Episode(
            episode_id=self.episode_id, request=self.prompt, policy_version=self.policy_version,
            pad_id=pad_id, request_len=request_len, response_len=response_len, target=target,
        )
        episode.response = "".join(turn.action + turn.observation for turn in self.turns)
        episode.request_tokens = list(self.prompt_ids)
        episode.response_tokens = list(self.response_ids)
        episode.response_model_mask = list(self.model_mask)
        episode.truncated = self.truncated
        episode.behaviour_logprobs = list(self.logprobs)  # 0.0 on env tokens, which the loss masks
        return episode

    def as_dict(self) -> dict:
        """Plain JSON-able values (one line of ``trajectories.jsonl``), without the token lists."""
        values = asdict(self)
        for name in ("prompt_ids", "response_ids", "model_mask", "logprobs"):
            values.pop(name)
        values["response_tokens"] = len(self.response_ids)
        values["model_tokens"] = sum(self.model_mask)
        return values


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str | None):
    """The policy model's tokenizer, loaded once per process: the rollout
    tokenizes the environment's turns with it, as the engine would."""
    return load_tokenizer(model)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


async def play_trajectory(
    policy, env, tokenizer, problem: dict, *, response_len: int, max_tokens: int,
    sessions: bool = True, episode_id: str | None = None, **sampling: Any,
) -> Trajectory:
    """Play one episode of ``env`` with ``policy``, turn by turn.

    Parameters
    ----------
    policy:
        The Policy service (``generate.route``).
    env:
        The EnvironmentActor service (``reset``/``step``/``close``).
    tokenizer:
        The policy model's tokenizer (``tokenizer_for(model)``).
    problem:
        ``{"question", "answer"}``, e.g. from ``env.sample_problem.route()``.
    response_len:
        Most tokens after the prompt, model's and environment's together;
        the trajectory is cut (``truncated``) when it gets there.
    max_tokens:
        Most tokens one model turn may generate.
    sessions:
        Every policy call of the trajectory in one session (one replica, its
        KV cache); False lets the router choose for each turn.
    episode_id:
        The trajectory's id (the environment's key for its state); fresh if None.
    **sampling:
        Sampling overrides for every turn, e.g. ``temperature=0.0``.

    Returns the Trajectory. Raises what the services raise (a prompt longer
    than the engine's context, an environment error such as a NaN reward);
    the trajectory's episode is closed on the environment then, and also
    when the trajectory is cancelled (``close_episode``).

    Example
    -------
    ::

        trajectory = await play_trajectory(policy, env, tokenizer, problem,
                                           response_len=128, max_tokens=32)
        [(t.action, t.observation, t.cached_tokens, t.replica) for t in trajectory.turns]
    """
    episode_id = episode_id or uuid.uuid4().hex[:12]
    try:
        async with env.session():  # the episode's state lives on one environment replica
            pin = policy.session() if sessions else contextlib.nullcontext()
            async with pin as session:
                prompt = await env.reset.route(episode_id, problem)
                return await _play(policy, env, tokenizer, problem, prompt, episode_id, session,
                                   response_len, max_tokens, sampling)
    # CancelledError is not an Exception: named, or a cancelled trajectory
    # would leave its episode open. (Reset included: cancelled while the
    # reset was on its way, the episode opens there all the same.) The
    # sessions' pins are already dropped here: their blocks have exited.
    except (Exception, asyncio.CancelledError):
        await close_episode(env, episode_id)
        raise


async def close_episode(env, episode_id: str) -> None:
    """Close trajectory ``episode_id`` on every replica of ``env`` and wait
    for it, even inside a task that is being cancelled.

    Every replica, not a route: the trajectory's session may have ended, and
    a route without it could reach a replica that never heard of the id
    (the others ignore an unknown id). The close goes out after every call
    the trajectory sent, and a replica takes one caller's messages in order,
    one at a time: an episode whose reset was still running when the caller
    stopped waiting is closed after it opens. Shielded: cancelling the
    caller again stops the wait, not the close. A close that fails raises
    nothing (a replica that is down, or a service shut down, holds no episode).
    """
    task = asyncio.ensure_future(env.close.fanout(episode_id))
    _CLOSING.add(task)
    task.add_done_callback(_closed)
    with contextlib.suppress(Exception):
        await asyncio.shield(task)


def _closed(task: asyncio.Future) -> None:
    _CLOSING.discard(task)
    if not task.cancelled():
        task.exception()  # looked at: a close nobody waits for any more must not warn


async def _play(policy, env, tokenizer, problem, prompt, episode_id, session,
                response_len, max_tokens, sampling) -> Trajectory:
    trajectory: Trajectory | None = None
    conversation = prompt  # the text the next turn continues
    context: list[int] = []  # the trajectory's ids so far: prompt, then response
    previous: list[int] | None = None  # the ids the last turn's replica holds KV for
    previous_version = None  # ... computed with these weights
    while True:
        room = response_len - (len(trajectory.response_ids) if trajectory else 0)
        seconds: dict[str, float] = {}  # this turn's: "generate" and "env"
        completion = (await timed(seconds, "generate", policy.generate.route(
            conversation, n=1, max_tokens=min(max_tokens, room), **sampling
        )))[0]
        engine_prompt = completion.prompt_ids.tolist()
        if trajectory is None:
            trajectory = Trajectory(episode_id, dict(problem), prompt, engine_prompt, session=session)
            context = list(engine_prompt)
        elif engine_prompt != context:
            trajectory.retokenized_turns += 1
        # The engine keeps KV for every token it fed the model: the prompt and
        # the generated tokens but the last (sampled, never fed back). KV the
        # previous turn computed with other weights is no use: a weight update
        # empties the cache.
        reusable = 0
        if previous is not None and previous_version == completion.generator_version:
            reusable = min(common_prefix(previous, engine_prompt), len(engine_prompt) - 1)
        new = completion.token_ids.tolist()
        previous, previous_version = engine_prompt + new[:-1], completion.generator_version
        trajectory.response_ids += new
        trajectory.model_mask += [True] * len(new)
        trajectory.logprobs += completion.logprobs.tolist()
        context += new

        observation, reward, done, info = await timed(seconds, "env", env.step.route(episode_id, completion.text))
        trajectory.turns.append(Turn(
            index=len(trajectory.turns) + 1, action=completion.text, observation=observation,
            reward=reward, prompt_tokens=len(engine_prompt), cached_tokens=completion.num_cached_tokens,
            reusable_tokens=reusable, new_tokens=len(new), replica=completion.replica,
            policy_version=completion.generator_version, stop_reason=completion.stop_reason,
            generate_s=seconds["generate"], env_s=seconds["env"], info=info,
        ))
        trajectory.reward += reward
        trajectory.correct = bool(info.get("correct", False))
        if done:
            trajectory.done = True
            return trajectory

        observed = tokenizer(observation, add_special_tokens=False)["input_ids"]
        room = response_len - len(trajectory.response_ids)
        if len(observed) >= room:  # no room for the answer and one more model token
            observed = observed[:room]
            trajectory.truncated = True
        trajectory.response_ids += observed
        trajectory.model_mask += [False] * len(observed)
        trajectory.logprobs += [0.0] * len(observed)
        context += observed
        if trajectory.truncated:
            await env.close.route(episode_id)
            return trajectory
        # Special tokens kept: the model's end-of-turn token is part of the conversation.
        conversation += tokenizer.decode(new, skip_special_tokens=False) + observation


# ---------------------------------------------------------------- GRPO


async def rollout_env_group(s, config, pad_id: int, window) -> Group:
    """One problem, ``group_size`` trajectories played at once, scored, with
    advantages, into the buffer: the multi-turn ``rollout_group``
    (``forge_lite.grpo.loop``), used when ``config.env.name`` is set; both
    end in ``forge_lite.grpo.rollout.finish_group``.

    Time goes to ``window.seconds``: "generate" (playing the group's
    trajectories: the policy's turns and the environment's steps, which
    interleave; each Turn records its own ``generate_s`` and ``env_s``) and
    "reference" (asked only for a group that reaches the buffer). Every
    trajectory is appended to ``<config.output_dir>/trajectories.jsonl`` when
    the run has an output_dir.
    """
    problem = await s.env.sample_problem.route()
    trajectories = await timed(window.seconds, "generate", all_or_none(*(
        play_trajectory(
            s.policy, s.env, tokenizer_for(config.model), problem,
            response_len=config.env.response_len, max_tokens=config.policy.max_tokens,
            sessions=config.env.sessions,
        )
        for _ in range(config.group_size)
    )))
    group = Group(uuid.uuid4().hex[:8])
    group.episodes = [
        t.episode(pad_id, config.data.request_len, config.env.response_len, target=extract_target(problem["answer"]))
        for t in trajectories
    ]
    if any(t.truncated for t in trajectories) and (config.output_dir, config.env.response_len) not in _TOLD:
        # Said once per run; the episodes say so too, and trajectories.jsonl counts them.
        _TOLD.add((config.output_dir, config.env.response_len))
        print(f"GRPO: a trajectory did not fit env.response_len={config.env.response_len} and was cut "
              "there (Episode.truncated, scored with the rewards it had earned); raise "
              "env.response_len if this happens often", flush=True)
    save_trajectories(config.output_dir, trajectories)
    # The reward is the return; the reference is asked by finish_group, once
    # the group is known to reach the buffer.
    return await finish_group(
        s, config, window, group, rewards=[t.reward for t in trajectories],
        correct=[t.correct for t in trajectories], tokens=sum(sum(t.model_mask) for t in trajectories),
    )


async def all_or_none(*trajectories: Awaitable[Trajectory]) -> list[Trajectory]:
    """Play ``trajectories`` together; their results in order.

    If one fails, the others are cancelled (each closes its episode on the
    environment as it goes, see "Abandoned trajectories" above) and the first
    error is raised once they have stopped: with ``asyncio.gather`` alone they
    would play on, for a group that can no longer be trained on.
    """
    tasks = [asyncio.ensure_future(trajectory) for trajectory in trajectories]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


async def evaluate_env(policy, env, problems: list[dict], *, model: str | None, response_len: int,
                       max_tokens: int, sessions: bool = True) -> dict[str, float]:
    """Greedy play of ``env`` on held-out ``problems``, all at once.

    Returns ``{"success": share answered right, "reward": mean return,
    "turns": mean model turns, "tool_calls": mean calls (calculator),
    "truncated": share cut at response_len}``.
    Example: ``await evaluate_env(policy, env, await env.eval_problems.route(100), model=TOOL_MODEL,
    response_len=128, max_tokens=32)``.
    """
    tokenizer = tokenizer_for(model)
    trajectories = await all_or_none(*(
        play_trajectory(policy, env, tokenizer, p, response_len=response_len, max_tokens=max_tokens,
                        sessions=sessions, temperature=0.0)
        for p in problems
    ))
    return outcome_summary(trajectories)


def outcome_summary(trajectories: list[Trajectory | dict]) -> dict[str, float]:
    """What a set of trajectories achieved: success, mean return, turns, tool calls, truncations."""
    rows = [t.as_dict() if isinstance(t, Trajectory) else t for t in trajectories]
    n = max(len(rows), 1)
    return {
        "success": sum(r["correct"] for r in rows) / n,
        "reward": sum(r["reward"] for r in rows) / n,
        "turns": sum(len(r["turns"]) for r in rows) / n,
        "tool_calls": sum(r["turns"][-1]["info"].get("tool_calls", 0) for r in rows) / n,
        "truncated": sum(r["truncated"] for r in rows) / n,
    }


def cache_summary(trajectories: list[Trajectory | dict]) -> dict[str, float]:
    """The KV cache over turns 2 and later of ``trajectories``.

    ``prompt_tokens``, ``cached_tokens``, ``reusable_tokens``: their sums;
    ``cached_share``: cached / prompt tokens; ``of_reusable``: the share of
    the reusable tokens (the previous turn's KV) that came from the cache,
    how close the cache came to what a session can give; ``same_replica``:
    the share of those turns served by the replica that served the turn
    before; ``moved_cached``: for the turns that were not, the share of
    their reusable tokens the cache served anyway (a sibling trajectory of
    the group had written the same conversation there first);
    ``weights_changed``: the share whose weights changed since the turn
    before (the update emptied the cache). (A turn can get more than its reusable tokens from the cache
    when a sibling trajectory wrote the same text first; ``of_reusable``
    counts at most the reusable ones per turn, ``cached_share`` all.)
    """
    rows = [t.as_dict() if isinstance(t, Trajectory) else t for t in trajectories]
    later = [(turns[i - 1], turns[i]) for r in rows for turns in [r["turns"]] for i in range(1, len(turns))]
    prompt = sum(t["prompt_tokens"] for _, t in later)
    cached = sum(t["cached_tokens"] for _, t in later)
    reusable = sum(t["reusable_tokens"] for _, t in later)
    moved = [(a, b) for a, b in later if a["replica"] != b["replica"]]
    moved_reusable = sum(b["reusable_tokens"] for _, b in moved)
    return {
        "turns": len(later),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "reusable_tokens": reusable,
        "cached_share": cached / prompt if prompt else float("nan"),
        "of_reusable": (sum(min(t["cached_tokens"], t["reusable_tokens"]) for _, t in later) / reusable
                        if reusable else float("nan")),
        "same_replica": sum(a["replica"] == b["replica"] for a, b in later) / len(later) if later else float("nan"),
        "moved_cached": (sum(min(b["cached_tokens"], b["reusable_tokens"]) for _, b in moved) / moved_reusable
                         if moved_reusable else float("nan")),
        # A weight update drops every replica's cache: these turns could not hit.
        "weights_changed": (sum(a["policy_version"] != b["policy_version"] for a, b in later) / len(later)
                            if later else float("nan")),
    }


def save_trajectories(output_dir: str | None, trajectories: list[Trajectory]) -> None:
    """Append each trajectory as a JSON line to ``<output_dir>/trajectories.jsonl``
    (nothing without an output_dir)."""
    if output_dir is None:
        return
    path = Path(output_dir) / TRAJECTORIES_FILE
    with path.open("a") as file:
        for trajectory in trajectories:
            file.write(json.dumps(trajectory.as_dict(), default=str) + "\n")


def read_trajectories(output_dir: str | Path) -> list[dict]:
    """The trajectories a run appended to ``<output_dir>/trajectories.jsonl``, oldest first.

    Raises FileNotFoundError, naming the file, when the run wrote none.
    """
    path = Path(output_dir) / TRAJECTORIES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run played no multi-turn trajectory there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def heldout_success(s, config) -> float:
    """A multi-turn run's held-out score (``GRPORun.evaluate``): the share of
    the environment's first ``config.eval_samples`` held-out problems that
    greedy play answers right."""
    problems = await s.env.eval_problems.route(config.eval_samples)
    outcome = await evaluate_env(
        s.policy, s.env, problems, model=config.model, response_len=config.env.response_len,
        max_tokens=config.policy.max_tokens, sessions=config.env.sessions,
    )
    return outcome["success"]
