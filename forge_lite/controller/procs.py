"""Spawning and stopping the processes that actors live in.

Every ProcMesh the kit creates goes through here, so the kit always knows
which processes it owns: it can stop them all when the caller exits (no
orphans after a notebook kernel restarts), bound every stop with a timeout
(Monarch's stop can hang on a mesh whose process died), and give back the
GPUs each process was handed (``forge_lite.controller.gpus`` decides which;
``forge_lite.controller.memory`` says whether a killed one hit the memory
limit).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from monarch.actor import Actor, ProcMesh, endpoint, this_host
from monarch._rust_bindings.monarch_hyperactor.host_mesh import BootstrapCommand
from monarch._src.actor.host_mesh import default_bootstrap_cmd

# The module every Monarch process starts with (what default_bootstrap_cmd runs).
_BOOTSTRAP_MAIN = "monarch._src.actor.bootstrap_main"

from forge_lite.controller import runtime
# Also this module's names, as before (gpus.py and memory.py were part of it).
from forge_lite.controller.gpus import pack_gpus, release_gpus, reserve_gpus, visible_gpus  # noqa: F401
from forge_lite.controller.memory import memory_limit_mb, memory_oom_kills, oom_killed  # noqa: F401

log = logging.getLogger("forge_lite")

# Stopping a healthy 1-process mesh takes well under a second; a mesh with a dead
# process can hang in Monarch's log flush. Past this we kill what is left.
STOP_TIMEOUT_S = 10.0


# How much more the kernel's OOM killer should prefer a worker to other
# processes (-1000..1000; raising one's own is allowed without privileges).
# A learner's server with a memory limit holds the notebook's kernel and its
# workers: at the limit, the kernel dying loses the learner's state and leaves
# the notebook waiting on nothing, while a dead worker is a FAILED replica that
# says why and comes back.
WORKER_OOM_SCORE_ADJ = 500


class _ProcessInfo(Actor):
    """A tiny actor on every process the kit spawns: it reports the pid, so
    the kit can kill a process on purpose (fault injection) or if stop hangs.
    Started first on each process, it also makes the process the OOM killer's
    first choice (``WORKER_OOM_SCORE_ADJ``)."""

    def __init__(self):
        try:
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write(str(WORKER_OOM_SCORE_ADJ))
        except OSError:  # not Linux, or a sandbox that forbids it: keep the default
            pass

    @endpoint
    def pid(self) -> int:
        return os.getpid()


@dataclass
class Processes:
    """One ProcMesh the kit owns: its processes' pids, hosts and GPUs."""

    mesh: ProcMesh
    name: str
    pids: list[int]
    gpus: list[int] = field(default_factory=list)
    gpu_share: float = 1.0  # of each of `gpus` (see gpus.pack_gpus)
    info: object = None  # the _ProcessInfo mesh: answers health probes
    stopped: bool = False
    # On a cluster (forge_lite.controller.cluster): where the mesh runs, and
    # the host of each pid. None / empty: this machine.
    placement: object = None
    pid_hosts: list = field(default_factory=list)
    remote: bool = False  # does any process run on another host than the caller's?
    # The caller's memory cgroup's OOM-kill count when these processes started.
    oom_kills_at_start: int | None = None
    # The caller's process for light actors (see acquire_shared): how many
    # actor meshes live on it, and whether it still takes new ones.
    shared: bool = False
    tenants: int = 0
    closed: bool = False


_live: list[Processes] = []


# ---------------------------------------------------------------- spawn / stop


# A process on another host that has not started in this long is not coming.
REMOTE_SPAWN_TIMEOUT_S = 60.0


