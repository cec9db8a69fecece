"""A whole GRPO run on the shipped model: how fast, and does it learn.

    python benchmarks/grpo.py                       # configs/grpo_tiny.yaml, about 8 min on 2 cores
    python benchmarks/grpo.py steps=20 trainer.lr=3e-4

Runs ``configs/grpo_tiny.yaml`` (with any ``key=value`` overrides) and prints
steps per minute, rollout tokens per second, where a step's time goes, the
mean reward of the first 10 steps against the last 10, and the held-out
greedy accuracy before and after training. The config's target, on this
project's 2-core machine: last-10 minus first-10 reward >= +0.2, and a
held-out accuracy that goes up.

Writes the reward curve and the numbers to ``benchmarks/results/grpo/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from pathlib import Path

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo.config import load_config
from forge_lite.grpo.recorder import PHASES
from forge_lite.grpo.run import run_grpo

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "grpo"


def report(result) -> dict:
    """The benchmark's numbers, printed as a table and returned for the JSON file."""
    reward_first, reward_last = result.first_last("reward_mean")
    accuracy_first, accuracy_last = result.first_last("accuracy")
    reward_first50, reward_last50 = result.first_last("reward_mean", 50)
    split = result.mean_time_split()
    numbers = {
        "steps": len(result.recorder.steps),
        "startup_s": result.startup_s,
        "train_s": result.train_s,
        "wall_s": result.wall_s,
        "steps_per_min": result.steps_per_min,
        "rollout_tokens_per_s": result.rollout_tokens_per_s,
        "mean_step_s": result.train_s / len(result.recorder.steps),
        "time_split_s": split,
        "reward_first10": reward_first,
        "reward_last10": reward_last,
        "reward_gain": reward_last - reward_first,
        "reward_first50": reward_first50,
        "reward_last50": reward_last50,
        "skipped_groups": sum(s.skipped_groups for s in result.recorder.steps),
        "sampled_accuracy_first10": accuracy_first,
        "sampled_accuracy_last10": accuracy_last,
        "heldout_accuracy_before": result.eval_accuracy_before,
        "heldout_accuracy_after": result.eval_accuracy_after,
        "curve": result.curve_path,
    }
    rows = [
        ("steps", f"{numbers['steps']}"),
        ("services started in", f"{numbers['startup_s']:.0f} s"),
        ("training wall time", f"{numbers['train_s']:.0f} s (whole run {numbers['wall_s']:.0f} s)"),
        ("steps/min", f"{numbers['steps_per_min']:.2f}"),
        ("rollout tokens/s", f"{numbers['rollout_tokens_per_s']:.0f}"),
        ("mean seconds per step", f"{numbers['mean_step_s']:.2f}"),
    ]
    rows += [(f"  {phase} (s/step, summed over tasks)", f"{split[phase]:.2f}") for phase in PHASES if phase in split]
    rows += [
        ("reward mean, first 10 -> last 10", f"{reward_first:.3f} -> {reward_last:.3f} ({reward_last - reward_first:+.3f})"),
        ("sampled accuracy, first 10 -> last 10", f"{accuracy_first:.3f} -> {accuracy_last:.3f}"),
        # Ten steps see about 50 problems, and problems differ in difficulty
        # more than that: 50-step means move much less from run to run.
        ("reward mean, first 50 -> last 50", f"{reward_first50:.3f} -> {reward_last50:.3f} ({reward_last50 - reward_first50:+.3f})"),
        ("groups skipped (equal rewards)", f"{numbers['skipped_groups']}"),
    ]
    if result.eval_accuracy_before is not None:
        rows.append((
            f"held-out greedy accuracy ({result.config.eval_samples})",
            f"{result.eval_accuracy_before:.3f} -> {result.eval_accuracy_after:.3f} "
            f"({result.eval_accuracy_after - result.eval_accuracy_before:+.3f})",
        ))
    rows.append(("reward curve", result.curve_path))
    width = max(len(label) for label, _ in rows)
    print()
    print(f"GRPO benchmark ({CONFIG.name}, {platform.machine()}, {os.cpu_count()} CPUs)")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return numbers


async def main(overrides: list[str]) -> None:
    config = load_config(CONFIG, [f"output_dir={RESULTS}", *overrides])
    result = await run_grpo(config)
    numbers = report(result)
    numbers["overrides"] = overrides
    (RESULTS / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the config")
    asyncio.run(main(parser.parse_args().overrides))
