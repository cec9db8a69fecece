"""One replica of a service: its processes, its actor, its state.

A replica is its own ProcMesh (``procs`` processes, on each of its ``hosts``
hosts of the cluster) with one ActorMesh on it, so it can die and be replaced
without touching the others. It is placed before it spawns (``place``), and
``host`` says where: "local" on this machine alone, else "host1" or
"host0+host1". The replica knows how to start, call, probe and stop itself;
deciding *when* (routing, retries, respawns) is the service's job.

States, as the dashboard shows them:
  RECOVERING  processes being spawned (at start, and after a failure)
  HEALTHY     taking requests
  OVERLOADED  ``max_concurrent_requests`` in flight: the router prefers others
  FAILED      a process died, or stopped answering probes
  STOPPED     shut down, or removed by ``scale``
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from monarch.actor import ActorError

from forge_lite.controller import procs as _procs
from forge_lite.controller import runtime
# HostLost, ReplicaFailure and UserError live in errors.py with the controller's
# other exceptions; importing them from here still works.
from forge_lite.controller.errors import HostLost, ReplicaFailure, UserError, remote_exception
from forge_lite.controller.spawn import spawn_actor_mesh


class ReplicaState(str, Enum):
    HEALTHY = "HEALTHY"
    OVERLOADED = "OVERLOADED"
    FAILED = "FAILED"
    RECOVERING = "RECOVERING"
    STOPPED = "STOPPED"

    def __str__(self) -> str:
        return self.value


@dataclass
class CircuitBreaker:
    """Takes a replica out of rotation after repeated infrastructure failures.

    Each failure (a dead process, a failed respawn) counts; a request the
    replica served resets the count. At ``failure_threshold`` in a row the
    breaker opens: no respawn for ``cooldown`` seconds, then one respawn
    decides (a failed one opens it again).
    """

    consecutive_failures: int = 0
    open_until: float = 0.0  # time.monotonic() when it closes; 0.0: closed

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, threshold: int, cooldown: float) -> bool:
        """Count a failure; True if that opened the breaker."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= threshold:
            self.open_for(cooldown)
            return True
        return False

    def open_for(self, cooldown: float) -> None:
        self.open_until = time.monotonic() + cooldown

    @property
    def is_open(self) -> bool:
        return bool(self.open_until)

    def seconds_left(self) -> float:
        return self.open_until - time.monotonic()

    def close(self) -> None:
        self.open_until = 0.0


