"""A host's own copy of each weight version: fetched over the network once per
host, then read from a local file by the other Policy replicas there.

When several replicas on one host need version v at once (an
``update_weights.fanout``), the first fetches it from the trainer's process;
the others wait on a file lock, and it writes v to this host's cache folder
for them; they map the file (the page cache holds it, so a map copies
nothing). Without this, 4 replicas on one host would pull 4 copies through
the same link. A replica alone writes nothing: a file costs a copy of the
weights (0.06-0.86 s for 298 MB on this project's 2-core machine).

The folder is ``host_cache_<store id>`` in the user's private temporary folder
(``forge_lite.paths.private_temp_dir()``: ``<TMPDIR>/forge_lite-<uid>``, mode
0700), on the host's own disk: shared with nothing on other hosts, and with
no other Unix user on this one.
A file appears under its final name only once complete (written under a
hidden name, then renamed), and its name carries the version and the
publish's token, so a version published twice is never read stale. The
file's form is the version's tensors at the offsets of its layout
(`TensorSlot`), the layout itself coming from the weight server.

Who cleans up: each process that uses the folder holds a shared lock on
``.users`` while it does; ``leave()`` (the Policy calls it when it stops)
releases it and deletes the folder when no other process holds one.
Processes killed with SIGKILL (a kernel that died, say) never leave, but the
kernel releases their locks: the next replica of the same user to join any
store on that host deletes a folder that nobody holds (``STALE_AFTER_S`` after
it last changed). That sweep looks only in the user's own private folder: it
never reads or deletes another user's files.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import torch

from forge_lite.paths import private_temp_dir

#: Seconds after which a cache folder nobody holds is a dead run's, and the
#: next replica of the same user to join any store on the host deletes it.
STALE_AFTER_S = 60.0

# Offsets in a version's file are multiples of this, so a slice can be viewed as
# any dtype (a view needs its offset to be a multiple of the element size).
_ALIGN = 64


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor sits in a version's file: ``offset`` and ``nbytes``
    in bytes, ``dtype`` as torch names it (``"bfloat16"``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def snapshot(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[TensorSlot]]:
    """A copy of a state dict on the CPU, and the layout of its file form.

    The copy is what a holder sends (a dict of separate tensors: Monarch sent
    298 MB that way in 0.70 s between two hosts here, against 0.93 s as one
    flat buffer). Tensors that share memory (tied embeddings:
    ``lm_head.weight`` is ``model.embed_tokens.weight``) are copied once and
    named twice, and have one place in the file.
    """
    copies, slots, placed, total = {}, [], {}, 0
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor.device)
        if key not in placed:
            placed[key] = (total, tensor.detach().to("cpu", copy=True).contiguous())
            total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        offset, copies[name] = placed[key]
        slots.append(TensorSlot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset,
                                tensor.numel() * tensor.element_size()))
    return copies, slots


def unpack(flat: torch.Tensor, layout: list[TensorSlot]) -> dict[str, torch.Tensor]:
    """The state dict of a file's bytes (``flat``, ``uint8``): views, no copy."""
    return {slot.name: _view(flat, slot) for slot in layout}


