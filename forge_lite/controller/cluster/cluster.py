"""The cluster: placing replicas on its hosts, and watching the hosts.

One idea: the ``Cluster`` object a service asks where to put a replica
(``place``: least-occupied UP hosts, GPUs reserved per process) and tells
when it is gone (``Placement.release``); and the watch kept on its hosts.
Monarch 0.7 alone lets a call to a dead or cut-off host hang for 40-70 s,
or forever, without telling anyone, so every host's agent (``agent.py``) is
probed every ``probe_interval`` seconds. A host that misses one probe
deadline is LOST and every subscriber (each service) hears it at once. The
agent keeps being probed (a cut link that comes back), and a lost worker's
address keeps being attached again (a restarted worker); either way the
host is UP again, its leftover processes are killed, and services use it
again. ``replace_host`` puts a new worker in a lost host's place.

Which cluster is in use, and attaching one, is ``attach.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import warnings
from typing import Any, Callable, Sequence

from monarch.actor import attach_to_workers

from forge_lite.controller.cluster.agent import check_versions, start_agent
from forge_lite.controller.cluster.hosts import LOST, UP, Host, HostListener, Placement, strip_scheme
from forge_lite.controller.cluster.transport import (
    accepts_connections,
    host_port,
    refuse_same_endpoint,
    refuse_same_worker,
)
from forge_lite.controller.errors import ClusterError

log = logging.getLogger("forge_lite")

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
            mesh, agent_procs, agent, facts = await start_agent(host.address, host.index, REATTACH_TIMEOUT_S)
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
                    f"lost; a worker answers at {strip_scheme(host.address)} again, but this process cannot "
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
        host_port(address)
        others = [h for h in self.hosts if h is not host and h.address and h.state != LOST]
        refuse_same_endpoint([*(h.address for h in others), address])
        if not await accepts_connections(address, timeout=min(timeout, 3.0)):
            raise ClusterError(f"no worker answers at {address}")
        try:
            mesh, agent_procs, agent, facts = await start_agent(address, index, timeout)
        except Exception as e:
            raise ClusterError(f"could not attach the worker at {address} within {timeout:g} s ({e!r})") from None
        candidate = Host(index, address, mesh, facts)
        try:
            check_versions(candidate)
            refuse_same_worker([*others, candidate])
        except ClusterError:
            from forge_lite.controller.procs import stop_processes

            await stop_processes(agent_procs, timeout=2.0)
            raise
        host.address = address
        host.orphans = []  # they died with the old worker
        self._adopt(host, mesh, agent_procs, agent, facts)
        self._came_back(host, f"replaced by the worker at {strip_scheme(address)}")
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
