"""Where the CPU of a GRPO run goes: CPU seconds per process while it trains
(and while it starts).

    python benchmarks/loop_cpu.py                    # configs/grpo_tiny.yaml, 150 steps, about 1 min on 2 cores
    python benchmarks/loop_cpu.py --runs 2 steps=300

Starts ``configs/grpo_tiny.yaml`` (``eval_samples=0``, with any
``key=value`` overrides), then reads each of the run's processes' CPU
seconds (user + system, ``psutil``) just before training and just after,
and prints the difference per process, per training step and as a share of
the whole: the controller (this process, which runs the loop's coroutines),
the policy, the trainer, the reference model (if the config starts one:
``configs/grpo_tiny.yaml`` does not), the reward service, the weight
server if any, and the shared process of light actors (the dataset, the
replay buffer and the advantage computation live there together: see
``ForgeActor.shares_process``). Every process the kit spawned is found in
``forge_lite.controller.procs``, named by its mesh.

The CPU each process took to start (``GRPORun.start()``: imports, model
loading, setup) is printed alongside: on 2 cores the start-up's wall time
is about their sum over 2.

On 2 cores everything competes for the same CPU: CPU spent outside the
policy and the trainer is CPU they do not get. The machine's load average
and the CPU time other processes took meanwhile are printed too, so a run
on a busy machine says so.

Writes ``benchmarks/results/loop_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import psutil

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.assets import MATH_DATA_DIR
from forge_lite.controller import procs as _procs
from forge_lite.grpo.config import load_config
from forge_lite.grpo.run import GRPORun

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results")

# What lives in each process, by its mesh's name (a service's replica i is "<name>_r<i>").
WHAT = {_procs.SHARED_NAME: "dataset + replay buffer + advantages"}


def process_name(mesh_name: str) -> str:
    """``policy0_r0`` -> ``policy``: a service's name ends in its number, a
    replica's mesh adds ``_r<i>`` (one replica each in the tiny config)."""
    head, _, tail = mesh_name.rpartition("_r")
    name = head if head and tail.isdigit() else mesh_name
    return name.rstrip("0123456789") or name


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and of every
    process the kit spawned, by name; a name with several processes sums them."""
    seconds = {"controller": sum(psutil.Process().cpu_times()[:2])}
    for procs in list(_procs._live):
        for pid in procs.pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:  # gone meanwhile
                continue
            name = process_name(procs.name)
            seconds[name] = seconds.get(name, 0.0) + times.user + times.system
    return seconds


def machine_busy_s() -> float:
    """CPU seconds every process of the machine has spent busy so far."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)


async def prompts_served(run: GRPORun, config) -> int:
    """How many prompts the run's dataset actor has served (one per group)."""
    state = await run.services.dataloader.state_dict.call_one()
    split = Path(MATH_DATA_DIR) / f"{config.data.train_split}.jsonl"
    rows = sum(1 for line in split.open() if line.strip()) if config.data.path is None else 0
    return state["epoch"] * rows + state["position"]


async def one_run(overrides: list[str], index: int) -> dict:
    """One run's CPU per process while it trains, and its steps/min."""
    config = load_config(CONFIG, [f"output_dir={RESULTS / 'loop_cpu' / f'run{index}'}", "eval_samples=0", *overrides])
    spawned_before = cpu_by_process()
    run = await GRPORun(config).start()
    try:
        startup_cpu = {name: s - spawned_before.get(name, 0.0) for name, s in cpu_by_process().items()}
        served_before = await prompts_served(run, config)
        load_before = os.getloadavg()[0]
        before, busy_before, began = cpu_by_process(), machine_busy_s(), time.perf_counter()
        result = await run.train(on_interrupt="raise")
        after, busy_after, wall = cpu_by_process(), machine_busy_s(), time.perf_counter() - began
        served = await prompts_served(run, config) - served_before
    finally:
        await run.shutdown()
    steps = len(result.recorder.steps)
    skipped = sum(s.skipped_groups for s in result.recorder.steps)
    cpu = {name: after[name] - before.get(name, 0.0) for name in after}
    ours = sum(cpu.values())
    return {
        "steps": steps,
        "startup_s": result.startup_s,
        "train_s": result.train_s,
        "steps_per_min": result.steps_per_min,
        "rollout_tokens_per_s": result.rollout_tokens_per_s,
        "time_split_s": result.mean_time_split(),
        # Groups the rollouts started, and left out (equal rewards), per step;
        # a step trains on batch_size / group_size groups, the rest were
        # skipped, dropped as stale by the buffer, or still in flight at the end.
        "groups_per_step": served / steps,
        "skipped_groups_per_step": skipped / steps,
        "groups_per_batch": config.batch_size // config.group_size,
        "cpu_s": dict(sorted(cpu.items(), key=lambda item: -item[1])),
        "startup_cpu_s": startup_cpu,
        "cpu_s_total": ours,
        # Busy CPU seconds of the machine not spent by this run (other users, the OS).
        "others_cpu_s": max(0.0, busy_after - busy_before - ours),
        "wall_s": wall,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
    }


def report(run: dict) -> None:
    """One run's table: CPU seconds, per step, and share, per process."""
    steps, total = run["steps"], run["cpu_s_total"]
    print(f"\n{steps} steps in {run['train_s']:.1f} s: {run['steps_per_min']:.1f} steps/min, "
          f"rollout {run['rollout_tokens_per_s']:.0f} tokens/s, start-up {run['startup_s']:.1f} s; "
          f"load {run['load_1min_before']:.2f} -> {run['load_1min_after']:.2f}")
    startup = run["startup_cpu_s"]
    print(f"{'process':<16} {'CPU s':>7} {'ms/step':>8} {'share':>6} {'start-up CPU s':>15}")
    for name, seconds in run["cpu_s"].items():
        what = f"  ({WHAT[name]})" if name in WHAT else ""
        print(f"{name:<16} {seconds:7.1f} {1000 * seconds / steps:8.0f} {seconds / total:6.0%} "
              f"{startup.get(name, 0.0):15.2f}{what}")
    print(f"{'all':<16} {total:7.1f} {1000 * total / steps:8.0f}   of {os.cpu_count()} x {run['wall_s']:.1f} s wall; "
          f"other processes {run['others_cpu_s']:.1f} CPU s; start-up {sum(startup.values()):.2f} CPU s")
    print(f"groups per step: {run['groups_per_step']:.2f} started, "
          f"{run['skipped_groups_per_step']:.2f} skipped (equal rewards); a step trains on {run['groups_per_batch']}")
    split = ", ".join(f"{phase} {s:.3f}" for phase, s in run["time_split_s"].items())
    print(f"phase split (s/step): {split}")


async def main(runs: int, overrides: list[str]) -> None:
    numbers = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": CONFIG.name,
               "overrides": overrides, "runs": []}
    for index in range(runs):
        run = await one_run(overrides, index)
        report(run)
        numbers["runs"].append(run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loop_cpu.json").write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs, one after the other (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the config (default steps=150)")
    args = parser.parse_args()
    overrides = args.overrides if any(o.startswith("steps=") for o in args.overrides) else ["steps=150", *args.overrides]
    asyncio.run(main(args.runs, overrides))