def _being_cancelled() -> bool:
    """Is the running task itself being cancelled (rather than what it awaits)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _reason(cancelled: asyncio.CancelledError) -> str:
    return str(cancelled.args[0]) if cancelled.args else "its host was lost"


def describe_failure(report: str, processes: _procs.Processes | None = None) -> str:
    """A one-line reason from Monarch's multi-line failure report.

    A SIGKILL while the OOM killer was at work in the caller's memory cgroup
    since ``processes`` started is said to be that, with what to lower.
    """
    if m := re.search(r"Killed\(sig=(\d+)\)", report):
        sig = int(m.group(1))
        if sig == 9 and processes is not None and _procs.oom_killed(processes):
            limit = _procs.memory_limit_mb()
            at = f" at this server's memory limit ({limit} MB)" if limit else ""
            return (f"out of memory: the kernel killed the process{at}; lower num_replicas or procs, "
                    "use a smaller model, or shut down services you no longer use")
        return "process killed (SIGKILL)" if sig == 9 else f"process killed by signal {sig}"
    if m := re.search(r"exited with non-zero code (\d+)", report):
        return f"process exited with code {m.group(1)}"
    if "stopped" in report and "client" in report:
        return "stopped"
    first = report.strip().splitlines()[0] if report.strip() else "unknown failure"
    return first[:160]


class Replica:
    """A live replica. ``in_flight`` and ``requests_served`` are read by routers."""

    def __init__(self, service, index: int):
        self.service = service
        self.index = index
        self.state: ReplicaState = ReplicaState.RECOVERING
        self.reason = "starting"
        self.in_flight = 0
        self.requests_served = 0
        self.breaker = CircuitBreaker()
        self.recovering = False  # a background respawn is under way
        self.delay_s = 0.0  # injected by slow_replica()
        self.generation = 0
        self.processes: _procs.Processes | None = None
        self.mesh: Any = None
        self.last_spawn_s: float | None = None
        self._actor_name = ""
        # Where it runs: "local" on this machine; on a cluster the host names
        # ("host1", "host0+host1"), the Host objects, and its home: where it
        # was first placed, where it goes back to after its host returns.
        self.host: str | None = None
        self.hosts: list = []
        self.home: list | None = None
        self._placement = None  # chosen by place(), not yet handed to a spawn
        # Calls (and a spawn) in flight: given up at once if the host is lost.
        self._pending: set[asyncio.Future] = set()

    # ------------------------------------------------------------ properties

    @property
    def accepting(self) -> bool:
        return self.state in (ReplicaState.HEALTHY, ReplicaState.OVERLOADED)

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.service.config.max_concurrent_requests

    @property
    def pids(self) -> list[int]:
        return list(self.processes.pids) if self.processes else []

    @property
    def displaced(self) -> bool:
        """Runs away from its home hosts (they were lost)."""
        return self.home is not None and self.hosts != self.home

    # ------------------------------------------------------------ lifecycle

    def place(self, prefer_home: bool = True) -> None:
        """Choose where the next ``spawn`` runs and set ``host``.

        On this machine alone there is nothing to choose. On a cluster: the
        replica's home when it is up, else the least-occupied hosts; raises
        what ``Cluster.place`` raises (too few hosts up, no free GPUs). With
        ``options(on_hosts=...)`` its home is the least occupied of the
        hosts named (ValueError for a host the cluster does not have).
        """
        cluster = self.service.cluster
        self._release_placement()
        if cluster.is_local:
            self.host, self.hosts = "local", list(cluster.hosts)
            return
        cls = self.service.actor_cls
        if self.home is None and cls.on_hosts is not None:
            self.home = cluster.choose_among(cls.on_hosts, cls.hosts or 1,
                                             f"{cls.__name__}.options(on_hosts={list(cls.on_hosts)})")
        self._placement = cluster.place(
            cls.hosts or 1, cls.procs, cls.with_gpus, f"{self.service.name} replica {self.index}",
            prefer=self.home if prefer_home else None,
        )
        self.hosts = list(self._placement.hosts)
        self.host = self._placement.name
        if self.home is None:
            self.home = list(self.hosts)

    def _release_placement(self) -> None:
        if self._placement is not None:
            self._placement.release()
            self._placement = None

    async def spawn(self) -> None:
        """Start fresh processes and the actor on them (runs ``setup``), where
        ``place`` chose (it is called here if it was not).

        On a cluster the spawn is given up, with HostLost, the moment its
        host is lost (``abandon``): Monarch would wait a minute or more.
        """
        if self.host is None or (self._placement is None and not self.service.cluster.is_local):
            self.place()
        if self.service.cluster.is_local:
            return await self._spawn()
        task = asyncio.ensure_future(self._spawn())
        self._pending.add(task)
        try:
            await task
        except asyncio.CancelledError as e:
            if task.cancelled() and not _being_cancelled():
                raise HostLost(_reason(e)) from None
            raise
        finally:
            self._pending.discard(task)

    async def _spawn(self) -> None:
        svc = self.service
        self.generation += 1
        # Monarch names a failed mesh "<actor name>-<random>": a name unique to
        # this replica and generation maps a failure back to us.
        self._actor_name = f"{svc.name}_r{self.index}_g{self.generation}"
        started = time.perf_counter()
        env = {runtime.REPLICA_ENV: str(self.index), runtime.JOINING_ENV: "1" if svc.serving else "0"}
        if not svc.cluster.is_local:
            # The placement now belongs to the processes: stopping them gives it back.
            placement, self._placement = self._placement, None
            self.processes = await _procs.spawn_processes(
                svc.actor_cls.procs, f"{svc.name}_r{self.index}", env=env, placement=placement
            )
        else:
            share = svc.actor_cls.gpu_share
            gpus = (
                _procs.reserve_gpus(svc.actor_cls.procs, f"{svc.name} replica {self.index}", share)
                if svc.actor_cls.with_gpus
                else None
            )
            try:
                self.processes = await _procs.spawn_processes(
                    svc.actor_cls.procs, f"{svc.name}_r{self.index}", gpus, env=env, gpu_share=share
                )
            except BaseException:
                _procs.release_gpus(gpus or [], share)
                raise
        runtime.on_mesh_failure(self._actor_name, self._on_mesh_failure)
        try:
            self.mesh = await spawn_actor_mesh(
                svc.actor_cls, self.processes, self._actor_name, svc.args, svc.kwargs
            )
        except BaseException:
            runtime.forget_mesh(self._actor_name)
            raise
        self.last_spawn_s = time.perf_counter() - started

    def _on_mesh_failure(self, mesh_name: str, report: str) -> None:
        # Runs on a Monarch thread: hop onto the service's event loop.
        generation = self.generation
        self.service.loop.call_soon_threadsafe(
            self.service.replica_failed, self, describe_failure(report, self.processes), generation,
            context=self.service.context.copy(),
        )

    async def stop(self) -> None:
        runtime.forget_mesh(self._actor_name)
        self._release_placement()
        if self.processes is not None:
            await _procs.stop_processes(self.processes)

    def abandon(self, reason: str) -> None:
        """Its host is lost: every call (and a spawn) in flight here fails
        now with HostLost(``reason``), instead of hanging until Monarch
        gives up on the host."""
        for pending in list(self._pending):
            pending.cancel(msg=reason)

    def kill(self) -> None:
        """SIGKILL every process of this replica (fault injection)."""
        if self.processes is not None:
            _procs.kill_processes(self.processes)

    # ------------------------------------------------------------ calls

    async def call(self, endpoint: str, args: tuple, kwargs: dict) -> Any:
        """Run ``endpoint`` on this replica; rank 0's result for a replica of
        several processes (or hosts).

        Raises UserError for an exception from the endpoint's code and
        ReplicaFailure when the replica itself failed.
        """
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        mesh = self.mesh
        if mesh is None or not self.accepting:
            raise ReplicaFailure(f"replica {self.index} is {self.state}")
        method = getattr(mesh, endpoint)
        cls = self.service.actor_cls
        one_process = cls.procs == 1 and (cls.hosts or 1) == 1
        pending = None
        try:
            if one_process:
                pending = method.call_one(*args, **kwargs).as_asyncio()
            else:
                pending = method.call(*args, **kwargs).as_asyncio()
            self._pending.add(pending)
            result = await pending
            return result if one_process else next(iter(result.values()))
        except asyncio.CancelledError as e:
            if pending is not None and pending.cancelled() and not _being_cancelled():
                raise HostLost(_reason(e)) from None  # abandon(): its host is lost
            raise
        except ActorError as e:
            raise UserError(remote_exception(e)) from None
        except (TypeError, ValueError):
            raise  # bad arguments, checked on the caller's side: the caller's error
        except Exception as e:  # SupervisionError and friends: infrastructure
            raise ReplicaFailure(describe_failure(str(e), self.processes)) from e
        finally:
            self._pending.discard(pending)

    async def probe(self, timeout: float) -> None:
        """Ask a helper actor on each process for its pid: does the process answer?"""
        if self.processes is None or self.processes.info is None:
            raise ReplicaFailure("no processes")
        try:
            await asyncio.wait_for(self.processes.info.pid.call(), timeout)
        except asyncio.TimeoutError:
            raise ReplicaFailure(f"did not answer a health probe within {timeout:.1f} s") from None
        except Exception as e:
            raise ReplicaFailure(describe_failure(str(e), self.processes)) from e
