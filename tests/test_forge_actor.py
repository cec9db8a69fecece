"""ForgeActor on real Monarch processes: options, as_actor, setup, errors, shutdown."""

import os
import warnings

import pytest
from conftest import count_children, wait_for_children, wait_for_exit
from monarch.actor import Actor, endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller import gpus as gpus_module

pytestmark = pytest.mark.timeout(120)


class Adder(ForgeActor):
    def __init__(self, base: int, *, scale: int = 1):
        self.base = base
        self.scale = scale

    @endpoint
    async def add(self, x: int) -> int:
        return (self.base + x) * self.scale

    @endpoint
    async def pid(self) -> int:
        return os.getpid()


class SetupFailed(Exception):
    """A custom type: the caller must get this class back, not a wrapper."""


class PreparedActor(ForgeActor):
    def __init__(self, fail_in_setup: bool = False):
        self.fail_in_setup = fail_in_setup
        self.setup_calls = 0

    # No @endpoint: overriding setup with a plain async method must still work.
    async def setup(self):
        self.setup_calls += 1
        if self.fail_in_setup:
            raise SetupFailed("weights not found at /nowhere")

    @endpoint
    async def setup_count(self) -> int:
        return self.setup_calls


class BrokenInit(ForgeActor):
    def __init__(self):
        raise RuntimeError("init failed on purpose")

    @endpoint
    async def ping(self) -> str:
        return "pong"


from tutorial_actors import ForgeCounter  # noqa: E402  (the tutorial's class, verbatim)


class PlainMonarchActor(Actor):
    @endpoint
    def ping(self) -> str:
        return "pong"


# ---------------------------------------------------------------- as_actor


async def test_as_actor_passes_positional_and_keyword_args():
    handle = await Adder.options(procs=1).as_actor(10, scale=2)
    try:
        assert await handle.add.call_one(1) == 22
    finally:
        await Adder.shutdown(handle)


async def test_as_actor_with_two_procs_runs_one_actor_per_process():
    handle = await Adder.options(procs=2).as_actor(1)
    try:
        pids = await handle.pid.call()
        sums = await handle.add.call(1)
        assert len(set(pids.values())) == 2
        assert list(sums.values()) == [2, 2]
    finally:
        await Adder.shutdown(handle)


async def test_setup_runs_once_after_init_even_without_endpoint_decorator():
    handle = await PreparedActor.as_actor()
    try:
        assert await handle.setup_count.call_one() == 1
    finally:
        await PreparedActor.shutdown(handle)


async def test_tutorial_forge_counter_mixes_sync_and_async_endpoints():
    counter = await ForgeCounter.options(procs=1).as_actor(initial_value=5)
    try:
        assert await counter.increment.call_one() == 6
        assert await counter.increment.call_one() == 7
        await counter.reset.call_one()
        assert await counter.get_value.call_one() == 0
    finally:
        await ForgeCounter.shutdown(counter)


# ---------------------------------------------------------------- options


def test_options_return_independent_subclasses_and_leave_the_base_alone():
    two_procs = Adder.options(procs=2, max_concurrent_requests=3)
    four_replicas = Adder.options(num_replicas=4, router="least_loaded")

    assert (two_procs.procs, two_procs.num_replicas) == (2, 1)
    assert (four_replicas.procs, four_replicas.num_replicas) == (1, 4)
    assert two_procs.service_config.max_concurrent_requests == 3
    assert two_procs.service_config.router == "round_robin"
    assert four_replicas.service_config.max_concurrent_requests == 10
    assert four_replicas.service_config.router == "least_loaded"
    # The class the user wrote is untouched and is what gets spawned.
    assert (Adder.procs, Adder.num_replicas) == (1, 1)
    assert Adder.service_config.max_concurrent_requests == 10
    assert two_procs.actor_class() is Adder and four_replicas.actor_class() is Adder
    # options() of options() keeps what the first call set.
    assert two_procs.options(num_replicas=2).procs == 2


@pytest.mark.parametrize("key", ["procs", "num_replicas"])
@pytest.mark.parametrize("bad", [0, -1])
def test_options_reject_counts_below_one(key, bad):
    with pytest.raises(ValueError, match=key):
        Adder.options(**{key: bad})


def test_options_reject_unknown_keys_naming_them():
    with pytest.raises(TypeError, match="num_replica"):
        Adder.options(num_replica=2)


def test_options_on_a_plain_monarch_actor_says_to_subclass_forge_actor():
    # A plain Monarch Actor has no options(); reaching ForgeActor's with one
    # (as a helper taking "any actor class" would) must say what to do.
    with pytest.raises(TypeError, match="ForgeActor"):
        ForgeActor.options.__func__(PlainMonarchActor, procs=1)


@pytest.mark.parametrize("name", ["stop", "size", "slice", "initialized"])
def test_endpoint_named_like_an_actor_mesh_attribute_fails_at_class_definition(name):
    async def body(self):
        return None

    with pytest.raises(TypeError, match=repr(name)):
        type("Clashing", (ForgeActor,), {name: endpoint(body)})


# ---------------------------------------------------------------- errors


async def test_setup_error_reaches_the_caller_with_its_type_and_leaves_no_process():
    before = count_children()
    with pytest.raises(SetupFailed, match="weights not found at /nowhere"):
        await PreparedActor.as_actor(fail_in_setup=True)
    assert await wait_for_children(before) <= before


async def test_init_error_names_the_class_and_the_cause():
    before = count_children()
    with pytest.raises(RuntimeError) as info:
        await BrokenInit.as_actor()
    assert "BrokenInit" in str(info.value)
    assert "init failed on purpose" in str(info.value)
    assert await wait_for_children(before) <= before
    # The caller survived the failed process and can spawn again.
    handle = await Adder.as_actor(1)
    try:
        assert await handle.add.call_one(1) == 2
    finally:
        await Adder.shutdown(handle)


# ---------------------------------------------------------------- GPUs, shutdown


@pytest.mark.slow  # the first with_gpus=True imports torch in this process (~4 s)
async def test_with_gpus_on_a_cpu_machine_warns_once_and_runs(monkeypatch):
    if gpus_module.visible_gpus():
        pytest.skip("this machine has GPUs")
    monkeypatch.setattr(gpus_module, "_warned_no_gpu", False)
    on_gpus = Adder.options(procs=1, with_gpus=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = await on_gpus.as_actor(1)
        second = await on_gpus.as_actor(2)
    try:
        gpu_warnings = [w for w in caught if "with_gpus" in str(w.message)]
        assert len(gpu_warnings) == 1
        assert "CPU" in str(gpu_warnings[0].message)
        assert await first.add.call_one(1) == 2
        assert await second.add.call_one(1) == 3
    finally:
        await on_gpus.shutdown(first)
        await on_gpus.shutdown(second)


async def test_shutdown_is_idempotent_and_leaves_no_orphan_process():
    before = count_children()
    handle = await Adder.options(procs=2).as_actor(0)
    pids = list((await handle.pid.call()).values())
    assert count_children() >= before + 2
    await Adder.shutdown(handle)
    await Adder.shutdown(handle)
    assert await wait_for_exit(pids) == []
    assert await wait_for_children(before) <= before
