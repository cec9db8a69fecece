"""Multi-turn GRPO with a calculator tool: what sessions save, and does it learn.

    python benchmarks/multiturn.py                    # both parts, about 30 min on 2 cores
    python benchmarks/multiturn.py --part cache       # sessions vs round robin vs prefix router
    python benchmarks/multiturn.py --part learning    # two whole runs of the config
    python benchmarks/multiturn.py --part cache steps=10   # overrides for every run
    python benchmarks/multiturn.py --part cache --tasks retry steps=1   # the smoke test's short run

Runs ``configs/grpo_tool_tiny.yaml`` (two policy replicas, the tool model).

**cache**: the same short training run three times, side by side: every
trajectory's turns in one policy session; no sessions with the round-robin
router; no sessions with the prefix router. From each run's
``trajectories.jsonl`` (``forge_lite.grpo.multiturn.cache_summary``), over
turns 2 and later: the share of prompt tokens served from the KV cache,
the share of the *reusable* tokens (the previous turn's KV, the most the
engine could reuse) that were, and the rollout time per trajectory. Twice:
the calculator with the tool model, and the retry environment with the
shipped model (see ``CACHE_TASKS`` for why both).
Target with sessions: >= 90% of the reusable tokens. A weight update
empties every replica's cache (its KV belongs to the old weights), so a
turn whose weights changed since the turn before has nothing reusable;
``weights_changed`` is their share, which no router can help.

**learning**: the config's whole run twice (problem orders 0 and 1): the
held-out success of the calculator task (200 problems, greedy), before and
after. Target: +0.2 or more in both, each run within 10 minutes.

Writes the numbers to ``benchmarks/results/multiturn.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo.config import load_config
from forge_lite.grpo.multiturn import cache_summary, outcome_summary, read_trajectories
from forge_lite.grpo.run import run_grpo

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_tool_tiny.yaml"
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "multiturn"

CACHE_MODES = {
    "sessions": ["env.sessions=true", "policy.router=round_robin"],
    "round robin": ["env.sessions=false", "policy.router=round_robin"],
    "prefix router": ["env.sessions=false", "policy.router=prefix"],
}
CACHE_STEPS = 15
# The calculator with the tool model, and the retry environment with the shipped
# model: a group's calculator trajectories often write the very same tool call,
# so a turn that round robin moves may find a sibling's identical conversation
# cached on the other replica; the retry trajectories' sampled answers differ.
CACHE_TASKS = {
    "calculator": [f"model={ROOT / 'forge_lite/assets/tool_model'}"],
    "retry": ["model=null", "env.name=retry", "env.response_len=160", "policy.max_tokens=32"],
}


async def cache_part(overrides: list[str], tasks: list[str]) -> dict:
    numbers = {}
    for task in tasks:
        task_settings = CACHE_TASKS[task]
        numbers[task] = {}
        for mode, settings in CACHE_MODES.items():
            out = RESULTS / f"cache-{task}-{mode.replace(' ', '-')}"
            config = load_config(CONFIG, [
                f"output_dir={out}", f"steps={CACHE_STEPS}", "eval_samples=0", *task_settings, *settings,
                *overrides,
            ])
            (out / "trajectories.jsonl").unlink(missing_ok=True)  # this run's only
            result = await run_grpo(config)
            trajectories = read_trajectories(out)
            times = [sum(t["generate_s"] + t["env_s"] for t in r["turns"]) for r in trajectories]
            numbers[task][mode] = {
                "steps": len(result.recorder.steps),
                **cache_summary(trajectories),
                "trajectories": len(trajectories),
                "rollout_s_per_trajectory": sum(times) / len(times),
                "steps_per_min": result.steps_per_min,
                **{f"sampled_{k}": v for k, v in outcome_summary(trajectories).items()},
            }
        base = numbers[task]["sessions"]["rollout_s_per_trajectory"]
        for values in numbers[task].values():
            values["time_vs_sessions"] = values["rollout_s_per_trajectory"] / base
    print()
    # The runs' step count: CACHE_STEPS unless an override (steps=N) changed it.
    print(f"KV cache over turns 2+ during multi-turn GRPO ({config.steps} steps each, 2 policy replicas, "
          f"{platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"{'':26} {'cached/prompt':>14} {'cached/reusable':>16} {'same replica':>13} {'moved, cached':>14} "
          f"{'weights changed':>16} {'s/trajectory':>13} {'vs sessions':>12}")
    for task, modes in numbers.items():
        for mode, n in modes.items():
            print(f"{task + ', ' + mode:26} {n['cached_share']:14.1%} {n['of_reusable']:16.1%} "
                  f"{n['same_replica']:13.1%} {n['moved_cached']:14.1%} {n['weights_changed']:16.1%} "
                  f"{n['rollout_s_per_trajectory']:13.3f} {n['time_vs_sessions']:11.2f}x")
    return numbers


async def learning_part(overrides: list[str]) -> dict:
    runs = {}
    for seed in (0, 1):
        out = RESULTS / f"learning-{seed}"
        config = load_config(CONFIG, [
            f"model={ROOT / 'forge_lite/assets/tool_model'}", f"output_dir={out}", f"env.seed={seed}",
            *overrides,
        ])
        (out / "trajectories.jsonl").unlink(missing_ok=True)
        began = time.perf_counter()
        result = await run_grpo(config)
        first, last = result.first_last("accuracy")
        runs[f"seed {seed}"] = {
            "heldout_before": result.eval_accuracy_before,
            "heldout_after": result.eval_accuracy_after,
            "gain": result.eval_accuracy_after - result.eval_accuracy_before,
            "sampled_success_first10": first,
            "sampled_success_last10": last,
            "train_s": result.train_s,
            "wall_s": time.perf_counter() - began,
            "steps": len(result.recorder.steps),
            "truncated": outcome_summary(read_trajectories(out))["truncated"],
        }
    print()
    print(f"Held-out calculator success (greedy, {config.eval_samples} problems), {config.steps} steps")
    for name, n in runs.items():
        print(f"{name}: {n['heldout_before']:.3f} -> {n['heldout_after']:.3f} ({n['gain']:+.3f}); sampled "
              f"{n['sampled_success_first10']:.2f} -> {n['sampled_success_last10']:.2f}; "
              f"{n['wall_s'] / 60:.1f} min in all ({n['train_s'] / 60:.1f} training)")
    return runs


async def main(part: str, overrides: list[str], tasks: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS.parent / "multiturn.json"
    numbers = json.loads(path.read_text()) if path.exists() else {}
    if part in ("cache", "all"):
        numbers["cache"] = await cache_part(overrides, tasks)
    if part in ("learning", "all"):
        numbers["learning"] = await learning_part(overrides)
    numbers["overrides"] = overrides
    path.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["cache", "learning", "all"], default="all")
    parser.add_argument("--tasks", default=",".join(CACHE_TASKS),
                        help=f"the cache part's tasks, comma-separated (default: {','.join(CACHE_TASKS)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the config")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if unknown := sorted(set(tasks) - set(CACHE_TASKS)):
        parser.error(f"unknown task(s) {unknown}; known: {list(CACHE_TASKS)}")
    asyncio.run(main(args.part, args.overrides, tasks))
