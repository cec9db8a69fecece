"""The problems the environments pose, in the gsm8k layout of ``forge_lite.data``.

A problem is ``{"question": ..., "answer": "<worked step>\\n#### N"}``, as in
the shipped math set, so ``extract_target`` reads its number.

- ``shipped_problems(split)``: the shipped two-digit set (``forge_lite/assets/math``),
  which the shipped model gets right about 6 times in 10.
- ``big_number_problems(...)``: the same phrasings with three-digit numbers,
  which the models cannot add in their heads but a calculator can. Test
  problems (``BIG_TEST_SEED``) are a fixed set; training problems are drawn
  fresh and never share an equation with them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from forge_lite.assets import MATH_DATA_DIR
from forge_lite.data.math_problems import ADDITION_PHRASINGS, ITEMS, NAMES, SUBTRACTION_PHRASINGS, equation

BIG_TEST_SEED = 1000
BIG_TEST_SIZE = 200


def shipped_problems(split: str = "train") -> list[dict[str, str]]:
    """The shipped math set's ``split`` ("train": 2000 problems, "test": 200)."""
    path = Path(MATH_DATA_DIR) / f"{split}.jsonl"
    if not path.exists():
        raise ValueError(f"the shipped math set has splits 'train' and 'test', not {split!r}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_big_problem(rng: random.Random) -> dict[str, str]:
    """One three-digit addition or subtraction (equally often), in one of the
    shipped set's phrasings; subtractions never go below zero."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    if rng.random() < 0.5:
        op, phrasings, result = "+", ADDITION_PHRASINGS, a + b
    else:
        a, b = max(a, b), min(a, b)
        op, phrasings, result = "-", SUBTRACTION_PHRASINGS, a - b
    question = rng.choice(phrasings).format(a=a, b=b, name=rng.choice(NAMES), items=rng.choice(ITEMS))
    return {"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}"}


def big_number_problems(split: str = "test", count: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Three-digit problems: the fixed ``"test"`` split (``BIG_TEST_SIZE`` of them,
    ``count`` first ones), or ``count`` ``"train"`` problems drawn with ``seed``,
    none of which shares an equation with the test split.

    Raises ValueError for another split, or a train split without ``count``.
    Example: ``big_number_problems("train", 3, seed=1)``.
    """
    test = _big_test_split()
    if split == "test":
        return test[:count]
    if split != "train":
        raise ValueError(f"big_number_problems has splits 'train' and 'test', not {split!r}")
    if count is None:
        raise ValueError("the train split is drawn fresh: say how many problems (count=...)")
    stream = ProblemStream(make=make_big_problem, seed=seed, exclude={equation(p) for p in test})
    return [stream.next() for _ in range(count)]


def _big_test_split() -> list[dict[str, str]]:
    rng = random.Random(BIG_TEST_SEED)
    test, seen = [], set()
    while len(test) < BIG_TEST_SIZE:
        problem = make_big_problem(rng)
        if equation(problem) not in seen:
            seen.add(equation(problem))
            test.append(problem)
    return test


class ProblemStream:
    """Training problems one at a time, endlessly: a list in a shuffled order,
    reshuffled each pass, or fresh draws of ``make(rng)`` whose equation is
    not in ``exclude`` (the test split's). Seeded, so runs repeat.

    Raises ValueError unless exactly one of ``problems`` and ``make`` is given.
    Example: ``ProblemStream(shipped_problems("train"), seed=0).next()``.
    """

    def __init__(self, problems: list[dict] | None = None, seed: int = 0, make=None,
                 exclude: set[str] | frozenset[str] = frozenset()):
        if (problems is None) == (make is None):
            raise ValueError("give ProblemStream a list of problems or a make(rng) function, not both")
        if problems is not None and not problems:
            raise ValueError("ProblemStream got an empty list of problems")
        self.problems, self.make, self.exclude = problems, make, exclude
        self.rng = random.Random(seed)
        self._order: list[int] = []

    def next(self) -> dict:
        if self.make is not None:
            while True:
                problem = self.make(self.rng)
                if equation(problem) not in self.exclude:
                    return problem
        if not self._order:
            self._order = list(range(len(self.problems)))
            self.rng.shuffle(self._order)
        return self.problems[self._order.pop()]
