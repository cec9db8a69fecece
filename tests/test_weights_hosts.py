"""Weights across hosts: the trainer on one host, the Policy on another, and
the versions moving between them as Monarch messages (the actor store: each
version stays in the trainer's memory and each host fetches it once).

Two hosts, each a Monarch worker (as root: in its own network namespace,
else on a loopback port; see ``forge_lite.worker.LocalHosts``), each with a
temporary folder of its own: no folder is shared, so the file store could
not work here. The trainer and its WeightServer run on host0, a 2-replica
Policy service on host1 (``options(on_hosts=...)``).

- After ``push_weights(1)`` and ``update_weights.fanout(1)`` every replica
  answers exactly as an engine in this process loaded with the trainer's own
  weights (asked of the trainer, not of the store); a replica killed on
  host1 comes back there serving version 1. Nothing of the weights is
  written on host0; host1's cache folder is gone when the Policy stops.
- The trainer's process is killed (SIGKILL, from outside) while a push is
  under way: the replicas keep serving version 1, answering exactly as
  before; version 2 is either not listed (a KeyError naming version 1) or
  listed with its holder gone (a RuntimeError saying so), and the replicas
  stay on version 1 either way; a new trainer publishes version 2 and the
  replicas load it.

As in test_hosts.py, the checks (``check_*``) run in a fresh pytest process
started by ``test_weights_across_hosts_in_a_fresh_process``, because
Monarch fixes its transport at its first call in a process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from monarch.actor import endpoint

import forge_lite
from conftest import run_host_checks, started_hosts
from forge_lite.actors.engines import SamplingConfig, make_engine
from forge_lite.actors.policy import Policy
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors.weight_server import ActorWeightStore, open_weight_store
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.controller import ForgeActor
from forge_lite.rl.loss import grpo_loss
from forge_lite.worker import LocalHosts

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 16}
PROBE = "What is 12 + 30?"


@pytest.mark.timeout(400)
def test_weights_across_hosts_in_a_fresh_process():
    run_host_checks(__file__, timeout=380)


# ---------------------------------------------------------------- the hosts


class HostsWithOwnFolders(LocalHosts):
    """LocalHosts whose workers (and every process they start) each have a
    temporary folder of their own (TMPDIR), which the other host never sees."""

    def __init__(self, count: int):
        super().__init__(count)
        self.folders = [tempfile.mkdtemp(prefix=f"fl_host{i}_") for i in range(count)]

    def _new_worker(self, i: int):
        worker = super()._new_worker(i)
        worker.prefix += ["env", f"TMPDIR={self.folders[i]}"]
        return worker


@pytest.fixture(scope="module")
def hosts(request):
    return started_hosts(request, HostsWithOwnFolders(2))


class Folder(ForgeActor):
    """Says which temporary folder its process uses."""

    @endpoint
    async def tempdir(self) -> str:
        return tempfile.gettempdir()


async def started(hosts, start):
    """Await ``start`` (a coroutine that starts one actor); return (its result,
    the host index it landed on, the pid of its process there)."""
    before = [hosts.processes(i) for i in range(hosts.count)]
    result = await start
    new = [hosts.processes(i) - before[i] for i in range(hosts.count)]
    landed = [i for i, pids in enumerate(new) if pids]
    assert len(landed) == 1 and len(new[landed[0]]) == 1, new
    return result, landed[0], next(iter(new[landed[0]]))


def start_trainer(store):
    return RLTrainer.options(procs=1, on_hosts="host0").as_actor(
        model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": 1e-2}, training={"seq_len": 256},
        loss=functools.partial(grpo_loss, beta=0.0), weight_store=store,
    )


async def answers(policy) -> list[list[int]]:
    """Each replica's greedy answer to PROBE (token ids)."""
    return [c[0].token_ids.tolist() for c in await policy.generate.fanout(PROBE)]


async def local_answer(trainer) -> list[int]:
    """The greedy answer of an engine in this process loaded with the
    trainer's own weights (its state dict, not what the store holds)."""
    state = await trainer.state_dict.call_one()
    engine = make_engine({"backend": "transformers"}, seed=0, device="cpu")
    engine.load_weights(state["model"], version=1)
    return engine.generate([PROBE], SamplingConfig.from_dict(GREEDY))[0][0].token_ids.tolist()


_T0 = time.monotonic()


