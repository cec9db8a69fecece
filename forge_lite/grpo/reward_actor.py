"""RewardActor: scores a response with several reward functions and averages them.

Scoring is cheap CPU work, but in a real run it can be slow (a code sandbox,
a judge model), so it lives in its own actor that scales on its own: the
tutorial runs it as a service with many replicas. The reward functions are
plain callables, ``fn(prompt, response, target) -> float`` (see
``forge_lite.data.rewards``), shipped to the actor's process when it starts.

A score of NaN or +-inf is refused here, where it enters: averaged in, it
would turn the group's advantages and the loss into NaN far from its cause.
So is a score that is not a number (a string such as "1.0", None, a list):
``float("1.0")`` would quietly accept a function that returns text.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

from forge_lite.controller import ForgeActor
from monarch.actor import endpoint

RewardFunction = Callable[[str, str, str], float]


class RewardActor(ForgeActor):
    """The mean of ``reward_functions`` for each response it is asked about."""

    def __init__(self, reward_functions: Sequence[RewardFunction]):
        self.reward_functions = list(reward_functions)

    # Checked in setup, not __init__: an error in setup reaches the caller of
    # as_actor/as_service as itself (a ValueError), one in __init__ only as
    # the process's failure report.
    @endpoint
    async def setup(self) -> None:
        if not self.reward_functions:
            # The tutorial's version returns 0.0 here, a reward that silently
            # teaches nothing; an empty list is a configuration mistake.
            raise ValueError(
                "RewardActor needs at least one reward function, e.g. "
                "reward_functions=[MathReward(), ThinkingReward()]"
            )
        not_callable = [repr(fn) for fn in self.reward_functions if not callable(fn)]
        if not_callable:
            raise TypeError(f"reward functions must be callable, got {not_callable}")

    @endpoint
    def evaluate_response(self, prompt: str, response: str, target: str) -> float:
        """The average score of ``response`` over the reward functions.

        Raises ValueError, naming the reward function and the response, when a
        function scores NaN or +-inf, and TypeError when it returns something
        that is not a real number (a Python or NumPy number, a bool, or a
        0-d tensor or array).
        """
        return self._score(prompt, response, target)

    @endpoint
    def evaluate_responses(self, prompt: str, responses: list[str], target: str) -> list[float]:
        """``evaluate_response`` for each of a group's responses to one prompt,
        in one call: a GRPO group is scored with one round trip, not one per response."""
        return [self._score(prompt, response, target) for response in responses]

    def _score(self, prompt: str, response: str, target: str) -> float:
        scores = []
        for fn in self.reward_functions:
            value = fn(prompt, response, target)
            if not is_real_number(value):
                raise TypeError(
                    f"reward function {describe(fn)} returned {shortened(repr(value))} "
                    f"({type(value).__name__}) for the response {shortened(response)}; a reward "
                    "must be a real number (float, int, bool, or a 0-d tensor)"
                )
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(
                    f"reward function {describe(fn)} scored {score} for the response "
                    f"{shortened(response)} (target {target!r}); a reward must be a finite "
                    "number"
                )
            scores.append(score)
        return sum(scores) / len(scores)


def is_real_number(value: Any) -> bool:
    """A Python or NumPy real number (bool included), or a 0-d tensor or
    array holding one; not a string, None, a sequence or a complex number."""
    if isinstance(value, numbers.Real):
        return True
    if getattr(value, "shape", None) == () and hasattr(value, "dtype"):  # torch.tensor(1.0), np.array(1.0)
        return not getattr(value.dtype, "is_complex", False) and getattr(value.dtype, "kind", "f") in "biuf"
    return False


def describe(fn: RewardFunction) -> str:
    """A reward function's name: its own for a function, its class's for an
    instance such as ``MathReward()`` (whose repr is just an address)."""
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def shortened(text: str, limit: int = 200) -> str:
    """``repr(text)``, cut to ``limit`` characters: responses run to hundreds of tokens."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + "...(cut)"
