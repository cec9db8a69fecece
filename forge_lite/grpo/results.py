"""What a GRPO run returns and writes: the result, its summary, the reward curve."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from forge_lite.grpo.config import GRPOConfig
from forge_lite.grpo.recorder import PHASES, MetricsRecorder, trailing_mean


@dataclass
class GRPOResult:
    """What ``run_grpo`` returns: the recorded steps, held-out accuracy, where files went."""

    config: GRPOConfig
    recorder: MetricsRecorder
    eval_accuracy_before: float | None
    eval_accuracy_after: float | None
    startup_s: float  # starting every service
    train_s: float  # from the first rollout to the last training step
    wall_s: float  # from start() to the end of the last evaluation
    output_dir: str
    curve_path: str = ""
    metrics_path: str = ""
    files: dict = field(default_factory=dict)
    # Steps taken in train_s: fewer than the recorder holds after a resume.
    steps_trained: int | None = None

    @property
    def steps_per_min(self) -> float:
        steps = len(self.recorder.steps) if self.steps_trained is None else self.steps_trained
        return 60 * steps / self.train_s

    @property
    def rollout_tokens_per_s(self) -> float:
        steps = self.recorder.steps
        return sum(s.tokens_per_s * s.step_time_s for s in steps) / sum(s.step_time_s for s in steps)

    def first_last(self, name: str, k: int = 10) -> tuple[float, float]:
        """Mean of a metric over the first ``k`` and the last ``k`` steps."""
        values = self.recorder.series(name)
        k = max(1, min(k, len(values) // 2 or 1))
        return sum(values[:k]) / k, sum(values[-k:]) / k

    def mean_time_split(self) -> dict[str, float]:
        """Mean seconds per step in each phase."""
        totals: dict[str, float] = defaultdict(float)
        for record in self.recorder.steps:
            for phase, seconds in record.time_split_s.items():
                totals[phase] += seconds
        return {phase: totals[phase] / len(self.recorder.steps) for phase in PHASES if phase in totals}

    def summary(self) -> str:
        steps = len(self.recorder.steps)
        k = max(1, min(10, steps // 2 or 1))
        trained = steps if self.steps_trained is None else self.steps_trained
        resumed = f" (steps {steps - trained} to {steps - 1}; resumed)" if trained < steps else ""
        lines = [
            f"GRPO: {trained} steps{resumed} in {self.train_s:.0f} s ({self.steps_per_min:.1f} steps/min), "
            f"services started in {self.startup_s:.0f} s, whole run {self.wall_s:.0f} s",
            f"{'':24}{'first ' + str(k):>10}{'last ' + str(k):>10}",
        ]
        for name, label, digits in (
            ("reward_mean", "reward mean", 3), ("accuracy", "sampled accuracy", 3),
            ("loss", "loss", 4), ("kl", "KL to the reference", 4),
            ("tokens_per_s", "rollout tokens/s", 0), ("step_time_s", "seconds/step", 2),
        ):
            # Rounded first, then + 0.0: a tiny negative mean would print as "-0.0000".
            first, last = (round(value, digits) + 0.0 for value in self.first_last(name, k))
            lines.append(f"{label:24}{first:10.{digits}f}{last:10.{digits}f}")
        ages = [a for s in self.recorder.steps for a in s.episode_ages]
        lines.append(f"{'episode age (versions)':24}{'mean ' + format(sum(ages) / len(ages), '.2f'):>20}"
                     f"  (1 = sampled by the weights the step started from)")
        if self.config.skip_uniform_groups:
            skipped = sum(s.skipped_groups for s in self.recorder.steps)
            lines.append(f"{'groups skipped':24}{skipped:>10}  (every response got the same reward)")
        split = self.mean_time_split()
        lines.append("mean seconds per step: " + ", ".join(f"{p} {v:.2f}" for p, v in split.items()))
        if self.eval_accuracy_before is not None:
            lines.append(
                f"held-out greedy accuracy ({self.config.eval_samples} problems): "
                f"{self.eval_accuracy_before:.3f} -> "
                + ("(interrupted)" if self.eval_accuracy_after is None else f"{self.eval_accuracy_after:.3f}")
            )
        lines.append(f"reward curve: {shown(self.curve_path)}")
        return "\n".join(lines)



def shown(path) -> str:
    """``path`` as a log line shows it: relative to the working directory
    when it is under it (a notebook's output then names no machine's folders)."""
    path = os.path.abspath(path)
    here = os.getcwd()
    return os.path.relpath(path, here) if path.startswith(here + os.sep) else path


def write_outputs(result: GRPOResult, output_dir: Path) -> None:
    """The config, one JSON line per step, the reward curve and the summary."""
    config_path = output_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
    metrics_path = output_dir / "metrics.jsonl"
    with open(metrics_path, "w") as out:
        for record in result.recorder.steps:
            out.write(json.dumps(record.as_dict()) + "\n")
    result.metrics_path = str(metrics_path)
    result.curve_path = str(output_dir / "reward_curve.png")
    plot_reward_curve(result, result.curve_path)
    summary_path = output_dir / "summary.txt"
    summary_path.write_text(result.summary() + "\n")
    # The run's numbers that are not per step, for forge_lite.grpo.compare
    # to read back from the folder (the summary is for people).
    result_path = output_dir / "result.json"
    result_path.write_text(json.dumps(result_numbers(result), indent=1) + "\n")
    result.files = {"config": str(config_path), "metrics": str(metrics_path),
                    "curve": result.curve_path, "summary": str(summary_path),
                    "result": str(result_path)}


def result_numbers(result: GRPOResult) -> dict:
    """What ``result.json`` holds: held-out accuracy before and after (None:
    not evaluated or interrupted), the seconds of each phase, steps trained."""
    steps = len(result.recorder.steps) if result.steps_trained is None else result.steps_trained
    return {
        "eval_accuracy_before": result.eval_accuracy_before,
        "eval_accuracy_after": result.eval_accuracy_after,
        "eval_samples": result.config.eval_samples,
        "startup_s": result.startup_s, "train_s": result.train_s, "wall_s": result.wall_s,
        "steps_trained": steps,
        "steps_per_min": result.steps_per_min if result.train_s > 0 else None,
    }


def plot_reward_curve(result: GRPOResult, path: str) -> None:
    """Reward mean and sampled accuracy per step with their 10-step means, and the
    held-out accuracy before and after."""
    from matplotlib.figure import Figure

    recorder = result.recorder
    steps = recorder.series("step")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    # Dashed accuracy: with the math reward alone the two curves coincide.
    for name, label, colour, style in (("reward_mean", "reward mean", "#2e7d32", "-"),
                                       ("accuracy", "sampled accuracy", "#1565c0", "--")):
        values = recorder.series(name)
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, trailing_mean(values, 10), color=colour, linewidth=2, linestyle=style,
                label=f"{label} (10-step mean)")
    if result.eval_accuracy_before is not None:
        ax.axhline(result.eval_accuracy_before, color="#757575", linestyle=":",
                   label=f"held-out greedy accuracy before ({result.eval_accuracy_before:.2f})")
    if result.eval_accuracy_after is not None:  # None: the run was interrupted
        ax.axhline(result.eval_accuracy_after, color="black", linestyle="--",
                   label=f"held-out greedy accuracy after ({result.eval_accuracy_after:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO on " + (result.config.model or "the shipped model"))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
