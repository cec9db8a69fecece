"""The repository cites only what a reader has.

Code, tests and notebooks explain a departure from the tutorial by pointing at a
row of ``docs/tutorial_differences.md`` (``docs/tutorial_differences.md#<row>``).
These tests check that no file points at notes kept outside the repository,
that every cited row exists on the page, and that every row is complete.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "tutorial_differences.md"

FOLDERS = ("forge_lite", "tests", "notebooks", "widgets", "benchmarks", "scripts", "configs", "docs")
SUFFIXES = {".py", ".ipynb", ".md", ".toml", ".yaml", ".yml", ".cfg"}
# Never part of the repository (see .gitignore); skipped when git is not there to say so.
IGNORED_PARTS = {".venv", "__pycache__", ".ipynb_checkpoints", "runs", "results", ".pytest_cache"}

# Names of private notes that readers never get. Spelled in pieces so that
# this file does not match itself.
FORBIDDEN = [
    ("a private list of the tutorial's mistakes", re.compile("ERR" + "ATA", re.IGNORECASE)),
    ("a private design note", re.compile(re.escape("DESIGN" + ".md"))),
    ("a private shared folder", re.compile(re.escape("shared" + "/"))),
]

# One `### name` heading per difference; GitHub's anchor for it is the name itself.
HEADING = re.compile(r"^### (\S+)\s*$", re.MULTILINE)
NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
CITATION = re.compile(r"tutorial_differences\.md#([A-Za-z0-9_.-]*[A-Za-z0-9_-])")
# A markdown link to the page, [text](path/to/tutorial_differences.md#<row>).
LINK = re.compile(r"\]\(([^)\s#]*tutorial_differences\.md)(?:#[^)\s]*)?\)")
LABELS = ("**The tutorial says:**", "**The kit does:**", "**Why:**")


def repository_files() -> list[Path]:
    """Files of the repository, tracked or new, in the folders readers get."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *FOLDERS, "README.md"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        paths = [ROOT / line for line in listed]
    except (OSError, subprocess.CalledProcessError):
        paths = [ROOT / "README.md"]
        for folder in FOLDERS:
            paths += [p for p in (ROOT / folder).rglob("*") if not IGNORED_PARTS & set(p.relative_to(ROOT).parts)]
    return sorted({p for p in paths if p.is_file() and (p.suffix in SUFFIXES or p.name == "README.md")})


def page_anchors() -> list[str]:
    return HEADING.findall(PAGE.read_text(encoding="utf-8"))


def page_rows() -> dict[str, str]:
    """Each difference's name -> its text up to the next heading."""
    text = PAGE.read_text(encoding="utf-8")
    parts = re.split(r"^(#{1,3} .*)$", text, flags=re.MULTILINE)
    rows = {}
    for heading, body in zip(parts[1::2], parts[2::2]):
        match = HEADING.fullmatch(heading)
        if match:
            rows[match.group(1)] = body
    return rows


def test_the_page_exists_with_rows():
    assert PAGE.is_file(), "docs/tutorial_differences.md is missing"
    assert len(page_anchors()) >= 10, "the page lists too few differences"


def test_row_names_are_unique_kebab_case():
    anchors = page_anchors()
    bad = [a for a in anchors if not NAME.fullmatch(a)]
    assert not bad, f"row names must be lowercase kebab-case (their GitHub anchor is the name): {bad}"
    duplicated = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicated, f"row names used twice: {duplicated}"


@pytest.mark.parametrize("name", page_anchors() if PAGE.is_file() else [])
def test_each_row_says_tutorial_kit_and_why(name):
    body = page_rows()[name]
    missing = [label for label in LABELS if label not in body]
    assert not missing, f"row {name!r} lacks {missing}"


def test_the_summary_table_links_every_row():
    text = PAGE.read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(#([^)\s]+)\)", text))
    unknown = sorted(linked - set(page_anchors()))
    assert not unknown, f"the page links to rows it does not have: {unknown}"
    unlisted = sorted(set(page_anchors()) - linked)
    assert not unlisted, f"rows missing from the summary table: {unlisted}"


def test_no_file_cites_notes_readers_do_not_have():
    offenders = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, pattern in FORBIDDEN:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what} ({match.group(0)!r})")
    assert not offenders, (
        "cite a row of docs/tutorial_differences.md instead:\n" + "\n".join(offenders)
    )


def test_every_cited_row_exists():
    anchors = set(page_anchors())
    missing = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            if match.group(1) not in anchors:
                line = text.count("\n", 0, match.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: #{match.group(1)}")
    assert not missing, f"cited rows that docs/tutorial_differences.md does not have: {missing}"


def test_links_to_the_page_resolve():
    broken = []
    for path in repository_files():
        if path.suffix not in {".md", ".ipynb"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in LINK.finditer(text):
            target = (path.parent / match.group(1)).resolve()
            if target != PAGE.resolve():
                broken.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
    assert not broken, f"links that do not lead to docs/tutorial_differences.md: {broken}"