def mark(what: str) -> None:
    """Print how far the check is, and when (in the fresh process's output)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {what}", flush=True)


def weight_files(hosts) -> list[Path]:
    return [p for folder in hosts.folders for p in Path(folder).rglob("*.safetensors")]


def cache_folders(hosts, host: int) -> list[Path]:
    """The actor store's cache folders in ``host``'s temporary folder."""
    found = list(Path(hosts.folders[host]).glob("forge_lite-*/host_cache_*"))  # in the user's private folder
    assert not list(Path(hosts.folders[host]).glob("*weights*"))  # and nowhere else
    return found


# ---------------------------------------------------------------- the checks


async def check_weights_travel_from_the_trainer_host_to_the_policy_host(hosts):
    from test_weight_runs import train_step

    mark("hosts started")
    await forge_lite.attach_cluster(hosts.addresses, client_address=hosts.client_address)
    store = trainer = policy = None
    try:
        # The server and the trainer on host0, the Policy on host1.
        store, on, server_pid = await started(hosts, open_weight_store("actor", on_hosts="host0"))
        assert on == 0 and isinstance(store, ActorWeightStore)
        trainer, on, trainer_pid = await started(hosts, start_trainer(store))
        assert on == 0
        # Each host has its own temporary folder: no path of the other.
        folder1, on, _ = await started(hosts, Folder.options(on_hosts="host1").as_actor())
        assert on == 1 and await folder1.tempdir.call_one() == hosts.folders[1]
        await Folder.shutdown(folder1)
        policy = await Policy.options(num_replicas=2, on_hosts="host1").as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY, weight_store=store
        )
        assert [r.host for r in policy.replicas] == ["host1", "host1"]
        mark("policy started")
        original = await answers(policy)

        mark("version 1 goes from host0 to both replicas on host1")
        await train_step(trainer, seed=1)
        await trainer.push_weights.call_one(policy_version=1)
        await policy.update_weights.fanout(1)
        assert await policy.get_version.fanout() == [1, 1]
        served = await answers(policy)
        expected = await local_answer(trainer)
        assert served == [expected, expected]
        assert served[0] != original[0]  # the step did change the answer: the comparison means something

        mark("a replica killed on host1 comes back there, at version 1")
        await policy.kill_replica(1)
        await policy.wait_for_state(1, "HEALTHY", timeout=120)
        assert policy.replicas[1].host == "host1"
        assert await policy.get_version.fanout() == [1, 1]
        assert await answers(policy) == served

        mark("the trainer dies in the middle of a push of version 2")
        await train_step(trainer, seed=2)
        # The server is paused, so the push cannot finish before the kill:
        # the trainer is certainly still sending (or waiting to) when it dies.
        os.kill(server_pid, signal.SIGSTOP)
        try:
            push = asyncio.ensure_future(trainer.push_weights.call_one(policy_version=2))
            await asyncio.sleep(1.0)
            assert not push.done()
            os.kill(trainer_pid, signal.SIGKILL)
        finally:
            os.kill(server_pid, signal.SIGCONT)
        mark("trainer killed")
        with pytest.raises(Exception, match=r"Killed\(sig=9\)"):  # Monarch's SupervisionError
            await asyncio.wait_for(push, 60)
        mark("the push failed")
        await RLTrainer.shutdown(trainer)
        trainer = None
        mark("dead trainer shut down")

        # The replicas serve version 1, exactly as before.
        assert await policy.get_version.fanout() == [1, 1]
        assert await answers(policy) == served
        held = await store.aversions()
        # The server lists version 2 only once its holder had all of it. The
        # listing message may still arrive after the kill (the kernel had it
        # in its socket buffers), so both outcomes happen.
        print(f"\nserver after the trainer was killed mid-push: versions {held}", flush=True)
        assert held in ([1], [1, 2])
        refused = (r"weight version 2 .*available: \[1\]" if held == [1]
                   else r"weight version 2 is held only by the process that published it .* did not answer")
        with pytest.raises(Exception, match=refused):
            await policy.update_weights.fanout(2)
        assert await policy.get_version.fanout() == [1, 1]
        assert await answers(policy) == served

        mark("a new trainer publishes, and the replicas load it")
        trainer, on, _ = await started(hosts, start_trainer(store))
        assert on == 0
        await train_step(trainer, seed=3)
        await trainer.push_weights.call_one(policy_version=2)
        await policy.update_weights.fanout(2)
        assert await policy.get_version.fanout() == [2, 2]
        expected = await local_answer(trainer)
        assert await answers(policy) == [expected, expected]

        assert weight_files(hosts) == []  # no weight store folder on either host
        assert cache_folders(hosts, 0) == []  # host0 only sent
        await policy.shutdown()
        policy = None
        assert cache_folders(hosts, 1) == []  # the last replica on host1 deleted its folder
        mark("done")
    finally:
        if policy is not None:
            await policy.shutdown()
        if trainer is not None:
            await RLTrainer.shutdown(trainer)
        if store is not None:
            await store.aclose()  # stops the server
        await forge_lite.detach_cluster()
