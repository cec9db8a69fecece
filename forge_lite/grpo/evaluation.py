"""Held-out accuracy: what a GRPO run is judged by.

The policy answers held-out problems greedily (temperature 0), and an answer
counts when the right number is in its first ``<answer>`` tag (MathReward's
full score), whatever the run was rewarded with.
"""

from __future__ import annotations

import asyncio

from forge_lite.data.rewards import MathReward

_MATH = MathReward()


def is_correct(request: str, response: str, target: str) -> bool:
    """The right number in the first ``<answer>`` tag (MathReward's full score)."""
    return _MATH(request, response, target) == 1.0


async def load_eval_problems(eval_data, count: int) -> list[dict]:
    """The first ``count`` problems the held-out split serves (the same every run)."""
    return [await eval_data.sample.call_one() for _ in range(count)]


async def evaluate(policy, problems: list[dict], max_tokens: int) -> float:
    """Greedy accuracy of the policy service on ``problems`` (0 to 1).

    All requests go out at once: the replicas share them, and each Policy
    batches what it has queued.
    """
    answers = await asyncio.gather(*(
        policy.generate.route(p["request"], n=1, temperature=0.0, max_tokens=max_tokens)
        for p in problems
    ))
    right = sum(is_correct(p["request"], a[0].text, p["target"]) for p, a in zip(problems, answers))
    return right / len(problems)
