"""GRPO across hosts: ``configs/grpo_tiny_two_hosts.yaml`` on two real hosts.

The hosts are Monarch workers started with ``python -m forge_lite.worker``
(``LocalHosts``): as root each in its own network namespace, else on
loopback ports; the output says which mode ran. Monarch fixes its transport
at its first call in a process, so the ``check_*`` functions run in a fresh
pytest process of their own, started by ``test_grpo_hosts_in_a_fresh_process``
(as in test_hosts.py). What needs no cluster (a placement naming a host this
machine does not have) runs here directly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from monarch.actor import endpoint

import forge_lite
from conftest import count_children, run_host_checks, started_hosts
from forge_lite.controller import ForgeActor
from forge_lite.controller.actor import processes_of
from forge_lite.controller.service.events import ReplicaStateChanged
from forge_lite.worker import LocalHosts
from test_grpo_loop import CONFIGS, FAST

ROOT = Path(__file__).resolve().parents[1]
TWO_HOSTS = os.path.join(CONFIGS, "grpo_tiny_two_hosts.yaml")
STEPS = 30


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grpo_hosts_in_a_fresh_process():
    run_host_checks(__file__, timeout=280)


# ---------------------------------------------------------------- no cluster needed


async def test_a_placement_on_a_host_the_cluster_lacks_fails_before_anything_starts(tmp_path):
    from forge_lite.grpo.config import load_config
    from forge_lite.grpo.run import run_grpo

    before = count_children()
    config = load_config(TWO_HOSTS, FAST + [f"output_dir={tmp_path}", "progress=false"])
    with pytest.raises(ValueError, match=r"placement\.\w+: no host 'host\d' in the cluster; it has 0=local"):
        await run_grpo(config)
    assert count_children() == before  # not even the weight server started


async def test_on_hosts_naming_a_missing_host_is_refused_at_the_call():
    before = count_children()
    with pytest.raises(ValueError, match=r"no host 'host3' in the cluster; it has 0=local"):
        await Where.options(on_hosts="host3").as_service()
    with pytest.raises(ValueError, match=r"no host 2 in the cluster"):
        await Where.options(on_hosts=[0, 2]).as_actor()
    with pytest.raises(ValueError, match="on_hosts must be"):
        Where.options(on_hosts=[True])
    assert count_children() == before


# ---------------------------------------------------------------- on two hosts


class Where(ForgeActor):
    @endpoint
    async def worker(self) -> int:
        return os.getppid()

    @endpoint
    async def threads(self) -> str | None:
        return os.environ.get("OMP_NUM_THREADS")


@pytest.fixture(scope="module")
def hosts(request):
    """Two hosts: network namespaces as root, else loopback workers (see LocalHosts)."""
    return started_hosts(request, LocalHosts(2))


@pytest.fixture
async def cluster(hosts):
    attached = await forge_lite.attach_cluster(hosts.addresses, client_address=hosts.client_address)
    try:
        yield attached
    finally:
        await forge_lite.detach_cluster()


async def check_on_hosts_places_replicas_and_actors_on_the_named_hosts(hosts, cluster, monkeypatch):
    # A GRPO run's threads_per_process: it must reach processes on other hosts too.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    svc = await Where.options(num_replicas=3, on_hosts="host1").as_service()
    actor = await Where.options(on_hosts=[0]).as_actor()
    try:
        assert [r.host for r in svc.replicas] == ["host1"] * 3  # not spread: the host named
        assert set(await svc.worker.fanout()) == {hosts.workers[1].pid}
        assert await actor.worker.call_one() == hosts.workers[0].pid
        assert processes_of(actor).placement.name == "host0"
        assert await svc.threads.fanout() == ["1", "1", "1"] and await actor.threads.call_one() == "1"
    finally:
        await svc.shutdown()
        await Where.shutdown(actor)
    spread = await Where.options(num_replicas=2, on_hosts=["host1", 0]).as_service()
    try:
        assert sorted(r.host for r in spread.replicas) == ["host0", "host1"]  # least occupied of those named
    finally:
        await spread.shutdown()
    with pytest.raises(ValueError, match=r"no host 'host2' in the cluster; it has 0=host0, 1=host1"):
        await Where.options(on_hosts="host2").as_service()
    assert [h.placed for h in cluster.hosts] == [0, 0]  # nothing left placed


async def check_a_service_shut_down_mid_respawn_gives_its_host_slot_back(hosts, cluster):
    # What a GRPO run that stops after losing a host does: its services shut
    # down while their replicas respawn elsewhere.
    svc = await Where.options(num_replicas=1, on_hosts="host1").as_service()
    respawning = asyncio.Event()
    svc.events.subscribe(lambda e: isinstance(e, ReplicaStateChanged) and e.new == "RECOVERING"
                         and "respawning" in e.reason and respawning.set())
    await svc.kill_replica(0)
    await asyncio.wait_for(respawning.wait(), 30)
    await svc.shutdown()
    assert [h.placed for h in cluster.hosts] == [0, 0]  # the respawn's slot was given back too
    assert await settled(hosts, 1)


async def settled(hosts, i: int, timeout: float = 20.0) -> bool:
    """Host ``i`` runs nothing of ours but its agent (stopped processes take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while len(hosts.processes(i)) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return len(hosts.processes(i)) <= 1


async def check_the_two_hosts_config_trains_and_every_replica_ends_on_the_last_version(hosts, cluster, tmp_path):
    from forge_lite.actors.weight_server import ActorWeightStore
    from forge_lite.grpo.config import load_config
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.grpo.run import GRPORun

    # Two replicas, so "every replica" means something; no held-out scoring and
    # no skipped groups (two responses agree often): 30 short steps, nothing else.
    config = load_config(TWO_HOSTS, FAST + [f"steps={STEPS}", "policy.num_replicas=2", "eval_samples=0",
                                            "skip_uniform_groups=false", f"output_dir={tmp_path}",
                                            "progress=false"])
    recorder = MetricsRecorder()
    run = await GRPORun(config, recorder).start()
    try:
        # Each component runs where the config put it: by name, and by process parentage.
        where = run.services.hosts()
        assert where["policy"] == ["host1", "host1"] and where["ref_model"] == ["host1"]
        assert where["reward_actor"] == ["host1"] and where["trainer"] == ["host0"], where
        on_host1, on_host0 = set(hosts.workers[1].children()), set(hosts.workers[0].children())
        assert all(set(r.pids) <= on_host1 for r in run.services.policy.replicas)
        assert set(processes_of(run.services.trainer).pids) <= on_host0
        assert isinstance(run.store, ActorWeightStore)  # no folder is shared between the hosts
        # Its server sits with the policy replicas: a version crosses the network once.
        assert set(processes_of(run.store.handle).pids) <= on_host1

        result = await run.train()

        assert [s.step for s in recorder.steps] == list(range(STEPS))
        assert recorder.versions[-1].trainer_version == STEPS
        assert recorder.versions[-1].replica_versions == (STEPS, STEPS)
        assert await run.services.policy.get_version.fanout() == [STEPS, STEPS]
        assert result.steps_trained == STEPS
    finally:
        await run.shutdown()
    assert [h.placed for h in cluster.hosts] == [0, 0]


def check_the_command_line_runs_the_two_hosts_config_on_the_workers_it_is_given(hosts, tmp_path):
    # Its own process attaches the workers (no cluster attached here meanwhile).
    overrides = [o for o in FAST if not o.startswith("steps=")] + [
        "steps=3", "eval_samples=0", f"output_dir={tmp_path}", "progress=false"]
    out = subprocess.run(
        [sys.executable, "-m", "forge_lite.grpo", "--config", TWO_HOSTS,
         "--cluster", ",".join(hosts.addresses), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={k: v for k, v in os.environ.items() if not k.startswith("FORGE_LITE_")},
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "GRPO: 3 steps in" in out.stdout and "weights: actor" in out.stdout
    with open(tmp_path / "metrics.jsonl") as metrics:
        assert sum('"reward_mean"' in line for line in metrics) == 3
    # The workers are free again: every process the run started there is gone.
    deadline = time.monotonic() + 20
    while (hosts.workers[0].children() or hosts.workers[1].children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not hosts.workers[0].children() and not hosts.workers[1].children()
