"""The environment interface: ``reset()`` starts an episode, ``step(action)`` plays one turn.

The same contract as Gymnasium's and OpenEnv's, for a language model:

    observation = env.reset(problem)           # the prompt the model answers
    while True:
        action = <the model's turn, as text>
        observation, reward, done, info = env.step(action)
        if done:
            break
        # observation continues the conversation: the model answers it next

An observation is text that is appended to the conversation as it stands
(ChatML, see ``forge_lite.envs.chat``): ``reset`` returns the whole prompt,
``step`` what the environment says after the model's turn ("" when the
episode is over). So the trajectory a trainer sees is the prompt, then model
turns and environment turns, alternating; only the model's tokens are
trained on (``forge_lite.rl.episode.Episode.response_model_mask``).

The reward is per step; an episode's return is the sum of its steps'
rewards. Both environments shipped here pay at the end (and the calculator
charges an optional ``tool_cost`` per call, a negative reward on that step).

What an environment returns is checked where it enters (``check_step``,
``check_reset``): a NaN reward or a missing observation is a ValueError
naming the environment class, the problem and the turn, not a NaN loss or a
tokenizer error far from its cause.

An environment instance holds one episode at a time, like a Gymnasium env;
``EnvironmentActor`` (``forge_lite.envs.actor``) keeps one per trajectory in
a process, so a GRPO group's trajectories each have their own.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

from forge_lite.data.prompts import extract_target


class StepResult(NamedTuple):
    """What ``step`` returns; unpacks as ``observation, reward, done, info``.

    ``observation``: the environment's turn as text ("" when ``done``);
    ``reward``: this step's reward (a float); ``done``: the episode is over;
    ``info``: what happened, for logs and tests (each environment documents
    its keys; every one has ``turn``, the model turns so far, and
    ``correct``, whether a right answer was given).
    """

    observation: str
    reward: float
    done: bool
    info: dict[str, Any]


def check_step(env: object, result: Any, turn: Any) -> StepResult:
    """``result``, what ``env.step`` (or ``play``) returned on turn ``turn``,
    as a StepResult with ``reward`` a float and ``done`` a bool.

    The contract: ``observation`` a str, ``reward`` a finite real number
    (bool and int count, as for reward functions), ``done`` a bool, ``info``
    a dict; a plain 4-tuple in that order is fine. Raises ValueError naming
    the environment's class, each problem and the turn, e.g.
    ``"RetryEnv.step on turn 2 returned a bad result: reward is nan (float),
    expected a finite number"``.
    """
    if not isinstance(result, tuple) or len(result) != 4:
        raise ValueError(
            f"{type(env).__name__}.step on turn {turn} returned {_shown(result)}, expected "
            "StepResult(observation, reward, done, info)"
        )
    observation, reward, done, info = result
    problems = []
    if not isinstance(observation, str):
        problems.append(f"observation is {_shown(observation)}, expected str")
    # numbers.Real: int, float, bool and numpy's scalars, not "1.0" or a tensor.
    try:
        value = float(reward) if isinstance(reward, numbers.Real) else math.nan
    except OverflowError:  # an int past float's range
        value = math.inf
    if not math.isfinite(value):
        problems.append(f"reward is {_shown(reward)}, expected a finite number")
    if not isinstance(done, bool):
        problems.append(f"done is {_shown(done)}, expected bool")
    if not isinstance(info, dict):
        problems.append(f"info is {_shown(info)}, expected dict")
    if problems:
        raise ValueError(f"{type(env).__name__}.step on turn {turn} returned a bad result: " + "; ".join(problems))
    return StepResult(observation, value, done, info)


def check_reset(env: object, observation: Any) -> str:
    """``observation``, what ``env.reset`` returned, if it is a str (the prompt).

    Raises ValueError naming the environment's class otherwise.
    """
    if not isinstance(observation, str):
        raise ValueError(
            f"{type(env).__name__}.reset (turn 0) returned a bad result: observation is "
            f"{_shown(observation)}, expected str (the prompt)"
        )
    return observation


def _shown(value: Any) -> str:
    """``value`` and its type, short: ``None``, ``'1.0' (str)``."""
    if value is None:
        return "None"
    try:
        text = str(value) if isinstance(value, numbers.Real) else repr(value)  # nan, not np.float32(nan)
    except Exception:  # an int too long to print, a broken __repr__
        text = "<unprintable>"
    text = text if len(text) <= 60 else text[:60] + "..."
    return f"{text} ({type(value).__name__})"


class EpisodeOver(RuntimeError):
    """``step`` was called on an episode that ended (or never began: call ``reset``)."""


class Environment(ABC):
    """A multi-turn task for a language model (see the module docstring).

    Subclasses set ``name`` and ``max_turns`` and implement ``prompt`` (the
    first observation for a problem) and ``play`` (one turn). This class does
    the bookkeeping every environment shares: the problem, its target
    number, the turn count and the end of the episode.
    """

    name = "environment"

    def __init__(self, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.problem: dict | None = None
        self.target: str | None = None
        self.turn = 0  # model turns played in this episode
        self.done = True  # no episode until reset

    def reset(self, problem: dict) -> str:
        """Start an episode on ``problem`` (``{"question", "answer"}`` in the
        gsm8k layout); returns the prompt, the first observation.

        Raises ValueError if the problem's answer has no ``#### N`` line.
        Example: ``env.reset({"question": "What is 347 + 589?", "answer": "#### 936"})``.
        """
        self.problem = dict(problem)
        self.target = extract_target(problem["answer"])
        self.turn = 0
        self.done = False
        return check_reset(self, self.prompt(problem["question"]))

    def step(self, action: str) -> StepResult:
        """Play the model's turn ``action`` (its text); returns ``StepResult``.

        The episode ends when the environment says so or after ``max_turns``
        model turns. Raises EpisodeOver when called after the end (or before
        ``reset``), TypeError when ``action`` is not text, ValueError when
        ``play`` broke the contract (``check_step``).
        """
        if self.done:
            raise EpisodeOver(f"{self.name}: the episode is over; call reset(problem) to start another")
        if not isinstance(action, str):
            raise TypeError(f"action must be the model's text, got {type(action).__name__}")
        self.turn += 1
        result = check_step(self, self.play(action), self.turn)
        if not result.done and self.turn >= self.max_turns:
            result = self.out_of_turns(result)
        self.done = result.done
        return result._replace(info={"turn": self.turn, **result.info})

    @abstractmethod
    def prompt(self, question: str) -> str:
        """The conversation's opening for ``question`` (ChatML text)."""

    @abstractmethod
    def play(self, action: str) -> StepResult:
        """One model turn: the environment's answer (``self.turn`` is its number, from 1)."""

    def out_of_turns(self, result: StepResult) -> StepResult:
        """The step that ends an episode at ``max_turns``: no answer, reward as played."""
        return StepResult("", result.reward, True, {**result.info, "out_of_turns": True})
