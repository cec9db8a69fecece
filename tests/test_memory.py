"""A learner's footprint: what a workshop's memory limit allows.

- Light actors (``shares_process = True``: the dataset, the replay buffer,
  the advantages) started with ``as_actor`` share one process per caller; each
  is still stopped on its own, and the process goes with the last of them. A
  service's replicas keep a process each.
- The dataset actor's light loading (no ``datasets``, no AutoTokenizer) serves
  what the full loading served.
- A replica the kernel's OOM killer took is a FAILED replica that says so,
  not a hang (the test runs in a memory cgroup with a small limit).
- Every notebook passes under nbval in a memory cgroup with a workshop's
  1.5 GB hard limit, or its measured peak where it still needs more: that
  check is part of each notebook's nbval run (``tests/test_notebooks.py``),
  so CI does not run the notebooks twice; ``benchmarks/memory.py`` measures
  the peaks.

The cgroup tests need root and the cgroup v1 memory controller; elsewhere they skip.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import pid_alive, wait_for_exit

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.actors.replay_buffer import ReplayBuffer
from forge_lite.controller import ForgeActor
from forge_lite.controller.actor import processes_of
from forge_lite.grpo.advantages import ComputeAdvantages
from forge_lite.grpo.dataset import DatasetActor, ShippedRows, load_math_dataset, load_request_tokenizer
from forge_lite.grpo.reward_actor import RewardActor
from forge_lite.data.rewards import MathReward
from monarch.actor import endpoint

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
WORKSHOP_LIMIT_MB = 1500


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
needs_cgroup = pytest.mark.skipif(bench.cgroup_available() is not None,
                                  reason=str(bench.cgroup_available()))


class Fragile(ForgeActor):
    """A light actor whose ``__init__`` fails when told to."""

    shares_process = True

    def __init__(self, fail: bool = False):
        if fail:
            raise RuntimeError("Fragile refused to start")

    @endpoint
    def pid(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------- one process for light actors


async def test_light_actors_share_one_process_and_stop_one_at_a_time():
    dataset, buffer, advantages = await asyncio.gather(
        DatasetActor.options(procs=1).as_actor(data_split="test"),
        ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1),
        ComputeAdvantages.options(procs=1).as_actor(),
    )
    pids = {processes_of(actor).pids[0] for actor in (dataset, buffer, advantages)}
    assert len(pids) == 1, f"three light actors on {len(pids)} processes"
    (pid,) = pids
    assert pid != os.getpid() and pid_alive(pid)
    try:
        await ForgeActor.shutdown(dataset)  # stops that actor only
        assert pid_alive(pid)
        assert await buffer.numel.call_one() == 0
        # Each is still its own actor, with its own state.
        second = await ReplayBuffer.options(procs=1).as_actor(batch_size=2, max_policy_age=1, dp_size=1)
        assert processes_of(second).pids == [pid]
        await ReplayBuffer.shutdown(second)
        assert await buffer.numel.call_one() == 0
        await ComputeAdvantages.shutdown(advantages)
        assert pid_alive(pid)
    finally:
        await ReplayBuffer.shutdown(buffer)  # the last one: the process goes
    assert await wait_for_exit([pid], timeout=15) == []
    # The next light actor gets a fresh process.
    again = await ComputeAdvantages.options(procs=1).as_actor()
    try:
        assert processes_of(again).pids[0] != pid
    finally:
        await ComputeAdvantages.shutdown(again)


async def test_the_light_actors_process_never_loads_torch():
    """What a GRPO run asks of its light actors (a problem, a group's
    advantages, episodes into the buffer and a batch of them back, with
    ``collate=None`` as the run sets it) loads no torch in their process:
    about 1 CPU-s less start-up and 190 MB less memory per run. The episodes
    leave this process with tensor fields and come back as lists of the same
    numbers, which collate as before."""
    import torch

    from forge_lite.rl.collate import grpo_collate
    from forge_lite.rl.episode import Group

    dataset, buffer, advantages = await asyncio.gather(
        DatasetActor.options(procs=1).as_actor(data_split="test"),
        ReplayBuffer.options(procs=1).as_actor(batch_size=4, max_policy_age=1, dp_size=1, collate=None),
        ComputeAdvantages.options(procs=1).as_actor(),
    )
    try:
        problem = await dataset.sample.call_one()
        group = Group.new_group("g", 4, problem["request"], 0, pad_id=0, request_len=8, response_len=4)
        for i, episode in enumerate(group.episodes):
            episode.request_tokens = torch.tensor([1, 2, 3])
            episode.response_tokens = torch.tensor([4, 5, 6][: i % 3 + 1])
            episode.behaviour_logprobs = torch.tensor([-0.5, -0.25, -0.125][: i % 3 + 1])
            episode.reward = float(i % 2)
        for episode, advantage in zip(group.episodes, await advantages.compute.call_one(group)):
            episode.advantage = advantage
        await buffer.extend.call_one(group.episodes)
        sampled = await buffer.sample.call_one(curr_policy_version=0)
        (pid,) = processes_of(buffer).pids
        with open(f"/proc/{pid}/maps") as maps:
            assert "libtorch" not in maps.read(), "the light actors' process loaded torch"
    finally:
        await asyncio.gather(DatasetActor.shutdown(dataset), ReplayBuffer.shutdown(buffer),
                             ComputeAdvantages.shutdown(advantages))
    (episodes,) = sampled  # one chunk per dp rank
    assert all(isinstance(e.behaviour_logprobs, list) for e in episodes)
    by_id = {e.episode_id: e for e in group.episodes}
    order = [by_id[e.episode_id] for e in episodes]
    for came_back, sent in zip(grpo_collate(episodes), grpo_collate(order)):
        for key in sent[0]:
            assert torch.equal(came_back[0][key], sent[0][key]), key


async def test_two_dataset_actors_start_at_once_on_the_shared_process():
    # A GRPO run starts its training and held-out sets together: on one
    # process, their tokenizer imports must not trip over each other.
    train, held_out = await asyncio.gather(
        DatasetActor.options(procs=1).as_actor(data_split="train"),
        DatasetActor.options(procs=1).as_actor(data_split="test"),
    )
    try:
        assert processes_of(train).pids == processes_of(held_out).pids
        first, other = await train.sample.call_one(), await held_out.sample.call_one()
        assert first["request"] and other["request"] and first["question"] != other["question"]
    finally:
        await DatasetActor.shutdown(train)
        await DatasetActor.shutdown(held_out)


async def test_a_light_actor_that_fails_to_start_leaves_the_others_working():
    first = await Fragile.options(procs=1).as_actor()
    pid = await first.pid.call_one()
    try:
        with pytest.raises(RuntimeError, match="Fragile refused to start"):
            await Fragile.options(procs=1).as_actor(fail=True)
        assert await first.pid.call_one() == pid  # still there, still answering
        # Monarch starts no more actors on that process: the next one gets a new one.
        later = await Fragile.options(procs=1).as_actor()
        try:
            assert await later.pid.call_one() != pid
        finally:
            await Fragile.shutdown(later)
    finally:
        await Fragile.shutdown(first)
    assert await wait_for_exit([pid], timeout=15) == []


async def test_a_light_actor_asked_for_more_than_one_process_gets_its_own():
    actor = await Fragile.options(procs=2).as_actor()
    try:
        pids = await actor.pid.call()
        assert len({pid for _, pid in pids.items()}) == 2
        assert not processes_of(actor).shared
    finally:
        await Fragile.shutdown(actor)


async def test_service_replicas_keep_a_process_each():
    light = await ComputeAdvantages.options(procs=1).as_actor()
    reward = await RewardActor.options(procs=1, num_replicas=2).as_service(reward_functions=[MathReward()])
    try:
        replica_pids = [pid for replica in reward.replicas for pid in replica.pids]
        assert len(set(replica_pids)) == 2
        assert processes_of(light).pids[0] not in replica_pids
    finally:
        await reward.shutdown()
        await ComputeAdvantages.shutdown(light)


# ---------------------------------------------------------------- the dataset actor, light


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_rows_shuffle_as_datasets_does(split):
    light, full = ShippedRows(split), load_math_dataset(data_split=split)
    assert len(light) == len(full)
    for seed in (0, 1, 5):
        pairs = zip(light.shuffle(seed), full.shuffle(seed=seed))
        assert all(a["question"] == b["question"] and a["answer"] == b["answer"] for a, b in pairs)
    with pytest.raises(ValueError, match="not 'validation'"):
        ShippedRows("validation")


def test_request_tokenizer_formats_as_the_full_tokenizer():
    from forge_lite.actors.hf_model import load_tokenizer
    from forge_lite.data.prompts import format_request

    light, full = load_request_tokenizer(None), load_tokenizer(None)
    question = "Tom has 3 apples and buys 4 more. How many apples?"
    assert format_request(light, question) == format_request(full, question)
    assert (light.pad_token_id, light.eos_token_id) == (full.pad_token_id, full.eos_token_id)


# ---------------------------------------------------------------- out of memory


OOM_SCRIPT = textwrap.dedent('''
    import asyncio, time
    import forge_lite
    from forge_lite.controller import ForgeActor
    from monarch.actor import endpoint

    class Hog(ForgeActor):
        @endpoint
        async def grow(self, mb: int) -> int:
            block = bytearray(mb * 2**20)
            for i in range(0, len(block), 4096):  # touch every page
                block[i] = 1
            return len(block)

    async def main():
        svc = await Hog.options(procs=1, num_replicas=1, max_retries=0).as_service()
        try:
            await asyncio.wait_for(svc.grow.route({mb}), 120)
            print("NO ERROR")
        except Exception as error:
            print("ERROR", type(error).__name__, error, flush=True)
        print("REASON", svc.replicas[0].reason, flush=True)
        await svc.shutdown()

    asyncio.run(main())
''')


@needs_cgroup
@pytest.mark.timeout(300)
def test_a_replica_killed_for_memory_says_so(tmp_path):
    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT.format(mb=1200))
    result = bench.run_in_cgroup([sys.executable, str(script)], limit_bytes=600 * MB, timeout_s=240)
    output = result["output"]
    assert result["returncode"] == 0, output[-3000:]
    assert result["oom_kills"] >= 1, output[-3000:]
    # The caller (the kernel, in a notebook) lives on and was told why.
    assert "NoHealthyReplicaError" in output, output[-3000:]
    assert "out of memory" in output and "(600 MB)" in output and "lower num_replicas" in output, output[-3000:]
    assert "REASON" in output and "out of memory" in output.split("REASON", 1)[1], output[-3000:]


# ---------------------------------------------------------------- notebooks in a workshop's limit

# Where a notebook still needs more than the workshop's limit: its measured
# peak (benchmarks/memory.py, 2026-12-07, page cache included) with a margin.
