"""TrainingDashboard: a GRPO run as it happens.

A header says where the run is (step N of the total, the time left, the
held-out accuracy before and after training: the run's verdict) and what the
last step measured. Below it, four panels that share the step axis:

1. is it learning: the share of sampled answers that were right, against the
   held-out accuracy before (and after) training;
2. how far the policy moved: the KL to the reference model, and the loss;
3. staleness: how many weight versions old the episodes the trainer learned from were;
4. where each step's time went, by phase.

Per-step values are noise around a trend (a step sees a handful of problems,
some easy, some hard), so every panel draws trailing means; the legends sit
outside the axes, never on the data; a series that says nothing (a lag that
is always 0, a reward equal to the accuracy) is not drawn but named.

It listens to a ``MetricsRecorder`` (``forge_lite.grpo.recorder``). Drawing a
figure costs a tenth of a second or more, taken from the kernel's event loop,
which is also the training's controller: the figure redraws at most every
``redraw_interval`` seconds and takes at most ``max_share`` of the loop's time
(see ``widgets/throttle.py``); the header, which is cheap, follows every step.
"""

from __future__ import annotations

import html
import io
import math

import ipywidgets as w

from forge_lite.grpo.recorder import PHASES, RunStatus, StepRecord, trailing_mean
from .throttle import Throttle

PHASE_COLOURS = {"generate": "#1f77b4", "reward": "#ff7f0e", "reference": "#2ca02c",
                 "train": "#d62728", "sync": "#9467bd"}
SAME_WITHIN = 0.02  # two trend lines closer than this everywhere are drawn as one
TREND = 10  # steps in a trailing mean
FONT = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}


def number(value: float, spec: str) -> str:
    """``format(value, spec)``, but never a negative zero: a loss of -0.00001
    shown as "-0.0000" reads as a sign that means something."""
    text = format(value, spec)
    if text.startswith("-") and float(text) == 0:
        return text[1:]
    return text


