"""Environments for multi-turn RL: ``reset()`` -> observation, ``step(action)`` -> observation, reward, done.

- ``base``: the interface (``Environment``, ``StepResult``);
- ``calculator``: ``CalculatorEnv``, a ``<calc>`` tool for arithmetic too big to do in one's head;
- ``retry``: ``RetryEnv``, "Not quite, try again." after a wrong answer;
- ``arithmetic``: the calculator's safe evaluator (parsed, never ``eval``-ed);
- ``chat``: the ChatML text environments write;
- ``problems``: the problems they pose;
- ``actor``: ``EnvironmentActor``, environments in a process (an actor or a service).

The multi-turn GRPO rollout that plays them is ``forge_lite.grpo.multiturn``.
"""

from forge_lite.envs.base import Environment, EpisodeOver, StepResult
from forge_lite.envs.calculator import CalculatorEnv
from forge_lite.envs.retry import RetryEnv

__all__ = ["CalculatorEnv", "Environment", "EpisodeOver", "RetryEnv", "StepResult"]
