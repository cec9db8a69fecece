"""Every script in benchmarks/ runs, in a short mode, so that none can rot unnoticed.

Each test runs one benchmark as a learner would (``python benchmarks/X.py``,
a fresh process) with its smallest settings, and checks that it measured
something and wrote its result file. The numbers of so short a run mean
nothing; that the script still starts, measures and writes is the point.
Results go to a temporary folder (``FORGE_LITE_BENCH_RESULTS``), never over
the numbers of a real run in benchmarks/results/.

A new benchmark needs an entry in ``SHORT_RUNS`` (or, with a reason, in
``NOT_RUN``): ``test_every_benchmark_has_a_short_run`` fails otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.slow

#: benchmark -> (its short mode's arguments, the result file it writes, relative to the results folder)
SHORT_RUNS = {
    "grpo": (["steps=2", "eval_samples=0"], "grpo/numbers.json"),
    "grpo_step_bound": (["--rounds", "1"], "grpo_step_bound.json"),
    "grpo_vs_trl": (["--steps", "4", "--eval-every", "2"], "grpo_vs_trl.json"),
    "hosts": (["--warmup", "2", "--sequential", "10", "--rounds", "1", "--callers", "4",
               "--calls-per-caller", "2", "--throughput-rounds", "1", "--loss-callers", "4"], "hosts.json"),
    "loop_cpu": (["steps=3"], "loop_cpu.json"),
    "multiturn": (["--part", "cache", "--tasks", "retry", "steps=1"], "multiturn.json"),
    "notebook_overhead": (["--steps", "2"], "notebook_overhead.json"),
    "notebook_startup": (["02_services"], "notebook_startup.json"),
    "policy": (["--prompts", "4", "--max-tokens", "4", "--rounds", "1", "--conversations", "2", "--turns", "2"],
               "policy.json"),
    "services": (["--warmup", "2", "--sequential", "10", "--rounds", "1", "--callers", "4",
                  "--calls-per-caller", "2", "--throughput-rounds", "1", "--replicas", "1", "2",
                  "--scaling-callers", "4", "--scaling-seconds", "0.2", "--failover-repeats", "1"],
                 "services.json"),
    "train_step": (["--rounds", "1"], "train_step.json"),
    "weights": (["--models", "shipped", "--rounds", "1"], "weights.json"),
}

#: benchmarks without a short run here, and why
NOT_RUN = {
    "memory": "needs root and the cgroup v1 memory controller, and runs whole notebooks; "
              "tests/test_benchmarks_smoke.py leaves it to its own engineer's tests",
}


def test_every_benchmark_has_a_short_run():
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")}
    missing = sorted(scripts - set(SHORT_RUNS) - set(NOT_RUN))
    assert not missing, f"benchmarks without a short run in {Path(__file__).name}: {missing}"
    assert not sorted(set(SHORT_RUNS) - scripts), "SHORT_RUNS names a benchmark that is gone"


def checks(name: str, numbers: dict) -> None:
    """What each benchmark's result must hold: something measured."""
    if name == "grpo":
        assert numbers["steps"] == 2 and numbers["steps_per_min"] > 0
    elif name == "grpo_step_bound":
        assert numbers["pipelined_bound_steps_per_min"] > 0 and numbers["generate_tokens_per_s_1_thread"] > 0
    elif name == "grpo_vs_trl":
        assert sorted(run["side"] for run in numbers["runs"]) == ["forge_lite", "trl"]
        # Both sides evaluated before, every 2 steps (GRPORun's evaluate_every) and after.
        assert [[e["step"] for e in run["evals"]] for run in numbers["runs"]] == [[0, 2, 4]] * 2
    elif name == "hosts":
        assert numbers["overhead"] and numbers["losses"]
    elif name == "loop_cpu":
        run = numbers["runs"][0]
        assert run["steps"] == 3 and run["steps_per_min"] > 0 and run["groups_per_step"] > 0
        # Every process of the run was found and measured (grpo_tiny.yaml starts no reference model).
        assert {"controller", "policy", "rltrainer", "rewardactor", "light_actors"} <= set(run["cpu_s"])
        assert "referencemodel" not in run["cpu_s"]
        assert run["startup_cpu_s"]["policy"] > 0 and run["startup_cpu_s"]["light_actors"] > 0
        assert all(seconds > 0 for seconds in run["cpu_s"].values())
    elif name == "multiturn":
        assert set(numbers["cache"]["retry"]) == {"sessions", "round robin", "prefix router"}
        assert [mode["steps"] for mode in numbers["cache"]["retry"].values()] == [1, 1, 1]  # steps=1 obeyed
    elif name == "notebook_overhead":
        assert [len(numbers["runs"][kind]) for kind in ("terminal", "notebook")] == [1, 1]
    elif name == "notebook_startup":
        (row,) = numbers["notebooks"]
        assert row["notebook"] == "02_services" and row["service_cell"] is not None and row["startup_s"] > 0
    elif name == "policy":
        assert numbers["cache_reuse"]["transformers"]["sessions"]["cached_fraction"] > 0
        assert numbers["engines"]["transformers"]["tokens_per_s"] > 0
        if numbers["route_vs_direct"] is not None:  # vLLM installed
            assert all(row["tokens_per_s"] > 0 for row in numbers["route_vs_direct"].values())
    elif name == "services":
        assert numbers["overhead"] and numbers["scaling"] and numbers["failover"]
    elif name == "train_step":
        assert numbers["padded_s"] > 0 and numbers["dropped_s"] > 0
    elif name == "weights":
        assert [r["model"] for r in numbers["results"]] == ["shipped"]
        assert all(seconds > 0 for seconds in numbers["results"][0]["median_s"].values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_benchmark_runs_in_its_short_mode(name, tmp_path):
    arguments, result = SHORT_RUNS[name]
    env = {**os.environ, "FORGE_LITE_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=580,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    path = tmp_path / result
    assert path.exists(), f"{name} wrote no {result}; its output:\n{done.stdout[-2000:]}"
    checks(name, json.loads(path.read_text()))
