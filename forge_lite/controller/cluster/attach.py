"""The process-wide current cluster, and how it changes.

One idea: which cluster services are placed on now. It is this machine
alone (nothing attached, nothing probed) until ``attach_cluster`` (workers
at addresses) or ``attach_job`` (a ``monarch.job`` job) installs another,
and again after ``detach_cluster``. There is one per process because a
service asks for it when it places a replica (``current()``), and because
Monarch's transport is fixed once per process. The cluster changes only
while nothing runs on it (``_check_idle``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Sequence

from monarch.actor import HostMesh, this_host

from forge_lite.controller import runtime
from forge_lite.controller.cluster.agent import HostAgent, check_versions, host_facts, start_agent
from forge_lite.controller.cluster.cluster import ATTACH_TIMEOUT_S, PROBE_INTERVAL_S, PROBE_TIMEOUT_S, Cluster
from forge_lite.controller.cluster.hosts import Host
from forge_lite.controller.cluster.transport import (
    accepts_connections,
    choose_transport,
    host_port,
    refuse_same_endpoint,
    refuse_same_worker,
)
from forge_lite.controller.errors import ClusterError


def _this_host(index: int) -> Host:
    """This machine as host ``index`` of an attached cluster (``include_this_host``)."""
    facts = host_facts()
    facts["worker_pid"] = os.getpid()
    return Host(index, None, this_host(), facts, is_this_host=True, reason="this machine")


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
        host_port(address)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"worker addresses repeat: {addresses}")
    refuse_same_endpoint(addresses)
    _check_idle()
    for address in addresses:
        if not await accepts_connections(address, timeout=min(timeout, 3.0)):
            raise ClusterError(
                f"no worker answers at {address}: start one there with "
                f"`python -m forge_lite.worker --address tcp://0.0.0.0:{host_port(address)[1]}`, "
                "and check that this machine can reach it"
            )
    choose_transport(addresses, client_address)
    runtime.configure_client()
    hosts: list[Host] = [_this_host(0)] if include_this_host else []
    cluster = Cluster(hosts, "workers", probe_interval=probe_interval, probe_timeout=probe_timeout)
    first = len(hosts)
    results = await asyncio.gather(
        *(start_agent(a, first + i, timeout) for i, a in enumerate(addresses)), return_exceptions=True
    )
    try:
        for i, (address, result) in enumerate(zip(addresses, results)):
            if isinstance(result, BaseException):
                why = "timed out" if isinstance(result, asyncio.TimeoutError) else f"{type(result).__name__}: {result}"
                raise ClusterError(f"could not attach the worker at {address} within {timeout:g} s ({why})")
            mesh, agent_procs, agent, facts = result
            hosts.append(Host(first + i, address, mesh, facts, agent=agent, agent_procs=agent_procs))
        for host in hosts:
            check_versions(host)
        refuse_same_worker(hosts)
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
            check_versions(host)
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
