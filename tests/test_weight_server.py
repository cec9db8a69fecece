"""The actor-backed weight store (`WeightServer` + `ActorWeightStore`) on real
Monarch processes: versions stay in the publisher's memory and travel as
actor messages; a host shares one fetch among its replicas through a file.

- The server keeps the newest K versions; asking for a dropped one is a
  KeyError that names the versions held.
- A version's copy and its file form keep every tensor exactly (dtypes,
  shapes, tied tensors stored once).
- Four processes on one host that ask for a version at once fetch it once;
  one alone writes no file; the last to leave deletes the folder, and the
  folder of a run whose processes were all killed goes at the next join.
- A version whose holder died is a RuntimeError after HOLDER_TIMEOUT_S, not
  a wait forever.
- The client pickles with its actor handle: an actor that receives it as an
  argument calls the server itself.
- A trainer pushes v1, v2, v3; a 2-replica Policy service updated to v3
  answers as a Policy started at v3 (and not as v0); a respawned replica comes
  back at v3. The same flow runs with the file `WeightStore`.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from monarch.actor import concurrent_endpoint, endpoint
from test_engines import build_tiny_qwen3, perturbed
from test_weight_runs import train_step

from forge_lite.actors.engines import make_engine
from forge_lite.actors.policy import Policy
from forge_lite.actors.trainer import RLTrainer
from forge_lite.actors import weight_server
from forge_lite.actors.host_cache import HostCache, _map, _write_tensors, file_size, host_cache, snapshot, unpack
from forge_lite.actors.weight_server import ActorWeightStore, WeightServer
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.controller import ForgeActor
from forge_lite.rl.loss import grpo_loss

pytestmark = pytest.mark.timeout(600)

GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 16}
PROBE = "What is 12 + 30?"


class Reader(ForgeActor):
    """Reads from a store it is handed as an argument, inside its own process."""

    @endpoint
    async def total(self, store, version: int) -> float:
        state_dict = await store.aget(version)
        return float(sum(tensor.sum() for tensor in state_dict.values()))

    @endpoint
    async def missing(self, store, version: int) -> str:
        try:
            await store.aget(version)
        except KeyError as error:
            return str(error)
        return "no error"


@pytest.fixture(scope="module")
async def server():
    handle = await WeightServer.options(procs=1).as_actor(keep_last=2)
    yield handle
    await WeightServer.shutdown(handle)


async def test_the_server_keeps_the_newest_versions_and_names_them_for_a_dropped_one(server):
    store = ActorWeightStore(server)
    for version in (1, 2, 3):
        await store.aput(version, {"w": torch.full((4,), float(version))})
    assert await store.aversions() == [2, 3]
    assert await store.alatest() == 3
    assert torch.equal((await store.aget(3))["w"], torch.full((4,), 3.0))
    with pytest.raises(KeyError, match=r"weight version 1 .*available: \[2, 3\]"):
        await store.aget(1)
    # The sync methods block on the answer: for scripts, here run off the loop.
    assert await asyncio.to_thread(store.versions) == [2, 3]
    assert torch.equal((await asyncio.to_thread(store.get, 2))["w"], torch.full((4,), 2.0))


async def test_an_actor_handed_the_store_calls_the_server_itself(server):
    store = ActorWeightStore(server)
    await store.aput(7, {"w": torch.ones(10)})
    reader = await Reader.options(procs=1).as_actor()
    try:
        assert await reader.total.call_one(store, 7) == 10.0
        message = await reader.missing.call_one(store, 1)
        assert "weight version 1" in message and "available: [" in message
    finally:
        await Reader.shutdown(reader)


def test_a_snapshot_and_its_file_form_keep_every_tensor(tmp_path):
    embed = torch.randn(7, 3)
    state = {
        "embed": embed,
        "lm_head": embed,  # tied: the same tensor under two names
        "bf16": torch.randn(5, 2).to(torch.bfloat16),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
        "steps": torch.tensor(41, dtype=torch.int64),  # 0-dim
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    published = embed.clone()
    copies, layout = snapshot(state)
    embed += 1  # the next optimizer step: a published version must not change
    assert [slot.name for slot in layout] == list(state)
    assert copies["embed"] is copies["lm_head"]  # copied once
    assert layout[0].offset == layout[1].offset  # and stored once
    assert all(slot.offset % 64 == 0 for slot in layout)
    expected = {**state, "embed": published, "lm_head": published}
    for name, tensor in expected.items():
        assert copies[name].dtype == tensor.dtype and torch.equal(copies[name], tensor), name

    path = tmp_path / "v1.bin"
    with open(path, "wb") as file:
        _write_tensors(file, copies, layout)
    loaded = unpack(_map(path), layout)
    assert list(loaded) == list(state)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    # The file holds the tied tensor once: its size is what the distinct tensors need.
    distinct = [t for name, t in state.items() if name != "lm_head"]
    assert path.stat().st_size == file_size(layout) == sum(-(-t.numel() * t.element_size() // 64) * 64
                                                          for t in distinct)


class SlowSource(ForgeActor):
    """Answers a fetch after a second, and counts the fetches: the replicas
    that ask meanwhile must wait for the first one's file, not fetch."""

    def __init__(self):
        self.fetches = 0

    @concurrent_endpoint
    async def get(self, version: int) -> dict[str, torch.Tensor]:
        self.fetches += 1
        await asyncio.sleep(1.0)
        return {"w": torch.full((1000,), float(version)), "b": torch.arange(10)}

    @endpoint
    async def count(self) -> int:
        return self.fetches


