"""The GRPO pieces, under the names the tutorial imports from ``apps.grpo.main``.

``Episode`` and ``Group`` hold rollouts; ``DatasetActor`` serves prompts,
``RewardActor`` scores responses, ``ComputeAdvantages`` turns a group's
rewards into advantages. ``episode_from_completion`` (alias
``create_episode_from_grpo_data``, the name the tutorial uses without
defining it) builds an Episode from one generated Completion.
``run_grpo`` / ``GRPORun`` run the whole loop (``forge_lite.grpo.run``; the
two loops themselves are ``forge_lite.grpo.loop``); ``compare(runs)`` puts
finished runs side by side (``forge_lite.grpo.comparison``).

Names are imported on first use: a RewardActor replica then loads only the
reward code, not torch (seconds of CPU per process).
"""

from forge_lite.lazy import lazy_exports

_HOMES = {
    "ComputeAdvantages": "forge_lite.grpo.advantages",
    "DatasetActor": "forge_lite.grpo.dataset",
    "Episode": "forge_lite.rl.episode",
    "Group": "forge_lite.rl.episode",
    "create_episode_from_grpo_data": "forge_lite.rl.episode",
    "episode_from_completion": "forge_lite.rl.episode",
    "RewardActor": "forge_lite.grpo.reward_actor",
    # The runnable loop (python -m forge_lite.grpo) and what it reports to.
    "GRPORun": "forge_lite.grpo.run",
    "run_grpo": "forge_lite.grpo.run",
    "load_config": "forge_lite.grpo.config",
    "MetricsRecorder": "forge_lite.grpo.recorder",
    # Runs side by side: a table and their curves (from GRPOResults or run folders).
    "compare": "forge_lite.grpo.comparison",
}

__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
