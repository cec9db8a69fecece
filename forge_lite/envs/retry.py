"""RetryEnv: a wrong answer gets "Not quite, try again." and another turn.

The simplest multi-turn task: the model answers the shipped math problems in
its usual format; a right answer ends the episode, a wrong one (or none)
gets feedback as a user message and another turn, up to ``max_turns``.

The reward falls with the turns a right answer took: ``(max_turns - turn + 1)
/ max_turns``, so with 3 turns 1.0 on the first, 2/3 on the second, 1/3 on
the third, and 0 if no turn got it. GRPO then prefers trajectories that got
there sooner, and, among those that needed feedback, the ones that used it
(a model that repeats its wrong answer never earns the later rewards).
"""

from __future__ import annotations

from forge_lite.data.prompts import SYSTEM_PROMPT
from forge_lite.data.rewards import ANSWER_TAG, MathReward
from forge_lite.envs import chat
from forge_lite.envs.base import Environment, StepResult

FEEDBACK = "Not quite, try again."


class RetryEnv(Environment):
    """Math problems with feedback and retries (see the module docstring).

    Parameters
    ----------
    max_turns:
        Model turns before the episode ends unanswered (default 3).

    ``info`` keys besides ``turn`` and ``correct``: ``answer`` (the text in
    this turn's answer tag, None without one).

    Example
    -------
    >>> env = RetryEnv()
    >>> _ = env.reset({"question": "What is 47 + 38?", "answer": "47 + 38 = 85\\n#### 85"})
    >>> env.step("<think>47 + 38 = 84</think><answer>84</answer>").observation
    '\\n<|im_start|>user\\nNot quite, try again.<|im_end|>\\n<|im_start|>assistant\\n'
    >>> round(env.step("<think>47 + 38 = 85</think><answer>85</answer>").reward, 3)
    0.667
    """

    name = "retry"

    def __init__(self, max_turns: int = 3):
        super().__init__(max_turns)
        self._math = MathReward()

    def prompt(self, question: str) -> str:
        return chat.prompt(SYSTEM_PROMPT, question)

    def play(self, action: str) -> StepResult:
        answer = ANSWER_TAG.search(action)
        info = {"answer": None if answer is None else answer.group(1).strip()}
        if self._math("", action, self.target) == 1.0:
            reward = (self.max_turns - self.turn + 1) / self.max_turns
            return StepResult("", reward, True, {**info, "correct": True})
        return StepResult(chat.reply("user", FEEDBACK), 0.0, False, {**info, "correct": False})
