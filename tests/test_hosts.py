"""Services across hosts, on real processes and a real network.

Each "host" is a Monarch worker started with ``python -m forge_lite.worker``.
As root each host gets its own network stack: a network namespace joined to
this one by a veth pair, so it has its own address and ``ip link set ...
down`` is a real partition. Without root the hosts are workers on loopback
ports, and a frozen host (SIGSTOP of its worker and processes) stands in for
a cut link. Which mode ran is reported (a ``HostsTestMode`` warning in the
summary), never skipped silently.

Monarch fixes its transport (Unix sockets or TCP) at its first call in a
process, and hosts with their own network need TCP, so the checks below
(``check_*``) run in a fresh pytest process of their own, started by
``test_hosts_in_a_fresh_process``: nothing the rest of the suite did with
Monarch can be in the way, and nothing done here can leak into it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import psutil
import pytest
from monarch.actor import current_rank, endpoint

import forge_lite
from forge_lite.controller import ForgeActor
from forge_lite.controller.cluster import ClusterError, Host, host_versions_match
from forge_lite.controller.service.events import HostStateChanged, ReplicaStateChanged, RequestRouted
from forge_lite.worker import LocalHosts, free_port

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 3


class HostsTestMode(UserWarning):
    """Which kind of hosts the checks ran on (reported, so no mode passes unseen)."""


@pytest.mark.timeout(300)
def test_hosts_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-o", "python_functions=check_*", str(Path(__file__).relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
        env={k: v for k, v in os.environ.items() if not k.startswith("FORGE_LITE_")},
    )
    mode = re.search(r"^HOSTS MODE: (.*)$", out.stdout, re.MULTILINE)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "no output"
    warnings.warn(HostsTestMode(f"{mode.group(1) if mode else 'unknown'}; {summary}"))
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    assert mode is not None and " passed" in summary


# ---------------------------------------------------------------- the hosts


@pytest.fixture(scope="module")
def hosts(request):
    """HOSTS hosts: network namespaces as root, else loopback workers (see LocalHosts)."""
    made = LocalHosts(HOSTS)
    # A finalizer runs even when a check fails; LocalHosts.start also
    # registers stop() at exit, for a pytest that is killed.
    request.addfinalizer(made.stop)
    made.start()
    print(f"\nHOSTS MODE: {made.mode}", flush=True)
    return made


@pytest.fixture
async def cluster(hosts):
    """The hosts attached as the cluster; services started here are shut down after."""
    attached = await forge_lite.attach_cluster(hosts.addresses, client_address=hosts.client_address)
    attached.started = []
    try:
        yield attached
    finally:
        for svc in attached.started:
            await svc.shutdown()
        for i in list(hosts.frozen):
            hosts.heal(i)
        await forge_lite.detach_cluster()


async def start(cluster, cls, *args, **kwargs):
    svc = await cls.as_service(*args, **kwargs)
    cluster.started.append(svc)
    return svc


# ---------------------------------------------------------------- the actor


class Where(ForgeActor):
    """Says where it runs; ``work`` leaves a file per execution in ``log_dir``."""

    def __init__(self, log_dir: str = ""):
        self.log_dir = log_dir

    @endpoint
    async def where(self) -> dict:
        return {"replica": int(os.environ.get("FORGE_LITE_REPLICA", -1)), "worker": os.getppid(),
                "pid": os.getpid(), "rank": dict(current_rank())}

    @endpoint
    async def work(self, token: int, seconds: float = 0.0) -> tuple[int, int]:
        Path(self.log_dir, f"{token}.{os.getpid()}").touch()
        await asyncio.sleep(seconds)
        return token, os.getppid()


def host_of(replica) -> int:
    return int(replica.host.removeprefix("host"))


async def settle(hosts, i: int, expected: set[int], timeout: float = 20.0) -> set[int]:
    """Wait until host ``i`` runs exactly ``expected`` (processes take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while (now := hosts.processes(i)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return now


# ---------------------------------------------------------------- placement


async def check_replicas_spread_over_hosts_and_run_there(hosts, cluster):
    svc = await start(cluster, Where.options(procs=2, num_replicas=3))
    placed = {r.host for r in svc.replicas}
    assert placed == {"host0", "host1", "host2"}, placed  # least occupied first: one each
    for replica in svc.replicas:
        worker = hosts.workers[host_of(replica)]
        assert len(replica.pids) == 2 and set(replica.pids) <= set(worker.children())
        answer = await svc.where.route()
        assert answer["worker"] in {w.pid for w in hosts.workers}

    # The host is part of the state, the events and the metrics.
    started = [e for e in svc.events.history(ReplicaStateChanged) if e.new == "HEALTHY"]
    assert {e.host for e in started} == placed
    await svc.where.route()
    assert svc.events.history(RequestRouted)[-1].host in placed
    metrics = svc.metrics()
    assert {name: info["replicas"] for name, info in metrics["hosts"].items()} == {
        r.host: [r.index] for r in svc.replicas}
    assert all(m["host"] == r.host for m, r in zip(metrics["replicas"], svc.replicas))

    # A second service fills the hosts evenly again.
    other = await start(cluster, Where.options(num_replicas=3))
    assert {r.host for r in other.replicas} == placed
    assert [h.placed for h in cluster.hosts] == [2, 2, 2]


async def check_a_replica_over_two_hosts(hosts, cluster):
    svc = await start(cluster, Where.options(hosts=2, procs=1, num_replicas=1))
    replica = svc.replicas[0]
    assert replica.host.count("+") == 1  # "host0+host1"
    parents = {psutil.Process(pid).ppid() for pid in replica.pids}
    assert len(parents) == 2 and parents <= {w.pid for w in hosts.workers}
    assert (await svc.where.route())["rank"] == {"hosts": 0, "procs": 0}

    actor = await Where.options(hosts=2, procs=1).as_actor()
    try:
        answers = await actor.where.call()
        assert {a["worker"] for _, a in answers.items()} <= {w.pid for w in hosts.workers}
        assert len({a["worker"] for _, a in answers.items()}) == 2
    finally:
        await Where.shutdown(actor)


async def check_route_fanout_and_sessions_across_hosts(hosts, cluster):
    svc = await start(cluster, Where.options(num_replicas=3))
    workers = {w.pid for w in hosts.workers}
    seen = Counter([(await svc.where.route())["worker"] for _ in range(30)])
    assert set(seen) == workers and set(seen.values()) == {10}  # round robin over the three hosts

    everyone = await svc.where.fanout()
    assert {a["worker"] for a in everyone} == workers and everyone.replicas == [0, 1, 2]

    async with svc.session():
        pinned = {(await svc.where.route())["worker"] for _ in range(5)}
    assert len(pinned) == 1


# ---------------------------------------------------------------- a lost host


async def load(svc, count: int, tokens_from: int, seconds: float) -> list:
    return await asyncio.gather(
        *(svc.work.route(tokens_from + i, seconds) for i in range(count)), return_exceptions=True
    )


def assert_ran_once_outside(log_dir: Path, tokens, lost_pids: set[int]) -> None:
    """Every token ran, and at most once outside the processes of the lost
    replica (whose runs were given up and retried: their answers never came)."""
    runs: dict[int, list[int]] = {}
    for path in log_dir.iterdir():
        token, pid = map(int, path.name.split("."))
        runs.setdefault(token, []).append(pid)
    for token in tokens:
        assert token in runs, f"request {token} never ran"
        assert sum(pid not in lost_pids for pid in runs[token]) <= 1, f"request {token} ran twice: {runs[token]}"


async def check_host_killed_under_load(hosts, cluster, tmp_path):
    svc = await start(cluster, Where.options(num_replicas=3, max_concurrent_requests=100), str(tmp_path))
    victim = next(r for r in svc.replicas if r.host == "host1")
    before = {r.index: set(r.pids) for r in svc.replicas}
    running = asyncio.create_task(load(svc, 200, 0, 0.02))
    await asyncio.sleep(0.3)  # requests in flight on every host
    killed_at = time.monotonic()
    hosts.kill(1)
    results = await running

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert [token for token, _ in results] == list(range(200))  # each its own answer, none lost
    states = [e for e in svc.events.history(ReplicaStateChanged) if e.replica == victim.index]
    failed = next(e for e in states if e.new == "FAILED")
    assert "host1" in failed.reason and "lost" in failed.reason
    await svc.wait_for_state(victim.index, "HEALTHY", timeout=30)
    assert victim.host in {"host0", "host2"}
    assert time.monotonic() - killed_at < 30
    lost = [e for e in svc.events.history(HostStateChanged) if e.host == "host1" and e.new == "LOST"]
    assert lost, "the service never heard that host1 was lost"
    # Nothing that returned ran twice: a token ran again only if its first
    # run was on the killed host, whose answer never came.
    assert_ran_once_outside(tmp_path, range(200), before[victim.index])

    # A replacement worker takes the lost host's place; its replica goes home.
    new = hosts.replace(1)
    await cluster.replace_host(1, new.address)
    await svc.service.wait_for_host(1, "UP", timeout=10)
    await _wait(lambda: victim.host == "host1" and str(victim.state) == "HEALTHY", 30,
                lambda: (victim.host, victim.state, victim.reason, victim.in_flight, victim.recovering, victim.home, victim.hosts))
    assert (await svc.where.fanout()) and set(victim.pids) <= set(new.children())

    await svc.shutdown()
    for i in range(HOSTS):  # only the cluster's agent is left on each host
        assert len(await settle(hosts, i, {cluster.hosts[i].agent_procs.pids[0]})) == 1
    assert not set().union(*before.values()) & {p for i in range(HOSTS) for p in hosts.processes(i)}


async def _wait(condition, timeout: float, what=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; {what() if what else ''}"
        await asyncio.sleep(0.05)


async def check_link_cut_under_load(hosts, cluster, tmp_path):
    svc = await start(cluster, Where.options(num_replicas=3, max_concurrent_requests=100), str(tmp_path))
    victim = next(r for r in svc.replicas if r.host == "host2")
    old_pids = set(victim.pids)
    running = asyncio.create_task(load(svc, 200, 1000, 0.02))
    await asyncio.sleep(0.3)
    hosts.cut(2)
    results = await running

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert [token for token, _ in results] == list(range(1000, 1200))
    assert_ran_once_outside(tmp_path, range(1000, 1200), old_pids)
    assert hosts.workers[2].pid not in {worker for _, worker in results[-50:]}
    failed = next(e for e in svc.events.history(ReplicaStateChanged)
                  if e.replica == victim.index and e.new == "FAILED")
    assert "host2" in failed.reason
    await svc.wait_for_state(victim.index, "HEALTHY", timeout=30)
    assert victim.host in {"host0", "host1"}

    # The link comes back: the host is UP, the replica goes home and serves there.
    hosts.heal(2)
    await svc.service.wait_for_host(2, "UP", timeout=30)
    await _wait(lambda: victim.host == "host2" and str(victim.state) == "HEALTHY", 30)
    answers = [await svc.work.route(2000 + i) for i in range(9)]
    assert hosts.workers[2].pid in {worker for _, worker in answers}
    # The processes cut off with the link were killed when it came back.
    agent = cluster.hosts[2].agent_procs.pids[0]
    assert await settle(hosts, 2, {agent, *victim.pids}) == {agent, *victim.pids}
    assert not old_pids & hosts.processes(2)

    await svc.shutdown()
    for i in range(HOSTS):
        assert len(await settle(hosts, i, {cluster.hosts[i].agent_procs.pids[0]})) == 1


# ---------------------------------------------------------------- bad input


async def check_bad_input_is_refused_at_the_call(hosts, cluster):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ClusterError, match=re.escape(nobody)):
        await forge_lite.attach_cluster([nobody])
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        await forge_lite.attach_cluster(["10.0.0.2:26600"])
    assert forge_lite.cluster() is cluster  # still the attached one

    before = [hosts.processes(i) for i in range(HOSTS)]
    with pytest.raises(ValueError, match=r"hosts=4 per replica, but the cluster has 3 host"):
        await Where.options(hosts=4, num_replicas=2).as_service()
    with pytest.raises(ValueError, match=r"hosts=4"):
        await Where.options(hosts=4).as_actor()
    assert [h.placed for h in cluster.hosts] == [0, 0, 0]
    assert [hosts.processes(i) for i in range(HOSTS)] == before  # nothing was started

    # A worker of another Monarch version is refused at attach, naming both
    # (checked on the versions its agent reports; this machine has only one).
    other = Host(5, "tcp://10.0.0.9:26600", None, {"forge_lite": forge_lite.__version__, "monarch": "0.6.0"})
    same, versions = host_versions_match(other)
    assert not same and "torchmonarch 0.6.0" in versions and "here: forge_lite" in versions

    svc = await start(cluster, Where.options(num_replicas=1))
    with pytest.raises(ClusterError, match="shut them down"):
        await forge_lite.attach_cluster(hosts.addresses)
    await svc.shutdown()


async def check_a_monarch_job_as_the_cluster(hosts):
    # Last in the file: the namespaces' attach above chose TCP for this
    # process; ProcessJob's own workers (Unix sockets) work with either.
    from monarch.job import ProcessJob

    job = ProcessJob({"hosts": 2})
    cluster = await forge_lite.attach_job(job)
    try:
        assert [h.name for h in cluster.hosts] == ["host0", "host1"]
        svc = await Where.options(num_replicas=2).as_service()
        try:
            assert {r.host for r in svc.replicas} == {"host0", "host1"}
            assert len({a["worker"] for a in await svc.where.fanout()}) == 2
        finally:
            await svc.shutdown()
    finally:
        await forge_lite.detach_cluster()
    assert forge_lite.cluster().is_local
