"""TrainingDashboard: a GRPO run as it happens.

Reward and accuracy per step, loss and KL, the policy-version timeline (the
trainer's version, each policy replica's version, and the age of every
sampled episode: how stale the data is that the trainer learns from), the
replay buffer's size and where each step's time went. It listens to a
``MetricsRecorder`` (``forge_lite.grpo.recorder``) and redraws at most twice a
second: a matplotlib figure costs ~0.1 s on a laptop core.
"""

from __future__ import annotations

import io

import ipywidgets as w

from widgets.throttle import Throttle

SPLIT_COLOURS = {"generate": "#1f77b4", "reward": "#ff7f0e", "reference": "#2ca02c",
                 "train": "#d62728", "sync": "#9467bd"}


class TrainingDashboard(w.VBox):
    def __init__(self, recorder, redraw_interval: float = 0.5):
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

        ax_reward.plot(steps, rec.series("reward_mean"), label="reward mean", color="#2e7d32")
        ax_reward.plot(steps, rec.series("accuracy"), label="accuracy", color="#1565c0")
        ax_reward.set_title("reward and accuracy per step")
        ax_reward.set_ylim(-0.05, 1.05)
        ax_reward.legend(loc="lower right", fontsize=8)

        ax_loss.plot(steps, rec.series("loss"), label="loss", color="#c62828")
        ax_kl = ax_loss.twinx()
        ax_kl.plot(steps, rec.series("kl"), label="KL", color="#6a1b9a")
        ax_loss.set_title("loss (left) and KL to the reference (right)")

        ax_version.plot(steps, rec.series("trainer_version"), label="trainer", color="black")
        for v in rec.versions:
            ax_version.scatter([v.step] * len(v.replica_versions), v.replica_versions,
                               marker="s", s=14, color="#ef6c00")
        for s in rec.steps:
            if s.episode_ages:
                ax_version.scatter([s.step] * len(s.episode_ages),
                                   [s.trainer_version - a for a in s.episode_ages],
                                   marker="_", s=40, color="#9e9e9e")
        ax_version.set_title("versions: trainer (line), replicas (■), sampled episodes (–)")
        ax_version.set_xlabel("step")

        bottom = [0.0] * len(steps)
        for part, colour in SPLIT_COLOURS.items():
            values = [s.time_split_s.get(part, 0.0) for s in rec.steps]
            ax_time.bar(steps, values, bottom=bottom, color=colour, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
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
