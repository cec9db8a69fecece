"""Checkpoints: a GRPO run that survives a restart.

Runs die: a JupyterHub culls an idle kernel, a laptop sleeps, someone
presses restart. With ``checkpoint_every: N`` in the config, the training
loop saves everything the run needs to go on after every N-th step's weight
sync, and a new run continues from the last complete checkpoint::

    result = await run_grpo(resume="runs/grpo")         # the checkpoint's own config
    python -m forge_lite.grpo --resume runs/grpo         # from a terminal

What a checkpoint holds, one file each, under the run's output_dir::

    checkpoints/step-000010/      10 steps done: the resumed run's first step is step 10
        checkpoint.json           what it is: step, policy version, save time, each file's size
                                  and sha256 digest
        config.yaml               the run's config
        trainer.pt                the trainer's weights, Adam's moments, its step count (torch.save)
        replay_buffer.pt          the buffer's episodes and its sampling RNG (a pickle: resume
                                  only from checkpoints you trust)
        dataset.json              the dataset's epoch and how many of its rows were served
        recorder.json             every step and version recorded so far: the curves

The policy serves the trainer's weights (the checkpoint's policy version), so
the weights are stored once; a resumed run puts them into its weight store as
that version and starts the policy replicas on them.

Atomic: a save writes into a hidden temporary directory beside the
checkpoints (``.step-000010.tmp-...``), fsyncs every file and the directory,
then renames it to ``step-000010``, and a rename is atomic. A crash mid-save
leaves the temporary directory, which is never taken for a checkpoint (the
next save deletes it), and the earlier checkpoints untouched. A
``step-NNNNNN`` directory is complete only if its checkpoint.json is there
and names files that are all there, each of the size it says. The two
checkpoints saved last are kept.

Verified: a file changed after the save, even one byte of a weight with its
size unchanged, or cut short, garbled or unreadable, is a ValueError naming
the checkpoint and the file, raised before anything of that checkpoint is
loaded. Each file's sha256 digest is recorded in checkpoint.json when it is
written, and checkpoint.json carries a digest of its own values (a changed
step or policy version shows too). Resuming from a run's directory, a damaged
last checkpoint is reported and the previous complete one is used (the two
kept are a few steps apart); without one, the error stops the resume. A
checkpoint saved by forge_lite before digests were recorded (format 1) is
still read: its files' sizes are checked, not their bytes, and loading it
says so; a file of it that cannot be parsed is the same ValueError. Checking
costs one read of every file.

``resume=DIR`` takes a run's output_dir, its ``checkpoints/`` folder (the
complete checkpoint saved last, which after a crash is where the run
stopped), or one ``step-NNNNNN`` directory (that one).

A resumed run continues the step count, the policy version, the weights,
Adam's moments, the buffer, the dataset's order and the recorded
curves. What it loses: the groups the rollouts had in flight at the save
(their prompts are not served again) and anything the killed run did after
its last checkpoint.

Its config is the checkpoint's, or one you pass; the keys in
``FIXED_ON_RESUME`` must then equal the checkpoint's (a ValueError names the
key and both values). Everything else may change: ``steps`` (to train
longer; it must exceed the checkpoint's step), ``output_dir``,
``checkpoint_every``, ``eval_samples``, ``progress``, the rollout tasks,
``max_policy_age``, the replicas and sampling, the reference model, the
rewards, ``trainer.beta``, ``trainer.max_norm``, the micro-batch size, and
the learning rate's settings: ``trainer.lr``, ``trainer.weight_decay``,
``trainer.warmup_steps`` and ``trainer.lr_decay``.

What a config defines is taken from the resumed run's config, never from the
checkpoint: the checkpoint holds what the steps taken made (weights, Adam's
moments, the step count), and the trainer recomputes the rest
(``RLTrainer.load_state_dict``). So every resumed step trains at exactly the
rate an uninterrupted run with the resumed config uses at that step: with
``trainer.lr_decay``, ``steps=40`` on a run saved at step 10 of 12 trains
step 10 at ``lr * (1 - 10/40)``, not at the 12-step schedule's
``lr * (1 - 10/12)``, and a finished run resumed with more steps does not
train at 0. The step count, the dataset position, the buffer and the curves
are the checkpoint's; the buffer's batch size and age limit, the schedule
and the steps left are the config's.

For the tiny config a checkpoint is about three times the model's size
(trainer.pt: the weights and Adam's two moments; the rest is tens of kB),
saved while the rollouts go on; a resumed run prints how long reading and
restoring it took. The trainer's state travels to the
controller as one message: fine for small models, while a 1.7B model's
(about 20 GB with Adam's moments) would want the trainer to write its own
files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.recorder import MetricsRecorder
from forge_lite.grpo.results import shown

FORMAT = "forge_lite GRPO checkpoint"
#: 2: checkpoint.json records each file's sha256 and its own. 1 (sizes only) is still read.
FORMAT_VERSION = 2
READS = (1, 2)
MANIFEST = "checkpoint.json"
#: The files every checkpoint holds besides its manifest.
FILES = ("config.yaml", "trainer.pt", "replay_buffer.pt", "dataset.json", "recorder.json")
KEEP_LAST = 2
_NAME = re.compile(r"step-(\d+)")

#: Config keys a resumed run cannot change, and why.
FIXED_ON_RESUME = {
    "model": "the checkpoint's weights are this model's",
    "group_size": "the buffer's episodes and their advantages were made in groups of this size",
    "batch_size": "the replay buffer and the lr schedule's steps are sized for batches of it",
    "data.path": "the dataset position counts rows of this data set",
    "data.revision": "the dataset position counts rows of this data set",
    "data.train_split": "the dataset position counts rows of this split",
    "data.streaming": "a streamed data set is shuffled in another order",
    "data.request_len": "the buffer's episodes are padded to this length",
    "policy.max_tokens": "the buffer's episodes are padded to this length",
    "trainer.procs": "a trainer is restored only onto the layout it was saved from",
    "trainer.optimizer": "the optimizer state is this optimizer's",
    "trainer.dtype": "the optimizer state is in this dtype",
}


# ---------------------------------------------------------------- saving


async def save_if_due(s, config: GRPOConfig, recorder: MetricsRecorder, steps_done: int,
                      policy_version: int) -> Path | None:
    """Save a checkpoint if ``steps_done`` is a multiple of ``config.checkpoint_every``
    (the training loop's one line); returns its path, or None when none was due."""
    every = config.checkpoint_every
    if every is None or steps_done % every:
        return None
    return await save_checkpoint(s, config, recorder, steps_done, policy_version)


async def save_checkpoint(s, config: GRPOConfig, recorder: MetricsRecorder, steps_done: int,
                          policy_version: int) -> Path:
    """Save the run as it is now to ``<config.output_dir>/checkpoints/step-<steps_done>``.

    Parameters
    ----------
    s:
        The run's ``Services``; the trainer must be between steps (the
        rollouts may go on meanwhile).
    config:
        The run's config; saved with it. Its ``output_dir`` says where.
    recorder:
        The run's recorder; its steps and versions are saved.
    steps_done, policy_version:
        Training steps taken so far, and the version the policy serves now.

    Returns the checkpoint's path; deletes all but the ``KEEP_LAST``
    checkpoints saved last. Raises ValueError if ``config.output_dir`` is None.

    Example: ``path = await save_checkpoint(run.services, run.config, run.recorder, 10, 10)``.
    """
    if config.output_dir is None:
        raise ValueError("saving a checkpoint needs config.output_dir: the checkpoints go under it")
    began = time.perf_counter()
    trainer_state = rank_zero(await s.trainer.state_dict.call())
    # The buffer before the dataset: a prompt served between the two snapshots
    # is then counted as served but its group is not in the buffer. Resumed,
    # it is lost, like every group in flight; the other order would train on
    # it twice.
    buffer_state = await s.replay_buffer.state_dict.call_one()
    dataset_state = await s.dataloader.state_dict.call_one()
    contents = {
        "config.yaml": config.to_dict(),
        "trainer.pt": trainer_state,
        "replay_buffer.pt": buffer_state,
        "dataset.json": dataset_state,
        "recorder.json": {
            "steps": [record.as_dict() for record in recorder.steps],
            "versions": [dataclasses.asdict(record) for record in recorder.versions],
        },
    }
    root = Path(config.output_dir) / "checkpoints"
    # Writing is disk work: in a thread, so the rollouts' calls keep flowing.
    path = await asyncio.to_thread(write_checkpoint, root, steps_done, policy_version, contents)
    prune(root, KEEP_LAST)
    size = sum(read_manifest(path)["files"].values())
    tqdm.write(f"GRPO: checkpoint {shown(path)} saved in {time.perf_counter() - began:.2f} s "
               f"({size / 1e6:.1f} MB)")
    return path


def rank_zero(values) -> Any:
    """Rank 0's answer of the trainer's ``state_dict.call()`` (the other ranks answer None)."""
    return next(value for value in values.values() if value is not None)


def write_checkpoint(root: str | Path, steps_done: int, policy_version: int,
                     contents: dict[str, Any]) -> Path:
    """Write ``contents`` as the checkpoint ``<root>/step-<steps_done>``, atomically.

    ``contents`` maps each file name to what goes in it, by the name's
    ending: ``.pt`` torch.save, ``.json`` JSON, ``.yaml`` YAML. The files go
    into a temporary directory in ``root``, are fsync'd, and the directory is
    renamed to its final name last, replacing a checkpoint of that name.
    Returns the final path. A save that fails deletes its temporary
    directory; one killed leaves it, and the next save deletes it.

    Example: ``write_checkpoint("out/checkpoints", 10, 10, {"dataset.json": {"epoch": 0}, ...})``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    final = root / f"step-{steps_done:06d}"
    # Named by process and time, so no two saves share it (mkdtemp would make it private: 0700).
    temporary = root / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    temporary.mkdir()
    try:
        sizes = {name: write_file(temporary / name, content) for name, content in contents.items()}
        # Read back from what was written: the digest is of the bytes a resume will read.
        digests = {name: file_digest(temporary / name) for name in contents}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": steps_done,
            "policy_version": policy_version, "saved_at": time.time(), "files": sizes,
            "sha256": digests,
        }
        write_file(temporary / MANIFEST, {**manifest, "checksum": manifest_digest(manifest)})
        fsync_directory(temporary)
        if final.exists():  # the same step saved before (an earlier run): move it aside first
            os.rename(final, root / f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(temporary, final)
        fsync_directory(root)  # makes the rename itself durable
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    remove_leftovers(root)
    return final


def write_file(path: Path, content: Any) -> int:
    """Write ``content`` to ``path`` in the format its name ends with, fsync'd; returns its size in bytes."""
    with open(path, "wb") as out:
        if path.suffix == ".pt":
            torch.save(content, out)
        elif path.suffix == ".json":
            out.write(json.dumps(content, indent=1).encode())
        elif path.suffix == ".yaml":
            out.write(yaml.safe_dump(content, sort_keys=False).encode())
        else:
            raise ValueError(f"write_file: no format for {path.name!r} (.pt, .json or .yaml)")
        out.flush()
        os.fsync(out.fileno())  # on disk before the rename that publishes it
    return path.stat().st_size


def file_digest(path: Path) -> str:
    """The sha256 of the file at ``path``, in hex. Raises OSError if it cannot be read."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's values (its ``checksum`` left out), in hex."""
    values = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def fsync_directory(path: Path) -> None:
    """Make the names in directory ``path`` durable (new files, renames)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_leftovers(root: Path) -> None:
    """Delete the hidden directories of saves that died (``.step-*``): one run saves at a time."""
    for path in root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` complete checkpoints in ``root`` saved last."""
    for path in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- finding


def read_manifest(path: str | Path) -> dict:
    """The checkpoint.json of the complete checkpoint at ``path``: its files are
    all there, each of the size it says (their bytes are ``verify_checkpoint``'s).

    Raises ValueError naming ``path`` and saying why it is not one: no or an
    unreadable checkpoint.json, not a forge_lite checkpoint, a checkpoint.json
    whose values changed since the save, or a file missing or of the wrong size.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path} has no {MANIFEST}: not a complete checkpoint") from None
    except (OSError, ValueError) as error:  # unreadable, or not JSON (garbled)
        raise ValueError(f"checkpoint {path}: {MANIFEST} cannot be read ({error}): the "
                         f"checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}/{MANIFEST} is not a {FORMAT}'s")
    if manifest.get("format_version") not in READS:
        raise ValueError(f"{path} is a version {manifest.get('format_version')} checkpoint; "
                         f"this kit reads versions {list(READS)}")
    if manifest["format_version"] >= 2 and manifest.get("checksum") != manifest_digest(manifest):
        raise ValueError(f"checkpoint {path}: {MANIFEST} does not match its own checksum: its "
                         f"values (step, sizes, digests...) changed since the save; the checkpoint "
                         f"is damaged")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"checkpoint {path}: {MANIFEST} lists no files")
    for name in FILES:
        if name not in files:
            raise ValueError(f"{path}: {MANIFEST} lists no {name}")
        if manifest["format_version"] >= 2 and name not in manifest["sha256"]:
            raise ValueError(f"{path}: {MANIFEST} records no digest of {name}")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{path}: {name} is missing: the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise ValueError(f"{path}: {name} has {file.stat().st_size} bytes, {MANIFEST} says "
                             f"{size}: the checkpoint is incomplete or damaged")
    return manifest


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint.json of the checkpoint at ``path`` once every file in it
    is complete and its bytes are those saved (its sha256 digest matches).

    Raises ValueError naming ``path`` and the file for the first that is not:
    missing, of another size, changed, or unreadable (permissions, I/O).
    A format-1 checkpoint (no digests) is checked for sizes only.

    Example: ``verify_checkpoint("runs/grpo/checkpoints/step-000010")["step"]`` -> 10.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name in manifest["files"]:
        try:
            digest = file_digest(path / name)
        except OSError as error:
            raise _unreadable(path, name, error) from None
        _check_digest(path, manifest, name, digest)
    return manifest


def _check_digest(path: Path, manifest: dict, name: str, digest: str) -> None:
    expected = manifest.get("sha256", {}).get(name)  # None: format 1, no digests recorded
    if expected is not None and digest != expected:
        raise ValueError(
            f"checkpoint {path}: {name} does not match the sha256 digest recorded at the save: "
            f"it was changed or damaged since; nothing of this checkpoint is loaded"
        )


def _unreadable(path: Path, name: str, error: Exception) -> ValueError:
    # The error's type only: torch's unpickling errors advise weights_only=False,
    # which is no cure for a damaged file and unsafe for one from elsewhere.
    detail = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
    return ValueError(f"checkpoint {path}: {name} cannot be read ({detail}): the checkpoint is "
                      f"damaged; nothing of it is loaded")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete ``step-NNNNNN`` checkpoints directly in ``root``, saved last last
    (complete as ``read_manifest`` checks it: files there, sizes right)."""
    found = []
    for path in _step_directories(root):
        try:
            manifest = read_manifest(path)
        except ValueError:
            continue
        found.append((manifest["saved_at"], manifest["step"], path))
    return [path for _, _, path in sorted(found)]


def _step_directories(root: str | Path) -> list[Path]:
    """The ``step-NNNNNN`` directories in ``root``, saved last last; a save's
    temporary directory (``.step-...``) is none. One whose manifest cannot be
    read is placed by its directory's time, which its rename set."""

    def saved_at(path: Path) -> float:
        try:
            return float(json.loads((path / MANIFEST).read_bytes())["saved_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return path.stat().st_mtime

    root = Path(root)
    paths = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(paths, key=lambda p: (saved_at(p), p.name))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from ``path``, verified (``verify_checkpoint``).

    ``path`` is a run's output_dir or its ``checkpoints/`` folder: the
    checkpoint saved last, or, if that one is damaged or incomplete, the
    latest one before it that is intact, with a line on stderr naming the
    refused one and why. Or ``path`` is one ``step-NNNNNN`` checkpoint
    directory: that one. Raises FileNotFoundError if ``path`` does not
    exist, and ValueError, naming ``path`` and what was expected, if it holds
    no intact checkpoint (a damaged one named by the error, with its file).

    Example: ``find_checkpoint("runs/grpo")`` -> ``runs/grpo/checkpoints/step-000010``.
    """
    path = Path(path).expanduser()
    expected = ("expected a GRPO run's output_dir holding checkpoints/step-NNNNNN/ (saved with "
                "checkpoint_every), its checkpoints/ folder, or one step-NNNNNN/ checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"cannot resume from {path}: it does not exist; {expected}")
    if not path.is_dir():
        raise ValueError(f"cannot resume from {path}: it is a file; {expected}")
    if (path / MANIFEST).exists():  # one checkpoint, named: that one or its error
        verify_checkpoint(path)
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    refused = []
    for candidate in reversed(_step_directories(folder)):  # saved last first
        try:
            verify_checkpoint(candidate)
        except ValueError as error:
            refused.append(str(error))
            continue
        if refused:
            print(f"GRPO: refused the later checkpoint(s) in {folder}: {' | '.join(refused)}. "
                  f"Resuming from the previous complete checkpoint, {candidate.name}, instead.",
                  file=sys.stderr, flush=True)
        return candidate
    raise ValueError(
        f"cannot resume from {path}: it holds no complete checkpoint"
        + (f" ({' | '.join(refused)})" if refused else "") + f"; {expected}"
    )


# ---------------------------------------------------------------- resuming


def checkpoint_config(path: str | os.PathLike, overrides=()) -> GRPOConfig:
    """The config saved in the checkpoint ``find_checkpoint(path)`` finds, with
    ``overrides`` such as ``["steps=100"]`` applied (``load_config``'s)."""
    return load_config(find_checkpoint(path) / "config.yaml", overrides)


def resume_config(checkpoint: Path, config: GRPOConfig | None) -> GRPOConfig:
    """The config a run resumed from ``checkpoint`` (a checkpoint directory that
    ``find_checkpoint`` returned) runs with.

    None: the checkpoint's own. A config: that one, once checked. Raises
    ValueError naming the key and both values if it changes a key of
    ``FIXED_ON_RESUME``, and if its ``steps`` leave nothing to train.
    """
    try:
        saved = load_config(checkpoint / "config.yaml")
    except (OSError, ValueError, TypeError, yaml.YAMLError) as error:  # a format-1 checkpoint's, garbled
        raise _unreadable(checkpoint, "config.yaml", error) from None
    if config is None:
        config = saved
    for key, why in FIXED_ON_RESUME.items():
        before, now = _dotted(saved, key), _dotted(config, key)
        if before != now:
            raise ValueError(
                f"cannot resume {checkpoint} with {key}={now!r}: its run had {key}={before!r}, and "
                f"{key} cannot change mid-run ({why}); use {key}={before!r}, or start a new run"
            )
    step = read_manifest(checkpoint)["step"]
    if config.steps <= step:
        raise ValueError(
            f"cannot resume {checkpoint} with steps={config.steps}: it is at step {step}, so "
            f"nothing is left to train; pass a config with steps > {step} (steps=... on the "
            f"command line)"
        )
    return config


def load_checkpoint(path: str | Path) -> dict:
    """Everything in the checkpoint directory ``path``: its manifest's ``step`` and
    ``policy_version``, and ``trainer``, ``replay_buffer``, ``dataset``, ``recorder``.

    Every file is read and checked against its digest before any is parsed,
    and every one is parsed before this returns: a damaged checkpoint gives
    nothing. Raises ValueError naming ``path`` and the file if one is
    missing, of the wrong size, changed since the save, unreadable or cannot
    be parsed. The replay buffer's file is unpickled (Episodes): load only
    checkpoints you trust (a digest catches damage, not a forger).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if "sha256" not in manifest:
        print(f"GRPO: {path} was saved by an earlier forge_lite, without digests: its files' "
              f"sizes are checked, not their bytes", file=sys.stderr, flush=True)
    data = {}
    for name in manifest["files"]:  # config.yaml too: resume_config read it, this checks it
        try:
            data[name] = (path / name).read_bytes()
        except OSError as error:
            raise _unreadable(path, name, error) from None
        _check_digest(path, manifest, name, hashlib.sha256(data[name]).hexdigest())
    parsed = {}
    for name in ("trainer.pt", "replay_buffer.pt", "dataset.json", "recorder.json"):
        try:
            if name == "trainer.pt":
                parsed[name] = torch.load(io.BytesIO(data[name]), weights_only=True)
            elif name.endswith(".pt"):
                parsed[name] = torch.load(io.BytesIO(data[name]), weights_only=False)
            else:
                parsed[name] = json.loads(data[name])
        except Exception as error:  # unpickling, zip and JSON errors of every kind
            raise _unreadable(path, name, error) from None
    return {
        "step": manifest["step"],
        "policy_version": manifest["policy_version"],
        "trainer": parsed["trainer.pt"],
        "replay_buffer": parsed["replay_buffer.pt"],
        "dataset": parsed["dataset.json"],
        "recorder": parsed["recorder.json"],
    }


async def restore(s, state: dict, recorder: MetricsRecorder) -> None:
    """Put ``load_checkpoint``'s ``state`` into freshly started services and the recorder.

    The policy replicas are not here: they start on the checkpoint's weights
    (``start_services(..., policy_version=state["policy_version"])``).
    """
    await s.trainer.load_state_dict.call(state["trainer"])  # every rank the same
    await s.replay_buffer.load_state_dict.call_one(state["replay_buffer"])
    await s.dataloader.load_state_dict.call_one(state["dataset"])
    recorder.load(state["recorder"]["steps"], state["recorder"]["versions"])


def _dotted(config: GRPOConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
