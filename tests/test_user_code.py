"""A learner's own code runs on the replicas, and its errors reach them intact.

Two kinds of fault, each on real Monarch processes:

- A ForgeActor (or an argument's class) from a module the caller imported
  through its own ``sys.path`` entry must import in every process the kit
  spawns: services, actors, respawned replicas, and entries added after the
  kit has already spawned processes.
- An exception an endpoint raises reaches the caller with its type name and
  message, even when its class cannot be rebuilt from its pickled args.
"""

import os
import sys
import textwrap
import threading
import uuid

import pytest
from monarch.actor import concurrent_endpoint, endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller.errors import RemoteError
from forge_lite.controller.procs import caller_import_path
from forge_lite.controller.service import FanoutError

pytestmark = pytest.mark.timeout(120)

# The tutorial's ForgeCounter, as a learner would put it in their own module,
# with a class for an argument and errors that pickle badly.
USER_MODULE = '''
from dataclasses import dataclass

from forge_lite.controller import ForgeActor
from monarch.actor import endpoint


@dataclass
class Step:
    size: int


class ForgeCounter(ForgeActor):
    def __init__(self, initial_value: int):
        self.value = initial_value

    @endpoint
    def increment(self, step: Step | None = None) -> int:
        self.value += step.size if step is not None else 1
        return self.value

    @endpoint
    def get_value(self) -> int:
        return self.value

    @endpoint
    def step_of(self, size: int) -> Step:
        return Step(size)
'''


def write_module(folder, source: str) -> str:
    """Write ``source`` as a module with a fresh name in ``folder``; return the name."""
    name = f"user_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module importable in this process only through a runtime sys.path entry."""
    helpers = tmp_path / "helpers_dir"
    helpers.mkdir()
    name = write_module(helpers, USER_MODULE)
    assert str(helpers) not in os.environ.get("PYTHONPATH", "")
    monkeypatch.syspath_prepend(str(helpers))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


async def test_service_of_a_class_from_a_runtime_sys_path_entry(user_module):
    counter = await user_module.ForgeCounter.options(procs=1, num_replicas=2).as_service(initial_value=0)
    try:
        assert await counter.increment.fanout() == [1, 1]
        # An argument whose class lives in that module, both ways.
        assert await counter.increment.route(user_module.Step(5)) == 6
        step = await counter.step_of.route(3)
        assert type(step).__name__ == "Step" and step.size == 3
        # A respawned replica imports the module again.
        await counter.kill_replica(0)
        await counter.wait_for_state(0, "HEALTHY", timeout=60)
        values = await counter.get_value.fanout()
        assert len(values) == 2 and values[0] == 0  # replica 0 starts afresh
    finally:
        await counter.shutdown()


async def test_actor_of_a_class_from_a_runtime_sys_path_entry(user_module):
    counter = await user_module.ForgeCounter.options(procs=2).as_actor(initial_value=10)
    try:
        values = await counter.increment.call(user_module.Step(2))
        assert sorted(values.values()) == [12, 12]
    finally:
        await user_module.ForgeCounter.shutdown(counter)


async def test_a_sys_path_entry_added_after_processes_were_spawned(tmp_path, monkeypatch, user_module):
    # The kit has spawned processes already (the fixture's module works);
    # an entry added now reaches the processes spawned from now on.
    first = await user_module.ForgeCounter.options(num_replicas=1).as_service(initial_value=0)
    try:
        later = tmp_path / "added_later"
        later.mkdir()
        name = write_module(later, USER_MODULE)
        monkeypatch.syspath_prepend(str(later))
        module = __import__(name)
        second = await module.ForgeCounter.options(num_replicas=1).as_service(initial_value=41)
        try:
            assert await second.increment.route(module.Step(1)) == 42
        finally:
            await second.shutdown()
            sys.modules.pop(name, None)
    finally:
        await first.shutdown()


