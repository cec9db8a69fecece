"""The GRPO pieces, under the names the tutorial imports from ``apps.grpo.main``.

``Episode`` and ``Group`` hold rollouts; ``DatasetActor`` serves prompts,
``RewardActor`` scores responses, ``ComputeAdvantages`` turns a group's
rewards into advantages. ``episode_from_completion`` (alias
``create_episode_from_grpo_data``, the name the tutorial uses without
defining it) builds an Episode from one generated Completion.
"""

from forge_lite.grpo.advantages import ComputeAdvantages
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.episode import (
    Episode,
    Group,
    create_episode_from_grpo_data,
    episode_from_completion,
)
from forge_lite.grpo.reward_actor import RewardActor

__all__ = [
    "ComputeAdvantages",
    "DatasetActor",
    "Episode",
    "Group",
    "RewardActor",
    "create_episode_from_grpo_data",
    "episode_from_completion",
]