def _view(flat: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    return flat[slot.offset : slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)


def file_size(layout: list[TensorSlot]) -> int:
    """Bytes of a version's file form: each distinct tensor once, aligned."""
    end = max((slot.offset + slot.nbytes for slot in layout), default=0)
    return -(-end // _ALIGN) * _ALIGN


def _write_tensors(file, tensors: dict[str, torch.Tensor], layout: list[TensorSlot]) -> None:
    """Write ``tensors`` into ``file`` at their layout's offsets (file form)."""
    written = set()
    for slot in layout:
        if slot.offset in written:
            continue
        written.add(slot.offset)
        file.seek(slot.offset)
        file.write(tensors[slot.name].reshape(-1).view(torch.uint8).numpy().data)
    file.truncate(file_size(layout))


# A version's files: "v3-<token>.bin" (the data), and while replicas fetch it,
# ".v3-<token>.lock" and ".v3-<token>.want.<pid>" (a replica waiting for it).
_VERSION_FILE = re.compile(r"\.?v(\d+)-[0-9a-f]+\..*")

# A store's folder: "host_cache_<store id>" in the user's private temporary folder.
_FOLDER_PREFIX = "host_cache_"


class HostCache:
    """This host's folder of weight versions for one weight store.

    ``store_id``: the store's id (a hex string); ``keep_last``: versions kept
    in the folder (the newest by number).
    """

    def __init__(self, store_id: str, keep_last: int):
        self.folder = private_temp_dir() / f"{_FOLDER_PREFIX}{store_id}"
        self.keep_last = keep_last
        self._users_fd: int | None = None
        self._writes: set[asyncio.Task] = set()

    def path(self, version: int, token: str) -> Path:
        return self.folder / f"v{version}-{token}.bin"

    async def load(self, version: int, token: str, layout: list[TensorSlot],
                   fetch: Callable[[], Awaitable[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Version ``version`` (published as ``token``, laid out as ``layout``)
        as a state dict: from this host's file if there is one, else ``await
        fetch()`` (a copy from the process that holds it), once for every
        replica on the host that asks meanwhile.

        The replica that fetches writes the file only when another replica
        waits for it: one replica alone on its host loads from memory and
        writes nothing. A fetch that fails raises here and leaves no file;
        the next waiting replica then fetches itself.
        """
        self._join()
        path = self.path(version, token)
        if path.exists():
            return unpack(_map(path), layout)
        stem = f".v{version}-{token}"
        want = self.folder / f"{stem}.want.{os.getpid()}"
        want.touch()
        lock = await asyncio.to_thread(_lock, self.folder / f"{stem}.lock")
        want.unlink(missing_ok=True)
        try:
            if path.exists():  # another replica on this host wrote it while we waited
                os.close(lock)
                return unpack(_map(path), layout)
            tensors = await fetch()
        except BaseException:
            os.close(lock)
            raise
        if not any(self.folder.glob(f"{stem}.want.*")):
            os.close(lock)  # nobody waits: no file (a later replica fetches its own copy)
            self._drop_old()
            return tensors
        # Write the file in the background, still holding the lock: this
        # replica loads from memory right away, and the others wait only for
        # the write, not for a fetch of their own.
        task = asyncio.create_task(self._write(tensors, layout, path, lock))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return tensors

    async def _write(self, tensors: dict[str, torch.Tensor], layout: list[TensorSlot], path: Path,
                     lock: int) -> None:
        try:
            await asyncio.to_thread(self._write_file, tensors, layout, path)
        finally:
            os.close(lock)  # releases the lock: the waiters find the file

    def _write_file(self, tensors: dict[str, torch.Tensor], layout: list[TensorSlot], path: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as file:
                _write_tensors(file, tensors, layout)
            os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        except BaseException:
            os.remove(tmp)
            raise
        self._drop_old()

    def _drop_old(self) -> None:
        """Delete the files of all but the newest ``keep_last`` versions."""
        files = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _VERSION_FILE.fullmatch(p.name))]
        newest = sorted({version for version, _ in files})[-self.keep_last :]
        for version, p in files:
            if version not in newest:
                p.unlink(missing_ok=True)

    def _join(self) -> None:
        """Create the folder and hold a shared lock on it for this process's
        life; on the first join, delete the folders of this user's runs whose
        processes are all gone (killed before they could leave)."""
        if self._users_fd is None:
            private_temp_dir()  # made again (0700) if something deleted it since __init__
            self.folder.mkdir(mode=0o700, exist_ok=True)
            self._users_fd = os.open(self.folder / ".users", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            # Only this user's folder is swept: other users' runs are not ours to judge or delete.
            for other in self.folder.parent.glob(f"{_FOLDER_PREFIX}*"):
                try:
                    # Old enough that no process is between creating it and locking it.
                    stale = time.time() - other.stat().st_mtime > STALE_AFTER_S
                except FileNotFoundError:  # another process deleted it just now
                    continue
                if stale and other != self.folder:
                    _delete_if_unused(other)

    async def flush(self) -> None:
        """Wait until this process's files are written (errors are the writes' own)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def leave(self) -> None:
        """Finish this process's writes, stop using the folder, and delete it
        if no other process on the host still uses it. Safe to call twice."""
        await self.flush()
        if self._users_fd is None:
            return
        os.close(self._users_fd)  # our shared lock goes; then ask for the folder alone
        self._users_fd = None
        _delete_if_unused(self.folder)


def _delete_if_unused(folder: Path) -> bool:
    """Delete ``folder`` if no process holds a lock on its ``.users``; say whether it did."""
    try:
        fd = os.open(folder / ".users", os.O_RDWR)
    except FileNotFoundError:  # another process deleted it just now
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when nobody holds a shared lock
    except BlockingIOError:
        return False  # still in use: its last user deletes it
    else:
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


_caches: dict[str, HostCache] = {}


def host_cache(store_id: str, keep_last: int) -> HostCache:
    """This process's `HostCache` of a store: one per process, however many
    copies of the store it was sent (each copy with a cache of its own would
    hold the folder's lock forever)."""
    if store_id not in _caches:
        _caches[store_id] = HostCache(store_id, keep_last)
    return _caches[store_id]


def _lock(path: Path) -> int:
    """Open ``path`` and take an exclusive lock on it (blocking); the fd holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _map(path: Path) -> torch.Tensor:
    """The file as a flat ``uint8`` tensor over its pages (no copy)."""
    return torch.from_file(str(path), shared=True, size=path.stat().st_size, dtype=torch.uint8)