def test_caller_import_path_is_absolute_and_ordered(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")  # an interactive session's "current directory"
    entries = caller_import_path().split(os.pathsep)
    assert entries[0] == str(tmp_path)
    assert all(os.path.isabs(entry) for entry in entries)
    assert len(entries) == len(set(entries))


# ---------------------------------------------------------------- errors


class CodedError(Exception):
    """Its __init__ takes (code, detail) but stores one string: pickle rebuilds it as CodedError(str)."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


class KeywordOnlyError(Exception):
    def __init__(self, *, reason: str):
        super().__init__(f"because {reason}")


class UnpicklableError(Exception):
    """Pickles its args fine, but holds an attribute that cannot be pickled."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()  # locks do not pickle


class RebuildableError(Exception):
    pass


class Failing(ForgeActor):
    def __init__(self):
        self.calls = 0

    @endpoint
    async def coded(self) -> None:
        self.calls += 1
        raise CodedError(404, "no such item")

    @endpoint
    async def keyword_only(self) -> None:
        raise KeywordOnlyError(reason="the queue is empty")

    @endpoint
    async def unpicklable(self) -> None:
        raise UnpicklableError("holds a lock")

    @endpoint
    async def rebuildable(self) -> None:
        raise RebuildableError("kept as itself", 7)

    @endpoint
    async def count(self) -> int:
        return self.calls


class SyncFailing(ForgeActor):
    @endpoint
    def coded(self) -> None:
        raise CodedError(500, "sync body")


class ConcurrentFailing(ForgeActor):
    @concurrent_endpoint
    async def coded(self) -> None:
        raise CodedError(503, "concurrent body")

    @concurrent_endpoint
    async def fine(self) -> str:
        return "ok"


def assert_like_original(error: BaseException, type_name: str, message: str) -> None:
    assert isinstance(error, RemoteError)
    assert type(error).__name__ == type_name
    assert str(error) == message
    assert type_name in error.remote_traceback  # the remote traceback names the original


async def test_errors_that_cannot_be_rebuilt_reach_a_service_caller_intact():
    service = await Failing.options(num_replicas=2).as_service()
    try:
        with pytest.raises(RemoteError) as caught:
            await service.coded.route()
        assert_like_original(caught.value, "CodedError", "404: no such item")
        with pytest.raises(RemoteError) as caught:
            await service.keyword_only.route()
        assert_like_original(caught.value, "KeywordOnlyError", "because the queue is empty")
        with pytest.raises(RemoteError) as caught:
            await service.unpicklable.route()
        assert_like_original(caught.value, "UnpicklableError", "holds a lock")
        # A class that pickles fine arrives as itself, args and all.
        with pytest.raises(RebuildableError) as caught:
            await service.rebuildable.route()
        assert not isinstance(caught.value, RemoteError)
        assert caught.value.args == ("kept as itself", 7)
        # Not retried (one call on one replica), and every replica stays healthy.
        assert sorted(await service.count.fanout()) == [0, 1]
        assert [str(r.state) for r in service._service.replicas] == ["HEALTHY", "HEALTHY"]
        # Fanout reports it per replica with the same type name.
        with pytest.raises(FanoutError) as caught:
            await service.coded.fanout()
        failures = caught.value.failures
        assert {type(e).__name__ for e in failures.values()} == {"CodedError"}
    finally:
        await service.shutdown()


async def test_errors_reach_an_actor_caller_intact_from_sync_and_concurrent_endpoints():
    sync = await SyncFailing.options(procs=1).as_actor()
    concurrent = await ConcurrentFailing.options(procs=1).as_actor()
    try:
        with pytest.raises(RemoteError) as caught:
            await sync.coded.call_one()
        assert_like_original(caught.value, "CodedError", "500: sync body")
        with pytest.raises(RemoteError) as caught:
            await concurrent.coded.call_one()
        assert_like_original(caught.value, "CodedError", "503: concurrent body")
        assert await concurrent.fine.call_one() == "ok"  # the actor lives on
    finally:
        await SyncFailing.shutdown(sync)
        await ConcurrentFailing.shutdown(concurrent)
