"""CalculatorEnv: arithmetic with a tool the model calls by writing ``<calc>…</calc>``.

A conversation (``|`` separates the turns, model turns in brackets)::

    prompt | [<calc>347 + 589</calc>] | tool: <result>936</result> | [<answer>936</answer>]

Each model turn is read in this order:

1. an ``<answer>`` tag ends the episode; the reward is ``MathReward``'s score
   of the turn (1.0 for the right number);
2. else a ``<calc>expression</calc>`` is computed with ``evaluate_expression``
   (parsed, never ``eval``-ed) and the result comes back as the tool's turn,
   ``<result>936</result>``, or ``<result>error: division by zero</result>``
   when it cannot be computed: a bad call costs a turn, never a crash;
3. a ``<calc>`` without ``</calc>`` gets ``<result>error: …</result>`` too;
4. a turn with neither tag ends the episode, scored by ``MathReward``
   (0.1 if the right number is in it somewhere, else 0).

After ``max_turns`` model turns without an answer the episode ends with no
reward. ``tool_cost`` (default 0) is subtracted for every call, as that
step's reward: set it above 0 to teach a model to call the tool only when it
needs to (on problems it gets right in its head, each call then costs more
than it earns); the three-digit problems of ``configs/grpo_tool_tiny.yaml``
need the tool every time, so there it stays 0.
"""

from __future__ import annotations

import re

from forge_lite.data.rewards import ANSWER_TAG, MathReward
from forge_lite.envs import chat
from forge_lite.envs.arithmetic import CalcError, evaluate_expression, format_number
from forge_lite.envs.base import Environment, StepResult

SYSTEM_PROMPT = (
    "Solve the math problem. To compute, write <calc>expression</calc> and read the "
    "<result>. Give the final number inside <answer></answer>."
)
CALC_TAG = re.compile(r"<\s*calc\s*>(.*?)<\s*/\s*calc\s*>", re.IGNORECASE | re.DOTALL)
CALC_OPEN = re.compile(r"<\s*calc\s*>", re.IGNORECASE)
# The role the tool's answer is written in: its own, so a reader of the
# conversation sees who said what (Qwen3's template puts tool responses in a
# user message instead; either works for a model trained on it).
TOOL_ROLE = "tool"


class CalculatorEnv(Environment):
    """Arithmetic problems with a calculator tool (see the module docstring).

    Parameters
    ----------
    max_turns:
        Model turns before the episode ends without an answer (default 3:
        a call, an answer, and one spare).
    tool_cost:
        Reward subtracted per tool call, >= 0 (default 0).

    ``info`` keys besides ``turn`` and ``correct``: ``tool_calls`` (so far),
    ``expression`` and ``result`` of this turn's call, ``error`` (why a call
    failed), ``answer`` (the text in the answer tag).

    Example
    -------
    >>> env = CalculatorEnv()
    >>> _ = env.reset({"question": "What is 347 + 589?", "answer": "347 + 589 = 936\\n#### 936"})
    >>> env.step("<calc>347 + 589</calc>").observation
    '\\n<|im_start|>tool\\n<result>936</result><|im_end|>\\n<|im_start|>assistant\\n'
    >>> env.step("<answer>936</answer>")[1:3]
    (1.0, True)
    """

    name = "calculator"

    def __init__(self, max_turns: int = 3, tool_cost: float = 0.0):
        super().__init__(max_turns)
        if tool_cost < 0:
            raise ValueError(f"tool_cost must be >= 0 (a reward taken per call), got {tool_cost}")
        self.tool_cost = tool_cost
        self.tool_calls = 0
        self._math = MathReward()

    def reset(self, problem: dict) -> str:
        self.tool_calls = 0
        return super().reset(problem)

    def prompt(self, question: str) -> str:
        return chat.prompt(SYSTEM_PROMPT, question)

    def play(self, action: str) -> StepResult:
        answer = ANSWER_TAG.search(action)
        if answer is not None or not CALC_OPEN.search(action):
            reward = self._math("", action, self.target)
            return StepResult("", reward, True, {
                "tool_calls": self.tool_calls, "correct": reward == 1.0,
                "answer": None if answer is None else answer.group(1).strip(),
            })
        self.tool_calls += 1
        info = {"tool_calls": self.tool_calls, "correct": False}
        call = CALC_TAG.search(action)
        try:
            if call is None:
                raise CalcError("write the expression as <calc>expression</calc>")
            info["expression"] = call.group(1).strip()
            info["result"] = format_number(evaluate_expression(call.group(1)))
            result = info["result"]
        except CalcError as error:
            info["error"] = str(error)
            result = f"error: {error}"
        observation = chat.reply(TOOL_ROLE, f"<result>{result}</result>")
        return StepResult(observation, -self.tool_cost if self.tool_cost else 0.0, False, info)
