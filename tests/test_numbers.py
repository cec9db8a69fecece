"""Numbers as models write them: one reading, in the reward and in the calculator tool.

MathReward (the answer tag and the partial-credit search) and the
calculator's ``evaluate_expression`` read numbers through the same function,
``plain_numbers``: markdown and LaTeX decoration, plain fractions, typographic
minus signs, thousands separators and currency signs. Each kind here has
several inputs, and each has its negatives: a wrong number scores 0, a wrong
sign never earns partial credit, and a comma that is no thousands separator is
no number (the tool says what to write instead).
"""

import pytest

from forge_lite.data.rewards import MathReward, parse_number, plain_numbers
from forge_lite.envs.arithmetic import CalcError, evaluate_expression
from forge_lite.envs.calculator import CalculatorEnv

MINUS = "\u2212"  # the typographic minus sign, −


def score(response: str, target: str) -> float:
    return MathReward()("q", response, target)


# ---------------------------------------------------------------- decorated numbers in the tag

DECORATED = [
    ("**36**", 36), ("*36*", 36), ("***36***", 36), ("__36__", 36), ("_36_", 36),
    ("`36`", 36), ("```36```", 36), ("**36**.", 36), ('"36"', 36), ("**$1,234**", 1234),
    (f"**{MINUS}5**", -5), ("`-7.25`", -7.25), ("**36 apples**", 36), ("\\textbf{36}", 36),
    ("$\\boxed{36}$", 36), ("**\\boxed{36}**", 36),
]


@pytest.mark.parametrize("written, value", DECORATED, ids=[w for w, _ in DECORATED])
def test_a_decorated_number_in_the_tag_is_full_credit(written, value):
    assert parse_number(written) == value
    assert score(f"<answer>{written}</answer>", str(value)) == 1.0


@pytest.mark.parametrize("written, value", DECORATED, ids=[w for w, _ in DECORATED])
def test_a_decorated_wrong_number_scores_zero(written, value):
    assert score(f"<answer>{written}</answer>", str(value + 1)) == 0.0


def test_the_issues_example():
    assert MathReward()("q", "<answer>**36**</answer>", "36") == 1.0


@pytest.mark.parametrize(
    "written", ["The answer is **36**", "**Answer:** 36", "2 *3* 4", "**36** or **37**"],
)
def test_words_or_arithmetic_around_a_decorated_number_are_no_number(written):
    # Decoration is dropped, nothing else: the tag must hold one number.
    assert parse_number(written) is None


# ---------------------------------------------------------------- plain fractions

FRACTIONS = [
    ("3/4", "0.75"), ("-3/4", "-0.75"), (f"{MINUS}3/4", "-0.75"), ("**3/4**", "0.75"),
    ("$3/4$", "0.75"), ("3/4 cup", "0.75"), ("1/3", "0.333333"), ("10/4", "2.5"),
    ("1.5/3", "0.5"), ("3/4", "3/4"),
]


@pytest.mark.parametrize("written, target", FRACTIONS)
def test_a_plain_fraction_is_its_value(written, target):
    assert score(f"<answer>{written}</answer>", target) == 1.0


@pytest.mark.parametrize(
    "written, target",
    [
        ("3/4", "0.76"),  # a wrong value
        ("3/4", "-0.75"),  # a wrong sign
        ("3/4", "3"),  # the numerator is not the answer, nor partial credit
        ("3/4", "4"),
        ("3/0", "0"),  # no number
        ("2 1/2", "2.5"),  # a mixed number is not read
        ("2 1/2", "21/2"),  # nor read as 21/2 (spaces are not dropped between numbers)
        ("3/4/5", "0.15"),  # a date-like run of slashes is no fraction
    ],
)
def test_a_fraction_is_not_another_number(written, target):
    assert score(f"<answer>{written}</answer>", target) == 0.0


def test_a_fraction_outside_the_tag_earns_partial_credit():
    assert score("so 3/4 of it", "0.75") == pytest.approx(0.1)
    assert score("<answer>0.7</answer> (3/4)", "0.75") == pytest.approx(0.1)


# ---------------------------------------------------------------- minus signs, in and out of the tag

NEGATIVE_FIVES = [f"{MINUS}5", "-5", "\uff0d5", "\ufe635", f"**{MINUS}5**", f"${MINUS}5$",
                  f"{MINUS}$5", "`-5`", "\\boxed{-5}"]


@pytest.mark.parametrize("written", NEGATIVE_FIVES)
def test_every_minus_sign_is_a_sign(written):
    assert parse_number(written) == -5
    assert score(f"<answer>{written}</answer>", "-5") == 1.0
    assert score(f"<answer>{written}</answer>", f"{MINUS}5") == 1.0  # the target is read alike
    assert score(f"<answer>{written}</answer>", "5") == 0.0


@pytest.mark.parametrize("written", NEGATIVE_FIVES)
def test_partial_credit_keeps_the_sign(written):
    # Outside the tag, as in it: "−5" is -5, never 5.
    assert score(f"so it is {written}", "-5") == pytest.approx(0.1)
    assert score(f"so it is {written}", "5") == 0.0
    assert score(f"<answer>4</answer> or {written}", "5") == 0.0


@pytest.mark.parametrize("written", ["5", "+5", "**5**", "$5$"])
def test_a_positive_number_is_no_partial_credit_for_its_negative(written):
    assert score(f"so it is {written}", "-5") == 0.0
    assert score(f"so it is {written}", "5") == pytest.approx(0.1)


