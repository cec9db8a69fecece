"""Execute the notebooks in place, so the committed copies show real outputs.

    .venv/bin/python scripts/execute_notebooks.py [notebooks/02_services.ipynb ...]

Each notebook runs top to bottom in a fresh kernel started in notebooks/.
Afterwards the widget state blob nbconvert stores in the metadata is dropped
(the outputs keep each widget's short text form), and the outputs are checked
for absolute paths of this machine, which must never be committed.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MACHINE_PATH = re.compile(r"/(root|tmp|work|home)/")


def execute(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    elapsed = time.perf_counter() - started
    nb.metadata.pop("widgets", None)
    leaks = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and MACHINE_PATH.search(str(cell.get("outputs", "")))
    ]
    if leaks:
        raise SystemExit(f"{path.name}: cells {leaks} print absolute paths of this machine; fix them before committing")
    nbformat.write(nb, path)
    return elapsed


def main(args: list[str]) -> None:
    paths = [Path(a).resolve() for a in args] or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
