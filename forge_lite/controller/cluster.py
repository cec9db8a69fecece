"""The cluster: the hosts that services and actors are placed on.

By default the cluster is this machine alone and nothing here runs: every
replica is spawned on Monarch's ``this_host()``, as it always was. To use
several machines, start a Monarch worker on each (``python -m
forge_lite.worker --address tcp://0.0.0.0:26600``) and attach them:

    cluster = await forge_lite.attach_cluster(["tcp://10.0.0.2:26600", "tcp://10.0.0.3:26600"])

or hand the kit a ``monarch.job`` job (``ProcessJob`` on one machine for
testing, ``SlurmJob``, ``KubernetesJob``): ``await forge_lite.attach_job(job)``.
From then on ``options(hosts=H, procs=P, num_replicas=R)`` gives each replica
H hosts × P processes, least-occupied hosts first.

Each host is one Monarch ``HostMesh`` of one worker. Next to the replicas, the
kit runs one small process per host, the ``HostAgent``: it reports what the
host has (CPUs, GPUs, versions), kills processes there on request, and answers
a probe every ``probe_interval`` seconds. That probe is how a lost host is
noticed: Monarch 0.7 alone lets a call to a dead or cut-off host hang for
40-70 s, or forever, without telling anyone. A host that misses one probe
deadline is LOST; every service hears about it at once. The agent keeps being
probed (a cut link that comes back), and a lost worker's address keeps being
attached again (a restarted worker); either way the host is UP again and
services use it again.

Security: Monarch 0.7.0 does not implement TLS. Anyone who can reach a
worker's port can run code on that machine, so a cluster must be on a
trusted network (a private subnet, a VPN, a cluster's internal network).
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import ipaddress
import itertools
import logging
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import psutil
from monarch.actor import Actor, HostMesh, attach_to_workers, endpoint, this_host

from forge_lite.controller import runtime

log = logging.getLogger("forge_lite")

UP, LOST = "UP", "LOST"

# A probe is sent to every host this often (seconds) ...
PROBE_INTERVAL_S = 0.5
# ... and a host that has not answered within this many seconds is LOST.
# Together they bound detection: at most interval + timeout after a host dies.
PROBE_TIMEOUT_S = 1.5
# A lost host with a known address is attached again at most this often,
# each try given this long.
REATTACH_INTERVAL_S = 2.0
REATTACH_TIMEOUT_S = 5.0
# Attaching a worker and starting its agent: past this it counts as unreachable.
ATTACH_TIMEOUT_S = 15.0


class ClusterError(RuntimeError):
    """The cluster could not be attached, or cannot hold what was asked of it."""


# ---------------------------------------------------------------- on each host


def host_facts() -> dict:
    """What this machine has, as the HostAgent reports it (also used for this host)."""
    from forge_lite.controller.procs import visible_gpus

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


# ---------------------------------------------------------------- hosts


@dataclass(eq=False)  # a host is itself: compared by identity
class Host:
    """One machine of the cluster, as the caller sees it.

    ``placed`` counts the replicas (and actors) placed here, which is what
    "least occupied" means; ``state`` is UP or LOST.
    """

    index: int
    address: str | None  # "tcp://10.0.0.2:26600"; None for this machine or a job's host
    mesh: Any  # a HostMesh of this one host
    facts: dict = field(default_factory=dict)
    is_this_host: bool = False
    name: str = ""  # "host1"; "local" when the cluster is this machine alone
    agent: Any = None  # the HostAgent (None on this machine: the caller is the probe)
    agent_procs: Any = None
    state: str = UP
    reason: str = "attached"
    placed: int = 0
    gpus_in_use: set = field(default_factory=set)
    orphans: list = field(default_factory=list)  # processes to kill when it comes back
    reattaching: bool = False
    last_reattach: float = 0.0
    attachments: int = 1  # a new worker (replace_host, re-attach) makes it a new host

    def __post_init__(self) -> None:
        self.name = self.name or f"host{self.index}"

    @property
    def where(self) -> str:
        """``10.0.0.3:26600``, ``this machine``, or a job host's hostname."""
        if self.address:
            return _where(self.address)
        return "this machine" if self.is_this_host else self.facts.get("hostname", "?")

    @property
    def label(self) -> str:
        """``host1 (10.0.0.3:26600)``: the name, and where it is."""
        return f"{self.name} ({self.where})"

    @property
    def gpus(self) -> list[int]:
        return list(self.facts.get("gpus", []))

    def reserve_gpus(self, count: int) -> list[int]:
        free = [g for g in self.gpus if g not in self.gpus_in_use]
        taken = free[:count]
        self.gpus_in_use.update(taken)
        return taken

    def free_gpus(self) -> int:
        return len(self.gpus) - len(self.gpus_in_use)