class CacheUser(ForgeActor):
    """Loads versions through this host's cache, in its own process."""

    @endpoint
    async def load(self, store_id: str, version: int, source) -> list:
        cache = host_cache(store_id, keep_last=2)
        _, layout = snapshot({"w": torch.zeros(1000), "b": torch.arange(10)})
        state = await cache.load(version, "ab12", layout, lambda: source.get.call_one(version))
        await cache.flush()
        self.cache = cache
        return [state["w"].sum().item(), state["b"].tolist(), sorted(p.name for p in cache.folder.glob("v*"))]

    @endpoint
    async def leave(self) -> None:
        await self.cache.leave()


async def test_the_replicas_of_a_host_fetch_a_version_once_and_share_its_file():
    import uuid

    store_id = uuid.uuid4().hex[:16]
    source = await SlowSource.options(procs=1).as_actor()
    users = await CacheUser.options(procs=4).as_actor()
    lone = await CacheUser.options(procs=1).as_actor()
    folder = HostCache(store_id, keep_last=2).folder
    try:
        # Four processes ask for version 1 at once: one fetch, one file.
        answers = await users.load.call(store_id, 1, source)
        assert [a for _, a in answers.items()] == [[1000.0, list(range(10)), ["v1-ab12.bin"]]] * 4
        assert await source.count.call_one() == 1
        # One process alone asks for version 2: it fetches and writes no file.
        assert await lone.load.call_one(store_id, 2, source) == [2000.0, list(range(10)), ["v1-ab12.bin"]]
        assert await source.count.call_one() == 2
        # A file that exists is read, not fetched again.
        assert (await lone.load.call_one(store_id, 1, source))[0] == 1000.0
        assert await source.count.call_one() == 2
        # The folder stays while any process uses it; the last one out deletes it.
        await users.leave.call()
        assert folder.exists()
        await lone.leave.call_one()
        assert not folder.exists()
    finally:
        for handle in (source, users, lone):
            await ForgeActor.shutdown(handle)


