"""Synthetic arithmetic word problems in the gsm8k layout.

The kit ships no hub data, so GRPO runs on problems made here: mostly
two-digit addition and subtraction in a few phrasings. Each problem is a dict
like one gsm8k row, ``{"question": ..., "answer": "<worked step>\\n#### N"}``,
so the same code reads this set and ``openai/gsm8k``.

The worked step is a single equation such as ``47 + 38 = 85``. The shipped
model was trained to write that equation inside ``<think>`` before the
answer, and the equation doubles as the problem's identity: train and test
splits share no equation, so a test score measures arithmetic the model did
not see, not memory of a phrasing.
"""

import random

NAMES = ("Sam", "Ana", "Ben", "Mia", "Leo", "Zoe", "Max", "Ivy")
ITEMS = ("apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "shells")

# {a} and {b} are the operands, in the order they appear in the equation.
ADDITION_PHRASINGS = (
    "What is {a} + {b}?",
    "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
    "A box holds {a} {items}. {name} puts in {b} more. How many {items} are in the box?",
)
SUBTRACTION_PHRASINGS = (
    "What is {a} - {b}?",
    "{name} has {a} {items} and gives away {b}. How many are left?",
    "A box holds {a} {items}. {name} takes out {b}. How many {items} are in the box?",
)

# "Mostly two-digit": this share of problems gets a one-digit second operand,
# the easy cases a weak model gets right first.
ONE_DIGIT_SHARE = 0.1

# How many distinct equations make_problem can draw: a in 10..99 with b in
# 2..99 for additions; for subtractions the unordered two-digit pairs plus a
# two-digit number minus a one-digit one. Asking for more would never finish.
DISTINCT_EQUATIONS = 90 * 98 + (90 * 91 // 2 + 90 * 8)


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem drawn from ``rng``: an addition or a subtraction, equally often."""
    a = rng.randint(10, 99)
    b = rng.randint(2, 9) if rng.random() < ONE_DIGIT_SHARE else rng.randint(10, 99)
    if rng.random() < 0.5:
        op, phrasings, result = "+", ADDITION_PHRASINGS, a + b
    else:
        # Keep answers non-negative: word problems cannot give away more than they have.
        a, b = max(a, b), min(a, b)
        op, phrasings, result = "-", SUBTRACTION_PHRASINGS, a - b
    question = rng.choice(phrasings).format(
        a=a, b=b, name=rng.choice(NAMES), items=rng.choice(ITEMS)
    )
    return {"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}"}


def equation(problem: dict[str, str]) -> str:
    """The worked equation of a problem (``"47 + 38 = 85"``): its identity across splits."""
    return problem["answer"].split("\n", 1)[0]


def generate_problems(
    count: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """``count`` problems with distinct equations, none of them in ``exclude``.

    The same ``(count, seed, exclude)`` always gives the same list.
    """
    if not 0 <= count <= DISTINCT_EQUATIONS - len(exclude):
        raise ValueError(
            f"count must be between 0 and {DISTINCT_EQUATIONS - len(exclude)} "
            f"(the distinct equations left after excluding {len(exclude)}), got {count}"
        )
    rng = random.Random(seed)
    seen = set(exclude)
    problems = []
    while len(problems) < count:
        problem = make_problem(rng)
        if equation(problem) not in seen:
            seen.add(equation(problem))
            problems.append(problem)
    return problems
