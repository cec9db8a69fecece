"""The kit's process on each host, and what a host reports about itself.

One idea: the small actor (``HostAgent``) the kit starts on every attached
worker, next to the replicas. It is how the caller reaches a machine at all
apart from the replicas: it answers the liveness probe (``Cluster`` in
``cluster.py`` sends it), reports the host's facts (CPUs, GPUs, versions,
which worker process this is) and kills processes there on request.
Attaching a worker (``start_agent``) means connecting to it and starting
this agent on it; the facts it reports decide whether the host may join
(same versions as the caller, not a worker already attached).
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import itertools
import os
import signal
import socket
import sys

import psutil
from monarch.actor import Actor, attach_to_workers, endpoint

from forge_lite.controller.cluster.hosts import Host
from forge_lite.controller.errors import ClusterError


def host_facts() -> dict:
    """What this machine has, as the HostAgent reports it (also used for this host)."""
    from forge_lite.controller.gpus import visible_gpus

    # Counting GPUs imports torch (seconds); without an NVIDIA driver there are none.
    gpus = visible_gpus() if os.path.exists("/proc/driver/nvidia") else []
    names: list[str] = []
    if gpus:
        import torch

        names = sorted({torch.cuda.get_device_name(i) for i in range(len(gpus))})
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 1,
        "gpus": gpus,
        "gpu_names": names,
        "python": sys.executable,
        "forge_lite": _version("forge-lite"),
        "monarch": _version("torchmonarch"),
        "worker_pid": os.getppid(),
        # With the worker's pid, which worker this is: two addresses that reach
        # the same (boot, pid) are one worker spelled twice.
        "boot_id": _boot_id(),
    }


def _boot_id() -> str:
    """This boot of this machine (Linux: a random id per boot); the hostname elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class HostAgent(Actor):
    """The kit's process on one host: probes, facts, and kills there.

    Its parent is the host's Monarch worker, so "the worker's children" are
    exactly the processes the cluster started on that host.
    """

    @endpoint
    def ping(self) -> int:
        return os.getpid()

    @endpoint
    def facts(self) -> dict:
        return host_facts()

    @endpoint
    def kill(self, pids: list[int], sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to those of ``pids`` that are this worker's children
        (a pid of a process long gone may belong to someone else by now)."""
        worker = os.getppid()
        killed = []
        for pid in pids:
            try:
                if psutil.Process(pid).ppid() == worker:
                    os.kill(pid, sig)
                    killed.append(pid)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        return killed

    @endpoint
    def kill_host(self) -> None:
        """SIGKILL the worker and every process it started, this one last:
        to the rest of the cluster, the machine is gone."""
        worker = psutil.Process(os.getppid())
        for child in worker.children(recursive=True):
            if child.pid != os.getpid():
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        worker.kill()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- starting one

_attachments = itertools.count()


async def start_agent(address: str, index: int, timeout: float):
    """Attach the worker at ``address`` as host ``index`` and start its agent.

    Returns (the worker's HostMesh, the agent's processes, the agent, its
    facts). Raises asyncio.TimeoutError when any step takes longer than
    ``timeout`` seconds, or what Monarch raises for a worker it cannot
    attach; nothing of this attach keeps running then.
    """
    from forge_lite.controller.procs import spawn_processes, stop_processes

    # Names unique per attach: a restarted worker must not be mistaken for
    # the one that died at the same address.
    n = next(_attachments)
    mesh = attach_to_workers(ca="trust_all_connections", workers=[address], name=f"fl_host{index}_{n}")
    agent_procs = None
    try:
        await asyncio.wait_for(mesh.initialized, timeout)
        agent_procs = await asyncio.wait_for(spawn_processes(1, f"fl_agent{index}_{n}", host_mesh=mesh), timeout)
        agent = agent_procs.mesh.spawn(f"fl_agent{index}_{n}", HostAgent)
        facts = await asyncio.wait_for(agent.facts.call_one().as_asyncio(), timeout)
    except BaseException:
        if agent_procs is not None:
            await stop_processes(agent_procs, timeout=2.0)
        raise
    return mesh, agent_procs, agent, facts


def host_versions_match(host: Host) -> tuple[bool, str]:
    """(same versions as this process?, "forge_lite 0.1.0, torchmonarch 0.7.0 (same as here)")."""
    mine = {"forge_lite": _version("forge-lite"), "monarch": _version("torchmonarch")}
    theirs = {key: host.facts.get(key) for key in mine}
    text = f"forge_lite {theirs['forge_lite']}, torchmonarch {theirs['monarch']}"
    if theirs == mine:
        return True, text + " (same as here)"
    return False, text + f" (here: forge_lite {mine['forge_lite']}, torchmonarch {mine['monarch']})"


def check_versions(host: Host) -> None:
    """ClusterError naming the host when it runs other versions than this process."""
    same, versions = host_versions_match(host)
    if not same:
        raise ClusterError(f"{host.label} runs {versions}: install the same versions on every node")