async def spawn_processes(
    count: int,
    name: str,
    gpus: list[int] | None = None,
    env: dict[str, str] | None = None,
    placement=None,
    host_mesh=None,
    gpu_share: float = 1.0,
) -> Processes:
    """Start ``count`` processes (per host) as one ProcMesh named ``name``.

    Args:
        count: processes per host.
        name: the mesh's name (Monarch adds a random suffix).
        gpus: on this machine, process ``i`` sees only ``gpus[i]`` (as its cuda:0).
        gpu_share: the share of its GPU each process was given (``gpus.reserve_gpus``),
            given back when the processes stop.
        env: added to every process's environment (e.g. the replica index).
        placement: a cluster ``Placement``: start on its hosts, each process
            with its GPU there and the host's own Python. None: this machine.
        host_mesh: start on this HostMesh with the worker's own command and
            environment (the cluster's agents, before a host's Python is known).

    Returns:
        The Processes, their pids known. On any error (a process on another
        host that does not start within REMOTE_SPAWN_TIMEOUT_S seconds
        included) whatever started is stopped, the placement given back, and
        the error raised.
    """
    runtime.configure_client()
    base = default_bootstrap_cmd()

    # Quiet children: a progress bar per model load, or a multiprocessing
    # warning from a killed process (with a path in it), would land in
    # whatever notebook cell happens to be running.
    quiet = {
        "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        "PYTHONWARNINGS": os.environ.get(
            "PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker"
        ),
        runtime.WORKER_ENV: "1",
        # The caller's import path as it is now, so that a class (or an
        # argument's class) from a module the caller found through its own
        # sys.path entries (`sys.path.append("..")` in a notebook, pytest's
        # rootdir insertion) can be imported in the new process too.
        "PYTHONPATH": caller_import_path(),
    }
    # The caller's torch threads per process (a GRPO run's threads_per_process
    # sets it). A process here inherits it anyway; one on another host gets
    # its worker's environment instead, and with torch's default (a thread
    # per core) its threads spin-wait for cores the others hold: on 2 cores,
    # the tiny GRPO config across two namespace hosts ran about ten times
    # slower without this line, the trainer's step most of all.
    if "OMP_NUM_THREADS" in os.environ:
        quiet["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]

    def command_for(point):
        extra = {**quiet, **(env or {})}
        # A process that was not given a GPU must not grab one: torch would
        # otherwise use cuda:0 of every process on a GPU node.
        extra["CUDA_VISIBLE_DEVICES"] = str(gpus[point.rank]) if gpus else ""
        return base.with_env(extra)

    def command_on_host(point):
        # On a cluster host: that host's Python (its path may differ from
        # ours), and the GPU it gave this process.
        host_index, proc = dict(point).get("hosts", 0), dict(point).get("procs", 0)
        host = placement.hosts[host_index]
        extra = {**quiet, **(env or {})}
        extra["CUDA_VISIBLE_DEVICES"] = str(placement.gpus[host_index][proc]) if placement.gpus else ""
        if host.is_this_host:
            return base.with_env(extra)
        return BootstrapCommand(host.facts["python"], None, ["-m", _BOOTSTRAP_MAIN], {}).with_env(extra)

    remote = False
    if host_mesh is not None:
        mesh = host_mesh.spawn_procs(per_host={"procs": count}, name=name)
        remote = True
    elif placement is not None:
        mesh = placement.mesh.spawn_procs(per_host={"procs": count}, name=name, bootstrap_command=command_on_host)
        remote = not placement.on_this_host_only
    else:
        mesh = this_host().spawn_procs(
            per_host={"procs": count}, name=name, bootstrap_command=command_for
        )
    procs = Processes(mesh=mesh, name=name, pids=[], gpus=list(gpus or []), gpu_share=gpu_share, placement=placement, remote=remote,
                      oom_kills_at_start=memory_oom_kills())
    _live.append(procs)
    try:
        if remote:
            # A host that dies now would leave these awaits hanging for a
            # minute or more (Monarch does not notice quickly): bound them.
            await asyncio.wait_for(_start_info(procs, name), REMOTE_SPAWN_TIMEOUT_S)
        else:
            await _start_info(procs, name)
    except BaseException:
        await stop_processes(procs)
        raise
    return procs


async def _start_info(procs: Processes, name: str) -> None:
    await procs.mesh.initialized
    procs.info = procs.mesh.spawn(f"{name}_info", _ProcessInfo)
    pids = await procs.info.pid.call()
    procs.pids = [pid for _, pid in pids.items()]
    if procs.placement is not None:
        procs.pid_hosts = [procs.placement.hosts[dict(point).get("hosts", 0)] for point, _ in pids.items()]


def kill_processes(procs: Processes, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process of the mesh (fault injection, last resort).

    A pid means something only on its own machine: processes on another
    host are killed there, by its agent, and those on a lost host when it
    comes back.
    """
    if not procs.remote:
        for pid in procs.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return
    if not procs.pid_hosts:
        log.debug("cannot kill %s: its host is not known", procs.name)
        return
    by_host: dict[int, tuple] = {}
    for pid, host in zip(procs.pids, procs.pid_hosts):
        by_host.setdefault(id(host), (host, []))[1].append(pid)
    for host, pids in by_host.values():
        if host.state == "LOST":
            if procs not in host.orphans:
                host.orphans.append(procs)
        else:
            procs.placement.cluster.kill_pids(host, pids, sig)


async def stop_processes(procs: Processes, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop a mesh's processes; harmless to call twice; never hangs."""
    if procs.stopped:
        return
    procs.stopped = True
    try:
        if procs.placement is not None and procs.placement.lost:
            # Monarch's stop would wait for a host that does not answer:
            # kill what can be reached now, the rest when its host is back.
            kill_processes(procs)
        else:
            await asyncio.wait_for(procs.mesh.stop(), timeout)
    except Exception as e:  # includes TimeoutError and an already-dead mesh
        log.debug("stop of %s did not finish cleanly (%r); killing", procs.name, e)
        kill_processes(procs)
    finally:
        release_gpus(procs.gpus, procs.gpu_share)
        if procs.placement is not None:
            procs.placement.release()
        if procs in _live:
            _live.remove(procs)


# ---------------------------------------------------------------- light actors

# Actors that run no model (the dataset, the replay buffer, the advantages)
# need little memory, but each process costs its start-up and its Python.
# They live together on one process per caller, which never loads torch
# (see forge_lite.rl.episode); each is still its own actor (own mesh, own
# state, stopped on its own). What they share is their fate: a crash of that
# process takes all of them down.
SHARED_NAME = "light_actors"

_shared: Processes | None = None
_shared_locks: dict = {}  # event loop -> asyncio.Lock (a lock belongs to one loop)


def _alive(pid: int) -> bool:
    """Is process ``pid`` (on this machine) running, not a zombie?"""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def acquire_shared() -> Processes:
    """The caller's one process for light actors, started on first use;
    count one more actor mesh on it. Give it back with ``release_processes``.

    A new process replaces the old one when that one is stopped or dead, or
    refuses new actors (Monarch spawns nothing more on a process once an
    actor's ``__init__`` failed there).
    """
    global _shared
    loop = asyncio.get_running_loop()
    lock = _shared_locks.get(loop)
    if lock is None:
        _shared_locks.clear()  # the locks of finished loops
        lock = _shared_locks[loop] = asyncio.Lock()
    async with lock:
        current = _shared
        if current is None or current.stopped or current.closed or not all(map(_alive, current.pids)):
            current = await spawn_processes(1, SHARED_NAME)
            current.shared = True
            _shared = current
        current.tenants += 1
        return current


async def release_processes(procs: Processes, actors=None, timeout: float = STOP_TIMEOUT_S) -> None:
    """Give back the processes ``actors`` ran on: stop them, or, for the
    shared process of light actors, stop ``actors`` only, and the process
    with its last actor mesh. Never hangs."""
    global _shared
    if not procs.shared:
        await stop_processes(procs, timeout)
        return
    procs.tenants -= 1
    if procs.tenants > 0 and not procs.stopped:
        if actors is not None:
            try:
                await asyncio.wait_for(actors.stop(), timeout)
            except Exception as e:  # a dead process: nothing left to stop
                log.debug("stop of an actor mesh on %s failed (%r)", procs.name, e)
        return
    if _shared is procs:
        _shared = None
    await stop_processes(procs, timeout)


def caller_import_path() -> str:
    """This process's ``sys.path`` as a PYTHONPATH value (absolute, in order).

    A new process puts PYTHONPATH's entries before its own defaults and drops
    the duplicates (``site``), so its ``sys.path`` starts like the caller's.
    ``""`` (the current directory, in an interactive session) becomes the
    directory itself: the child may not start in it.
    """
    entries = []
    for entry in sys.path:
        entry = os.path.abspath(entry or os.getcwd())
        if entry not in entries and os.path.exists(entry):
            entries.append(entry)
    return os.pathsep.join(entries)


@atexit.register
def _kill_leftovers() -> None:
    # When the kernel shuts down or restarts, nobody awaits a graceful stop:
    # make sure no process outlives it.
    # Processes on other hosts are ended by their workers when this client
    # goes away (a Monarch worker drops a disconnected client's work).
    for procs in list(_live):
        if not procs.remote:
            kill_processes(procs)
