"""Reward functions for math answers: is the number right, did the model think first.

GRPO learns only from rewards, so a reward is the task's definition. Both
rewards here are plain callables with the signature the RewardActor expects,
``reward(prompt, response, target) -> float``, and both read the response
format of ``forge_lite.data.prompts``: ``<think>...</think><answer>N</answer>``.

A trap worth knowing: an untagged but correct response such as
``"15% of 240 is 36"`` scores 0.1 with MathReward (partial credit: the number
is there, but not in an answer tag) and 0.0 with ThinkingReward; averaged,
0.05. The rewards teach the format as much as the arithmetic.
"""

import re

# The first <answer>...</answer>; tags may carry stray spaces or capitals.
ANSWER_TAG = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
THINK_BLOCK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)
ANY_THINK_TAG = re.compile(r"<\s*/?\s*think\s*>", re.IGNORECASE)
# A number as people write it in prose: optional sign, thousands commas, decimals.
NUMBER_IN_TEXT = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """``text`` as a float after dropping ``$``, ``,`` and spaces; None if it is not a number."""
    cleaned = re.sub(r"[\s$,]", "", str(text))
    try:
        return float(cleaned)
    except ValueError:
        return None


class MathReward:
    """1.0 for the right number in the first ``<answer>`` tag.

    ``partial_credit`` when the right number appears elsewhere in the
    response (the model knew it but did not answer in the format), 0.0
    otherwise. A target that is not a number scores 0.0: pass the bare
    number (the dataset's ``target``), not gsm8k's worked solution.
    """

    def __init__(self, tolerance: float = 1e-6, partial_credit: float = 0.1):
        self.tolerance = tolerance
        self.partial_credit = partial_credit

    def __call__(self, prompt: str, response: str, target: str) -> float:
        target_number = parse_number(target)
        if target_number is None:
            return 0.0
        answer = ANSWER_TAG.search(response)
        if answer is not None:
            answered = parse_number(answer.group(1))
            if answered is not None and self._matches(answered, target_number):
                return 1.0
        for number in NUMBER_IN_TEXT.findall(response):
            if self._matches(float(number.replace(",", "")), target_number):
                return self.partial_credit
        return 0.0

    def _matches(self, value: float, target: float) -> bool:
        return abs(value - target) <= self.tolerance


class ThinkingReward:
    """``full_reward`` for a non-empty ``<think>...</think>`` block.

    ``partial_reward`` when a think tag is there but the block is empty or
    unclosed, 0.0 when there is none. It rewards showing the work, whatever
    the work is; MathReward judges the result.
    """

    def __init__(self, partial_reward: float = 0.2, full_reward: float = 1.0):
        self.partial_reward = partial_reward
        self.full_reward = full_reward

    def __call__(self, prompt: str, response: str, target: str | None = None) -> float:
        block = THINK_BLOCK.search(response)
        if block is not None and block.group(1).strip():
            return self.full_reward
        if ANY_THINK_TAG.search(response):
            return self.partial_reward
        return 0.0
