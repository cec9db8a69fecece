"""Does a notebook with both dashboards train as fast as a terminal?

    python benchmarks/notebook_overhead.py              # 200 steps each, about 5 min on 2 cores
    python benchmarks/notebook_overhead.py --steps 100 --repeats 2

Runs the same GRPO run (``configs/grpo_tiny.yaml``, ``steps=N eval_samples=0``)
two ways, one after the other, and compares their steps per minute:

- **terminal**: ``python -m forge_lite.grpo``, as a user runs it from a shell;
- **notebook**: in a Jupyter kernel (driven by nbclient, as JupyterLab drives
  one), with a TrainingDashboard and a ServiceDashboard on the policy
  displayed and redrawing, as notebook 04 does. Their redraws run on the
  kernel's event loop, which is also the run's controller, and every drawing
  goes to the front end as a widget message.

With ``--repeats R`` the two alternate R times (terminal, notebook, terminal,
...) and the medians are compared, so that a machine shared with other work
disturbs both alike. Target: notebook / terminal >= 0.9.

Writes the numbers to ``benchmarks/results/notebook_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "notebook_overhead.json"
SUMMARY = re.compile(r"GRPO: (\d+) steps in (\d+) s \(([\d.]+) steps/min\)")


def overrides(steps: int, output_dir: str) -> list[str]:
    return [f"steps={steps}", "eval_samples=0", "progress=false", f"output_dir={output_dir}"]


def terminal_run(steps: int) -> dict:
    """``python -m forge_lite.grpo`` in a child process; its steps/min from the summary line."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "forge_lite.grpo", "--config", str(CONFIG), *overrides(steps, out)],
            cwd=ROOT, capture_output=True, text=True,
        )
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the terminal run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = SUMMARY.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no summary line in the run's output:\n{done.stdout[-2000:]}")
    return {"steps_per_min": float(found.group(3)), "wall_s": wall}


# The notebook: notebook 04's cells, cut down to the run and its two dashboards.
CELLS = [
    """import json
import forge_lite
import ipywidgets
from forge_lite.grpo import GRPORun, MetricsRecorder, load_config
from forge_lite.widgets import ServiceDashboard, TrainingDashboard
config = load_config({config!r}, {overrides!r})""",
    """recorder = MetricsRecorder()
run = await GRPORun(config, recorder).start()""",
    """training = TrainingDashboard(recorder)
policy_view = ServiceDashboard(run.services.policy)
ipywidgets.VBox([training, policy_view])""",
    "result = await run.train()",
    """print("NUMBERS", json.dumps({{"steps_per_min": result.steps_per_min,
    "training_redraws": training.redraws, "training_busy_s": training._throttle.busy_s,
    "service_redraws": policy_view.redraws, "strip_redraws": policy_view._strip_throttle.runs,
    "strip_busy_s": policy_view._strip_throttle.busy_s, "cards_busy_s": policy_view._throttle.busy_s}}))
await run.shutdown()""",
]


def notebook_run(steps: int) -> dict:
    """The same run in a Jupyter kernel, both dashboards displayed; its numbers from the last cell."""
    import nbformat
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as out:
        cells = [c.format(config=str(CONFIG), overrides=overrides(steps, out)) for c in CELLS]
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
        started = time.perf_counter()
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
        wall = time.perf_counter() - started
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    numbers = json.loads(printed.split("NUMBERS", 1)[1].strip().splitlines()[0])
    return {**numbers, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--repeats", type=int, default=1, help="terminal/notebook pairs, alternating")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"terminal": [], "notebook": []}
    for repeat in range(args.repeats):
        for kind, run in (("terminal", terminal_run), ("notebook", notebook_run)):
            numbers = run(args.steps)
            runs[kind].append(numbers)
            print(f"{kind:9} run {repeat + 1}: {numbers['steps_per_min']:6.1f} steps/min "
                  f"({numbers['wall_s']:.0f} s in all)", flush=True)

    terminal = statistics.median(r["steps_per_min"] for r in runs["terminal"])
    notebook = statistics.median(r["steps_per_min"] for r in runs["notebook"])
    ratio = notebook / terminal
    last = runs["notebook"][-1]
    print()
    print(f"GRPO, {args.steps} steps, {os.cpu_count()} CPUs, median of {args.repeats}:")
    print(f"  terminal                      {terminal:6.1f} steps/min")
    print(f"  notebook, both dashboards     {notebook:6.1f} steps/min")
    print(f"  notebook / terminal           {ratio:6.2f}   (target >= 0.90)")
    # The share of the training's wall time the kernel spent drawing: a bound on
    # the slowdown that, unlike steps/min, other work on the machine hardly moves.
    busy = last["training_busy_s"] + last["cards_busy_s"] + last["strip_busy_s"]
    train_s = 60 * args.steps / last["steps_per_min"]
    print(f"  dashboard work in the kernel  training figure {last['training_redraws']} draws, "
          f"{last['training_busy_s']:.1f} s; service cards {last['service_redraws']} draws, "
          f"{last['cards_busy_s']:.1f} s; strip {last['strip_redraws']} draws, {last['strip_busy_s']:.1f} s")
    print(f"                                {busy:.1f} s of {train_s:.0f} s of training: {busy / train_s:.1%}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "runs": runs,
                                   "terminal_steps_per_min": terminal, "notebook_steps_per_min": notebook,
                                   "ratio": ratio, "dashboard_share": busy / train_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
