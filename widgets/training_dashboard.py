"""TrainingDashboard: a GRPO run as it happens.

Reward and accuracy per step, loss and KL, staleness (how many weight versions
old the sampled episodes are, and how far the policy replicas lag behind the
trainer after a sync), the replay buffer's size and where each step's time went. It listens to a
``MetricsRecorder`` (``forge_lite.grpo.recorder``) and redraws at most every two
seconds: a matplotlib figure costs ~0.1-0.2 s on a laptop core, taken from the
event loop that also runs the training's controller.
"""

from __future__ import annotations

import io

import ipywidgets as w

from forge_lite.grpo.recorder import trailing_mean
from widgets.throttle import Throttle

SPLIT_COLOURS = {"generate": "#1f77b4", "reward": "#ff7f0e", "reference": "#2ca02c",
                 "train": "#d62728", "sync": "#9467bd"}


class TrainingDashboard(w.VBox):
    def __init__(self, recorder, redraw_interval: float = 2.0):
        self.recorder = recorder
        self._header = w.HTML()
        self._plot = w.Image(format="png", layout=w.Layout(max_width="900px"))
        super().__init__([self._header, self._plot])
        self._throttle = Throttle(self._redraw, redraw_interval)
        self._unsubscribe = recorder.subscribe(lambda record: self._throttle(), replay=False)
        self._redraw()

    @property
    def redraws(self) -> int:
        return self._throttle.runs

    def detach(self) -> None:
        self._unsubscribe()
        self._throttle.cancel()

    def _redraw(self) -> None:
        steps = self.recorder.steps
        if steps:
            last = steps[-1]
            self._header.value = (
                f"<b>GRPO</b> step {last.step}: reward {last.reward_mean:.3f}, "
                f"accuracy {last.accuracy:.0%}, loss {last.loss:.4f}, KL {last.kl:.4f}, "
                f"buffer {last.buffer_size}, {last.tokens_per_s:.0f} tokens/s"
            )
        else:
            self._header.value = "<b>GRPO</b>: waiting for the first step"
        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72)
        self._plot.value = buffer.getvalue()

    def figure(self):
        """The whole dashboard as one matplotlib figure."""
        from matplotlib.figure import Figure

        rec = self.recorder
        fig = Figure(figsize=(11, 6.5))
        (ax_reward, ax_loss), (ax_version, ax_time) = fig.subplots(2, 2)
        steps = rec.series("step")

        # A step sees a couple of prompts, some easy, some hard: the raw series
        # is noise around the trend, so the 10-step mean is drawn on top.
        for name, label, colour in (("reward_mean", "reward mean", "#2e7d32"),
                                    ("accuracy", "accuracy", "#1565c0")):
            values = rec.series(name)
            ax_reward.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax_reward.plot(steps, trailing_mean(values, 10), color=colour, linewidth=2,
                           label=f"{label} (10-step mean)")
        ax_reward.set_title("reward and accuracy per step")
        ax_reward.set_ylim(-0.05, 1.05)
        ax_reward.legend(loc="lower right", fontsize=8)

        ax_loss.plot(steps, rec.series("loss"), label="loss", color="#c62828")
        ax_kl = ax_loss.twinx()
        ax_kl.plot(steps, rec.series("kl"), label="KL", color="#6a1b9a")
        ax_loss.set_title("loss (left) and KL to the reference (right)")

        # Staleness in versions, which stays readable at step 500 where the
        # versions themselves would climb off a shared axis.
        with_ages = [s for s in rec.steps if s.episode_ages]
        ax_version.plot([s.step for s in with_ages],
                        [sum(s.episode_ages) / len(s.episode_ages) for s in with_ages],
                        color="#616161", label="episode age, mean")
        ax_version.plot([s.step for s in with_ages], [max(s.episode_ages) for s in with_ages],
                        color="#9e9e9e", linestyle="--", label="episode age, max")
        lags = [(v.step, v.trainer_version - min(v.replica_versions)) for v in rec.versions
                if v.replica_versions]
        if lags:
            xs, ys = zip(*lags)  # one scatter for all: one artist per step costs seconds at step 500
            ax_version.scatter(xs, ys, marker="s", s=14, color="#ef6c00", label="replica lag after sync")
        ax_version.set_title("staleness, in weight versions")
        ax_version.set_xlabel("step")
        if steps:
            ax_version.legend(loc="upper left", fontsize=7)

        if steps:
            parts = [[s.time_split_s.get(part, 0.0) for s in rec.steps] for part in SPLIT_COLOURS]
            ax_time.stackplot(steps, parts, colors=list(SPLIT_COLOURS.values()),
                              labels=list(SPLIT_COLOURS), step="mid")
        ax_buffer = ax_time.twinx()
        ax_buffer.plot(steps, rec.series("buffer_size"), color="black", linewidth=1)
        ax_time.set_title("seconds per step by phase; buffer size (line)")
        ax_time.set_xlabel("step")
        if steps:
            ax_time.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        return fig

    snapshot = figure

    def __repr__(self) -> str:
        return "TrainingDashboard(GRPO run)"
