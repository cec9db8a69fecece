"""Checkpoints: a GRPO run killed from outside continues where it stopped.

The first tests are the real thing: a run in its own controller process,
SIGKILLed once its step-10 checkpoint is on disk, then resumed here, as it
was and with more steps (the learning rate follows the longer schedule). A
real trainer checks that every value a config defines (the schedule, the
optimizer's settings) is its own after a restore, not the checkpoint's. The
others check, without starting a run, that a checkpoint whose save died or
whose files were damaged afterwards is never loaded, that a resume falls
back to the previous checkpoint saying so, and that a wrong directory or
config is a clear error.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.actors.trainer import RLTrainer, TrainingConfig
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.grpo import Episode, checkpoint
from forge_lite.grpo.__main__ import main as cli_main
from forge_lite.grpo.checkpoint_files import (
    find_checkpoint, load_checkpoint, read_manifest, verify_checkpoint, write_checkpoint,
)
from forge_lite.grpo.config import load_config
from forge_lite.grpo.dataset import DatasetActor
from forge_lite.grpo.recorder import MetricsRecorder, StepRecord
from forge_lite.grpo.run import GRPORun
from forge_lite.rl.collate import grpo_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "grpo_tiny.yaml")

# Small and quick; checkpoints at steps 5 and 10 of 12.
FAST = [
    "steps=12", "checkpoint_every=5", "group_size=2", "batch_size=4", "eval_samples=0",
    "policy.backend=transformers", "policy.max_tokens=32", "data.request_len=96",
    "skip_uniform_groups=false", "progress=false",
]


# ---------------------------------------------------------------- killed, then resumed


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The output_dir of a run in its own controller process, SIGKILLed once its
    step-10 checkpoint (of 12 steps; one at step 5 too) is on disk. Tests copy it."""
    out = tmp_path_factory.mktemp("killed") / "run"
    log_path = out.parent / "controller.log"
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
            time.sleep(0.1)
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
    return out


