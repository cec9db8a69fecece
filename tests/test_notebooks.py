"""Every notebook runs under nbval, and the outputs that teach are checked.

Each notebook runs in its own pytest process with ``--nbval-lax``, as a user
runs it from the repository root: every cell must run without error, and cells marked ``# NBVAL_CHECK_OUTPUT`` must print
what the committed notebook shows (after ``nbval_sanitize.cfg`` masks times,
ids and addresses).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
MACHINE_PATH = re.compile(r'"/(root|tmp|work|home)/')


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_under_nbval(notebook):
    # As a user runs it, `python -m pytest --nbval-lax notebooks/`, from the
    # repository root with the project's pytest settings (their per-test
    # timeout bounds every cell) and no extra environment: a notebook whose
    # real run takes minutes (04's GRPO training) sees PYTEST_CURRENT_TEST and
    # runs a short version. The sanitizer masks times and ids in the checked outputs.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
         str(notebook.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("FORGE_LITE_")},
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(notebook):
    cells = [c for c in _cells(notebook) if c["cell_type"] == "code"]
    assert "forge_lite.doctor" in _source(cells[0]), "the first code cell runs the doctor"
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params, "a cell tagged 'parameters'"
    # Run All leaves everything running, so a learner who scrolls back finds live
    # dashboards; under pytest (nbval) the last cell stops everything itself.
    assert 'TEARDOWN = "PYTEST_CURRENT_TEST" in os.environ' in _source(params[0]), "no TEARDOWN parameter"
    last = _source(cells[-1])
    assert "shutdown" in last and "if TEARDOWN:" in last, "the last code cell shuts everything down if TEARDOWN"
    assert "NBVAL_CHECK_OUTPUT" not in last, "the teardown cell prints differently under the tests"
    text = notebook.read_text()
    assert not MACHINE_PATH.search(text), "outputs carry an absolute path of this machine"
    assert '"widgets": {' not in text.split('"metadata"')[-1], "widget state blob in the metadata"
    assert any("NBVAL_CHECK_OUTPUT" in _source(c) for c in cells), "no output is checked"
