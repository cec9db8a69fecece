"""The weight store: how the trainer hands new weights to the Policy replicas.

The trainer `put`s a state dict under a policy version; each Policy replica
`get`s that version when told to update. They run in different processes, so
the store is a job directory on disk with one safetensors file per version.
(TorchForge uses torchstore for this, over RDMA where there is any; torchstore
pins an older torch and Monarch, so the kit keeps to files.)

The store belongs to one run: a trainer and the Policy replicas it feeds.
It is handed to each of them explicitly (``weight_store=store``; it pickles
as its directory), so two runs in one notebook kernel, one after the other
or at the same time, each have their own versions.

A file appears under its final name only when it is complete: it is written
to a hidden temporary name in the same directory and renamed, and a rename is
atomic, so a reader sees the whole version or nothing.

`put` is bounded by writing the file; `get` maps the file, so reading it back
from the page cache is cheap (benchmarks/weights.py times a version's whole
trip through this folder to the policy replicas).

This store needs one filesystem under every process. Across hosts, use
`forge_lite.actors.weight_server.ActorWeightStore`, whose versions travel as
Monarch messages; both have the same methods, sync (`put`, `get`, `versions`,
`latest`) and async (`aput`, `aget`, `aversions`, `alatest`).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from forge_lite.paths import private_temp_dir

_VERSION_FILE = re.compile(r"v(\d+)\.safetensors")


class WeightStore:
    """Versioned state dicts (HF parameter names -> tensors) in a run's directory.

    ``root``: the directory; by default a fresh temporary one, which is
    deleted when ``close()`` is called or this process exits (only by the
    process that created it: a copy sent to an actor never deletes it).
    ``keep_last=k`` drops all but the newest k versions after each put.

    Raises ValueError for ``keep_last < 1``.
    """

    def __init__(self, root: str | None = None, keep_last: int | None = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None to keep every version), got {keep_last}")
        self._owned = root is None
        if root is None:
            root = tempfile.mkdtemp(prefix="weights_", dir=private_temp_dir())  # 0700, this user's folder
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.keep_last = keep_last

    def __getstate__(self) -> dict:
        # The copy an actor receives names the same directory but does not own it.
        return {**self.__dict__, "_owned": False}

    def close(self) -> None:
        """Delete the directory if this store created it; safe to call twice."""
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
            self._owned = False

    def path(self, version: int) -> str:
        return os.path.join(self.root, f"v{version}.safetensors")

    def put(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Publish `state_dict` as `version` (replacing it if it exists)."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        tensors = _to_saveable(state_dict)
        fd, tmp_path = tempfile.mkstemp(prefix=f".v{version}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file(tensors, tmp_path)
            os.replace(tmp_path, self.path(version))
        except BaseException:
            os.remove(tmp_path)
            raise
        if self.keep_last is not None:
            for old in self.versions()[: -self.keep_last]:
                self.drop(old)

    def get(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict published as `version`, on the CPU."""
        try:
            return load_file(self.path(version))
        except FileNotFoundError:
            raise KeyError(
                f"weight version {version} is not in the store at {self.root}; available: {self.versions()}"
            ) from None

    def versions(self) -> list[int]:
        """Published versions, oldest first."""
        matches = (_VERSION_FILE.fullmatch(name) for name in os.listdir(self.root))
        return sorted(int(match.group(1)) for match in matches if match)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def drop(self, version: int) -> None:
        """Delete a version. Dropping one that is gone is fine: several processes may clean up."""
        try:
            os.remove(self.path(version))
        except FileNotFoundError:
            pass

    # One publisher at a time: the kernel's default store (forge_lite.actors.
    # default_store) is shared by every trainer that was given no store, and
    # a newer trainer takes it over from an older one.
    def claim(self, publisher: str) -> None:
        """Make ``publisher`` (a token) the store's publisher: every version
        published before is dropped, so nothing of an earlier trainer's run is served."""
        for version in self.versions():
            self.drop(version)
        fd, tmp_path = tempfile.mkstemp(prefix=".publisher.", suffix=".tmp", dir=self.root)
        with os.fdopen(fd, "w") as f:
            f.write(publisher)
        os.replace(tmp_path, os.path.join(self.root, ".publisher"))

    def publisher(self) -> str | None:
        """The token of the last ``claim``; None if nobody claimed the store."""
        try:
            with open(os.path.join(self.root, ".publisher")) as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def aclaim(self, publisher: str) -> None:
        await asyncio.to_thread(self.claim, publisher)

    async def apublisher(self) -> str | None:
        return self.publisher()

    # Async forms, the interface the trainer and the Policy use, shared with
    # the actor-backed store (forge_lite.actors.weight_server.ActorWeightStore).
    # In a thread, so an actor keeps serving while a file is written or read.
    async def aput(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        await asyncio.to_thread(self.put, version, state_dict)

    async def aget(self, version: int) -> dict[str, torch.Tensor]:
        return await asyncio.to_thread(self.get, version)

    async def aversions(self) -> list[int]:
        return self.versions()

    async def alatest(self) -> int | None:
        return self.latest()

    async def aclose(self) -> None:
        """``close()``, under the name the actor-backed store uses too."""
        self.close()

    def __repr__(self) -> str:
        return f"WeightStore(root={self.root!r}, versions={self.versions()})"


def _to_saveable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses
    shared tensors, and tied embeddings are exactly that)."""
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors
