"""tracking: tensorboard writes a run's metrics as TensorBoard event files; tracking: none writes none."""

from __future__ import annotations

import asyncio
import os

import pytest

from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.recorder import MetricsRecorder

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
pytest.importorskip("tensorboard")  # the optional extra: pip install -e '.[tracking,dev]'


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``log_dir``'s event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(folder) -> list:
    return [p for p in folder.rglob("*") if "tfevents" in p.name]


def test_the_tracker_writes_each_step_and_the_heldout_accuracy(tmp_path):
    from forge_lite.grpo.tracking import TensorBoardTracker

    recorder = MetricsRecorder()
    tracker = TensorBoardTracker(tmp_path)
    recorder.subscribe(tracker)
    recorder.record_status(state="training", heldout_before=0.5)
    for step, reward in enumerate((0.25, 0.75)):
        recorder.record_step(step=step, reward_mean=reward, accuracy=reward, loss=0.0, kl=0.0,
                             trainer_version=step + 1, episode_ages=(1, 2), buffer_size=8,
                             tokens_per_s=100.0, step_time_s=0.5, clip_fraction=float("nan"),
                             zero_std_fraction=0.25)
    recorder.record_status(state="evaluating")  # carries heldout_before again: written once only
    recorder.record_status(state="finished", heldout_after=0.625)
    tracker.close()

    scalars = read_scalars(tmp_path)
    assert scalars["reward/mean"] == [(0, 0.25), (1, 0.75)]
    assert scalars["reward/zero_std_fraction"] == [(0, 0.25), (1, 0.25)]
    assert scalars["staleness/mean_episode_age"] == [(0, 1.5), (1, 1.5)]
    assert scalars["heldout/greedy_accuracy"] == [(0, 0.5), (2, 0.625)]
    assert "train/clip_fraction" not in scalars  # NaN (a loss without a clip): left out, not plotted as 0


def test_the_config_takes_none_or_tensorboard():
    assert GRPOConfig().tracking == "none"
    assert load_config(None, ["tracking=tensorboard"]).tracking == "tensorboard"
    with pytest.raises(ValueError, match="tracking must be 'none' or 'tensorboard', got 'wandb'"):
        GRPOConfig.from_dict({"tracking": "wandb"})


@pytest.mark.slow
async def test_a_run_with_tracking_writes_event_files_and_one_without_writes_none(tmp_path):
    from forge_lite.grpo.run import run_grpo

    runs = {}
    for tracking in ("tensorboard", "none"):
        config = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"), [
            "steps=2", "eval_samples=4", "progress=false", f"tracking={tracking}", f"output_dir={tmp_path / tracking}",
        ])
        runs[tracking] = await asyncio.wait_for(run_grpo(config), timeout=300)

    tracked = runs["tensorboard"]
    scalars = read_scalars(tmp_path / "tensorboard" / "tensorboard")
    assert [step for step, _ in scalars["reward/mean"]] == [0, 1]
    assert [value for _, value in scalars["reward/mean"]] == pytest.approx(tracked.recorder.series("reward_mean"))
    assert [value for _, value in scalars["heldout/greedy_accuracy"]] == pytest.approx(
        [tracked.eval_accuracy_before, tracked.eval_accuracy_after])
    assert event_files(tmp_path / "none") == []
    assert not (tmp_path / "none" / "tensorboard").exists()
