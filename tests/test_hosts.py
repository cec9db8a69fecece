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
Monarch can be in the way, and nothing done here can leak into it (see
conftest.run_host_checks).
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import os
import re
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from monarch.actor import current_rank, endpoint

import forge_lite
from conftest import run_host_checks, started_hosts
from forge_lite.controller import ForgeActor
from forge_lite.controller.actor import processes_of
from forge_lite.controller.cluster import ClusterError
from forge_lite.controller.service.events import HostStateChanged, ReplicaStateChanged, RequestRouted
from forge_lite.worker import LocalHosts, WorkerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 3


@pytest.mark.timeout(300)
def test_hosts_in_a_fresh_process():
    run_host_checks(__file__, timeout=280)


# ---------------------------------------------------------------- the hosts


@pytest.fixture(scope="module")
def hosts(request):
    """HOSTS hosts: network namespaces as root, else loopback workers (see LocalHosts)."""
    return started_hosts(request, LocalHosts(HOSTS))


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
    async def answer(self, prompt: str) -> dict:
        return {"replica": int(os.environ.get("FORGE_LITE_REPLICA", -1)), "worker": os.getppid()}

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


async def check_prefix_routing_across_hosts(hosts, cluster):
    svc = await start(cluster, Where.options(num_replicas=3, router="prefix"))
    story = "once upon a time a replica kept a cache of every prompt it had seen. " * 3
    prompts = [f"conversation {i}: {story}" for i in range(3)]
    # Sent together, the first turns find no prefix and spread by load: one per host.
    first = await asyncio.gather(*(svc.answer.route(prompt=p) for p in prompts))
    assert {a["worker"] for a in first} == {w.pid for w in hosts.workers}
    follow_ups = [await svc.answer.route(prompt=p + " And then what happened?") for p in prompts]
    assert follow_ups == first  # the same replica, so the same host, as its conversation's first turn
    routed = svc.events.history(RequestRouted)[-3:]
    assert all("prefix match" in e.reason for e in routed), [e.reason for e in routed]
    assert [e.host for e in routed] == [svc.replicas[a["replica"]].host for a in first]


# ---------------------------------------------------------------- the dashboard


async def check_the_dashboard_groups_replicas_by_host_and_kills_one(hosts, cluster):
    from forge_lite.widgets import ServiceDashboard

    svc = await start(cluster, Where.options(num_replicas=3))
    dash = ServiceDashboard(svc)
    assert [(host, [c.index for c in cards]) for host, cards in dash.view.groups()] == sorted(
        (r.host, [r.index]) for r in svc.replicas)
    for i, worker in enumerate(hosts.workers):  # each group is titled with its host and address
        assert f"host{i} ({worker.address.removeprefix('tcp://')})" in dash._cards.value
        assert f"on host{i}" in dash._cards.value
    assert dash._host_pick.options == (("host0", 0), ("host1", 1), ("host2", 2))

    victim = next(r for r in svc.replicas if r.host == "host1")
    dash._host_pick.value = 1
    dash._buttons["kill host"].click()
    await svc.service.wait_for_host(1, "LOST", timeout=15)
    await svc.wait_for_state(victim.index, "HEALTHY", timeout=30)
    dash._redraw()
    assert dash._control_error.value == ""
    groups = dict(dash.view.groups())
    assert groups["host1"] == [] and dash.view.cards[victim.index] in groups[victim.host]
    assert "fl-host-lost" in dash._cards.value and dash.view.host_label("host1").endswith("LOST")

    # The next checks need host1: a fresh worker takes its place.
    new = hosts.replace(1)
    await cluster.replace_host(1, new.address)


# ---------------------------------------------------------------- training over hosts


