"""Reward functions for math answers: is the number right, did the model think first.

GRPO learns only from rewards, so a reward is the task's definition. Both
rewards here are plain callables with the signature the RewardActor expects,
``reward(prompt, response, target) -> float``, and both read the response
format of ``forge_lite.data.prompts``: ``<think>...</think><answer>N</answer>``.

What each reward accepts is in its docstring, with a table of examples. The
tables are the module's ``MATH_EXAMPLES`` and ``THINKING_EXAMPLES``, and
``tests/test_rewards.py`` checks every row, so the documentation cannot drift
from what the code does.

A trap worth knowing: an untagged but correct response such as
``"15% of 240 is 36"`` scores 0.1 with MathReward (partial credit: the number
is there, but not in an answer tag) and 0.0 with ThinkingReward; averaged,
0.05. The rewards teach the format as much as the arithmetic.
"""

import math
import re

# The first <answer>...</answer>; tags may carry stray spaces or capitals.
ANSWER_TAG = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
THINK_BLOCK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)
ANY_THINK_TAG = re.compile(r"<\s*/?\s*think\s*>", re.IGNORECASE)
# A prompt whose chat template opens the think block itself (R1-style templates end in "<think>\n").
THINK_OPENED_BY_PROMPT = re.compile(r"<\s*think\s*>\s*$", re.IGNORECASE)
# LaTeX a model wraps a number in. The wrappers' braces hold what is meant:
# \boxed{18} is 18, 18\text{ cm} is "18 cm".
LATEX_WRAPPER = re.compile(r"\\(?:boxed|text|textrm|textbf|mathrm|mathbf|mbox|fbox)\s*\{([^{}]*)\}")
# \frac{3}{4}, \dfrac, \tfrac; not right after a digit, where 2\frac{1}{2} is a
# mixed number that plain digits cannot say (it would read as "20.5").
LATEX_FRACTION = re.compile(r"(?<![\d.])\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
# Escaped symbols, as their plain selves.
LATEX_SYMBOLS = [("\\$", "$"), ("\\%", "%"), ("^{\\circ}", "°"), ("^\\circ", "°")]
# Spacing commands (1\,000 is LaTeX's thousands separator) and ~.
LATEX_SPACE = re.compile(r"\\[,;:! ]|~")
# Math delimiters \( \) \[ \], and the braces left over, as in 1{,}000.
LATEX_LEFTOVERS = re.compile(r"\\[()\[\]]|[{}]")
CURRENCY = re.compile(r"[$€£¥₹]")
# What may follow a number's last digit and be a unit: words, spaces, % ° / and
# punctuation ("18 cm", "60 km/h", "18%", "18 dollars.", "18,"), closing quotes
# and stray emphasis ("18\"", "18**").
UNIT = re.compile(r"(?:[^\W\d_]|[\s%°/.,;'\"’”*_])*")
# What may come before a number and say nothing: spaces, opening quotes, stray emphasis.
LEADING_DECORATION = " \t\n'\"‘“*_"

# Numbers as models write them, and the one reading of them that the reward
# (tag and partial credit alike) and the calculator tool share: plain_numbers.
# A minus sign may be typographic: U+2212, and the small and full-width
# hyphen-minus of CJK text (U+FE63, U+FF0D).
MINUS_SIGNS = re.compile("[\u2212\ufe63\uff0d]")
# A markdown code span's backticks: never part of a number or an operator.
BACKTICKS = re.compile(r"`+")
# Markdown bold or italics, **36**, *36*, __36__, _36_, ***36***: the same one
# to three markers on both sides, no space inside them.
EMPHASIS = re.compile(r"(\*{1,3}|_{1,3})(?=[^\s*_])([^*_\n]*?[^\s*_])\1(?![*_])")
# Digits grouped in threes by one separator used throughout: 1,234,567; 1 234
# with a space, a no-break space or a thin space (SI style, LaTeX's 1\,000).
# "1,23" and "1,2345" are not grouped: they stay as written (and are no number).
GROUPED_DIGITS = re.compile(
    r"(?<![\d.,])\d{1,3}([, \u00a0\u2009\u202f])\d{3}(?:\1\d{3})*(?!\d|\1\d)"
)
# A plain number, as Python's float() reads it, or a plain fraction of two
# (3/4 is 0.75, written without spaces): what plain_numbers leaves of a number.
_DECIMAL = r"(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
NUMBER = re.compile(rf"[-+]?{_DECIMAL}(?:/{_DECIMAL})?")
# The same in running text (partial credit): not a piece of a longer number
# (36 in 360 or 1.36, 3/4 in 1/3/4), and a sign only where it is not an
# operator between two terms: "10-5" holds 10 and 5, "x = -5" holds -5.
NUMBER_IN_TEXT = re.compile(
    rf"(?:(?<![\w.)\]])[-+])?(?<![\d.])(?<!\d/){_DECIMAL}(?:/{_DECIMAL})?(?!\d|\.\d|/\d)"
)


def latex_to_plain(text: str) -> str:
    """The LaTeX a number may be wrapped in, as plain text: ``\\boxed{1{,}000}`` -> ``1,000``.

    Only what the module's docstring tables list; other commands stay, and
    leave the text unreadable as a number.
    """
    for latex, plain in LATEX_SYMBOLS:
        text = text.replace(latex, plain)
    # Innermost braces first, until nothing changes: \boxed{\frac{1}{2}}.
    while True:
        plain = LATEX_FRACTION.sub(_fraction_value, LATEX_WRAPPER.sub(r"\1", text))
        if plain == text:
            break
        text = plain
    return LATEX_LEFTOVERS.sub("", LATEX_SPACE.sub(" ", text))


def _fraction_value(match: re.Match) -> str:
    """``\\frac{a}{b}`` as the digits of a / b when a and b are plain numbers; else unchanged."""
    numerator, denominator = (_plain_float(part) for part in match.groups())
    if numerator is None or not denominator:
        return match.group(0)
    return repr(numerator / denominator)


def _plain_float(text: str) -> float | None:
    try:
        return float(text.replace(" ", ""))
    except ValueError:
        return None


def without_unit(text: str) -> str:
    """``text`` without what follows its last digit, if that is a unit (``UNIT``)."""
    digits = [i for i, char in enumerate(text) if char.isdecimal()]
    if digits and UNIT.fullmatch(text, digits[-1] + 1):
        return text[: digits[-1] + 1]
    return text


def plain_numbers(text: str) -> str:
    """``text`` with every number in it written plainly, as Python reads numbers.

    The one place where numbers as models write them are read; MathReward
    (the answer tag and the partial-credit search) and the calculator tool
    both go through it, so a number one of them reads the other reads too:

    - LaTeX (``latex_to_plain``): ``\\boxed{18}``, ``$18$``, ``\\frac{3}{4}``;
    - markdown around a number: ``**18**``, ``*18*``, ``__18__``, ``_18_``,
      code spans (``18`` in backticks); markers right after or before an
      operand stay, as arithmetic: ``2 *3* 4`` and ``2**3**2`` keep their
      stars, and ``__class__`` (no digit) its underscores;
    - a typographic minus sign (U+2212, U+FE63, U+FF0D) as ``-``;
    - currency signs (``$ € £ ¥ ₹``) dropped: ``-$18`` is ``-18``;
    - thousands separators dropped where digits are grouped in threes:
      ``1,234,567``, ``1 234`` (space, no-break or thin space).

    Units, words and operators stay: what they mean is the caller's
    business. Example: ``plain_numbers("**−$1,234** and `3/4`")`` is
    ``"-1234 and 3/4"``.
    """
    text = latex_to_plain(text)
    text = EMPHASIS.sub(_unemphasised, BACKTICKS.sub("", text))
    text = CURRENCY.sub("", MINUS_SIGNS.sub("-", text))
    return GROUPED_DIGITS.sub(lambda match: re.sub(r"\D", "", match.group(0)), text)


def _unemphasised(match: re.Match) -> str:
    """Markdown emphasis around a number without its markers. Kept: emphasis
    with no digit in it (``__class__`` is a name, not bold), and markers with
    an operand right before or after them: they are arithmetic (``2 *3* 4``)."""
    if not any(char.isdecimal() for char in match.group(2)):
        return match.group(0)
    before = match.string[max(0, match.start() - 20): match.start()].rstrip()[-1:]
    after = match.string[match.end(): match.end() + 20].lstrip()[:1]
    operand_before = before and (before.isdecimal() or before in ")]")
    operand_after = after and (after.isdecimal() or after in "([")
    if operand_before or operand_after:
        return match.group(0)
    return match.group(2)


def parse_number(text: str) -> float | None:
    """The number ``text`` denotes, as models write it; None if it is not one number.

    The numbers are written plainly first (``plain_numbers``: LaTeX,
    markdown, minus signs, currency, thousands separators); then a unit or
    punctuation after the last digit goes (``without_unit``), and quotes or
    spaces before the first. What is left must be one plain number or plain
    fraction (``NUMBER``): ``3/4`` is 0.75, ``x = 18``, ``18 or 19``,
    ``2 1/2`` and ``1,23`` are no number. NaN, infinities and a fraction
    over 0 are no number either.
    """
    text = without_unit(plain_numbers(str(text))).lstrip(LEADING_DECORATION)
    text = re.sub(r"^([-+])\s+", r"\1", text.rstrip())  # "- 18", as "-$ 18" leaves it
    if not NUMBER.fullmatch(text):
        return None
    numerator, _, denominator = text.partition("/")
    number = float(numerator)
    if denominator:
        if float(denominator) == 0:
            return None
        number /= float(denominator)
    return number if math.isfinite(number) else None


# (response, target, MathReward()'s score, why). Rendered into MathReward's
# docstring below; tests/test_rewards.py checks every row.
MATH_EXAMPLES = [
    ("<answer>18</answer>", "18", 1.0, "the number, in the answer tag"),
    ("<answer> 18.0 </answer>", "18", 1.0, "numbers compare as numbers"),
    ("<ANSWER>18</Answer >", "18", 1.0, "tags tolerate case and spaces"),
    ("<answer>-18</answer>", "-18", 1.0, "negative numbers"),
    ("<answer>\u221218</answer>", "-18", 1.0, "the typographic minus sign"),
    ("<answer>-7.25</answer>", "-7.25", 1.0, "negative decimals"),
    ("<answer>\\boxed{18}</answer>", "18", 1.0, "LaTeX box"),
    ("<answer>$\\boxed{18}$</answer>", "18", 1.0, "a box in inline math"),
    ("<answer>$18$</answer>", "18", 1.0, "inline math"),
    ("<answer>\\(18\\)</answer>", "18", 1.0, "inline math, \\( \\) form"),
    ("<answer>\\[ \\boxed{-7.5} \\]</answer>", "-7.5", 1.0, "display math"),
    ("<answer>\\text{18}</answer>", "18", 1.0, "\\text"),
    ("<answer>\\mathrm{18}</answer>", "18", 1.0, "\\mathrm"),
    ("<answer>\\dfrac{3}{4}</answer>", "0.75", 1.0, "a simple fraction is its value"),
    ("<answer>\\boxed{-\\frac{1}{2}}</answer>", "-0.5", 1.0, "a signed fraction in a box"),
    ("<answer>\\frac{1}{3}</answer>", "0.333333", 1.0, "within the tolerance, 1e-6"),
    ("<answer>2\\frac{1}{2}</answer>", "2.5", 0.0, "a mixed number is not read"),
    ("<answer>3/4</answer>", "0.75", 1.0, "a plain fraction is its value"),
    ("<answer>2 1/2</answer>", "2.5", 0.0, "a plain mixed number is not read either"),
    ("<answer>**36**</answer>", "36", 1.0, "markdown bold"),
    ("<answer>*36*</answer>", "36", 1.0, "markdown italics"),
    ("<answer>`36`</answer>", "36", 1.0, "a markdown code span"),
    ("<answer>1,000</answer>", "1000", 1.0, "thousands commas"),
    ("<answer>1{,}000</answer>", "1000", 1.0, "LaTeX thousands separator"),
    ("<answer>1\\,000</answer>", "1000", 1.0, "LaTeX thin-space separator"),
    ("<answer>$1,000</answer>", "1000", 1.0, "currency and commas"),
    ("<answer>1,23</answer>", "123", 0.0, "a comma only between groups of three digits"),
    ("<answer>$18</answer>", "18", 1.0, "dollar sign"),
    ("<answer>\\$18</answer>", "18", 1.0, "LaTeX dollar sign"),
    ("<answer>-$18</answer>", "-18", 1.0, "a sign before the currency"),
    ("<answer>€18</answer>", "18", 1.0, "euro sign"),
    ("<answer>£1,250.50</answer>", "1250.5", 1.0, "pound sign, commas, decimals"),
    ("<answer>18 dollars</answer>", "18", 1.0, "a unit word"),
    ("<answer>18 cm.</answer>", "18", 1.0, "a unit and a full stop"),
    ("<answer>18\\text{ cm}</answer>", "18", 1.0, "a unit in \\text"),
    ("<answer>60 km/h</answer>", "60", 1.0, "a compound unit"),
    ("<answer>18%</answer>", "18", 1.0, "percent sign"),
    ("<answer>18\\%</answer>", "18", 1.0, "LaTeX percent sign"),
    ("<answer>90^\\circ</answer>", "90", 1.0, "degrees"),
    ("<answer>18 apples</answer>", "18", 1.0, "any trailing word reads as a unit"),
    ("<answer>18</answer>", "$18", 1.0, "the target is read the same way"),
    ("<answer>\\boxed{19}</answer>", "18", 0.0, "a wrong number scores 0, however written"),
    ("<answer>19 cm</answer>", "18", 0.0, "a wrong number with a unit"),
    ("<answer>18</answer>", "-18", 0.0, "the sign counts"),
    ("<answer>\\boxed{19}</answer> or 18", "18", 0.1, "right number outside the tag: partial"),
    ("<answer>35</answer> but really 36", "36", 0.1, "wrong answer, right number elsewhere"),
    ("<answer>36</answer><answer>7</answer>", "7", 0.1, "only the first tag is the answer"),
    ("<answer>x = 18</answer>", "18", 0.1, "only a currency or unit may surround the number"),
    ("<answer>18 or 19</answer>", "18", 0.1, "two numbers are not one answer"),
    ("<answer>\\sqrt{324}</answer>", "18", 0.0, "no arithmetic beyond a simple fraction"),
    ("<answer>thirty-six</answer>", "36", 0.0, "number words are not read"),
    ("<answer>nan</answer>", "18", 0.0, "NaN is not a number"),
    ("\\boxed{18}", "18", 0.1, "no answer tag: partial"),
    ("15% of 240 is 36", "36", 0.1, "no answer tag: partial"),
    ("it is **$1,234**", "1234", 0.1, "partial credit reads numbers as the tag does"),
    ("it is \u22125", "-5", 0.1, "a typographic minus outside the tag"),
    ("it is \u22125", "5", 0.0, "a wrong sign never earns partial credit"),
    ("10-5 is 5", "-5", 0.0, "a minus between two terms is no sign"),
    ("the answer is 360", "36", 0.0, "36 inside 360 is not the number 36"),
    ("<answer>36</answer>", "#### 36 is the worked answer", 0.0, "unreadable target"),
]

# (prompt, response, ThinkingReward()'s score, why). Rendered into
# ThinkingReward's docstring below; tests/test_rewards.py checks every row.
R1_PROMPT = "<|im_start|>assistant\n<think>\n"  # the template opened the block
THINKING_EXAMPLES = [
    ("q", "<think>add the tens</think><answer>5</answer>", 1.0, "a block with thinking in it"),
    ("q", "< THINK >add</ think>", 1.0, "tags tolerate case and spaces"),
    ("q", "<think>   </think><answer>5</answer>", 0.2, "empty block: partial"),
    ("q", "<think>never closed", 0.2, "unclosed block: partial"),
    ("q", "no tags at all", 0.0, "no think tag"),
    (R1_PROMPT, "2 plus 2 is 4.\n</think>\n<answer>4</answer>", 1.0,
     "the prompt opened the block, the model closed it"),
    ("assistant: <think>", "2 plus 2 is 4.</think>", 1.0, "opened right at the prompt's end"),
    ("assistant: < Think >  \n\n", "2 plus 2 is 4.</think>", 1.0, "whitespace after it allowed"),
    (R1_PROMPT, "\n</think>\n<answer>4</answer>", 0.2, "opened by the prompt, closed empty"),
    (R1_PROMPT, "2 plus 2 is 4. <answer>4</answer>", 0.2, "opened by the prompt, never closed"),
    ("<think>\n\n</think>\n\n", "<answer>4</answer>", 0.0,
     "the prompt opened and closed it: no thinking"),
    ("Think inside <think></think>.", "2 plus 2 is 4.</think>", 0.2,
     "a tag earlier in the prompt opens nothing"),
]


def examples_table(title: str, columns: list[str], examples: list[tuple]) -> str:
    """``examples`` as a text table for a docstring, strings as Python literals
    (so backslashes and newlines show as written); the last column is prose."""
    rows = [columns] + [
        [repr(cell) for cell in example[:-1]] + [example[-1]] for example in examples
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return f"\n    {title}\n\n" + "\n".join("        " + line for line in lines) + "\n"


class MathReward:
    """1.0 for the right number in the first ``<answer>`` tag.

    "The number" is read as models write it (``parse_number``), because a
    reward that refuses ``\\boxed{18}`` for 18 punishes a right answer, and
    GRPO would train the model away from the format it was taught:

    - LaTeX around it: ``\\boxed{}``, ``\\text{}``, ``\\mathrm{}`` (and
      ``\\textbf``, ``\\mathbf``, ``\\mbox``), math delimiters ``$...$``,
      ``\\(...\\)``, ``\\[...\\]``;
    - a simple fraction, ``\\frac{a}{b}`` (or ``\\dfrac``, ``\\tfrac``) of two
      plain numbers, or ``a/b``, as a / b; not after a whole number
      (``2\\frac{1}{2}``, ``2 1/2``);
    - markdown around it: ``**36**``, ``*36*``, ``__36__``, a code span;
    - a typographic minus sign (U+2212) as ``-``;
    - thousands separators between groups of three digits: ``1,000``,
      ``1{,}000``, ``1\\,000``, ``1 000`` (``1,23`` is no number);
    - a currency sign (``$ \\$ € £ ¥ ₹``) and a unit after the last digit:
      words, ``%``, ``^\\circ``, ``/`` (``18 cm``, ``60 km/h``, ``18%``). Any
      trailing word reads as a unit, so ``18 apples`` is 18.

    Numbers then compare within ``tolerance``, so ``18.0`` is 18; the sign
    counts. Anything else in the tag (``x = 18``, ``18 or 19``,
    ``\\sqrt{324}``) makes it no number: the reward does no arithmetic and
    does not guess which of two numbers is meant.

    ``partial_credit`` when the right number appears elsewhere in the
    response (the model knew it but did not answer in the format), 0.0
    otherwise. Numbers there are read as in the tag (``plain_numbers``, then
    ``parse_number`` number by number), so ``−5`` is -5, never 5; a minus
    between two terms is an operator (``10-5`` holds 10 and 5). The target is read like the answer; a target
    that is not a number scores 0.0: pass the bare number (the dataset's
    ``target``), not gsm8k's worked solution.
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
        # The same reading as the tag's, number by number: "**36**", "−5" and
        # "$1,234" outside the tag are 36, -5 and 1234 (and -5 is never 5).
        for written in NUMBER_IN_TEXT.findall(plain_numbers(response)):
            number = parse_number(written)
            if number is not None and self._matches(number, target_number):
                return self.partial_credit
        return 0.0

    def _matches(self, value: float, target: float) -> bool:
        return abs(value - target) <= self.tolerance


class ThinkingReward:
    """``full_reward`` for a non-empty ``<think>...</think>`` block.

    ``partial_reward`` when a think tag is there but the block is empty or
    unclosed, 0.0 when there is none. It rewards showing the work, whatever
    the work is; MathReward judges the result.

    The block may be opened by the prompt: chat templates of R1-style
    models end the prompt with ``<think>\\n`` and the model writes only the
    thinking and ``</think>``. A prompt that ends in a think tag (whitespace
    after it allowed) counts as the block's opening, so the model is not
    marked down for a tag it was never meant to write.
    """

    def __init__(self, partial_reward: float = 0.2, full_reward: float = 1.0):
        self.partial_reward = partial_reward
        self.full_reward = full_reward

    def __call__(self, prompt: str, response: str, target: str | None = None) -> float:
        if prompt and THINK_OPENED_BY_PROMPT.search(prompt):
            response = "<think>" + response
        block = THINK_BLOCK.search(response)
        if block is not None and block.group(1).strip():
            return self.full_reward
        if ANY_THINK_TAG.search(response):
            return self.partial_reward
        return 0.0


# The docstrings' example tables, from the lists the tests check (None under python -OO).
if MathReward.__doc__:
    MathReward.__doc__ += examples_table(
        "Examples (MATH_EXAMPLES, each one checked by tests/test_rewards.py):",
        ["response", "target", "score", "why"], MATH_EXAMPLES,
    )
if ThinkingReward.__doc__:
    ThinkingReward.__doc__ += examples_table(
        "Examples (THINKING_EXAMPLES, each one checked by tests/test_rewards.py):",
        ["prompt", "response", "score", "why"], THINKING_EXAMPLES,
    )


#: The reward functions a GRPO config can name (``reward_actor.functions``).
REWARD_FUNCTIONS = {"math": MathReward, "thinking": ThinkingReward}
