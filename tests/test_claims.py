"""Every measured figure in the kit's prose names where it is measured.

A speed, a time or a measured size written into a docstring, a code or config
comment, the README, docs/ or a notebook's markdown drifts: the code changes,
the figure stays. So each one must name, in its own block of text, the script
that measures it: ``benchmarks/<name>.py`` (or, for what a test or a script
prints, ``tests/<name>.py`` / ``scripts/<name>.py``), a file that exists. A
figure nothing reproduces is removed, or replaced by that pointer.

What counts as a measured figure (``PATTERNS``): a throughput (``steps/min``,
``tokens/s``, ...), a speed-up (``1.4×``, ``8x faster``), a time per step, an
approximate time (``about 2 s``, ``~20 s``), an accuracy before and after
(``0.645 -> 0.795``), a share (``6% of the time``), and any time, size or
percentage in a block that says it was *measured*. Versions, config values and limits
(``timeout: 60 s``) are not figures. A block is a paragraph (markdown, a
notebook's markdown cell, a docstring) or a run of comment lines; a markdown
table's block includes the paragraph just above it (its caption).
benchmarks/ itself is not scanned: each benchmark is its figures' source.

``pytest tests/test_claims.py -s`` prints every claim with its source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Where prose with figures lives (notebooks: markdown cells only).
SCANNED = ["README.md", "docs/**/*.md", "docs/**/*.py", "configs/*.yaml", "forge_lite/**/*.py",
           "widgets/*.py", "notebooks/*.ipynb"]

_NUMBER = r"\d+(?:\.\d+)?(?:\s?-\s?\d+(?:\.\d+)?)?"
#: A measured figure, wherever it stands.
PATTERNS = {
    "throughput": re.compile(_NUMBER + r"\s?(?:steps/min|steps per minute|tokens/s|tokens per second"
                             r"|steps/s|requests/s|calls/s)"),
    "speed-up": re.compile(r"\d+(?:\.\d+)?\s?×(?!\s?\d)|\b\d+(?:\.\d+)?x (?:faster|slower|the\b|TRL)"),
    "time per step": re.compile(_NUMBER + r"\s?(?:s|ms) (?:a|per) step|" + _NUMBER + r"\s?s/step"),
    "approximate time": re.compile(r"(?:about|~|≈)\s?" + _NUMBER + r"\s?(?:ms|s|min|minutes|seconds)\b"),
    "before -> after": re.compile(r"\d\.\d{2,3}\s?(?:->|→)\s?\d\.\d{2,3}"),
    "share": re.compile(r"(?<![\w.:])\d+(?:\.\d+)?\s?% of (?:the|its|a)\b"),
}
#: In a block that says "measured": every time, size and percentage in it.
MEASURED_WORD = re.compile(r"\bmeasured\b", re.IGNORECASE)
MEASURED_FIGURE = re.compile(r"(?<![\w.:\"'])" + _NUMBER + r"\s?(?:ms|s|min|MB|GB|%)(?![\w/])")  # not "{x:.0%}"
#: Where a figure is measured.
SOURCE = re.compile(r"\b(benchmarks|tests|scripts)/(\w+)\.py\b")


def blocks_of_text(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph; a table joins the paragraph above it."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not current:
                blocks.append((number, current))
            current.append(line)
        else:
            current = []
    joined: list[tuple[int, str]] = []
    for start, lines in blocks:
        if joined and all(line.lstrip().startswith("|") for line in lines):
            joined[-1] = (joined[-1][0], joined[-1][1] + "\n" + "\n".join(lines))
        else:
            joined.append((start, "\n".join(lines)))
    return joined


def blocks_of_code(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each run of comment lines, and of each
    blank-line-separated stretch of the rest (docstring paragraphs, code)."""
    blocks: list[tuple[int, list[str]]] = []
    kind = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        line_kind = None if not stripped else ("comment" if stripped.startswith("#") else "text")
        if line_kind is None:
            kind = None
            continue
        if line_kind != kind:
            blocks.append((number, []))
            kind = line_kind
        blocks[-1][1].append(line)
    return [(start, "\n".join(lines)) for start, lines in blocks]


def blocks(path: Path) -> list[tuple[str, str]]:
    """(where, text) of each block of ``path``; where is ``file:line`` (notebooks: ``file:cell N``)."""
    relative = path.relative_to(ROOT)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        found = []
        for index, cell in enumerate(json.loads(text)["cells"]):
            if cell["cell_type"] == "markdown":
                source = "".join(cell["source"])
                found += [(f"{relative}:cell {index}", block) for _, block in blocks_of_text(source)]
        return found
    split = blocks_of_text if path.suffix == ".md" else blocks_of_code
    return [(f"{relative}:{line}", block) for line, block in split(text)]


