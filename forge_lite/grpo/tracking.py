"""A run's metrics in TensorBoard, the offline experiment tracker learners already use.

With ``tracking: tensorboard`` in the config, the run subscribes
``TensorBoardTracker`` to its recorder: every step's numbers become scalars
in ``<output_dir>/tensorboard/`` (event files, written locally; nothing
reaches the network). Open the dashboard with ``tensorboard --logdir
<output_dir>/..`` from a terminal, or in JupyterLab with ``%load_ext
tensorboard`` then ``%tensorboard --logdir runs``: one line per run folder.

TensorBoard is an optional extra: ``pip install -e '.[tracking]'``.
"""

from __future__ import annotations

from pathlib import Path

from forge_lite.grpo.recorder import RunStatus, StepRecord

TRACKERS = ("none", "tensorboard")

# StepRecord fields written as scalars each step, under these tags.
STEP_SCALARS = {
    "reward_mean": "reward/mean", "accuracy": "reward/sampled_accuracy",
    "loss": "train/loss", "kl": "train/kl", "clip_fraction": "train/clip_fraction",
    "zero_std_fraction": "reward/zero_std_fraction", "tokens_per_s": "speed/rollout_tokens_per_s",
    "step_time_s": "speed/step_time_s",
}


class TensorBoardTracker:
    """A recorder listener that writes each StepRecord's numbers (and the
    held-out accuracy when the run's status carries it) to ``log_dir``.

    Raises ImportError naming the extra when TensorBoard is not installed.
    ``close()`` flushes and closes the event file.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises this when tensorboard is missing
            raise ImportError(
                "tracking: tensorboard needs the tensorboard package: pip install -e '.[tracking]'"
            ) from error
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._last_step = 0
        self._wrote_before = False

    def __call__(self, record) -> None:
        if isinstance(record, StepRecord):
            self._last_step = record.step
            for name, tag in STEP_SCALARS.items():
                value = getattr(record, name)
                if value == value:  # NaN (no clip in SAPO; no group scored) is left out
                    self._writer.add_scalar(tag, value, record.step)
            if record.episode_ages:
                ages = record.episode_ages
                self._writer.add_scalar("staleness/mean_episode_age", sum(ages) / len(ages), record.step)
        elif isinstance(record, RunStatus):
            # Each once: before training at step 0, after it past the last step.
            if record.heldout_before is not None and not self._wrote_before:
                self._wrote_before = True
                self._writer.add_scalar("heldout/greedy_accuracy", record.heldout_before, 0)
            if record.heldout_after is not None and record.state == "finished":
                self._writer.add_scalar("heldout/greedy_accuracy", record.heldout_after, self._last_step + 1)
            if record.state in ("finished", "interrupted"):
                self._writer.flush()  # readable now, before the run shuts down

    def close(self) -> None:
        self._writer.close()