async def check_a_data_parallel_trainer_over_two_hosts_takes_the_one_process_step(hosts, cluster, tmp_path):
    from test_trainer_ddp import SGD, make_episodes

    from forge_lite.actors.trainer import RLTrainer
    from forge_lite.actors.weights import WeightStore
    from forge_lite.assets import DEFAULT_MODEL
    from forge_lite.rl.collate import grpo_collate

    store = WeightStore(str(tmp_path))  # one machine's folder: every "host" here sees it
    episodes = make_episodes([1.0, -0.5, 0.5, 0.2])
    settings = dict(model=DEFAULT_MODEL, optimizer=SGD, weight_store=store,
                    training={"seq_len": 64, "max_norm": float("inf")})
    single = await RLTrainer.options(procs=1).as_actor(**settings)
    try:
        single_loss = await single.train_step.call_one(*grpo_collate(episodes, dp_size=1))
        await single.push_weights.call_one(policy_version=1)
    finally:
        await RLTrainer.shutdown(single)

    ddp = await RLTrainer.options(hosts=2, procs=1).as_actor(**settings)
    try:
        workers = {psutil.Process(pid).ppid() for pid in processes_of(ddp).pids}
        assert len(workers) == 2 and workers <= {w.pid for w in hosts.workers}  # one rank per host
        losses = await ddp.train_step.call(*grpo_collate(episodes, dp_size=2))
        await ddp.push_weights.call(policy_version=2)
    finally:
        await RLTrainer.shutdown(ddp)

    assert list(losses.values()) == [pytest.approx(single_loss, abs=1e-6)] * 2
    one_host, two_hosts = store.get(1), store.get(2)
    assert max((one_host[k] - two_hosts[k]).abs().max().item() for k in one_host) < 1e-5


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

    svc = await start(cluster, Where.options(num_replicas=1))
    with pytest.raises(ClusterError, match="shut them down"):
        await forge_lite.attach_cluster(hosts.addresses)
    await svc.shutdown()


async def check_one_worker_attached_twice_is_refused():
    """A real worker listening on every address of this machine (as
    ``python -m forge_lite.worker`` does by default), named several ways:
    each pair is refused before anything is attached, naming both."""
    from forge_lite.worker import monarch_address

    port = free_port()
    worker = WorkerProcess(f"tcp://0.0.0.0:{port}").start()
    # The address the worker advertises (this machine's, on its default route).
    public = monarch_address(f"tcp://0.0.0.0:{port}").split("@")[0]
    ip = public.removeprefix("tcp://").rsplit(":", 1)[0]
    try:
        pairs = [(public, f"tcp://127.0.0.1:{port}"), (public, f"tcp://[::ffff:{ip}]:{port}"),
                 (f"tcp://127.0.0.1:{port}", f"tcp://localhost:{port}"),
                 (f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:{port}")]
        for first, second in pairs:
            started = time.monotonic()
            with pytest.raises(ClusterError, match="same worker") as refused:
                await forge_lite.attach_cluster([first, second])
            assert first in str(refused.value) and second in str(refused.value)
            assert time.monotonic() - started < 10  # refused, not timed out
            assert forge_lite.cluster().is_local and worker.children() == []
        # (Named once, at the address it advertises, it attaches: every other
        # check here attaches workers. This process's transport may not reach
        # `public`, so it is not attached here.)
    finally:
        worker.kill()


def worker_reporting(tmp_path: Path, dist: str, name: str, version: str) -> WorkerProcess:
    """A real worker whose Python reports ``name`` ``version`` as installed:
    a ``.dist-info`` in its working directory comes first on its import path
    (this machine's index has one Monarch version only)."""
    folder = tmp_path / f"{dist}-{version}"
    (folder / f"{dist}-{version}.dist-info").mkdir(parents=True)
    (folder / f"{dist}-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return WorkerProcess(f"tcp://127.0.0.1:{free_port()}", prefix=["env", "-C", str(folder)])


async def check_a_worker_of_other_versions_is_refused_at_attach(tmp_path):
    here = f"here: forge_lite {metadata.version('forge-lite')}, torchmonarch {metadata.version('torchmonarch')}"
    others = [worker_reporting(tmp_path, "torchmonarch", "torchmonarch", "0.6.0"),
              worker_reporting(tmp_path, "forge_lite", "forge-lite", "0.0.1")]
    for worker in others:
        worker.launch()
    try:
        for worker, theirs in zip(others, ["torchmonarch 0.6.0", "forge_lite 0.0.1"]):
            worker.wait_ready()
            with pytest.raises(ClusterError) as refused:
                await forge_lite.attach_cluster([worker.address])
            message = str(refused.value)
            where = worker.address.removeprefix("tcp://")
            assert f"host0 ({where})" in message and theirs in message, message
            assert here in message, message
            assert forge_lite.cluster().is_local  # nothing half-attached
            deadline = time.monotonic() + 20  # and its agent stopped: the worker runs nothing
            while worker.children() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert worker.children() == []
    finally:
        for worker in others:
            worker.kill()


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
