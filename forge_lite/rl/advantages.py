"""Group-relative advantages: the "GR" in GRPO.

GRPO has no value network. It samples several responses to one prompt and
asks, for each: was this better or worse than the group's average? The
advantage is the reward standardised within the group,

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)

The std is the sample standard deviation (Bessel's correction, divide by
n - 1), torch's default and what TorchForge and TRL compute, so the numbers
match theirs. For a group of two with rewards 1 and 0 that gives +-0.707
(the population std would give +-1.0). The 1e-4 keeps a group with nearly
equal rewards finite. With equal rewards every advantage is 0 and the group
teaches nothing, which is right: no response was better than another.

Dr. GRPO (Liu et al. 2025, arXiv:2503.20783) leaves the division out,
``A_i = r_i - mean(r)`` (``scale="none"``; TRL's ``scale_rewards="none"``):
dividing by the std gives the prompts the model nearly always (or nearly
never) solves, whose std is small, the largest advantages, a bias towards
questions of one difficulty. The loss variant chooses (``loss.scale_rewards``
in a GRPO config, ``forge_lite.rl.loss.VARIANTS``).

A group of one has no spread at all: the sample std of one value is
undefined (torch gives NaN), so its advantage is 0.0, with a warning that
GRPO needs groups of two or more.

A reward of NaN or +-inf is refused with a ValueError. One such reward
makes the mean, and with it every advantage of the group, NaN or inf, and
the loss and gradient after them: a silent NaN in the weights. It is a
broken reward function, so it is reported where it enters, with its index.

The run computes them in the ``ComputeAdvantages`` actor
(``forge_lite.grpo.advantages``), which calls ``group_advantages``. That
actor lives in the light actors' process, which runs no model, so the
arithmetic here is plain Python floats (float64, as torch's would be)
rather than torch: eight numbers do not need it, and that process never
loads torch (see ``forge_lite.rl.episode``).
"""

import math
import warnings
from typing import Sequence

#: How a group's rewards become advantages: (r - mean) / std ("group"), or
#: r - mean ("none").
REWARD_SCALES = ("group", "none")

# Added to the std so that a group of equal rewards divides 0 by a small
# number instead of by zero.
STD_EPSILON = 1e-4


def group_advantages(rewards: Sequence[float], scale: str = "group") -> list[float]:
    """``(r - mean) / (sample std + 1e-4)`` for each reward of one group
    (``scale="group"``), or ``r - mean`` (``scale="none"``).

    Raises ValueError for an empty group, for a reward that is NaN or +-inf
    (naming its index and value), for finite rewards so large that their
    mean or spread overflows, and for a ``scale`` that is neither.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {list(REWARD_SCALES)}, got {scale!r}")
    if len(rewards) == 0:
        raise ValueError("a group needs at least one reward, got none")
    for index, reward in enumerate(rewards):
        if not math.isfinite(reward):
            raise ValueError(
                f"reward {index} of the group is {reward}; rewards must be finite numbers "
                f"(group rewards: {list(rewards)}); check the reward function"
            )
    if len(rewards) == 1:
        warnings.warn(
            "GRPO needs groups of 2 or more responses per prompt: the advantage of a "
            "single response is undefined, so it gets 0.0 and teaches nothing. "
            "Use Group.new_group(..., group_size=2 or more).",
            stacklevel=2,
        )
        return [0.0]
    if min(rewards) == max(rewards):
        # Exactly zero: the formula would give about 1e-12, float rounding in
        # the mean divided by the 1e-4.
        return [0.0] * len(rewards)
    mean, std = _mean(rewards), sample_std(rewards)
    deviations = [reward - mean for reward in rewards]
    if scale == "group" and math.isfinite(std):
        deviations = [d / (std + STD_EPSILON) for d in deviations]
    # Finite rewards near the float limit (1e308) overflow the mean or the
    # spread: an inf std would quietly make every advantage 0.
    if not (math.isfinite(mean) and math.isfinite(std) and all(math.isfinite(d) for d in deviations)):
        raise ValueError(
            f"the rewards {list(rewards)} are too large to standardise: their mean or "
            "spread overflows float64; scale the reward function down"
        )
    return deviations


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation of two or more numbers (Bessel's
    correction: divide by n - 1, as ``torch.std`` does), in float64; inf when
    the spread overflows float64."""
    mean = _mean(values)
    try:
        return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1))
    except OverflowError:  # a square beyond float64
        return math.inf


def _mean(values: Sequence[float]) -> float:
    try:
        return math.fsum(values) / len(values)
    except OverflowError:  # math.fsum refuses a sum beyond float64
        return math.inf