@pytest.mark.parametrize(
    "response, target, expected",
    [
        ("10-5 is the step", "-5", 0.0),  # a minus between two terms is an operator
        ("10-5 is the step", "5", 0.1),
        ("x = -5", "-5", 0.1),
        ("(-5)", "-5", 0.1),
        (f"10 {MINUS} 5", "-5", 0.0),  # written with a space, it is no sign either
    ],
)
def test_a_minus_between_terms_is_no_sign(response, target, expected):
    assert score(response, target) == pytest.approx(expected)


# ---------------------------------------------------------------- separators and currency

SEPARATED = [
    ("1,234", 1234), ("$1,234", 1234), ("€1,234.50", 1234.5), ("1,234,567", 1234567),
    ("1 234", 1234), ("1\u00a0234", 1234), ("1\u2009234", 1234), ("1\u202f234", 1234),
    ("1{,}234", 1234), ("-$1,234", -1234), (f"{MINUS}1,234", -1234), ("£1,234 dollars", 1234),
]


@pytest.mark.parametrize("written, value", SEPARATED)
def test_separators_and_currency_are_read(written, value):
    assert parse_number(written) == value
    assert score(f"<answer>{written}</answer>", str(value)) == 1.0
    assert score(f"<answer>{written}</answer>", str(value + 1)) == 0.0
    assert score(f"the total is {written} in all", str(value)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "written, target",
    [
        ("1,23", "123"),  # a comma is read only between groups of three digits
        ("1,23", "1.23"),
        ("1,2345", "12345"),
        ("1,234,56", "123456"),
        ("18 19", "1819"),  # two numbers, not one with a space in it
        ("1,234", "234"),  # no piece of a number is partial credit
        ("1,234", "1"),
    ],
)
def test_a_comma_or_space_between_numbers_is_no_separator(written, target):
    assert score(f"<answer>{written}</answer>", target) == 0.0


def test_the_one_reading():
    assert plain_numbers(f"**{MINUS}$1,234** and `3/4`") == "-1234 and 3/4"
    # Markers next to an operand are arithmetic, and stay; so does what is no number.
    kept = ["2 *3* 4", "2**3**2", "(2)*3*(4)", "(1).__class__", "__import__('os')", "**Answer:**"]
    assert [plain_numbers(text) for text in kept] == kept


# ---------------------------------------------------------------- the calculator reads them alike

# Units, words and quotes around a whole answer are the reward's business, not
# a number's: the tool reads every other way of writing one.
@pytest.mark.parametrize(
    "written",
    [w for w, _ in DECORATED + SEPARATED if not any(c in w for c in ('"', "apples", "dollars"))]
    + ["3/4", f"{MINUS}3/4", f"{MINUS}5", "1 000", "\\frac{3}{4}"],
)
def test_the_calculator_reads_a_number_as_the_reward_does(written):
    assert evaluate_expression(written) == pytest.approx(parse_number(written))


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,234 + 5", 1239), ("$1,234 + $5", 1239), ("€2.50 * 4", 10.0), (f"{MINUS}5 + 3", -2),
        (f"{MINUS}3 ** 2", -9), ("**12** * 3", 36), ("`12 * 3`", 36), ("$12 \\times 3$", 36),
        ("(1,000 - 1) / 3", 333.0), ("1 000 000 / 1,000", 1000.0), ("\\frac{3}{4} * 4", 3.0),
        # Stars and underscores that are arithmetic stay arithmetic.
        ("2 *3* 4", 24), ("2**3**2", 512), ("(2)*3*(4)", 24), ("2 ** 3", 8), ("1_000 + 1", 1001),
    ],
)
def test_the_calculator_computes_numbers_as_models_write_them(text, value):
    assert evaluate_expression(text) == value


@pytest.mark.parametrize(
    "text, advice, instead",
    [
        ("1,23 + 5", "write 123 or 1.23, not 1,23", "123 + 5"),
        ("1,2345 * 2", "write 12345 or 1.2345, not 1,2345", "12345 * 2"),
        ("1,2,3", "write 123, not 1,2,3", "123"),
        ("1,234,5 - 1", "write 12345, not 1,234,5", "12345 - 1"),
        ("1.234,5 * 2", "write 1234.5, not 1.234,5", "1234.5 * 2"),
    ],
)
def test_a_comma_the_calculator_cannot_read_says_what_to_write(text, advice, instead):
    with pytest.raises(CalcError) as error:
        evaluate_expression(text)
    assert str(error.value).startswith(advice)
    assert "Tuple" not in str(error.value)
    evaluate_expression(instead)  # the advice is an expression the tool computes


def test_two_numbers_with_a_comma_are_refused_in_words():
    with pytest.raises(CalcError, match="not a list with commas") as error:
        evaluate_expression("1, 2")
    assert "Tuple" not in str(error.value)


def test_the_calculator_environment_on_numbers_as_models_write_them():
    env = CalculatorEnv()
    env.reset({"question": "What is 1,234 + 5?", "answer": "1,234 + 5 = 1,239\n#### 1,239"})
    assert "<result>1239</result>" in env.step("<calc>1,234 + 5</calc>").observation
    refused = env.step("<calc>1,23 + 5</calc>")
    assert "<result>error: write 123 or 1.23, not 1,23" in refused.observation
    assert refused.info["error"].startswith("write 123 or 1.23, not 1,23")
    last = env.step("<answer>**$1,239**</answer>")
    assert (last.reward, last.done, last.info["correct"]) == (1.0, True, True)


def test_the_calculator_environment_scores_a_wrong_sign_zero():
    env = CalculatorEnv()
    env.reset({"question": "What is 3 - 8?", "answer": "#### -5"})
    assert env.step(f"<answer>{MINUS}5</answer>").reward == 1.0
    env.reset({"question": "What is 8 - 3?", "answer": "#### 5"})
    assert env.step(f"I think {MINUS}5").reward == 0.0
