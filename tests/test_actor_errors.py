"""An endpoint's exception reaches the caller as itself, through an actor
(``as_actor``: ``call_one``, ``call``, ``choose``, ``stream``, ``.get()``) as
through a service (``route``, ``fanout``): the original type and message, not
Monarch's ActorError around it, and the traceback from the actor's process
as a note. Real processes."""

import pytest
from monarch.actor import ActorError, endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller.errors import RemoteError
from forge_lite.controller.service import FanoutError


class OddAnswer(LookupError):
    """A user's own exception class, defined in a test module."""


class CodedError(Exception):
    # Cannot be rebuilt from its args: it arrives as a RemoteError named like it.
    def __init__(self, code: int, detail: str):
        super().__init__(f"{code}: {detail}")


class Picky(ForgeActor):
    def __init__(self):
        self.calls = 0

    @endpoint
    async def check(self, x: int) -> int:
        self.calls += 1
        if x < 0:
            raise ValueError(f"x must be >= 0, got {x}")
        if x == 13:
            raise OddAnswer("13 is not served here")
        if x == 404:
            raise CodedError(404, "no such item")
        return x * 2

    @endpoint
    def sync_check(self, x: int) -> int:
        if x < 0:
            raise KeyError(f"no key {x}")
        return x


def assert_remote_note(error: BaseException, function: str) -> None:
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "raised on the actor's process" in notes, notes
    assert f"in {function}" in notes, notes  # the remote frame that raised
    assert notes.count("raised on the actor's process") == 1  # attached once


@pytest.fixture(scope="module")
async def picky():
    actor = await Picky.options(procs=2).as_actor()
    yield actor
    await Picky.shutdown(actor)


@pytest.mark.parametrize("x, kind, message", [
    (-1, ValueError, "x must be >= 0, got -1"),
    (13, OddAnswer, "13 is not served here"),
])
async def test_an_actor_raises_the_endpoints_exception_for_every_adverb(picky, x, kind, message):
    one = picky.slice(procs=0)
    for call in (lambda: one.check.call_one(x), lambda: picky.check.call(x), lambda: picky.check.choose(x)):
        with pytest.raises(kind) as caught:
            await call()
        assert not isinstance(caught.value, ActorError)
        assert type(caught.value) is kind and str(caught.value) == message
        assert_remote_note(caught.value, "check")
    results = list(picky.check.stream(x))
    assert len(results) == 2
    for pending in results:
        with pytest.raises(kind, match=message):
            await pending
    # The blocking form, for scripts outside an event loop, raises the same.
    with pytest.raises(kind, match=message):
        await _in_thread(lambda: one.check.call_one(x).get())
    # and the actor still answers
    assert await one.check.call_one(4) == 8
    assert sorted((await picky.check.call(5)).values()) == [10, 10]


async def test_an_actors_sync_endpoint_and_an_unrebuildable_exception(picky):
    one = picky.slice(procs=0)
    with pytest.raises(KeyError, match="no key -3") as caught:
        await one.sync_check.call_one(-3)
    assert_remote_note(caught.value, "sync_check")
    with pytest.raises(RemoteError) as caught:
        await one.check.call_one(404)
    assert type(caught.value).__name__ == "CodedError" and str(caught.value) == "404: no such item"


async def test_a_service_raises_the_same_exception_with_the_same_note():
    service = await Picky.options(num_replicas=2).as_service()
    try:
        for x, kind in ((-1, ValueError), (13, OddAnswer)):
            with pytest.raises(kind) as routed:
                await service.check.route(x)
            assert_remote_note(routed.value, "check")
            with pytest.raises(FanoutError) as fanned:
                await service.check.fanout(x)
            failures = fanned.value.failures
            assert len(failures) == 2 and all(type(e) is kind for e in failures.values())
            for error in failures.values():
                assert_remote_note(error, "check")
        assert await service.check.route(3) == 6  # replicas stay healthy
    finally:
        await service.shutdown()


async def _in_thread(fn):
    import asyncio

    return await asyncio.to_thread(fn)
