"""Runs compared side by side: a table of their numbers and their curves on one figure.

``compare(runs)`` takes GRPO runs, each a ``GRPOResult`` or the output folder
a run wrote (``metrics.jsonl``, ``config.yaml``, ``result.json``: see
``forge_lite.grpo.results.write_outputs``), and returns ``(table, figure)``:

- ``table``, a ``ComparisonTable``: one ``RunRow`` per run (final held-out
  accuracy, steps per minute, mean clip fraction, mean zero-std fraction),
  printed as text and shown as HTML in a notebook;
- ``figure``, a matplotlib ``Figure``: each run's reward (trailing mean) per
  step on the left, its held-out accuracy before and after on the right.

Runs from disk and runs still in memory mix: a learner compares last week's
folders with the run just finished.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from forge_lite.grpo.recorder import trailing_mean


@dataclass(frozen=True)
class RunRow:
    """One run's numbers. NaN where the run has none (no clip in SAPO's loss;
    no held-out evaluation; a folder written before ``result.json`` existed)."""

    label: str
    loss_type: str  # the config's loss.type ("?" when the folder has no config)
    steps: int  # steps recorded
    heldout_before: float  # held-out greedy accuracy before training, in [0, 1]
    heldout_after: float  # ... and after: the number to compare runs by
    steps_per_min: float  # training steps per minute of training (startup and evaluation left out)
    clip_fraction: float  # mean over steps of the share of ratios the clip changed
    zero_std_fraction: float  # mean over steps of the share of groups with all-equal rewards
    reward_mean: tuple[float, ...]  # the reward per step, for the figure


COLUMNS = (  # (RunRow field, header, format)
    ("label", "run", "{}"),
    ("loss_type", "loss", "{}"),
    ("steps", "steps", "{:d}"),
    ("heldout_before", "held-out before", "{:.3f}"),
    ("heldout_after", "held-out after", "{:.3f}"),
    ("steps_per_min", "steps/min", "{:.1f}"),
    ("clip_fraction", "clip fraction", "{:.3f}"),
    ("zero_std_fraction", "zero-std fraction", "{:.3f}"),
)


class ComparisonTable:
    """The rows of ``compare``, in the order the runs were given.

    ``table.rows`` is a list of ``RunRow``; ``table["dapo"]`` the row labelled
    "dapo"; ``print(table)`` a text table; in a notebook it shows as HTML.
    """

    def __init__(self, rows: list[RunRow]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, label: str) -> RunRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no run labelled {label!r}; the labels are {[r.label for r in self.rows]}")

    def cells(self) -> list[list[str]]:
        """The table as text: a header row, then one row per run."""

        def cell(value, fmt):
            if isinstance(value, float) and math.isnan(value):
                return "-"
            return fmt.format(value)

        return [[header for _, header, _ in COLUMNS]] + [
            [cell(getattr(row, name), fmt) for name, _, fmt in COLUMNS] for row in self.rows
        ]

    def __repr__(self) -> str:
        cells = self.cells()
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        # The label and the loss read left-aligned, the numbers right-aligned.
        lines = ["  ".join(text.ljust(w) if i < 2 else text.rjust(w)
                           for i, (text, w) in enumerate(zip(line, widths))).rstrip()
                 for line in cells]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        header, *body = self.cells()
        th = "".join(f"<th>{html.escape(text)}</th>" for text in header)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in line) + "</tr>" for line in body
        )
        return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


class Comparison(NamedTuple):
    table: ComparisonTable
    figure: object  # matplotlib.figure.Figure


def compare(runs, labels: list[str] | None = None, window: int = 10) -> Comparison:
    """Compare GRPO runs: ``table, figure = compare([...])``.

    ``runs``: a list of runs, each a ``GRPOResult`` or the path of a run's
    output folder (a str or ``os.PathLike``); or a dict ``{label: run}``.
    ``labels``: one per run (with a list); by default each run's folder name.
    ``window``: the width, in steps, of the reward's trailing mean.

    Raises ValueError for no runs, labels that do not match the runs or
    repeat, or a folder whose ``metrics.jsonl`` holds no step;
    FileNotFoundError for a folder without ``metrics.jsonl``; TypeError for a
    run of another type.
    """
    if isinstance(runs, dict):
        if labels is not None:
            raise ValueError("compare: give labels as the dict's keys or as labels=, not both")
        labels, runs = [str(label) for label in runs], list(runs.values())
    else:
        runs = list(runs)
    if not runs:
        raise ValueError("compare: no runs to compare")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"compare: {len(labels)} labels for {len(runs)} runs")
    rows = [load_row(run, None if labels is None else labels[i]) for i, run in enumerate(runs)]
    names = [row.label for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: two runs share a label ({names}); pass labels=[...]")
    table = ComparisonTable(rows)
    return Comparison(table, plot_comparison(table, window))


def load_row(run, label: str | None = None) -> RunRow:
    """One run's ``RunRow``, from a ``GRPOResult`` or from its output folder."""
    from forge_lite.grpo.results import GRPOResult, result_numbers

    if isinstance(run, GRPOResult):
        steps = [record.as_dict() for record in run.recorder.steps]
        numbers = result_numbers(run)
        loss_type = run.config.loss.type
        folder = Path(run.output_dir)
    elif isinstance(run, (str, os.PathLike)):
        folder = Path(run)
        steps, numbers, loss_type = read_folder(folder)
    else:
        raise TypeError(f"compare: a run is a GRPOResult or a run's output folder, got {type(run).__name__}")
    if not steps:
        raise ValueError(f"compare: {folder} recorded no training step")

    def number(name):
        value = numbers.get(name)
        return float("nan") if value is None else float(value)

    def mean(name):  # over the steps that have a value (NaN: nothing to count that step)
        values = [s[name] for s in steps if s.get(name) is not None and not math.isnan(s[name])]
        return sum(values) / len(values) if values else float("nan")

    steps_per_min = number("steps_per_min")
    if math.isnan(steps_per_min):  # a folder without result.json: the steps' own times
        seconds = sum(s["step_time_s"] for s in steps)
        steps_per_min = 60 * len(steps) / seconds if seconds > 0 else float("nan")
    return RunRow(
        label=label if label is not None else folder.name,
        loss_type=loss_type,
        steps=len(steps),
        heldout_before=number("eval_accuracy_before"),
        heldout_after=number("eval_accuracy_after"),
        steps_per_min=steps_per_min,
        clip_fraction=mean("clip_fraction"),
        zero_std_fraction=mean("zero_std_fraction"),
        reward_mean=tuple(s["reward_mean"] for s in steps),
    )