def _where(address: str) -> str:
    """``tcp://10.0.0.2:26600`` -> ``10.0.0.2:26600``."""
    return address.split("://", 1)[-1].split("@", 1)[0]


@dataclass
class Placement:
    """Where one replica (or actor) runs: its hosts, a HostMesh over exactly
    those hosts, and each process's GPU (per host, per process) or None."""

    cluster: "Cluster"
    hosts: list[Host]
    mesh: Any
    gpus: list[list[int]] | None = None
    released: bool = False

    @property
    def name(self) -> str:
        """``host1``, or ``host0+host2`` for a replica over two hosts."""
        return "+".join(h.name for h in self.hosts)

    @property
    def on_this_host_only(self) -> bool:
        return len(self.hosts) == 1 and self.hosts[0].is_this_host

    @property
    def lost(self) -> list[Host]:
        return [h for h in self.hosts if h.state == LOST]

    def release(self) -> None:
        """Give the hosts' slots and GPUs back; safe to call twice."""
        if self.released:
            return
        self.released = True
        for i, host in enumerate(self.hosts):
            host.placed -= 1
            if self.gpus:
                host.gpus_in_use.difference_update(self.gpus[i])


HostListener = Callable[[str, Host, str], None]  # (UP or LOST, host, reason)


class Cluster:
    """The hosts replicas are placed on, and the watch kept on them.

    Get one from ``forge_lite.cluster()`` (this machine, unless a cluster was
    attached), ``forge_lite.attach_cluster(addresses)`` or
    ``forge_lite.attach_job(job)``; do not build it directly.
    """

    def __init__(self, hosts: list[Host], kind: str, *, probe_interval: float = PROBE_INTERVAL_S,
                 probe_timeout: float = PROBE_TIMEOUT_S, job: Any = None, job_mesh: Any = None):
        self.hosts = hosts
        self.kind = kind  # "local", "workers" or "job"
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.job = job
        self._job_mesh = job_mesh  # a job's HostMesh of every host: sliced for multi-host replicas
        self._group_meshes: dict[tuple[int, ...], Any] = {}
        self._listeners: list[HostListener] = []
        self._tasks: set[asyncio.Task] = set()  # the probes, and kills sent without waiting
        self.closed = False

    # ------------------------------------------------------------ reading it

    @property
    def is_local(self) -> bool:
        """This machine only: the kit places everything as it always did."""
        return self.kind == "local"

    def host(self, index: int) -> Host:
        if not 0 <= index < len(self.hosts):
            raise IndexError(f"no host {index}: this cluster has hosts 0..{len(self.hosts) - 1}")
        return self.hosts[index]

    def up_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.state == UP]

    def choose_among(self, names: Sequence[str | int], count: int, what: str) -> list[Host]:
        """``count`` of the hosts ``names`` names, for ``options(on_hosts=...)``:
        those up first, then the least occupied, lowest index first.

        ``names`` are host names (``"host1"``) or indices (``1``). Raises
        ValueError, naming the hosts the cluster has, for a host it does not
        have, or when fewer than ``count`` distinct hosts are named.
        """
        named: list[Host] = []
        for name in names:
            host = next((h for h in self.hosts if name == h.name or name == h.index), None)
            if host is None:
                alone = " (this machine alone: attach a cluster first)" if self.is_local else ""
                raise ValueError(
                    f"{what}: no host {name!r} in the cluster; it has "
                    f"{', '.join(f'{h.index}={h.name}' for h in self.hosts)}{alone}"
                )
            if host not in named:
                named.append(host)
        if len(named) < count:
            raise ValueError(f"{what} needs {count} host(s) per replica but on_hosts names "
                             f"{len(named)} ({', '.join(h.name for h in named)})")
        chosen = sorted(named, key=lambda h: (h.state != UP, h.placed, h.index))[:count]
        first = min(h.index for h in chosen)
        if self.kind == "job" and sorted(h.index for h in chosen) != list(range(first, first + count)):
            # A job's replica over several hosts is a slice of its HostMesh (see _mesh_for).
            raise ValueError(f"{what}: on a job's cluster a replica over {count} hosts needs neighbouring "
                             f"hosts; on_hosts gives {', '.join(h.name for h in chosen)}")
        return chosen

    def table(self) -> str:
        """One line per host: name, where, state, CPUs, GPUs, what is placed there."""
        lines = [f"{'host':<7} {'where':<24} {'state':<5} {'cpus':>4} {'gpus':>4} {'placed':>6}  reason"]
        for h in self.hosts:
            lines.append(
                f"{h.name:<7} {h.where:<24} {h.state:<5} {h.facts.get('cpus', '?'):>4} "
                f"{len(h.gpus):>4} {h.placed:>6}  {h.reason}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        states = ", ".join(f"{h.name} {h.state}" for h in self.hosts)
        return f"<Cluster {self.kind}: {len(self.hosts)} host(s): {states}>"

    # ------------------------------------------------------------ placing

    def check(self, hosts: int, what: str) -> None:
        """Raise ValueError if no replica of ``what`` could ever fit ``hosts`` hosts."""
        if hosts > len(self.hosts):
            raise ValueError(
                f"{what} asks for hosts={hosts} per replica, but the cluster has "
                f"{len(self.hosts)} host(s) ({', '.join(h.name for h in self.hosts)}); "
                f"attach more workers or lower hosts="
            )

    def place(self, hosts: int, procs: int, with_gpus: bool, what: str,
              prefer: Sequence[Host] | None = None) -> Placement:
        """Choose ``hosts`` distinct UP hosts for one replica and take their slots.

        ``prefer`` (the replica's home) is used when all of it is up;
        otherwise the least-occupied hosts, lowest index first. With
        ``with_gpus`` each of the ``procs`` processes per host gets its own
        GPU there. Raises ValueError when the cluster has fewer hosts than
        asked, ClusterError when too few are up or have free GPUs.
        """
        self.check(hosts, what)
        up = self.up_hosts()
        if len(up) < hosts:
            lost = ", ".join(f"{h.name}: {h.reason}" for h in self.hosts if h.state == LOST)
            raise ClusterError(f"{what} needs {hosts} host(s) that are up; {len(up)} of {len(self.hosts)} are ({lost})")
        gpus_each = procs if with_gpus and any(h.gpus for h in self.hosts) else 0
        if with_gpus and not gpus_each:
            _warn_no_gpus(what)
        fits = [h for h in up if h.free_gpus() >= gpus_each]
        if hosts > 1:  # a mesh over several hosts is made of workers (see _mesh_for)
            fits = [h for h in fits if not h.is_this_host]
        if prefer is not None and all(h in fits for h in prefer) and len(prefer) == hosts:
            chosen = list(prefer)
        else:
            chosen = self._least_occupied(fits, hosts)
        if chosen is None:
            free = ", ".join(f"{h.name}: {h.free_gpus()} free GPU(s)" for h in up)
            raise ClusterError(f"{what} needs {hosts} host(s) with {gpus_each} free GPU(s) each; {free}")
        mesh = self._mesh_for(chosen)
        gpus = [h.reserve_gpus(gpus_each) for h in chosen] if gpus_each else None
        for h in chosen:
            h.placed += 1
        return Placement(self, chosen, mesh, gpus)

    def _least_occupied(self, fits: list[Host], count: int) -> list[Host] | None:
        ranked = sorted(fits, key=lambda h: (h.placed, h.index))
        if self.kind != "job" or count == 1:
            return ranked[:count] if len(ranked) >= count else None
        # A job's hosts are one HostMesh; a replica over several must be a
        # slice of it: neighbours. The window with the fewest placements wins.
        usable = {h.index for h in fits}
        windows = [self.hosts[i:i + count] for i in range(len(self.hosts) - count + 1)
                   if all(j in usable for j in range(i, i + count))]
        return min(windows, key=lambda w: (sum(h.placed for h in w), w[0].index), default=None)

    def _mesh_for(self, hosts: list[Host]) -> Any:
        """A HostMesh over exactly ``hosts``."""
        if len(hosts) == 1:
            return hosts[0].mesh
        key = tuple(h.index for h in hosts)
        if key not in self._group_meshes:
            if self.kind == "job":
                self._group_meshes[key] = self._job_mesh.slice(hosts=slice(key[0], key[-1] + 1))
            elif all(h.address for h in hosts):
                # A second attachment to the same workers: Monarch allows it,
                # and it gives a mesh whose ranks span exactly these hosts.
                self._group_meshes[key] = attach_to_workers(
                    ca="trust_all_connections", workers=[h.address for h in hosts],
                    name=f"fl_group_{'_'.join(map(str, key))}",
                )
            else:
                raise ClusterError("a replica over several hosts is made of workers; this machine cannot be one")
        return self._group_meshes[key]

    # ------------------------------------------------------------ listening

    def subscribe(self, listener: HostListener) -> Callable[[], None]:
        """Call ``listener(state, host, reason)`` when a host is LOST or UP again.
        Returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _announce(self, host: Host, state: str, reason: str) -> None:
        host.state, host.reason = state, reason
        log.info("%s is %s: %s", host.label, state, reason)
        for listener in tuple(self._listeners):
            try:
                listener(state, host, reason)
            except Exception:  # one service's bug must not hide the news from others
                log.exception("host listener raised")

    # ------------------------------------------------------------ watching

    def start_monitor(self) -> None:
        """Probe every host but this machine (if it is one: the caller is its probe)."""
        for host in self.hosts:
            if not host.is_this_host:
                self._spawn(self._watch(host))

    async def _watch(self, host: Host) -> None:
        """Probe ``host`` every ``probe_interval`` s, each probe with a deadline."""
        while not self.closed:
            await asyncio.sleep(self.probe_interval)
            attachment = host.attachments
            answered = await self._probe(host)
            if host.attachments != attachment:
                continue  # a new worker was attached while the old one was probed
            if host.state == UP and not answered:
                self._announce(host, LOST, f"no answer to a probe within {self.probe_timeout:g} s")
            elif host.state == LOST and answered:
                self._came_back(host, "answers probes again")
            elif host.state == LOST and host.address and not host.reattaching \
                    and time.monotonic() - host.last_reattach >= REATTACH_INTERVAL_S:
                host.reattaching = True
                self._spawn(self._reattach(host))

    async def _probe(self, host: Host) -> bool:
        if host.agent is None:
            return False
        try:
            await asyncio.wait_for(host.agent.ping.call_one().as_asyncio(), self.probe_timeout)
            return True
        except Exception:  # a timeout, or Monarch already knows the agent is gone
            return False

    async def _reattach(self, host: Host) -> None:
        """A lost host's worker may have been restarted: try to attach it again.

        Often this fails: Monarch 0.7 keeps talking to the address in the
        dead worker's session, and the new worker rejects that ("stale
        session"). ``replace_host`` with a worker on another port always works.
        """
        try:
            host.last_reattach = time.monotonic()
            if not await accepts_connections(host.address, timeout=0.5):
                return
            mesh, agent_procs, agent, facts = await _attach_one(host.address, host.index, REATTACH_TIMEOUT_S)
            if host.state != LOST or self.closed:
                # The old agent answered meanwhile (a cut link came back):
                # the same worker, attached twice; the spare agent goes.
                from forge_lite.controller.procs import stop_processes

                await stop_processes(agent_procs, timeout=5.0)
                return
            self._adopt(host, mesh, agent_procs, agent, facts)
            self._came_back(host, "worker attached again")
        except Exception as e:
            log.debug("re-attaching %s failed: %r", host.label, e)
            if host.state == LOST:
                host.reason = (
                    f"lost; a worker answers at {_where(host.address)} again, but this process cannot "
                    f"attach it (Monarch keeps the old session): start it on another port and call "
                    f"cluster.replace_host({host.index}, 'tcp://...')"
                )
        finally:
            host.reattaching = False

    def _adopt(self, host: Host, mesh, agent_procs, agent, facts) -> None:
        from forge_lite.controller.procs import stop_processes

        old = host.agent_procs
        host.mesh, host.agent_procs, host.agent, host.facts = mesh, agent_procs, agent, facts
        host.attachments += 1
        if old is not None:  # gone with a dead worker; still there if the worker was only cut off
            self._spawn(_quietly(stop_processes(old, timeout=5.0), 10.0))
        self._group_meshes = {k: m for k, m in self._group_meshes.items() if host.index not in k}

    async def replace_host(self, index: int, address: str, timeout: float = ATTACH_TIMEOUT_S) -> Host:
        """Attach the worker at ``address`` as host ``index``, in place of a lost one.

        The host keeps its name, so the replicas that lived there go back to
        it. Use it when a machine was replaced, or its worker restarted
        (start the new worker on another port: Monarch 0.7 cannot attach a
        new worker at a dead one's address from the same process).

        Raises ValueError for a host that is up or a bad address, IndexError
        for no such host, ClusterError when the worker cannot be attached,
        runs other versions, or is a worker the cluster already has.
        """
        host = self.host(index)
        if host.state != LOST:
            raise ValueError(f"{host.label} is {host.state}: only a lost host can be replaced")
        _host_port(address)
        others = [h for h in self.hosts if h is not host and h.address and h.state != LOST]
        _refuse_same_endpoint([*(h.address for h in others), address])
        if not await accepts_connections(address, timeout=min(timeout, 3.0)):
            raise ClusterError(f"no worker answers at {address}")
        try:
            mesh, agent_procs, agent, facts = await _attach_one(address, index, timeout)
        except Exception as e:
            raise ClusterError(f"could not attach the worker at {address} within {timeout:g} s ({e!r})") from None
        candidate = Host(index, address, mesh, facts)
        try:
            _check_versions(candidate)
            _refuse_same_worker([*others, candidate])
        except ClusterError:
            from forge_lite.controller.procs import stop_processes

            await stop_processes(agent_procs, timeout=2.0)
            raise
        host.address = address
        host.orphans = []  # they died with the old worker
        self._adopt(host, mesh, agent_procs, agent, facts)
        self._came_back(host, f"replaced by the worker at {_where(address)}")
        return host

    def _came_back(self, host: Host, reason: str) -> None:
        # Processes left there when it was lost (a cut link keeps them alive)
        # still hold memory and a replica's old state: end them first.
        host.state = UP
        orphans, host.orphans = host.orphans, []
        pids = [pid for procs in orphans for pid, h in zip(procs.pids, procs.pid_hosts) if h is host]
        if pids:
            self.kill_pids(host, pids)
        self._announce(host, UP, reason)

    def kill_pids(self, host: Host, pids: list[int], sig: int = signal.SIGKILL) -> None:
        """Kill processes on ``host`` without waiting (through its agent)."""
        if host.is_this_host:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        elif host.agent is not None and host.state == UP:
            self._spawn(_quietly(host.agent.kill.call_one(pids, sig).as_asyncio(), self.probe_timeout * 4))

    async def kill_host(self, index: int) -> None:
        """SIGKILL host ``index``'s worker and every process on it (a teaching control).

        Nothing tells the services: they find out from the missed probe, as
        they would for a machine that lost power. Raises ValueError for this
        machine (it would take the caller down) and IndexError for no such host.
        """
        host = self.host(index)
        if host.is_this_host:
            raise ValueError(f"{host.label} is this machine: killing it would kill the caller")
        if host.agent is None or host.state == LOST:
            raise ClusterError(f"{host.label} is already lost ({host.reason})")
        # The agent dies with its host, so its answer never comes: send, don't wait.
        self._spawn(_quietly(host.agent.kill_host.call_one().as_asyncio(), self.probe_timeout))
        await asyncio.sleep(0)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop watching, stop the agents, let the workers go (they keep
        running, ready for another attach); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        from forge_lite.controller.procs import stop_processes

        await asyncio.gather(
            *(stop_processes(h.agent_procs, timeout=5.0) for h in self.hosts
              if h.agent_procs is not None and h.state == UP),
            return_exceptions=True,
        )
        meshes = [h.mesh for h in self.hosts if not h.is_this_host and h.state == UP and self.kind == "workers"]
        meshes += list(self._group_meshes.values()) if self.kind == "workers" else []
        await asyncio.gather(*(_bounded(m.stop(), 5.0) for m in meshes), return_exceptions=True)
        if self.job is not None:
            try:
                self.job.kill()
            except Exception as e:  # a job the scheduler already ended
                log.debug("killing the job failed: %r", e)


async def _quietly(awaitable, timeout: float) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except BaseException:  # noqa: BLE001  (fire and forget: the answer does not matter)
        pass


async def _bounded(future, timeout: float):
    return await asyncio.wait_for(future, timeout)


_warned_no_gpu = False


def _warn_no_gpus(what: str) -> None:
    global _warned_no_gpu
    if not _warned_no_gpu:
        warnings.warn(f"{what} asked for GPUs (with_gpus=True) but no host of the cluster has any; "
                      "running on CPU instead.", stacklevel=4)
        _warned_no_gpu = True


# ---------------------------------------------------------------- attaching


async def accepts_connections(address: str, timeout: float) -> bool:
    """Does something listen at ``tcp://HOST:PORT`` (checked with a plain TCP connect)?"""
    host, port = _host_port(address)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _host_port(address: str) -> tuple[str, int]:
    """``tcp://10.0.0.2:26600`` -> ``("10.0.0.2", 26600)``; ValueError otherwise."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise ValueError(f"worker address {address!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.2:26600")
    where = _where(address)
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker address {address!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.2:26600")
    return host.strip("[]"), int(port)


def _endpoint(address: str) -> tuple[str, int]:
    """Where ``tcp://HOST:PORT`` connects: (IP, port) after name resolution,
    with IPv4 written one way (``localhost``, ``127.1`` and ``127.0.0.1`` are
    one endpoint). On this machine, a port that one socket listens on for
    every address (a worker started with ``tcp://0.0.0.0:PORT``) is one
    endpoint however it is reached: ``("this machine", PORT)``."""
    host, port = _host_port(address)
    try:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, ValueError, IndexError):
        return host, port  # unresolvable: attaching will say so
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if _is_local(ip) and port in _wildcard_listeners():
        return "this machine", port
    return str(ip), port


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Is ``ip`` an address of this machine (in this network namespace)?"""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))  # only an address this machine has can be bound
        return True
    except OSError:
        return False


def _wildcard_listeners() -> set[int]:
    """TCP ports this machine listens on for every address (0.0.0.0 or ::).
    Read from the kernel's socket table, which any user may read."""
    try:
        listening = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return set()
    return {c.laddr.port for c in listening
            if c.status == psutil.CONN_LISTEN and c.laddr and ipaddress.ip_address(c.laddr.ip).is_unspecified}


def _refuse_same_endpoint(addresses: Sequence[str]) -> None:
    """ClusterError when two addresses resolve to the same IP and port: one
    worker would be attached as two hosts, and everything placed "on two
    hosts" would share one machine's memory and die together."""
    seen: dict[tuple[str, int], str] = {}
    for address in addresses:
        endpoint = _endpoint(address)
        if endpoint in seen:
            ip, port = endpoint
            where = f"{ip}:{port} after name resolution" if ip != "this machine" else \
                f"one worker listens on port {port} of this machine for every address"
            raise ClusterError(f"{seen[endpoint]} and {address} are the same worker ({where}): attach each worker once")
        seen[endpoint] = address


def _refuse_same_worker(hosts: Sequence["Host"]) -> None:
    """ClusterError when two attached hosts are one worker process (same boot
    of the same machine, same pid): addresses that resolve differently but
    reach one worker, e.g. ``127.0.0.1`` and this machine's own IP for a worker
    listening on ``0.0.0.0``."""
    seen: dict[tuple, str] = {}
    for host in hosts:
        facts = host.facts or {}
        if host.address is None or facts.get("worker_pid") is None:
            continue
        key = (facts.get("boot_id"), facts.get("hostname"), facts["worker_pid"])
        if key in seen:
            raise ClusterError(
                f"{seen[key]} and {host.address} are the same worker (pid {facts['worker_pid']} on "
                f"{facts.get('hostname')}): attach each worker once"
            )
        seen[key] = host.address


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _address_towards(host: str) -> str:
    """This machine's IP address on the route to ``host`` (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


_transport: str | None = None


def _choose_transport(addresses: Sequence[str], client_address: str | None) -> None:
    """Make this process reachable from the workers' processes.

    Monarch talks over Unix sockets by default: fine for workers on this
    machine (loopback addresses), unreachable from any other. For those it
    must use TCP, on an address the workers can reach, and Monarch fixes
    that at its first call in a process.
    """
    global _transport
    remote = [h for h, _ in map(_host_port, addresses) if not _is_loopback(h)]
    if not remote and client_address is None:
        return
    wanted = client_address or f"tcp://{_address_towards(remote[0])}:0"
    if _transport is not None:
        return  # chosen by an earlier attach: one transport per process
    import monarch.actor

    started = ClusterError(
        "this process already started Monarch over Unix sockets, which other machines "
        "cannot reach. Attach the cluster before anything is spawned: restart the kernel "
        "(or start a fresh script), import forge_lite, then `await forge_lite.attach_cluster(...)` first."
    )
    if runtime.client_started():
        raise started
    try:
        monarch.actor.enable_transport(wanted)
    except RuntimeError as e:  # raw Monarch used before the kit
        raise started from e
    _transport = wanted


_attachments = itertools.count()


async def _attach_one(address: str, index: int, timeout: float):
    """Attach one worker and start its agent; (mesh, agent procs, agent, facts)."""
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


def _check_versions(host: Host) -> None:
    same, versions = host_versions_match(host)
    if not same:
        raise ClusterError(f"{host.label} runs {versions}: install the same versions on every node")


def _this_host(index: int) -> Host:
    facts = host_facts()
    facts["worker_pid"] = os.getpid()
    return Host(index, None, this_host(), facts, is_this_host=True, reason="this machine")


# ---------------------------------------------------------------- the current cluster

_current: Cluster | None = None


def current() -> Cluster:
    """The cluster services are placed on now: this machine unless one was attached."""
    global _current
    if _current is None or _current.closed:
        _current = Cluster([Host(0, None, None, is_this_host=True, name="local", reason="this machine")], "local")
    return _current


def _check_idle() -> None:
    """Raise ClusterError while anything runs on the current cluster."""
    busy = [h.name for h in current().hosts if h.placed]
    if busy:
        raise ClusterError(
            f"replicas or actors still run on the current cluster ({', '.join(busy)}); "
            "shut them down first"
        )


def _install(cluster: Cluster) -> None:
    global _current
    _check_idle()
    _current = cluster
    cluster.start_monitor()


async def attach_cluster(
    addresses: Sequence[str],
    *,
    include_this_host: bool = False,
    timeout: float = ATTACH_TIMEOUT_S,
    probe_interval: float = PROBE_INTERVAL_S,
    probe_timeout: float = PROBE_TIMEOUT_S,
    client_address: str | None = None,
) -> Cluster:
    """Make the Monarch workers at ``addresses`` the cluster services are placed on.

    Start a worker on each node first: ``python -m forge_lite.worker --address
    tcp://0.0.0.0:26600``. Every node needs the same forge_lite and torchmonarch
    as this process (checked here); your own actor classes travel with the call
    when they are defined in the notebook or script, and a module of your own
    must be importable on every node (installed, or on a shared filesystem at
    the same path: the kit passes this process's ``sys.path`` to every process).

    Monarch 0.7.0 has no TLS: attach only workers on a trusted network.

    Args:
        addresses: ``tcp://HOST:PORT`` of each worker, e.g. ``["tcp://10.0.0.2:26600"]``.
        include_this_host: also place replicas on this machine (as ``host0``).
        timeout: seconds to wait for each worker to attach and answer.
        probe_interval: seconds between liveness probes of every host.
        probe_timeout: seconds a host may take to answer a probe before it is LOST.
        client_address: ``tcp://IP:0``, the address the workers reach this
            process at; by default this machine's address on the route to
            the first worker.

    Returns:
        The Cluster (``print(cluster.table())`` shows its hosts).

    Raises:
        ValueError: an address that is not ``tcp://HOST:PORT``, or none given.
        ClusterError: a worker that cannot be reached or attached within
            ``timeout`` (its address is named), one with other versions, two
            addresses that reach the same worker (``tcp://127.0.0.1:P`` and
            ``tcp://localhost:P``: both spellings are named),
            replicas still running on the current cluster, or a process that
            already uses Monarch over Unix sockets and now needs TCP. Nothing
            stays attached after an error.

    Example:
        >>> cluster = await forge_lite.attach_cluster(["tcp://10.0.0.2:26600", "tcp://10.0.0.3:26600"])
        >>> svc = await Echo.options(num_replicas=4).as_service()   # two per host
    """
    addresses = list(addresses)
    if not addresses:
        raise ValueError("attach_cluster needs at least one worker address, e.g. ['tcp://10.0.0.2:26600']")
    for address in addresses:
        _host_port(address)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"worker addresses repeat: {addresses}")
    _refuse_same_endpoint(addresses)
    _check_idle()
    for address in addresses:
        if not await accepts_connections(address, timeout=min(timeout, 3.0)):
            raise ClusterError(
                f"no worker answers at {address}: start one there with "
                f"`python -m forge_lite.worker --address tcp://0.0.0.0:{_host_port(address)[1]}`, "
                "and check that this machine can reach it"
            )
    _choose_transport(addresses, client_address)
    runtime.configure_client()
    hosts: list[Host] = [_this_host(0)] if include_this_host else []
    cluster = Cluster(hosts, "workers", probe_interval=probe_interval, probe_timeout=probe_timeout)
    first = len(hosts)
    results = await asyncio.gather(
        *(_attach_one(a, first + i, timeout) for i, a in enumerate(addresses)), return_exceptions=True
    )
    try:
        for i, (address, result) in enumerate(zip(addresses, results)):
            if isinstance(result, BaseException):
                why = "timed out" if isinstance(result, asyncio.TimeoutError) else f"{type(result).__name__}: {result}"
                raise ClusterError(f"could not attach the worker at {address} within {timeout:g} s ({why})")
            mesh, agent_procs, agent, facts = result
            hosts.append(Host(first + i, address, mesh, facts, agent=agent, agent_procs=agent_procs))
        for host in hosts:
            _check_versions(host)
        _refuse_same_worker(hosts)
    except BaseException:  # nothing stays attached: stop the agents that did start
        cluster.hosts = [Host(-1, None, r[0], agent_procs=r[1]) for r in results if not isinstance(r, BaseException)]
        await cluster.close()
        raise
    _install(cluster)
    return cluster


async def attach_job(job: Any, mesh: str | None = None, *, timeout: float = ATTACH_TIMEOUT_S,
                     probe_interval: float = PROBE_INTERVAL_S, probe_timeout: float = PROBE_TIMEOUT_S) -> Cluster:
    """Make the hosts of a ``monarch.job`` job the cluster.

    ``ProcessJob({"hosts": 2})`` runs two workers on this machine (for trying
    things out); ``SlurmJob({"hosts": 4}, gpus_per_node=8, ...)`` asks Slurm
    for four nodes and starts a worker on each; ``KubernetesJob`` (in
    ``monarch.job.kubernetes``) does the same with pods. The job's hosts form
    one HostMesh, so a replica over several hosts gets neighbouring ones.
    ``detach_cluster()`` kills the job.

    Args:
        job: a ``monarch.job`` job (not yet applied, or running).
        mesh: which of the job's meshes to use; the only one by default.
        timeout, probe_interval, probe_timeout: as for ``attach_cluster``.

    Returns:
        The Cluster.

    Raises:
        ValueError: ``mesh`` not given for a job with several meshes.
        ClusterError: a host whose agent did not start within ``timeout``, or
            with other versions; the job is killed then.

    Example:
        >>> from monarch.job import ProcessJob
        >>> cluster = await forge_lite.attach_job(ProcessJob({"hosts": 2}))
    """
    _check_idle()
    names = list(getattr(job, "_meshes", {}) or [])
    if mesh is None:
        if len(names) > 1:
            raise ValueError(f"the job has meshes {names}: pass mesh= to say which one")
        mesh = names[0] if names else "hosts"
    runtime.configure_client()
    state = await asyncio.to_thread(job.state, cached_path=None)
    job_mesh: HostMesh = getattr(state, mesh)
    count = job_mesh.extent["hosts"] if hasattr(job_mesh, "extent") else job_mesh.region.slice().sizes[0]
    cluster = Cluster([], "job", probe_interval=probe_interval, probe_timeout=probe_timeout, job=job, job_mesh=job_mesh)
    from forge_lite.controller.procs import spawn_processes

    try:
        await asyncio.wait_for(job_mesh.initialized, timeout)
        for i in range(count):
            one = job_mesh.slice(hosts=i)
            agent_procs = await asyncio.wait_for(spawn_processes(1, f"fl_agent{i}", host_mesh=one), timeout)
            host = Host(i, None, one, agent_procs=agent_procs)
            cluster.hosts.append(host)
            host.agent = agent_procs.mesh.spawn(f"fl_agent{i}", HostAgent)
            host.facts = await asyncio.wait_for(host.agent.facts.call_one().as_asyncio(), timeout)
            _check_versions(host)
    except BaseException:
        await cluster.close()
        raise
    _install(cluster)
    return cluster


async def detach_cluster() -> None:
    """Go back to this machine alone: stop the agents and let the workers go.

    Raises ClusterError while replicas or actors still run on the cluster.
    Workers started with ``python -m forge_lite.worker`` keep running, ready
    for the next attach; a job's hosts are released (``job.kill()``).
    """
    global _current
    cluster = current()
    if cluster.is_local:
        return
    _check_idle()
    await cluster.close()
    _current = None