def copy_of(run_dir, tmp_path):
    """A copy of a run's output_dir, so that each test resumes (and writes) its own."""
    return shutil.copytree(run_dir, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_run_killed_from_outside_resumes_from_its_last_checkpoint(killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    step10 = out / "checkpoints" / "step-000010"

    # What the killed run saved at step 10.
    saved_trainer = torch.load(step10 / "trainer.pt", weights_only=True)
    saved_buffer = torch.load(step10 / "replay_buffer.pt", weights_only=False)
    saved_dataset = json.loads((step10 / "dataset.json").read_text())
    assert read_manifest(step10)["policy_version"] == 10

    recorder = MetricsRecorder()  # empty, as after a kernel restart
    # The checkpoint's own config, writing to this test's copy.
    run = GRPORun(checkpoint.checkpoint_config(out, [f"output_dir={out}"]), recorder=recorder,
                  resume=out)
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


def learning_rates(trainer_state: dict) -> list[float]:
    """The rate each of the optimizer's parameter groups takes its next step at."""
    return [group["lr"] for group in trainer_state["optimizer"]["param_groups"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_run_resumed_with_more_steps_follows_the_longer_schedule(killed_run, tmp_path):
    # The killed run: lr 2e-4, 10 warm-up steps, lr_decay over its 12 steps.
    # Saved at step 10, the next step's rate was 2e-4 * (1 - 10/12) = 3.3e-5.
    out = copy_of(killed_run, tmp_path)
    saved = torch.load(out / "checkpoints" / "step-000010" / "trainer.pt", weights_only=True)
    assert learning_rates(saved) == [pytest.approx(2e-4 * (1 - 10 / 12))]

    config = checkpoint.checkpoint_config(out, ["steps=40", f"output_dir={out}"])
    rate = TrainingConfig(warmup_steps=10, decay_steps=40).lr_factor  # an uninterrupted 40-step run's
    run = GRPORun(config, resume=out)
    stop_after = 2  # steps 10 and 11; then interrupt, as a notebook user does

    def interrupt_after_two(record):
        if isinstance(record, StepRecord) and record.step == 10 + stop_after - 1:
            training.cancel()

    try:
        await run.start()
        trainer = checkpoint.rank_zero(await run.services.trainer.state_dict.call())
        assert trainer["step"] == 10
        assert learning_rates(trainer) == [2e-4 * rate(10)] == [pytest.approx(1.5e-4)]
        assert trainer["scheduler"]["base_lrs"] == [2e-4]
        assert_same(trainer["model"], saved["model"])  # what the steps made is the checkpoint's
        assert_same(trainer["optimizer"]["state"], saved["optimizer"]["state"])

        training = asyncio.create_task(run.train())
        run.recorder.subscribe(interrupt_after_two, replay=False)
        result = await training  # interrupted: returns the steps taken
        assert [r.step for r in run.recorder.steps[10:]][:stop_after] == [10, 11]
        trainer = checkpoint.rank_zero(await run.services.trainer.state_dict.call())
        taken = trainer["step"]  # a step already under way when the cancel came finishes
        assert taken >= 12 and result.steps_trained == taken - 10
        assert learning_rates(trainer) == [2e-4 * rate(taken)]
        assert learning_rates(trainer)[0] > 1e-4  # the 12-step schedule had reached 0 here
    finally:
        await run.shutdown()


@pytest.mark.slow
async def test_a_restored_trainer_follows_its_own_config_not_the_checkpoints():
    """Every value a config defines is recomputed on restore: the schedule's
    position and length, the warm-up, the optimizer's lr and weight decay."""
    batch = grpo_collate(tiny_episodes(), dp_size=1)

    def settings(lr=1e-3, weight_decay=0.0, warmup_steps=0, decay_steps=None):
        return {"model": DEFAULT_MODEL,
                "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay},
                "training": {"seq_len": 64, "warmup_steps": warmup_steps, "decay_steps": decay_steps}}

    async def state_of(trainer) -> dict:
        return checkpoint.rank_zero(await trainer.state_dict.call())

    spawn = RLTrainer.options(procs=1).as_actor
    saved_run, longer, warm_and_other_lr, constant = await asyncio.gather(
        spawn(**settings(decay_steps=12)),  # the run that saves: 12 steps, linear decay
        spawn(**settings(decay_steps=40)),  # resumed with steps=40
        spawn(**settings(lr=5e-4, weight_decay=0.1, warmup_steps=20, decay_steps=40)),
        spawn(**settings()),  # resumed with lr_decay off
    )
    try:
        for _ in range(10):
            await saved_run.train_step.call_one(*batch)
        at_10 = await state_of(saved_run)
        assert learning_rates(at_10) == [pytest.approx(1e-3 * 2 / 12)]  # the old schedule's
        for _ in range(2):
            await saved_run.train_step.call_one(*batch)
        finished = await state_of(saved_run)
        assert learning_rates(finished) == [0.0]  # 12 of 12: the old schedule ends at 0

        # The input: steps=40 from step 10, then each following step.
        await longer.load_state_dict.call(at_10)
        restored = await state_of(longer)  # what the steps made is the checkpoint's
        assert_same(restored["model"], at_10["model"])
        assert_same(restored["optimizer"]["state"], at_10["optimizer"]["state"])
        for step in (10, 11, 12):
            state = await state_of(longer)
            assert state["step"] == step
            assert learning_rates(state) == [1e-3 * (1 - step / 40)]
            await longer.train_step.call_one(*batch)
        assert learning_rates(await state_of(longer))[0] == pytest.approx(1e-3 * (1 - 13 / 40))
        # The finished run, resumed with more steps: not at 0.
        await longer.load_state_dict.call(finished)
        assert learning_rates(await state_of(longer)) == [pytest.approx(7e-4)]
        assert (await state_of(longer))["step"] == 12

        # A changed warm-up, lr and weight decay are the new config's, from step 10.
        await warm_and_other_lr.load_state_dict.call(at_10)
        state = await state_of(warm_and_other_lr)
        group = state["optimizer"]["param_groups"][0]
        assert group["lr"] == 5e-4 * TrainingConfig(warmup_steps=20, decay_steps=40).lr_factor(10)
        assert group["lr"] == pytest.approx(5e-4 * 11 / 21 * 0.75)
        assert group["weight_decay"] == 0.1 and group["initial_lr"] == 5e-4
        assert state["scheduler"]["base_lrs"] == [5e-4]
        assert_same(state["optimizer"]["state"], at_10["optimizer"]["state"])

        # No decay: the full rate, even from the finished run's lr of 0.
        await constant.load_state_dict.call(finished)
        assert learning_rates(await state_of(constant)) == [1e-3]
        await constant.train_step.call_one(*batch)
        assert learning_rates(await state_of(constant)) == [1e-3]

    finally:
        await asyncio.gather(*(RLTrainer.shutdown(t) for t in
                               (saved_run, longer, warm_and_other_lr, constant)))


def tiny_episodes() -> list[Episode]:
    """Two scored episodes of the shipped model's vocabulary: a batch to step on."""
    generator = torch.Generator().manual_seed(0)
    episodes = []
    for i, advantage in enumerate([1.0, -0.5]):
        episode = Episode(f"e{i}", "prompt", 0, 0, 12, 8, "3")
        episode.request_tokens = torch.randint(3, 400, (6 + i,), generator=generator).tolist()
        episode.response_tokens = torch.randint(3, 400, (8 - i,), generator=generator).tolist()
        episode.ref_logprobs = torch.zeros(len(episode.response_tokens))
        episode.reward, episode.advantage = 0.0, advantage
        episodes.append(episode)
    return episodes


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


WEIGHT = 1.5  # every weight of a fake checkpoint's model


def fake_checkpoint(root, step: int, config) -> os.PathLike:
    """A checkpoint with the right files, written the way the loop writes one
    (``config``: a GRPOConfig, or the dict an older kit wrote)."""
    return write_checkpoint(root, step, step, {
        "config.yaml": config if isinstance(config, dict) else config.to_dict(),
        "trainer.pt": {"model": {"w": torch.full((256,), WEIGHT)}, "optimizer": {}, "scheduler": {},
                       "step": step},
        "replay_buffer.pt": {"episodes": tiny_episodes(), "rng_state": None},
        "dataset.json": {"epoch": 0, "position": 2 * step},
        "recorder.json": {"steps": [], "versions": []},
    })


# ---------------------------------------------------------------- damaged after the save


def change_a_weight(path) -> None:
    """One byte of one weight in trainer.pt, the file's size unchanged."""
    data = bytearray(path.read_bytes())
    weights = data.find(struct.pack("<f", WEIGHT) * 256)
    assert weights > 0, "the weights' bytes are not in the file"
    data[weights + 4 * 100 + 1] ^= 0x10  # weight 100's mantissa
    path.write_bytes(bytes(data))


def change_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def replace_text(old: bytes, new: bytes):
    def damage(path) -> None:
        data = path.read_bytes()
        assert len(old) == len(new) and data.count(old) == 1, (old, data[:200])
        path.write_bytes(data.replace(old, new))
    damage.__name__ = "edit"
    return damage


def garble(path) -> None:
    """Every byte replaced, the size kept (a disk block of someone else's data)."""
    path.write_bytes(bytes((31 * i + 7) % 256 for i in range(path.stat().st_size)))


def truncate(path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


#: (file, how it is damaged, what the error says of it)
DAMAGES = [
    ("trainer.pt", change_a_weight, "does not match the sha256 digest"),
    ("replay_buffer.pt", change_a_byte, "does not match the sha256 digest"),
    ("dataset.json", replace_text(b'"position": 20', b'"position": 29'), "does not match the sha256"),
    ("recorder.json", replace_text(b'"steps"', b'"stepz"'), "does not match the sha256 digest"),
    ("config.yaml", replace_text(b"group_size: 2", b"group_size: 3"), "does not match the sha256"),
    ("trainer.pt", garble, "does not match the sha256 digest"),
    ("dataset.json", garble, "does not match the sha256 digest"),
    ("trainer.pt", truncate, r"has \d+ bytes, checkpoint.json says \d+"),
    ("replay_buffer.pt", truncate, r"has \d+ bytes, checkpoint.json says \d+"),
    ("dataset.json", os.unlink, "is missing"),
    ("trainer.pt", os.unlink, "is missing"),
    ("checkpoint.json", replace_text(b'"step": 10', b'"step": 19'), "does not match its own checksum"),
    ("checkpoint.json", replace_text(b'"policy_version": 10', b'"policy_version": 11'),
     "does not match its own checksum"),
    ("checkpoint.json", garble, "cannot be read"),
]
DAMAGE_IDS = [f"{name}-{how.__name__}-{i}" for i, (name, how, _) in enumerate(DAMAGES)]


@pytest.fixture
def loads(monkeypatch):
    """The files torch.load parses (every .pt file goes through it), in order."""
    calls = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        calls.append(f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


@pytest.mark.parametrize("name, damage, says", DAMAGES, ids=DAMAGE_IDS)
def test_a_checkpoint_damaged_after_its_save_is_refused_naming_the_file(tmp_path, loads, capsys,
                                                                        name, damage, says):
    config = load_config(TINY, FAST + [f"output_dir={tmp_path}"])
    step10 = fake_checkpoint(tmp_path / "checkpoints", 10, config)
    assert load_checkpoint(step10)["dataset"] == {"epoch": 0, "position": 20}  # intact: loads
    loads.clear()
    if name == "trainer.pt" and damage is change_a_weight:
        damage(step10 / name)
        # What loading it unchecked would do: no error, one weight changed.
        weights = torch.load(step10 / name, weights_only=True)["model"]["w"]
        assert (weights != WEIGHT).sum() == 1
        loads.clear()
    else:
        damage(step10 / name)

    where = rf"{re.escape(str(step10))}\W.*{re.escape(name)}.*{says}"
    for check in (verify_checkpoint, load_checkpoint, find_checkpoint, GRPORun):
        with pytest.raises(ValueError, match=where) as refused:
            check(step10) if check is not GRPORun else GRPORun(resume=step10)
        assert "weights_only" not in str(refused.value)
        assert type(refused.value) is ValueError
    assert loads == []  # not one file of it was parsed
    # Named by its run's directory, with no checkpoint before it: the same error.
    with pytest.raises(ValueError, match=rf"cannot resume from {re.escape(str(tmp_path))}: it holds no "
                                         rf"complete checkpoint.*{re.escape(name)}.*{says}"):
        find_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--resume", str(tmp_path)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert str(step10) in error and name in error and "weights_only" not in error
    assert loads == []


@pytest.mark.parametrize("name, damage, says", [DAMAGES[i] for i in (0, 2, 8, 9, 11)],
                         ids=[DAMAGE_IDS[i] for i in (0, 2, 8, 9, 11)])
def test_a_resume_falls_back_to_the_previous_checkpoint_saying_so(tmp_path, capsys, name, damage, says):
    config = load_config(TINY, FAST + [f"output_dir={tmp_path}"])
    step5 = fake_checkpoint(tmp_path / "checkpoints", 5, config)
    step10 = fake_checkpoint(tmp_path / "checkpoints", 10, config)
    assert find_checkpoint(tmp_path) == step10
    damage(step10 / name)

    for where in (tmp_path, tmp_path / "checkpoints"):
        assert find_checkpoint(where) == step5
        said = capsys.readouterr().err
        assert re.search(rf"refused.*{re.escape(str(step10))}\W.*{re.escape(name)}.*{says}", said)
        assert "previous complete checkpoint, step-000005" in said
    run = GRPORun(resume=tmp_path)
    assert run.resume_from == step5 and run.start_step == 5
    assert load_checkpoint(run.resume_from)["dataset"] == {"epoch": 0, "position": 10}
    # The command line says so too (and goes on with step 5: here its check of
    # a changed key stops it before anything starts).
    with pytest.raises(SystemExit):
        cli_main(["--resume", str(tmp_path), "group_size=4"])
    said = capsys.readouterr().err
    assert "previous complete checkpoint, step-000005" in said
    assert f"cannot resume {step5} with group_size=4" in said

    # Named itself, the damaged checkpoint is refused: no fallback.
    with pytest.raises(ValueError, match=re.escape(name)):
        find_checkpoint(step10)
    # Both damaged: the error names both.
    garble(step5 / name) if (step5 / name).exists() else None
    with pytest.raises(ValueError, match=rf"no complete checkpoint.*step-000010\W.*{re.escape(name)}"
                                         rf".*step-000005\W.*{re.escape(name)}") as refused:
        find_checkpoint(tmp_path)
    assert "weights_only" not in str(refused.value)


def as_format_1(path) -> None:
    """Rewrite a checkpoint's manifest as forge_lite wrote it before digests."""
    manifest = json.loads((path / "checkpoint.json").read_text())
    for key in ("sha256", "checksum"):
        del manifest[key]
    manifest["format_version"] = 1
    (path / "checkpoint.json").write_text(json.dumps(manifest, indent=1))


def test_a_checkpoint_saved_before_digests_is_read_by_size_saying_so(tmp_path, capsys):
    config = load_config(TINY, FAST + [f"output_dir={tmp_path}"])
    step10 = fake_checkpoint(tmp_path / "checkpoints", 10, config)
    as_format_1(step10)
    assert find_checkpoint(tmp_path) == step10
    assert load_checkpoint(step10)["dataset"] == {"epoch": 0, "position": 20}
    assert "without digests: its files' sizes are checked, not their bytes" in capsys.readouterr().err

    # Its files are still checked for size, and one that cannot be parsed is
    # the same clear error (torch's and json's own errors name neither).
    for name, damage, says in [
        ("trainer.pt", garble, r"cannot be read \(\w+\)"),
        ("dataset.json", garble, r"cannot be read \(\w*(JSON|Unicode)\w*\)"),
        ("replay_buffer.pt", truncate, r"has \d+ bytes"),
        ("recorder.json", replace_text(b'"steps"', b'"steps\x00'), r"cannot be read \(\w+\)"),
        ("config.yaml", garble, r"cannot be read"),
    ]:
        broken = fake_checkpoint(tmp_path / "broken", 10, config)
        as_format_1(broken)
        damage(broken / name)
        if name == "config.yaml":
            with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: config.yaml {says}"):
                checkpoint.resume_config(broken, None)
            continue
        with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}\W.*{re.escape(name)} {says}") as refused:
            load_checkpoint(broken)
        assert type(refused.value) is ValueError and "weights_only" not in str(refused.value)

    # A trainer.pt that holds what weights_only refuses: torch's error advises
    # weights_only=False; ours names the file and does not.
    unsafe = fake_checkpoint(tmp_path / "unsafe", 10, config)
    shutil.copy(unsafe / "replay_buffer.pt", unsafe / "trainer.pt")
    manifest = json.loads((unsafe / "checkpoint.json").read_text())
    manifest["files"]["trainer.pt"] = (unsafe / "trainer.pt").stat().st_size
    (unsafe / "checkpoint.json").write_text(json.dumps(manifest))
    as_format_1(unsafe)
    with pytest.raises(ValueError, match=r"trainer.pt cannot be read \(UnpicklingError\)") as refused:
        load_checkpoint(unsafe)
    assert "weights_only" not in str(refused.value)


def test_a_checkpoint_saved_before_the_sections_were_renamed_still_resumes(tmp_path):
    """Its config.yaml says ``reference`` and ``reward`` (now ``ref_model`` and
    ``reward_actor``, in ``placement`` too): it resumes as the same config, warning."""
    config = load_config(TINY, FAST + [f"output_dir={tmp_path}", "placement.ref_model=host1"])
    saved = config.to_dict()
    for section in (saved, saved["placement"]):
        section["reference"], section["reward"] = section.pop("ref_model"), section.pop("reward_actor")
    step10 = fake_checkpoint(tmp_path / "checkpoints", 10, saved)
    assert "\nreference:\n" in (step10 / "config.yaml").read_text()
    for read in (lambda: checkpoint.resume_config(step10, None), lambda: checkpoint.checkpoint_config(tmp_path)):
        with pytest.warns(FutureWarning) as heard:
            assert read() == config
        assert "config key placement.reward is now placement.reward_actor" in {
            str(w.message).split(" (")[0] for w in heard}


def test_an_unreadable_file_is_refused_for_an_unprivileged_user(tmp_path, request):
    """Permissions: as root every file is readable, so the reader is nobody."""
    shared = Path(tempfile.mkdtemp(prefix="forge_lite_test_"))  # pytest's tmp_path is root's alone
    os.chmod(shared, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    config = load_config(TINY, FAST + [f"output_dir={shared}"])
    step5 = fake_checkpoint(shared / "checkpoints", 5, config)
    step10 = fake_checkpoint(shared / "checkpoints", 10, config)
    os.chmod(step10 / "replay_buffer.pt", 0)
    script = ("import sys; from forge_lite.grpo.checkpoint import find_checkpoint, load_checkpoint\n"
              "print(find_checkpoint(sys.argv[1]))\n"
              "try:\n    load_checkpoint(sys.argv[2])\nexcept ValueError as error:\n    print(error)\n")
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-c", script, str(shared), str(step10)],
        capture_output=True, text=True, cwd="/", timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    found, error = done.stdout.splitlines()[-2:]
    assert found == str(step5)  # fell back
    assert "Permission denied" in done.stderr and "step-000010" in done.stderr  # and said why
    assert f"checkpoint {step10}: replay_buffer.pt cannot be read (Permission denied)" in error


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
    # The learning rate's settings too: the trainer recomputes the schedule from them.
    other_rate = GRPORun(load_config(TINY, FAST + ["steps=40", "trainer.lr=1e-3", "trainer.warmup_steps=0",
                                                   "trainer.lr_decay=false", "trainer.weight_decay=0.1"]),
                         resume=tmp_path / "run")
    assert other_rate.config.trainer.lr == 1e-3 and not other_rate.config.trainer.lr_decay
    for key in ("trainer.optimizer=SGD", "trainer.dtype=bfloat16", "trainer.procs=2"):  # still fixed
        with pytest.raises(ValueError, match=rf"{key.partition('=')[0]}=.*cannot change mid-run"):
            GRPORun(load_config(TINY, FAST + [key]), resume=tmp_path / "run")
