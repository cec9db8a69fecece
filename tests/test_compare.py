"""forge_lite.grpo.compare on runs built by hand: written to folders by the
run's own writer (write_outputs), a folder without result.json, and results in memory."""

from __future__ import annotations

import json
import math

import pytest

from forge_lite.grpo import MetricsRecorder, compare
from forge_lite.grpo.config import GRPOConfig
from forge_lite.grpo.results import GRPOResult, write_outputs


def make_result(tmp_path, name, loss_type, rewards, clip, zero_std, before, after, train_s):
    """A GRPOResult of len(rewards) steps with the given per-step values,
    written to tmp_path/name as a run writes its output folder."""
    config = GRPOConfig.from_dict({"steps": len(rewards), "eval_samples": 20, "loss": {"type": loss_type}})
    recorder = MetricsRecorder()
    for step, (reward, c, z) in enumerate(zip(rewards, clip, zero_std)):
        recorder.record_step(step=step, reward_mean=reward, accuracy=reward, loss=0.0, kl=0.0,
                             trainer_version=step + 1, episode_ages=(1, 1), buffer_size=8,
                             tokens_per_s=100.0, step_time_s=0.5, clip_fraction=c, zero_std_fraction=z)
    folder = tmp_path / name
    folder.mkdir()
    result = GRPOResult(config=config, recorder=recorder, eval_accuracy_before=before,
                        eval_accuracy_after=after, startup_s=5.0, train_s=train_s, wall_s=train_s + 9,
                        output_dir=str(folder))
    write_outputs(result, folder)
    return result


@pytest.fixture
def two_runs(tmp_path):
    grpo = make_result(tmp_path, "grpo", "grpo", [0.2, 0.4, 0.6, 0.8], [0.0, 0.1, 0.2, 0.3],
                       [0.5, 0.5, 0.25, 0.0], before=0.5, after=0.7, train_s=6.0)
    sapo = make_result(tmp_path, "sapo", "sapo", [0.5, 0.5, 0.6], [float("nan")] * 3,
                       [1.0, 0.0, 0.5], before=0.5, after=0.55, train_s=3.0)
    return grpo, sapo


def test_table_from_folders(two_runs, tmp_path):
    table, figure = compare([tmp_path / "grpo", str(tmp_path / "sapo")])
    grpo, sapo = table.rows
    assert (grpo.label, grpo.loss_type, grpo.steps) == ("grpo", "grpo", 4)
    assert (grpo.heldout_before, grpo.heldout_after) == (0.5, 0.7)
    assert grpo.steps_per_min == pytest.approx(60 * 4 / 6.0)  # result.json: steps over train_s
    assert grpo.clip_fraction == pytest.approx(0.15)
    assert grpo.zero_std_fraction == pytest.approx(0.3125)
    assert (sapo.loss_type, sapo.steps, sapo.heldout_after) == ("sapo", 3, 0.55)
    assert math.isnan(sapo.clip_fraction)  # SAPO has no clip: no number, not 0
    assert sapo.zero_std_fraction == pytest.approx(0.5)
    assert table["sapo"] is sapo

    text = repr(table)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["run", "loss"] and len(lines) == 3
    assert lines[1].split() == ["grpo", "grpo", "4", "0.500", "0.700", "40.0", "0.150", "0.312"]
    assert lines[2].split() == ["sapo", "sapo", "3", "0.500", "0.550", "60.0", "-", "0.500"]
    assert "<th>held-out after</th>" in table._repr_html_() and "<td>0.700</td>" in table._repr_html_()

    rewards, heldout = figure.axes
    assert [line.get_label() for line in rewards.lines] == ["grpo", "sapo"]
    # The reward panel draws the trailing mean, the held-out panel before -> after.
    assert list(rewards.lines[0].get_ydata()) == pytest.approx([0.2, 0.3, 0.4, 0.5])
    assert list(heldout.lines[0].get_ydata()) == [0.5, 0.7]


def test_results_in_memory_match_their_folders(two_runs, tmp_path):
    from_memory, _ = compare(list(two_runs), labels=["a", "b"])
    from_disk, _ = compare({"a": tmp_path / "grpo", "b": tmp_path / "sapo"})
    assert repr(from_memory) == repr(from_disk)
    assert [row.label for row in from_disk] == ["a", "b"]


def test_folder_without_result_json(two_runs, tmp_path):
    # A folder written before result.json existed: steps/min from the steps'
    # own times, held-out accuracy unknown (shown as "-").
    (tmp_path / "grpo" / "result.json").unlink()
    table, figure = compare([tmp_path / "grpo"])
    row = table.rows[0]
    assert row.steps_per_min == pytest.approx(60 * 4 / (4 * 0.5))
    assert math.isnan(row.heldout_after)
    assert repr(table).splitlines()[1].split()[3:5] == ["-", "-"]
    assert len(figure.axes[1].lines) == 0


def test_bad_input_is_named(two_runs, tmp_path):
    with pytest.raises(ValueError, match="no runs"):
        compare([])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        compare([tmp_path])
    with pytest.raises(TypeError, match="got int"):
        compare([3])
    with pytest.raises(ValueError, match="share a label"):
        compare([tmp_path / "grpo", tmp_path / "grpo"])
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        compare([tmp_path / "grpo", tmp_path / "sapo"], labels=["x"])
    (tmp_path / "grpo" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training step"):
        compare([tmp_path / "grpo"])


def test_result_json_holds_the_runs_numbers(two_runs, tmp_path):
    numbers = json.loads((tmp_path / "grpo" / "result.json").read_text())
    assert numbers["eval_accuracy_after"] == 0.7 and numbers["steps_trained"] == 4
    assert numbers["steps_per_min"] == pytest.approx(40.0)
    assert two_runs[0].files["result"] == str(tmp_path / "grpo" / "result.json")
