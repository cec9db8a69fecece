"""Learners: real unprivileged Unix users for the tests that must run as one.

A workshop's learners are never root, and CI is. Tests that touch files,
ports, processes or GPUs run their code as throwaway users made here with
``useradd`` (removed at the end, with every process and file they left in
the shared temporary folders).

The ``.venv`` here is built from root's pyenv Python (``/root`` is 0700), which
another user cannot run: each user's command runs in a mount namespace of its
own where ``/root`` holds only that Python (see ``as_user``); nothing changes
for the rest of the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest


def can_make_learners() -> str | None:
    """None when this machine can run commands as throwaway users; else why not."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None:
        return "needs root, useradd and runuser"
    if sys.base_prefix.startswith("/root/") and shutil.which("unshare") is None:
        return "the venv's Python is under /root and unshare is missing to show it to other users"
    return None


@contextlib.contextmanager
def learners(count: int, tag: str = "fl") -> Iterator[list["User"]]:
    """``count`` throwaway Unix users, removed (with everything they left) at
    the end; pytest.skip where they cannot be made (not root, say)."""
    why = can_make_learners()
    if why:
        pytest.skip(why)
    made = []
    try:
        for i in range(count):
            name = f"{tag}{os.getpid()}{chr(ord('a') + i)}"
            if subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                              capture_output=True).returncode != 0:
                pytest.skip(f"useradd {name} failed here")
            made.append(User(name))
        yield made
    finally:
        for user in made:
            _remove(user)


class User:
    def __init__(self, name: str):
        self.name = name
        self.uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
        self.home = Path(f"/home/{name}")

    def __repr__(self) -> str:
        return f"User({self.name}, uid {self.uid})"


def _remove(user: User) -> None:
    # Processes of a throwaway user that outlived a failed check (by pid, only theirs).
    for process in psutil.process_iter(["uids"]):
        if process.info["uids"] and process.info["uids"].real == user.uid:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    time.sleep(0.5)
    # What they left in this machine's shared folders (Monarch's logs, say).
    for shared in {tempfile.gettempdir(), "/tmp", "/dev/shm"}:
        for entry in Path(shared).iterdir():
            try:
                if entry.lstat().st_uid == user.uid:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except FileNotFoundError:
                pass
    subprocess.run(["userdel", "--remove", user.name], capture_output=True)


def as_user(user: User, args: list[str], tmpdir: Path | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (the first one ``python`` for the Python running this test) as
    ``user``, in ``cwd`` (its home by default), with ``TMPDIR=tmpdir`` (the
    machine's own when None); assert nothing, return the result.

    When the venv's Python lives under ``/root`` (0700 here), the command
    runs in a mount namespace of its own in which ``/root`` is an empty
    folder holding only that Python's install (bind-mounted, read-only in
    effect: it stays root's): the machine's ``/root`` is not opened to anyone.
    """
    if args[0] == "python":
        args = [sys.executable, *args[1:]]  # this venv's Python, which the test runs under
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_LITE_", "PYTEST_"))}
    env.update(HOME=str(user.home), PYTHONDONTWRITEBYTECODE="1")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    else:
        env.pop("TMPDIR", None)
    command = ["runuser", "-u", user.name, "--", *args]
    prefix = sys.base_prefix
    if prefix.startswith("/root/"):
        script = ('set -e; mount --bind "$1" /mnt; mount -t tmpfs -o mode=755 tmpfs /root; '
                  'mkdir -p "$1"; mount --bind /mnt "$1"; umount /mnt; shift; exec "$@"')
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", prefix, *command]
    return subprocess.run(command, cwd=cwd or user.home, env=env, capture_output=True, text=True, timeout=timeout)


