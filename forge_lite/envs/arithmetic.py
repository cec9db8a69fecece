"""Safe arithmetic: what the calculator tool computes, without ``eval``.

A model's tool call is untrusted text. ``eval("347 + 589")`` would work, and
so would ``eval("__import__('os').system('rm -rf ~')")``: a policy that
samples tokens at random will, sooner or later, write anything. So the
expression is parsed with ``ast.parse`` into a syntax tree and only a short
whitelist of node types is evaluated: numbers, ``+ - * / // % **``, unary
``+ -`` and parentheses. A name, a call, an attribute, a string, anything
else, is refused before a single operation runs.

Cheap-but-huge expressions are refused too: the text is at most
``MAX_EXPRESSION_CHARS`` long, an exponent at most ``MAX_EXPONENT``, and a
result (or an intermediate value) at most ``MAX_MAGNITUDE``; ``9**9**9``
would otherwise keep a core busy for minutes building a number with hundreds
of millions of digits.

Numbers are read the way MathReward reads an answer, by the same function
(``forge_lite.data.rewards.plain_numbers``): a model that writes
``1,234 + $5`` or ``−5 * **3**`` to the tool writes them so in its answer
too, and one reading means the tool never refuses a number the reward
accepts. A comma that is no thousands separator (``1,23``) is refused with
the number to write instead: the error is what the model learns from.

Every refusal is a ``CalcError`` (a ValueError) whose message is short
enough to show the model as the tool's answer.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from forge_lite.data.rewards import plain_numbers

MAX_EXPRESSION_CHARS = 100
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**18

# The operators a calculator has, and nothing else.
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Symbols people (and models) write for the same operators (a typographic
# minus sign is read with the numbers, by plain_numbers).
SYMBOLS = {"×": "*", "÷": "/", "\\times": "*", "\\cdot": "*", "\\div": "/", "^": "**"}
# Digits with a comma that plain_numbers did not read as a thousands
# separator: 1,23 or 1,2345, or a European 1.234,5.
COMMA_NUMBER = re.compile(r"\d[\d.]*(?:,[\d.]*\d)+")


class CalcError(ValueError):
    """An expression the calculator refuses or cannot compute; the message says why."""


def evaluate_expression(text: str) -> int | float:
    """The value of an arithmetic expression such as ``"347 + 589"``.

    Parameters
    ----------
    text:
        Numbers (integers or decimals, written as ``plain_numbers`` reads
        them: ``1,234``, ``$5``, ``−5``, ``**5**``, ``\\frac{3}{4}``),
        ``+ - * / // % **`` (``× ÷ ^`` and LaTeX's ``\\times \\cdot \\div``
        read as ``* / **``), unary signs and parentheses, at most
        ``MAX_EXPRESSION_CHARS`` characters as written.

    Returns
    -------
    An int when every step stays whole (``7 * 6`` is 42), else a float
    (``7 / 2`` is 3.5).

    Raises
    ------
    CalcError
        For anything else: empty text, a syntax error, a name or a call
        (``__import__('os')``), a comma that is no thousands separator
        (the message says what to write: ``write 123 or 1.23, not 1,23``),
        division by zero, an exponent above ``MAX_EXPONENT``, a value above
        ``MAX_MAGNITUDE``, NaN or infinity.

    Example
    -------
    >>> evaluate_expression("347 + 589")
    936
    >>> evaluate_expression("(12 - 4) / 3")
    2.6666666666666665
    >>> evaluate_expression("$1,234 + 5")
    1239
    """
    if not isinstance(text, str):
        raise CalcError(f"expression must be text, got {type(text).__name__}")
    # The length as written is checked before any reading, which costs time per character.
    written = len(text.strip())
    if written > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression too long ({written} characters, at most {MAX_EXPRESSION_CHARS})")
    text = plain_numbers(text)
    for symbol, python in SYMBOLS.items():
        text = text.replace(symbol, python)
    text = text.strip()
    if not text:
        raise CalcError("empty expression")
    comma = COMMA_NUMBER.search(text)
    if comma is not None:
        raise CalcError(f"write {_without_comma(comma.group(0))}, not {comma.group(0)}: "
                        "a comma is read only between groups of three digits (1,234)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # ValueError: a NUL byte in the text; the others: nesting the parser refuses.
        raise CalcError(f"not an arithmetic expression: {text!r}") from None
    return _checked(_evaluate(tree.body))


def _without_comma(written: str) -> str:
    """What a number written with a stray comma may mean: ``1,23`` -> ``123 or 1.23``."""
    if re.fullmatch(r"\d{1,3}(?:\.\d{3})+,\d+", written):  # 1.234,5: a decimal comma
        return written.replace(".", "").replace(",", ".")
    joined = written.replace(",", "")
    if written.count(",") == 1 and "." not in written:  # a decimal comma, or a misplaced separator
        return f"{joined} or {written.replace(',', '.')}"
    return joined


def _evaluate(node: ast.AST) -> int | float:
    """Walk the tree, computing only whitelisted nodes (recursion depth is
    bounded by the text's length, which was checked)."""
    if isinstance(node, ast.Constant):
        # bool is an int subclass: True + True is not arithmetic anyone wrote.
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _checked(node.value)
        raise CalcError(f"not a number: {node.value!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _checked(UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalcError(f"exponent {right} too large (at most {MAX_EXPONENT})")
            if left == 0 and right < 0:
                raise CalcError("division by zero")
        try:
            value = BINARY[type(node.op)](left, right)
        except OverflowError:
            raise CalcError("result too large") from None
        if isinstance(value, complex):  # (-8) ** 0.5
            raise CalcError("result is not a real number")
        return _checked(value)
    if isinstance(node, ast.Tuple):  # "1, 2": say so in words, not as Python's node name
        raise CalcError("only numbers and + - * / // % ** are allowed, not a list with commas: "
                        "one expression at a time")
    # Names, calls, attributes, subscripts, comparisons, lambdas, ...
    raise CalcError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _checked(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError(f"result too large (more than {MAX_MAGNITUDE:.0e})")
    return value


def format_number(value: int | float) -> str:
    """How the calculator writes a result: ints as they are, a float that is
    whole as an int (``6.0`` -> ``"6"``), other floats to 10 significant digits.

    Example: ``format_number(2 / 3)`` is ``"0.6666666667"``.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".10g")
    return str(value)