def figures(text: str) -> list[tuple[str, str]]:
    """(kind, figure) of each measured figure in one block."""
    matches = [(kind, m) for kind, pattern in PATTERNS.items() for m in pattern.finditer(text)]
    if MEASURED_WORD.search(text):
        taken = [m.span() for _, m in matches]
        matches += [("measured", m) for m in MEASURED_FIGURE.finditer(text)
                    if not any(start < m.end() and m.start() < end for start, end in taken)]
    return [(kind, m.group(0)) for kind, m in sorted(matches, key=lambda item: item[1].start())]


def sources(text: str) -> list[str]:
    """The measuring scripts a block names that exist."""
    return [m.group(0) for m in SOURCE.finditer(text) if (ROOT / m.group(0)).is_file()]


def claims(named_blocks) -> list[dict]:
    """Every measured figure in ``named_blocks`` ((where, text) pairs), with its sources."""
    found = []
    for where, text in named_blocks:
        for kind, figure in figures(text):
            found.append({"where": where, "kind": kind, "figure": " ".join(figure.split()),
                          "sources": sources(text)})
    return found


def scanned_files() -> list[Path]:
    return sorted({p for pattern in SCANNED for p in ROOT.glob(pattern) if "runs" not in p.parts})


def test_every_measured_figure_names_its_source():
    every = [claim for path in scanned_files() for claim in claims(blocks(path))]
    print(f"\n{len(every)} measured figures:")
    for claim in every:
        print(f"  {claim['where']:50} {claim['figure']:>22}  <- {', '.join(claim['sources']) or 'NO SOURCE'}")
    unsourced = [c for c in every if not c["sources"]]
    assert every, "no measured figure found at all: the scan is broken"
    assert not unsourced, (
        "measured figures that name no benchmarks/<name>.py (or tests/, scripts/ file) measuring them "
        "in their block; name it, or remove the figure:\n"
        + "\n".join(f"  {c['where']}: {c['figure']!r} ({c['kind']})" for c in unsourced)
    )


@pytest.mark.parametrize("text", [
    "The loop runs at 412 steps/min on two cores.",
    "Weight sync costs 0.13 s a step here.",
    "It reaches TRL's accuracy 1.4× sooner.",
    "One thread per process made a step 8x faster.",
    "A replica starts in about 12 s.",
    "Held-out accuracy 0.645 -> 0.795 in 400 steps.",
    "Decoding was 83% of the policy's time.",
    "# measured on 2 cores: the reference took 0.35 s of a step,\n# and 120 MB.",
])
def test_a_planted_unsourced_figure_is_caught(text):
    found = claims([("planted", text)])
    assert found and all(not c["sources"] for c in found), found


def test_a_figure_with_its_benchmark_passes_and_one_that_does_not_exist_does_not():
    sourced = "The loop runs at 412 steps/min (benchmarks/grpo_vs_trl.py)."
    assert [c["sources"] for c in claims([("planted", sourced)])] == [["benchmarks/grpo_vs_trl.py"]]
    missing = "The loop runs at 412 steps/min (benchmarks/no_such_benchmark.py)."
    assert [c["sources"] for c in claims([("planted", missing)])] == [[]]


def test_the_source_must_be_in_the_same_block():
    text = "Measured by benchmarks/grpo.py.\n\nThe loop runs at 412 steps/min."
    assert [c["sources"] for _, block in blocks_of_text(text) for c in claims([("x", block)])] == [[]]
    table = "Measured by benchmarks/memory.py:\n\n| notebook | time |\n|---|---|\n| 01 | ~30 s |"
    assert [c["sources"] for _, block in blocks_of_text(table) for c in claims([("x", block)])] == [
        ["benchmarks/memory.py"]]


@pytest.mark.parametrize("text", [
    "torchmonarch 0.7.0 and vLLM 0.11.1",
    "max_tokens: 32          # the model's answers are cut at 32 tokens",
    "timeout: 60 s, probe every 0.5 s",
    "lr: 2.0e-4 with 10 warm-up steps",
    "Qwen3-1.7B on gsm8k",
])
def test_versions_and_config_values_are_not_figures(text):
    assert claims([("x", text)]) == []
