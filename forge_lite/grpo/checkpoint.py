"""Checkpoints: a GRPO run that survives a restart.

Runs die: a JupyterHub culls an idle kernel, a laptop sleeps, someone
presses restart. With ``checkpoint_every: N`` in the config, the training
loop saves everything the run needs to go on after every N-th step's weight
sync, and a new run continues from the last complete checkpoint::

    result = await run_grpo(resume="runs/grpo")         # the checkpoint's own config
    python -m forge_lite.grpo --resume runs/grpo         # from a terminal

A checkpoint is a directory, ``<output_dir>/checkpoints/step-000010/`` for
10 steps done (the resumed run's first step is step 10), with one file each
for the run's config, the trainer's state (weights, Adam's moments, its step
count), the replay buffer, the dataset's position and the recorded curves.
How those files are written atomically, verified and found is
``forge_lite.grpo.checkpoint_files``; this module is the run's side: what it
saves, which checkpoint and config a resumed run takes, and putting the state
back into the run's services. The two checkpoints saved last are kept.

The policy serves the trainer's weights (the checkpoint's policy version), so
the weights are stored once; a resumed run puts them into its weight store as
that version and starts the policy replicas on them.

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
import os
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from forge_lite.grpo.checkpoint_files import (  # noqa: F401  (also this module's names, as before)
    FILES, FORMAT, FORMAT_VERSION, MANIFEST, READS, complete_checkpoints, file_digest,
    find_checkpoint, fsync_directory, load_checkpoint, manifest_digest, prune, read_manifest,
    remove_leftovers, unreadable, verify_checkpoint, write_checkpoint, write_file,
)
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.grpo.recorder import MetricsRecorder
from forge_lite.grpo.results import shown

#: How many of the checkpoints saved last a run keeps (``prune`` deletes the older).
KEEP_LAST = 2

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


def checkpoint_due(config: GRPOConfig, steps_done: int) -> bool:
    """Whether a checkpoint is due after ``steps_done`` steps (every
    ``config.checkpoint_every``; never when it is None)."""
    return config.checkpoint_every is not None and steps_done % config.checkpoint_every == 0


async def save_if_due(s, config: GRPOConfig, recorder: MetricsRecorder, steps_done: int,
                      policy_version: int) -> Path | None:
    """Save a checkpoint if ``steps_done`` is a multiple of ``config.checkpoint_every``
    (the training loop's one line); returns its path, or None when none was due."""
    if not checkpoint_due(config, steps_done):
        return None
    return await save_checkpoint(s, config, recorder, steps_done, policy_version)


async def save_checkpoint(s, config: GRPOConfig, recorder: MetricsRecorder, steps_done: int,
                          policy_version: int) -> Path:
    """Save the run as it is now to ``<config.output_dir>/checkpoints/step-<steps_done>``.

    Parameters
    ----------
    s:
        The run's ``RunComponents``; the trainer must be between steps (the
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
        raise unreadable(checkpoint, "config.yaml", error) from None
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
