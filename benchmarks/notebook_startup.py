"""How long a learner waits at each notebook's first cell that starts services.

    python benchmarks/notebook_startup.py                      # every notebook
    python benchmarks/notebook_startup.py 02_services 04_grpo_end_to_end

For each notebook: a fresh Jupyter kernel in ``notebooks/`` (as JupyterLab
starts one), its code cells run in order up to the first one that starts
services or actors (``.as_service(``, ``.as_actor(``, ``GRPORun(``, or
a GRPO run: ``await run_variant(``), and that cell's wall
seconds, from the execute request to the kernel going idle. The cells before
it (imports, settings) are timed too but not counted: they are what a learner
has already waited for. Where the cell goes on to train (notebook 07's
first run), the clock stops at the run's "GRPO: services ready" line instead.
The kernel is then shut down as a user's would be, and its processes with it.

Notebooks run in their fast mode (``FORGE_LITE_FAST=1``: the mode CI runs
them in) so that a cell that trains trains a few steps only; the first
service cell starts the same services in either mode.

Target (issue 24): <= 5 s for every notebook. Writes
``benchmarks/results/notebook_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "notebook_startup.json"
SERVICE_CELL = re.compile(r"\.as_service\(|\.as_actor\(|GRPORun\(|^await run_variant\(", re.MULTILINE)
SERVICES_READY = "GRPO: services ready"
TARGET_S = 5.0


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def run_cell(client, code: str, timeout: float = 600.0) -> tuple[float, float | None, str]:
    """Run ``code``; ``(seconds until idle, seconds until "services ready" or
    None, the cell's text output)``. Raises RuntimeError if the cell fails."""
    began = time.perf_counter()
    msg_id = client.execute(code)
    ready_s, text, error = None, [], None
    while True:
        message = client.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            text.append(content["text"])
            if ready_s is None and SERVICES_READY in content["text"]:
                ready_s = time.perf_counter() - began
        elif kind == "error":
            error = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            break
    if error:
        raise RuntimeError(error)
    return time.perf_counter() - began, ready_s, "".join(text)


def measure(name: str) -> dict:
    """The first service cell of notebook ``name`` (a file stem), timed in a fresh kernel."""
    from jupyter_client.manager import start_new_kernel

    path = NOTEBOOKS / f"{name}.ipynb"
    cells = code_cells(path)
    first = next((i for i, code in enumerate(cells) if SERVICE_CELL.search(code)), None)
    if first is None:
        return {"notebook": name, "service_cell": None}
    env = {**os.environ, "FORGE_LITE_FAST": "1"}
    started = time.perf_counter()
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(NOTEBOOKS), env=env)
    kernel_s = time.perf_counter() - started
    try:
        before_s = sum(run_cell(client, code)[0] for code in cells[:first])
        cell_s, ready_s, _ = run_cell(client, cells[first])
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)  # as JupyterLab's "shut down kernel": the kit's exit hooks run
    return {
        "notebook": name, "service_cell": first, "kernel_start_s": round(kernel_s, 2),
        "cells_before_s": round(before_s, 2), "cell_s": round(cell_s, 2),
        "services_ready_s": None if ready_s is None else round(ready_s, 2),
        "startup_s": round(ready_s if ready_s is not None else cell_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="file stems (default: every numbered notebook)")
    args = parser.parse_args()
    names = args.notebooks or sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb"))
    rows = []
    for name in names:
        row = measure(name)
        rows.append(row)
        if row["service_cell"] is None:
            print(f"{name:28s} starts no services", flush=True)
        else:
            ready = "" if row["services_ready_s"] is None else f" (the cell trains on: to 'services ready')"
            print(f"{name:28s} code cell {row['service_cell']:2d}: {row['startup_s']:5.1f} s{ready}"
                  f"  [kernel {row['kernel_start_s']:.1f} s, cells before {row['cells_before_s']:.1f} s]",
                  flush=True)
    timed = [r for r in rows if r["service_cell"] is not None]
    worst = max((r["startup_s"] for r in timed), default=0.0)
    print(f"slowest first service cell: {worst:.1f} s (target <= {TARGET_S:.0f} s: "
          f"{'met' if worst <= TARGET_S else 'not met'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"target_s": TARGET_S, "notebooks": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