async def test_a_replica_joining_deletes_the_folders_of_dead_runs_only(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temporary folder
    from forge_lite.paths import private_temp_dir

    def folder(name: str, age_s: float) -> "os.PathLike":
        path = private_temp_dir() / f"host_cache_{name}"
        path.mkdir()
        (path / ".users").touch()
        (path / "v1-ab12.bin").write_bytes(b"weights")
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    dead = folder("dead", age_s=600)  # every process of its run was killed: nobody holds it
    idle = folder("idle", age_s=600)  # a run whose replicas live, but have had no new version for a while
    young = folder("young", age_s=0)  # a run that is just starting
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(120)", str(idle / ".users")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        joining = HostCache("joining", keep_last=2)
        joining._join()
        assert not dead.exists()
        assert idle.exists() and young.exists()
        await joining.leave()
        assert not joining.folder.exists()
    finally:
        holder.kill()
        holder.wait()


class Publisher(ForgeActor):
    @endpoint
    async def publish(self, store, version: int) -> int:
        await store.aput(version, {"w": torch.ones(4)})
        return __import__("os").getpid()


async def test_a_version_whose_holder_died_is_an_error_not_a_wait(server, monkeypatch):
    import os
    import signal
    import time

    store = ActorWeightStore(server)
    publisher = await Publisher.options(procs=1).as_actor()
    try:
        pid = await publisher.publish.call_one(store, 11)
        assert (await store.aget(11))["w"].sum().item() == 4.0  # its holder answers while it lives
        assert not list(store.cache.folder.glob("v11-*"))  # fetched alone: no file on this host
        os.kill(pid, signal.SIGKILL)
        monkeypatch.setattr(weight_server, "HOLDER_TIMEOUT_S", 2.0)
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=r"weight version 11 is held only by the process that "
                                               r"published it .* did not answer in 2 s"):
            await store.aget(11)
        assert time.monotonic() - began < 30
        assert 11 in await store.aversions()  # still listed: a new publish replaces it
    finally:
        await Publisher.shutdown(publisher)
        await store.aclose()


async def test_keep_last_below_one_is_refused():
    with pytest.raises(Exception, match="keep_last must be an int >= 1"):
        await WeightServer.options(procs=1).as_actor(keep_last=0)


def test_an_engine_refuses_a_state_dict_with_a_wrong_shape_before_copying_any(tmp_path):
    engine = make_engine({"backend": "transformers", "model": build_tiny_qwen3(str(tmp_path))}, seed=0, device="cpu")
    before = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    bad = perturbed(before)
    last = max(bad)  # copied late by load_state_dict: the others would be in already
    bad[last] = torch.zeros(*bad[last].shape[:-1], bad[last].shape[-1] + 1)
    with pytest.raises(ValueError, match="shapes do not match"):
        engine.load_weights(bad, version=1)
    after = engine.model.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert engine.weight_version == 0


# ------------------------------------------------ a trainer and a Policy service


async def answer(policy) -> list[list[int]]:
    return [completions[0].token_ids.tolist() for completions in await policy.generate.fanout(PROBE)]


@pytest.fixture(params=["actor", "files"])
async def run_store(request):
    """The run's store: an ActorWeightStore (own server, keep 2) or a WeightStore (keep 2)."""
    if request.param == "files":
        store = WeightStore(keep_last=2)
        yield store
        store.close()
        return
    handle = await WeightServer.options(procs=1).as_actor(keep_last=2)
    store = ActorWeightStore(handle)
    yield store
    await WeightServer.shutdown(handle)
    # The replicas' host folder went with the last replica that stopped.
    assert not HostCache(store.id, 2).folder.exists()


@pytest.mark.slow
async def test_a_policy_service_serves_what_the_trainer_pushed(run_store):
    trainer, policy = await asyncio.gather(
        RLTrainer.options(procs=1).as_actor(
            model=DEFAULT_MODEL, optimizer={"name": "AdamW", "lr": 1e-3}, training={"seq_len": 256},
            loss=functools.partial(grpo_loss, beta=0.0), weight_store=run_store,
        ),
        Policy.options(num_replicas=2).as_service(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY, weight_store=run_store
        ),
    )
    fresh = None
    try:
        before = await answer(policy)
        for version in (1, 2, 3):
            await train_step(trainer, seed=version)
            await trainer.push_weights.call_one(policy_version=version)
        assert await run_store.aversions() == [2, 3]

        await policy.update_weights.fanout(3)
        assert await policy.get_version.fanout() == [3, 3]
        after = await answer(policy)
        assert after[0] != before[0]  # the weights did change

        # A Policy started at v3 answers exactly as the service updated to v3.
        fresh = await Policy.options(procs=1).as_actor(
            engine_config={"backend": "transformers"}, sampling_config=GREEDY,
            weight_store=run_store, policy_version=3,
        )
        assert (await fresh.generate.call_one(PROBE))[0].token_ids.tolist() == after[0]

        with pytest.raises(Exception, match=r"weight version 1 .*available: \[2, 3\]"):
            await policy.update_weights.fanout(1)
        assert await policy.get_version.fanout() == [3, 3]  # still serving v3

        # A respawned replica loads the newest version, wherever it runs.
        await policy.kill_replica(1)
        await policy.wait_for_state(1, "HEALTHY", timeout=180)
        assert await policy.get_version.fanout() == [3, 3]
        assert await answer(policy) == after
    finally:
        if fresh is not None:
            await Policy.shutdown(fresh)
        await asyncio.gather(RLTrainer.shutdown(trainer), Policy.shutdown(policy))


