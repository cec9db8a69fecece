"""The caller's memory limit: was a worker that died of SIGKILL killed by the OOM killer?

A JupyterHub server's memory limit is a memory cgroup holding the notebook's
kernel and every worker it started. At the limit the kernel's OOM killer
ends one of them (``procs.WORKER_OOM_SCORE_ADJ`` makes it a worker, not the
kernel), and the worker's replica reports only a SIGKILL. The cgroup counts
its OOM kills: a count that grew since the processes started names the
cause (``oom_killed``), and the limit (``memory_limit_mb``) says how much
there was. Linux only; elsewhere, or where the files cannot be read, the
answers are None and False.
"""

from __future__ import annotations

import os


def _memory_cgroup() -> tuple[str, str] | None:
    """This process's memory cgroup: ("v1" | "v2", its folder), or None."""
    try:
        with open("/proc/self/cgroup") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            return "v1", f"/sys/fs/cgroup/memory{path}"
    for hierarchy, controllers, path in entries:
        if hierarchy == "0" and controllers == "":
            return "v2", f"/sys/fs/cgroup{path}"
    return None


def _read_memory_cgroup(v1_file: str, v2_file: str) -> str | None:
    """The text of the caller's memory cgroup file (``v1_file`` under cgroup
    v1, ``v2_file`` under v2); None without a cgroup or where it cannot be read."""
    group = _memory_cgroup()
    if group is None:
        return None
    version, folder = group
    try:
        with open(os.path.join(folder, v1_file if version == "v1" else v2_file)) as f:
            return f.read()
    except OSError:
        return None


def memory_oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in the caller's
    memory cgroup (a JupyterHub server's memory limit is one); None where
    Linux does not say."""
    text = _read_memory_cgroup("memory.oom_control", "memory.events")
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def memory_limit_mb() -> int | None:
    """The caller's memory cgroup's limit in MB; None without one."""
    text = _read_memory_cgroup("memory.limit_in_bytes", "memory.max")
    try:
        limit = int((text or "").strip())
    except ValueError:  # "max" (v2): no limit; or no cgroup
        return None
    return None if limit >= 2**60 else limit // 2**20


def oom_killed(procs) -> bool:
    """Has the OOM killer killed a process of the caller's memory cgroup
    since ``procs`` (a ``procs.Processes``, which noted the count when it
    started) started? (For a process that died of SIGKILL: the likely
    reason.)"""
    now = memory_oom_kills()
    return now is not None and procs.oom_kills_at_start is not None and now > procs.oom_kills_at_start
