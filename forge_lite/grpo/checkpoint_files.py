"""A checkpoint's files on disk: written atomically, read back verified.

This is the file format of ``forge_lite.grpo.checkpoint`` (which says when a
run saves and how it resumes); nothing here talks to a service. A checkpoint
is one directory under the run's output_dir::

    checkpoints/step-000010/      10 steps done: the resumed run's first step is step 10
        checkpoint.json           what it is: step, policy version, save time, each file's size
                                  and sha256 digest
        config.yaml               the run's config
        trainer.pt                the trainer's weights, Adam's moments, its step count (torch.save)
        replay_buffer.pt          the buffer's episodes and its sampling RNG (a pickle: resume
                                  only from checkpoints you trust)
        dataset.json              the dataset's epoch and how many of its rows were served
        recorder.json             every step and version recorded so far: the curves

Atomic: a save writes into a hidden temporary directory beside the
checkpoints (``.step-000010.tmp-...``), fsyncs every file and the directory,
then renames it to ``step-000010``, and a rename is atomic. A crash mid-save
leaves the temporary directory, which is never taken for a checkpoint (the
next save deletes it), and the earlier checkpoints untouched. A
``step-NNNNNN`` directory is complete only if its checkpoint.json is there
and names files that are all there, each of the size it says. ``prune``
keeps the checkpoints saved last.

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
"""

from __future__ import annotations

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

FORMAT = "forge_lite GRPO checkpoint"
#: 2: checkpoint.json records each file's sha256 and its own. 1 (sizes only) is still read.
FORMAT_VERSION = 2
READS = (1, 2)
MANIFEST = "checkpoint.json"
#: The files every checkpoint holds besides its manifest.
FILES = ("config.yaml", "trainer.pt", "replay_buffer.pt", "dataset.json", "recorder.json")
_NAME = re.compile(r"step-(\d+)")


# ---------------------------------------------------------------- writing


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
            raise unreadable(path, name, error) from None
        _check_digest(path, manifest, name, digest)
    return manifest


def _check_digest(path: Path, manifest: dict, name: str, digest: str) -> None:
    expected = manifest.get("sha256", {}).get(name)  # None: format 1, no digests recorded
    if expected is not None and digest != expected:
        raise ValueError(
            f"checkpoint {path}: {name} does not match the sha256 digest recorded at the save: "
            f"it was changed or damaged since; nothing of this checkpoint is loaded"
        )


def unreadable(path: Path, name: str, error: Exception) -> ValueError:
    """The ValueError for the file ``name`` of the checkpoint at ``path`` that
    could not be read or parsed (``error`` says why)."""
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


# ---------------------------------------------------------------- reading


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
            raise unreadable(path, name, error) from None
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
            raise unreadable(path, name, error) from None
    return {
        "step": manifest["step"],
        "policy_version": manifest["policy_version"],
        "trainer": parsed["trainer.pt"],
        "replay_buffer": parsed["replay_buffer.pt"],
        "dataset": parsed["dataset.json"],
        "recorder": parsed["recorder.json"],
    }
