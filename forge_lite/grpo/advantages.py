"""ComputeAdvantages: the actor that turns a scored Group into advantages.

The math is ``forge_lite.rl.advantages.group_advantages`` (the "GR" in GRPO:
each reward standardised within its group); this actor runs it for the
loop, one call per group, with the run's ``scale`` (``loss.scale_rewards``:
"group" divides by the group's std, "none" does not, as in Dr. GRPO).
"""

from forge_lite.controller import ForgeActor
# group_advantages is also imported from here, where it used to live
# (notebooks 01 and 02: ``from forge_lite.grpo.advantages import group_advantages``).
from forge_lite.rl.advantages import REWARD_SCALES, group_advantages
from monarch.actor import endpoint


class ComputeAdvantages(ForgeActor):
    """An actor that turns a scored Group into one advantage per episode;
    ``scale`` is ``group_advantages``'s ("group" or "none")."""

    shares_process = True  # runs no model: lives on the caller's shared process of light actors

    def __init__(self, scale: str = "group"):
        self.scale = scale

    @endpoint
    def setup(self) -> None:
        if self.scale not in REWARD_SCALES:  # here, so that as_actor raises it as itself
            raise ValueError(f"ComputeAdvantages: scale must be one of {list(REWARD_SCALES)}, got {self.scale!r}")

    @endpoint
    def compute(self, group) -> list[float]:
        """The advantages of ``group.episodes``, in order; every reward must be set."""
        missing = [e.episode_id for e in group.episodes if e.reward is None]
        if missing:
            raise ValueError(
                f"episodes {missing} have no reward; set episode.reward before computing "
                "advantages"
            )
        return group_advantages([e.reward for e in group.episodes], self.scale)
