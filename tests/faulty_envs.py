"""Environments for the tests, in a module of their own so that an
EnvironmentActor's process imports them (``EnvironmentActor(env=SlowRetryEnv)``)
without importing a test module. Each breaks one part of the contract, or is
slow enough that a call to it is still running when its caller gives up."""

from __future__ import annotations

import time

from forge_lite.envs import Environment, RetryEnv, StepResult, chat


class ScriptedEnv(Environment):
    """Plays ``script``: turn k returns ``script[k - 1]`` (observation, reward, done, info)
    as ``play`` returns it, so the base class's ``step`` checks it."""

    name = "scripted"
    script: list[tuple] = []

    def __init__(self, max_turns: int = 3):
        super().__init__(max_turns)

    def prompt(self, question: str) -> str:
        return chat.reply("user", question)

    def play(self, action: str) -> StepResult:
        return self.script[self.turn - 1]


class NaNOnTurnTwoEnv(ScriptedEnv):
    """Turn 1 is fine, turn 2 scores NaN."""

    script = [(chat.reply("user", "Go on."), 0.0, False, {}), ("", float("nan"), True, {})]


class NoObservationEnv(Environment):
    """Overrides ``step`` itself (the base class's check never runs): turn 1
    answers None, as a forgotten ``return`` would."""

    name = "no-observation"

    def __init__(self, max_turns: int = 3):
        super().__init__(max_turns)

    def prompt(self, question: str) -> str:
        return chat.reply("user", question)

    def play(self, action: str) -> StepResult:  # never called: step is overridden
        raise AssertionError("unreachable")

    def step(self, action: str):
        self.turn += 1
        return None, 0.0, False, {}


class NoPromptEnv(ScriptedEnv):
    """``prompt`` returns None."""

    def prompt(self, question: str):
        return None


class SlowRetryEnv(RetryEnv):
    """RetryEnv that takes ``DELAY_S`` over every reset and step: a call sent
    to it is still running on its replica when the caller is cancelled."""

    DELAY_S = 0.3

    def reset(self, problem: dict) -> str:
        time.sleep(self.DELAY_S)
        return super().reset(problem)

    def play(self, action: str) -> StepResult:
        time.sleep(self.DELAY_S)
        return super().play(action)


class OneFailsEnv(SlowRetryEnv):
    """SlowRetryEnv, except that a problem whose question says "fail" fails
    its first step at once: its siblings are still playing, slowly, then."""

    def play(self, action: str) -> StepResult:
        if "fail" in self.problem["question"]:
            raise ValueError(f"OneFailsEnv fails on {self.problem['question']!r}")
        return super().play(action)