# ------------------------------------------------ choosing the store for a run


async def test_a_run_picks_its_store_from_the_weights_setting():
    from forge_lite.actors.weight_server import open_weight_store, weight_store_kind, weight_store_label
    from forge_lite.grpo.config import GRPOConfig

    assert weight_store_kind("auto") == "files"  # this machine: one host
    assert weight_store_kind("actor") == "actor"
    with pytest.raises(ValueError, match=r"weights must be one of \['files', 'actor', 'auto'\], got 'disk'"):
        weight_store_kind("disk")
    with pytest.raises(ValueError, match="weights must be one of"):
        GRPOConfig(weights="disk")

    files = await open_weight_store("auto")
    assert isinstance(files, WeightStore)
    await files.aclose()

    assert weight_store_label(files) == "files (one host)"

    store = await open_weight_store("actor")
    assert isinstance(store, ActorWeightStore)
    assert weight_store_label(store) == "actor (Monarch messages)"
    await store.aput(1, {"w": torch.zeros(2)})
    assert await store.aversions() == [1]
    await store.aclose()
    await store.aclose()  # safe twice


@pytest.mark.slow
async def test_a_grpo_run_with_weights_actor_syncs_through_the_server(tmp_path, capsys):
    import os

    from conftest import count_children, wait_for_children
    from test_grpo_loop import CONFIGS, FAST

    from forge_lite.grpo.config import load_config
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.grpo.run import run_grpo

    before = count_children()
    config = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"),
                         FAST + ["weights=actor", f"output_dir={tmp_path}", "progress=false"])
    recorder = MetricsRecorder()
    await run_grpo(config, recorder=recorder)
    assert "weights travel as Monarch messages from the trainer's memory" in capsys.readouterr().out
    assert recorder.status.weights == "actor (Monarch messages)"  # what the dashboard's header shows
    assert [(v.trainer_version, v.replica_versions) for v in recorder.versions] == [
        (1, (1,)), (2, (2,)), (3, (3,))
    ]
    assert await wait_for_children(before) <= before  # the server stopped with the run


def test_the_dashboard_header_says_which_store_the_run_chose():
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.widgets.training_dashboard import TrainingDashboard

    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder)
    assert "weights:" not in dash.header_text()  # not known before the run opens its store
    heard = []
    recorder.subscribe(heard.append)
    recorder.record_status(weights="actor (Monarch messages)")
    assert heard[-1].weights == "actor (Monarch messages)"  # a RunStatus event says it
    dash._redraw()
    assert dash.header_text().splitlines()[1] == "weights: actor (Monarch messages)"
    assert "weights: actor (Monarch messages)" in dash._header.value
    recorder.record_status(state="training", total_steps=5)
    assert "weights: actor (Monarch messages)" in dash.header_text()  # kept as the run goes on
    dash.detach()


@pytest.mark.parametrize("kind", ["actor", "files"])
async def test_one_trainer_at_a_time_publishes_into_a_default_store(kind):
    """The claim a trainer makes on a kernel's default store (both kinds of
    store): the newest publisher drops the versions before it, and the older
    one is refused afterwards."""
    from forge_lite.actors.default_store import Publisher
    from forge_lite.actors.weight_server import open_weight_store

    store = await open_weight_store(kind, keep_last=4)
    try:
        older, newer = Publisher(), Publisher()
        await older.check(store)
        await store.aput(5, {"w": torch.ones(3)})
        await older.check(store)  # still its own: nothing dropped
        assert await store.aversions() == [5]
        await newer.check(store)
        assert await store.aversions() == [] and await store.apublisher() == newer.token
        await store.aput(1, {"w": torch.zeros(3)})
        with pytest.raises(RuntimeError, match="newer RLTrainer"):
            await older.check(store)
        assert await store.aversions() == [1]
    finally:
        await store.aclose()
