"""Checkpoints: a GRPO run killed from outside continues where it stopped.

The first test is the real thing: a run in its own controller process,
SIGKILLed once its step-10 checkpoint is on disk, then resumed here. The
others check, without starting a run, that a checkpoint whose save died is
never loaded and that a wrong directory or config is a clear error.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo import checkpoint
from forge_lite.grpo.__main__ import main as cli_main
from forge_lite.grpo.checkpoint import find_checkpoint, read_manifest, write_checkpoint
from forge_lite.grpo.config import load_config
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.recorder import MetricsRecorder, StepRecord
from forge_lite.grpo.run import GRPORun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "grpo_tiny.yaml")

# Small and quick; checkpoints at steps 5 and 10 of 12.
FAST = [
    "steps=12", "checkpoint_every=5", "group_size=2", "batch_size=4", "eval_samples=0",
    "policy.backend=transformers", "policy.max_tokens=32", "data.request_len=96",
    "skip_uniform_groups=false", "progress=false",
]


# ---------------------------------------------------------------- killed, then resumed


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_run_killed_from_outside_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    log_path = tmp_path / "controller.log"
    step10 = out / "checkpoints" / "step-000010"
    with open(log_path, "w") as log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "forge_lite.grpo", "--config", TINY, *FAST, f"output_dir={out}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        while not step10.exists():  # appears whole: a checkpoint is renamed into place
            assert controller.poll() is None, f"the run ended early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no step-10 checkpoint:\n{log_path.read_text()}"
            await asyncio.sleep(0.1)
        workers = psutil.Process(controller.pid).children(recursive=True)
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait()
        # The workers notice their controller is gone and exit (measured: all 8
        # within about 2 s).
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert workers and not alive, (
            f"{len(alive)} of the killed controller's {len(workers)} worker processes "
            f"outlived it by 30 s")
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
        for worker in workers:  # nothing leaks, whatever happened above
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
    assert "checkpoint" in log_path.read_text()

    # What the killed run saved at step 10.
    saved_trainer = torch.load(step10 / "trainer.pt", weights_only=True)
    saved_buffer = torch.load(step10 / "replay_buffer.pt", weights_only=False)
    saved_dataset = json.loads((step10 / "dataset.json").read_text())
    assert read_manifest(step10)["policy_version"] == 10

    recorder = MetricsRecorder()  # empty, as after a kernel restart
    run = GRPORun(resume=out, recorder=recorder)  # the checkpoint's own config
    assert run.resume_from == step10 and run.start_step == 10
    assert run.config.steps == 12 and run.config.group_size == 2
    try:
        await run.start()
        s = run.services
        trainer = checkpoint.rank_zero(await s.trainer.state_dict.call())
        assert trainer["step"] == saved_trainer["step"] == 10
        assert_same(trainer["optimizer"]["state"], saved_trainer["optimizer"]["state"])
        assert trainer["optimizer"]["state"]  # Adam's moments, not a fresh optimizer's nothing
        assert trainer["optimizer"]["param_groups"] == saved_trainer["optimizer"]["param_groups"]
        assert trainer["scheduler"]["_last_lr"] == saved_trainer["scheduler"]["_last_lr"]
        assert trainer["scheduler"]["last_epoch"] == 10
        assert_same(trainer["model"], saved_trainer["model"])
        assert list(await s.policy.get_version.fanout()) == [10]
        assert_same(run.store.get(10), {k: v for k, v in saved_trainer["model"].items()
                                        if k in run.store.get(10)})
        buffer = await s.replay_buffer.state_dict.call_one()
        assert [e.episode_id for e in buffer["episodes"]] == [
            e.episode_id for e in saved_buffer["episodes"]]
        assert buffer["rng_state"] == saved_buffer["rng_state"]
        assert await s.dataloader.state_dict.call_one() == saved_dataset
        assert saved_dataset["position"] > 0
        assert [r.step for r in recorder.steps] == list(range(10))

        result = await run.train()
    finally:
        await run.shutdown()
    assert [r.step for r in recorder.steps] == list(range(12))  # continues from 10
    assert [r.trainer_version for r in recorder.steps[10:]] == [11, 12]
    assert result.recorder.steps[0].step == 0
    with open(result.metrics_path) as metrics:
        assert len(metrics.readlines()) == 12


def assert_same(actual, expected) -> None:
    """Nested dicts of tensors (and numbers) are equal, key for key."""
    assert isinstance(actual, dict) and set(actual) == set(expected), (sorted(actual), sorted(expected))
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same(actual[key], value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


# ---------------------------------------------------------------- the pieces, no run


async def test_the_dataset_resumes_with_exactly_the_next_samples():
    dataset = await DatasetActor.options(procs=1).as_actor(data_split="test")
    try:
        for _ in range(5):
            await dataset.sample.call_one()
        state = await dataset.state_dict.call_one()
        assert state == {"epoch": 0, "position": 5}
        following = [(await dataset.sample.call_one())["question"] for _ in range(3)]
        await dataset.load_state_dict.call_one(state)  # back, as a resumed run's actor
        again = [(await dataset.sample.call_one())["question"] for _ in range(3)]
        assert again == following
        # A whole epoch later (the test split has 200 rows) the order is the next epoch's.
        await dataset.load_state_dict.call_one({"epoch": 0, "position": 199})
        await dataset.sample.call_one()
        assert await dataset.state_dict.call_one() == {"epoch": 0, "position": 200}
        await dataset.sample.call_one()
        assert await dataset.state_dict.call_one() == {"epoch": 1, "position": 1}
    finally:
        await DatasetActor.shutdown(dataset)


def test_the_recorder_takes_its_history_back():
    old = MetricsRecorder()
    old.record_step(step=0, reward_mean=0.5, accuracy=0.5, loss=0.1, kl=float("nan"),
                    trainer_version=1, episode_ages=(1, 1), buffer_size=2, tokens_per_s=10.0,
                    step_time_s=1.0, time_split_s={"train": 0.5})
    old.record_versions(0, 1, [1])
    as_json = json.loads(json.dumps({"steps": [r.as_dict() for r in old.steps],
                                     "versions": [vars(v) for v in old.versions]}))
    heard = []
    new = MetricsRecorder()
    new.subscribe(heard.append)
    new.load(as_json["steps"], as_json["versions"])
    assert new.steps[0].episode_ages == (1, 1) and new.versions[0].replica_versions == (1,)
    assert new.steps[0].step == 0 and isinstance(new.steps[0], StepRecord)
    assert len(heard) == 2  # a dashboard already listening redraws


def fake_checkpoint(root, step: int, config) -> os.PathLike:
    """A checkpoint with the right files, written the way the loop writes one."""
    return write_checkpoint(root, step, step, {
        "config.yaml": config.to_dict(),
        "trainer.pt": {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "step": step},
        "replay_buffer.pt": {"episodes": [], "rng_state": None},
        "dataset.json": {"epoch": 0, "position": 2 * step},
        "recorder.json": {"steps": [], "versions": []},
    })


def test_a_checkpoint_whose_save_died_is_never_loaded(tmp_path, monkeypatch):
    config = load_config(TINY, FAST + [f"output_dir={tmp_path}"])
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5, config)
    step10 = fake_checkpoint(root, 10, config)
    assert find_checkpoint(tmp_path) == step10

    # A save killed mid-way leaves its temporary directory, even one that got
    # as far as a complete-looking checkpoint.json.
    shutil.copytree(step10, root / ".step-000015.tmp-killed")
    (root / ".step-000015.tmp-killed" / "replay_buffer.pt").unlink()
    # A step directory missing a file, saved later than step 10...
    missing = fake_checkpoint(root, 20, config)
    (missing / "trainer.pt").unlink()
    # ...and one whose file was cut short.
    truncated = fake_checkpoint(root, 25, config)
    with open(truncated / "replay_buffer.pt", "r+b") as file:
        file.truncate(10)
    # A save that fails while writing (a full disk, say) leaves nothing behind.
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "episodes" in obj:
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        fake_checkpoint(root, 30, config)
    monkeypatch.undo()
    assert not (root / "step-000030").exists()
    assert [p.name for p in root.glob(".step-000030*")] == []

    for where in (tmp_path, root):  # the output_dir or its checkpoints folder
        assert find_checkpoint(where) == step10
    with pytest.raises(ValueError, match="trainer.pt is missing"):
        find_checkpoint(missing)  # named directly: refused, not loaded
    with pytest.raises(ValueError, match="replay_buffer.pt has 10 bytes"):
        find_checkpoint(truncated)
    assert GRPORun(resume=tmp_path).resume_from == step10
    assert GRPORun(resume=tmp_path).start_step == 10

    # Saves clear the leftovers; the two complete checkpoints saved last are kept.
    step35 = fake_checkpoint(root, 35, config)
    assert not list(root.glob(".step-*"))
    checkpoint.prune(root, checkpoint.KEEP_LAST)
    assert checkpoint.complete_checkpoints(root) == [step10, step35]
    assert find_checkpoint(tmp_path) == step35


def test_resuming_from_a_wrong_directory_or_config_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "notes").mkdir(parents=True)
    (foreign / "data.csv").write_text("a,b\n1,2\n")
    (foreign / "step-000003").mkdir()  # the right name, nothing in it

    for where in (empty, foreign):
        with pytest.raises(ValueError, match=rf"{re.escape(str(where))}: it holds no complete checkpoint"):
            GRPORun(resume=where)
        with pytest.raises(SystemExit) as exit_:
            cli_main(["--resume", str(where)])
        assert exit_.value.code == 2
        assert f"cannot resume from {where}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GRPORun(resume=tmp_path / "nowhere")

    config = load_config(TINY, FAST + [f"output_dir={tmp_path / 'run'}"])
    fake_checkpoint(tmp_path / "run" / "checkpoints", 10, config)
    changed = load_config(TINY, FAST + ["group_size=4", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"group_size=4: its run had group_size=2"):
        GRPORun(changed, resume=tmp_path / "run")
    with pytest.raises(SystemExit):
        cli_main(["--resume", str(tmp_path / "run"), "group_size=4"])
    assert "group_size=4: its run had group_size=2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps=10: it is at step 10"):
        GRPORun(load_config(TINY, FAST + ["steps=10"]), resume=tmp_path / "run")
    # Keys that may change do.
    longer = GRPORun(load_config(TINY, FAST + ["steps=40", "eval_samples=5", "checkpoint_every=20"]),
                     resume=tmp_path / "run")
    assert longer.config.steps == 40 and longer.start_step == 10