def duration(seconds: float) -> str:
    """"45 s", "3 min 20 s", "1 h 05 min": how long a person waits."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def seconds_left(steps: list[StepRecord], total: int | None, window: int = 20) -> float | None:
    """Time to the last step at the pace of the last ``window`` steps (None
    until two steps are known)."""
    if total is None or len(steps) < 2:
        return None
    recent = steps[-window:]
    per_step = (recent[-1].time - recent[0].time) / (len(recent) - 1)
    return per_step * max(0, total - (steps[-1].step + 1))


def coincide(a: list[float], b: list[float], within: float = SAME_WITHIN) -> bool:
    """True if the trend lines of two series never differ by more than ``within``."""
    return len(a) == len(b) and all(
        abs(x - y) <= within for x, y in zip(trailing_mean(a, TREND), trailing_mean(b, TREND))
    )


class TrainingDashboard(w.VBox):
    """A live view of a GRPO run: a header and four panels (see the module docstring).

    ``recorder``: the run's ``MetricsRecorder`` (``run.recorder``); the
    dashboard follows what it records from now on and draws what it already
    holds. ``redraw_interval``: seconds between figure redraws at most;
    ``max_share``: the largest share of the kernel's event loop the figure
    may take (0.02: 2 %). ``detach()`` stops following; ``header_text()``
    is the header as plain text.

    Example: ``display(TrainingDashboard(run.recorder))`` before ``await run.train()``.
    """

    def __init__(self, recorder, redraw_interval: float = 2.0, max_share: float = 0.02):
        self.recorder = recorder
        self._header = w.HTML()
        self._plot = w.Image(format="png", layout=w.Layout(max_width="780px"))
        super().__init__([self._header, self._plot])
        self._header_throttle = Throttle(self._redraw_header, 0.5)
        self._throttle = Throttle(self._redraw_plot, redraw_interval, max_share)
        self._drawn = None  # what the figure showed when last drawn: skip a redraw that changes nothing
        self._unsubscribe = recorder.subscribe(self._on_record, replay=False)
        self._redraw()

    @property
    def redraws(self) -> int:
        return self._throttle.runs

    def detach(self) -> None:
        """Stop following the recorder (the last drawing stays)."""
        self._unsubscribe()
        self._header_throttle.cancel()
        self._throttle.cancel()
        self._redraw()

    def _on_record(self, record) -> None:
        if isinstance(record, RunStatus) and record.state in ("finished", "interrupted"):
            # The picture a learner will look at longest: draw it now.
            self._header_throttle.flush()
            self._throttle.flush()
            return
        self._header_throttle()
        self._throttle()

    def _redraw(self) -> None:
        self._redraw_header()
        self._redraw_plot()

    # ------------------------------------------------------------ header

    def header_text(self) -> str:
        """The header as plain text (what the HTML says, for tests and logs)."""
        steps, status = self.recorder.steps, self.recorder.status
        total = status.total_steps
        done = steps[-1].step + 1 if steps else 0
        where = f"step {done}/{total}" if total else f"step {done}"
        if status.state == "interrupted":
            progress = (f"interrupted at {where}: `await run.train()` goes on, "
                        f"`await run.shutdown()` stops every process")
        elif status.state == "finished":
            progress = f"finished: {where}"
        elif status.state == "evaluating":
            progress = f"{where}, scoring the held-out problems {'after' if steps else 'before'} training"
        elif steps:
            left = seconds_left(steps, total)
            progress = where + ("" if left is None else f", about {duration(left)} left")
        else:
            progress = "waiting for the first step"
        lines = [f"GRPO: {progress}"]
        if status.weights is not None:
            # Which weight store the run chose (config `weights`): one host or across hosts.
            lines.append(f"weights: {status.weights}")
        if status.heldout_before is not None:
            after = ("after: measured when training ends" if status.heldout_after is None
                     else f"after {status.heldout_after:.3f}")
            lines.append(f"held-out accuracy (greedy): before {status.heldout_before:.3f}, {after}")
        if steps:
            last = steps[-1]
            lines.append(
                f"last step: reward {last.reward_mean:.3f}, sampled accuracy {last.accuracy:.0%}, "
                f"loss {number(last.loss, '.4f')}, KL {number(last.kl, '.4f')}, "
                f"buffer {last.buffer_size}, {last.tokens_per_s:.0f} tokens/s"
            )
            # How often the loss's clip fired (none under SAPO), and the groups
            # whose rewards were all equal: with every group so, the loss sits
            # at 0 while nothing is learnt (watch the reward, not the loss).
            clip = "" if math.isnan(last.clip_fraction) else f"clipped {last.clip_fraction:.1%} of the ratios, "
            if not math.isnan(last.zero_std_fraction):
                lines.append(f"{clip}{last.zero_std_fraction:.0%} of the groups got equal rewards (they teach nothing)")
            elif clip:
                lines.append(clip.rstrip(", "))
        return "\n".join(lines)

    def _redraw_header(self) -> None:
        status, steps = self.recorder.status, self.recorder.steps
        lines = [html.escape(line) for line in self.header_text().split("\n")]
        bar = ""
        if status.total_steps and status.state != "finished":
            done = steps[-1].step + 1 if steps else 0
            bar = f" <progress value='{done}' max='{status.total_steps}' style='width:160px'></progress>"
        lines[0] = f"<b>{lines[0]}</b>{bar}"
        self._header.value = (
            "<div class='fl-training-header' style='font-family:sans-serif;font-size:13px;line-height:1.5'>"
            + "<br>".join(lines) + "</div>"
        )

    # ------------------------------------------------------------ figure

    def _redraw_plot(self) -> None:
        rec = self.recorder
        drawn = (len(rec.steps), len(rec.versions), rec.status.heldout_before, rec.status.heldout_after)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72)
        self._plot.value = buffer.getvalue()

    def figure(self):
        """The four panels as one matplotlib figure."""
        import matplotlib
        from matplotlib.figure import Figure

        with matplotlib.rc_context(FONT):
            fig = Figure(figsize=(10.5, 7.6))
            axes = fig.subplots(4, 1, sharex=True)
            # Fixed margins (not tight_layout, which draws the figure twice):
            # the right quarter holds the legends.
            fig.subplots_adjust(left=0.08, right=0.72, top=0.96, bottom=0.07, hspace=0.4)
            self._draw_learning(axes[0])
            self._draw_drift(axes[1])
            self._draw_staleness(axes[2])
            self._draw_time(axes[3])
            axes[3].set_xlabel("training step")
        return fig

    snapshot = figure

    def _legend(self, ax, handles=None, x: float = 1.01) -> None:
        if handles is None:
            handles = ax.get_legend_handles_labels()[0]
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(x, 1.0), frameon=False,
                      borderaxespad=0)

    def _draw_learning(self, ax) -> None:
        rec = self.recorder
        steps, status = rec.series("step"), rec.status
        accuracy, reward = rec.series("accuracy"), rec.series("reward_mean")
        series = [("sampled accuracy", accuracy, "#1565c0")]
        if coincide(accuracy, reward):
            # With the math reward alone a right answer scores 1, a wrong one 0:
            # the two lines would lie on each other.
            series[0] = (f"sampled accuracy\n(reward mean: the same ±{SAME_WITHIN})", accuracy, "#1565c0")
        else:
            series.append(("reward mean", reward, "#2e7d32"))
        for label, values, colour in series:
            ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
            ax.plot(steps, trailing_mean(values, TREND), color=colour, linewidth=2, label=label)
        if status.heldout_before is not None:
            ax.axhline(status.heldout_before, color="#757575", linestyle=":", linewidth=1.5,
                       label=f"held-out before: {status.heldout_before:.3f}")
        if status.heldout_after is not None:
            ax.axhline(status.heldout_after, color="black", linestyle="--", linewidth=1.5,
                       label=f"held-out after: {status.heldout_after:.3f}")
        ax.set_ylim(0, 1)
        ax.set_ylabel("answers right")
        ax.set_title(f"Is it learning? Share of right answers ({TREND}-step mean; held-out: greedy)", loc="left")
        ax.grid(alpha=0.3)
        self._legend(ax)

    def _draw_drift(self, ax) -> None:
        rec = self.recorder
        steps = rec.series("step")
        width = 2 * TREND  # the loss jumps from step to step: a longer mean
        kl_line = ax.plot(steps, trailing_mean(rec.series("kl"), width), color="#6a1b9a", linewidth=2,
                          label="KL to the reference (left)")
        ax.set_ylabel("KL", color="#6a1b9a")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax_loss = ax.twinx()
        loss_line = ax_loss.plot(steps, trailing_mean(rec.series("loss"), width), color="#c62828",
                                 linewidth=1.2, label="loss (right)")
        ax_loss.axhline(0, color="#c62828", linewidth=0.5, alpha=0.5)
        ax_loss.set_ylabel("loss", color="#c62828")
        ax.set_title(f"How far has the policy moved from the start? ({width}-step means)", loc="left")
        # The legend clears the right-hand axis's labels.
        self._legend(ax, kl_line + loss_line, x=1.1)

    def _draw_staleness(self, ax) -> None:
        rec = self.recorder
        with_ages = [s for s in rec.steps if s.episode_ages]
        xs = [s.step for s in with_ages]
        mean_age = [sum(s.episode_ages) / len(s.episode_ages) for s in with_ages]
        ax.plot(xs, trailing_mean(mean_age, TREND), color="#424242", linewidth=2,
                label=f"mean age ({TREND}-step mean)")
        ax.plot(xs, [max(s.episode_ages) for s in with_ages], color="#9e9e9e", linewidth=0.8,
                drawstyle="steps-mid", label="oldest in the batch")
        lags = [(v.step, v.trainer_version - min(v.replica_versions)) for v in rec.versions
                if v.replica_versions]
        if any(lag for _, lag in lags):
            lag_x, lag_y = zip(*lags)  # one artist for all: one per step costs seconds at step 500
            ax.scatter(lag_x, lag_y, marker="s", s=10, color="#ef6c00", label="replica lag after sync")
        elif lags:
            # Nothing to draw, but worth saying: the sync leaves no replica behind.
            ax.plot([], [], " ", label="replica lag after a\nsync: always 0")
        top = max([max(s.episode_ages) for s in with_ages] + [1])
        ax.set_ylim(0, top + 0.5)
        ax.set_yticks(range(0, top + 1))
        ax.set_ylabel("versions old")
        ax.set_title("Staleness: how many weight versions old the batch's episodes were", loc="left")
        ax.grid(alpha=0.3)
        self._legend(ax)

    def _draw_time(self, ax) -> None:
        rec = self.recorder
        steps = rec.series("step")
        if steps:
            phases = [p for p in PHASES if any(p in s.time_split_s for s in rec.steps)]
            parts = [trailing_mean([s.time_split_s.get(p, 0.0) for s in rec.steps], TREND) for p in phases]
            ax.stackplot(steps, parts, colors=[PHASE_COLOURS[p] for p in phases], labels=phases, alpha=0.85)
        ax.set_ylabel("seconds")
        ax.set_title(f"Where a step's time went ({TREND}-step means; rollout phases summed over tasks)",
                     loc="left")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        self._legend(ax, handles[::-1])  # top of the stack first, as drawn

    def __repr__(self) -> str:
        return "TrainingDashboard(GRPO run)"