def read_folder(folder: Path) -> tuple[list[dict], dict, str]:
    """A run folder's steps (``metrics.jsonl``), its ``result.json`` (``{}``
    when absent) and its loss type (``"?"`` without ``config.yaml``)."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"compare: {folder} holds no metrics.jsonl; is it a GRPO run's output_dir?")
    with open(metrics) as lines:
        steps = [json.loads(line) for line in lines if line.strip()]
    result = folder / "result.json"
    numbers = json.loads(result.read_text()) if result.is_file() else {}
    config = folder / "config.yaml"
    loss_type = "?"
    if config.is_file():
        loss_type = ((yaml.safe_load(config.read_text()) or {}).get("loss") or {}).get("type", "grpo")
    return steps, numbers, loss_type


def plot_comparison(table: ComparisonTable, window: int = 10):
    """The runs' reward (trailing mean of ``window`` steps) against the step,
    and their held-out accuracy before and after, one colour per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    rewards, heldout = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for i, row in enumerate(table.rows):
        colour = f"C{i % 10}"
        rewards.plot(range(len(row.reward_mean)), trailing_mean(list(row.reward_mean), window),
                     color=colour, linewidth=2, label=row.label)
        if not (math.isnan(row.heldout_before) or math.isnan(row.heldout_after)):
            # Before at x=0, after at x=1: a slope per run, steeper is better.
            heldout.plot([0, 1], [row.heldout_before, row.heldout_after], color=colour,
                         marker="o", linewidth=2, label=f"{row.label} ({row.heldout_after:.2f})")
        elif not math.isnan(row.heldout_after):
            heldout.plot([1], [row.heldout_after], color=colour, marker="o", label=row.label)
    rewards.set_xlabel("training step")
    rewards.set_ylabel(f"reward mean ({window}-step trailing mean)")
    rewards.set_title("sampled reward while training")
    rewards.legend(fontsize=8)
    rewards.grid(alpha=0.3)
    heldout.set_xticks([0, 1], ["before", "after"])
    heldout.set_xlim(-0.2, 1.2)
    heldout.set_ylabel("held-out greedy accuracy")
    heldout.set_title("held-out accuracy")
    if heldout.lines:
        heldout.legend(fontsize=8)
    heldout.grid(alpha=0.3)
    fig.tight_layout()
    return fig
