"""MathReward and ThinkingReward on the responses the tutorial and the kit produce."""

import pytest

from forge_lite.data.rewards import MathReward, ThinkingReward

UNTAGGED = "15% of 240 is 36"
TAGGED = "<think>15% of 240 = 36</think><answer>36</answer>"


def mean_reward(response: str, target: str) -> float:
    scores = [fn("What is 15% of 240?", response, target) for fn in (MathReward(), ThinkingReward())]
    return sum(scores) / len(scores)


def test_tutorial_untagged_response_gets_partial_credit_only():
    # docs/tutorial_differences.md#reward-score: the tutorial promises "around 1.0"; the untagged answer gets 0.05.
    assert MathReward()("What is 15% of 240?", UNTAGGED, "36") == pytest.approx(0.1)
    assert ThinkingReward()("What is 15% of 240?", UNTAGGED, "36") == 0.0
    assert mean_reward(UNTAGGED, "36") == pytest.approx(0.05)


def test_tagged_response_gets_full_reward():
    assert MathReward()("", TAGGED, "36") == 1.0
    assert ThinkingReward()("", TAGGED, "36") == 1.0
    assert mean_reward(TAGGED, "36") == 1.0


@pytest.mark.parametrize(
    "response, target, expected",
    [
        ("<answer>$1,000</answer>", "1000", 1.0),  # $ and thousands commas are stripped
        ("<answer> 36 </answer>", "36.0", 1.0),  # numbers compared, not strings
        ("<ANSWER>36</Answer >", "36", 1.0),  # tags tolerate case and spaces
        ("<answer>35</answer> but really 36", "36", 0.1),  # wrong answer, right number elsewhere
        ("<answer>36</answer><answer>7</answer>", "7", 0.1),  # only the first tag is the answer
        ("<answer>thirty-six</answer>", "36", 0.0),
        ("the answer is 360", "36", 0.0),  # 36 inside 360 is not the number 36
        ("<answer>36</answer>", "#### 36 is the worked answer", 0.0),  # unparseable target
    ],
)
def test_math_reward_cases(response, target, expected):
    assert MathReward()("q", response, target) == pytest.approx(expected)


def test_math_reward_tolerance_and_partial_credit_are_settable():
    assert MathReward(tolerance=0.01)("q", "<answer>36.005</answer>", "36") == 1.0
    assert MathReward()("q", "<answer>36.005</answer>", "36") == 0.0
    assert MathReward(partial_credit=0.5)("q", "it is 36", "36") == 0.5


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>add the tens</think><answer>5</answer>", 1.0),
        ("< THINK >add</ think>", 1.0),
        ("<think>   </think><answer>5</answer>", 0.2),  # empty block: partial
        ("<think>never closed", 0.2),
        ("no tags at all", 0.0),
    ],
)
def test_thinking_reward_cases(response, expected):
    assert ThinkingReward()("q", response, "5") == pytest.approx(expected)


def test_thinking_reward_values_are_settable():
    reward = ThinkingReward(partial_reward=0.5, full_reward=2.0)
    assert reward("q", "<think>x</think>", None) == 2.0
    assert reward("q", "<think></think>", None) == 0.5


# ---------------------------------------------------------------- the docstrings' tables
# The rewards' docstrings render MATH_EXAMPLES and THINKING_EXAMPLES; these
# tests check every row, so the documentation cannot drift from the code.

from forge_lite.data.rewards import MATH_EXAMPLES, THINKING_EXAMPLES, parse_number  # noqa: E402


def test_the_issues_examples():
    assert MathReward()("q", "<answer>\\boxed{18}</answer>", "18") == 1.0
    assert ThinkingReward()(
        "<|im_start|>assistant\n<think>\n", "2 plus 2 is 4.\n</think>\n<answer>4</answer>", "4"
    ) == 1.0


@pytest.mark.parametrize(
    "response, target, expected, why", MATH_EXAMPLES, ids=[e[3] for e in MATH_EXAMPLES]
)
def test_math_reward_examples(response, target, expected, why):
    assert MathReward()("q", response, target) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prompt, response, expected, why", THINKING_EXAMPLES, ids=[e[3] for e in THINKING_EXAMPLES]
)
def test_thinking_reward_examples(prompt, response, expected, why):
    assert ThinkingReward()(prompt, response, "4") == pytest.approx(expected)


@pytest.mark.parametrize(
    "response, target",
    [(r, t) for r, t, expected, _ in MATH_EXAMPLES if expected == 1.0],
)
def test_a_wrong_number_is_never_full_credit_however_it_is_written(response, target):
    # Every format the reward reads, with the target moved by one: reading the
    # format must not make any number right.
    wrong = str(parse_number(target) + 1)
    assert MathReward()("q", response, wrong) < 1.0


@pytest.mark.parametrize(
    "reward, examples", [(MathReward, MATH_EXAMPLES), (ThinkingReward, THINKING_EXAMPLES)]
)
def test_docstring_tables_show_every_example(reward, examples):
    for *cells, why in examples:
        row = [repr(cell) for cell in cells] + [why]
        assert any(all(cell in line for cell in row) for line in reward.__doc__.splitlines()), row
