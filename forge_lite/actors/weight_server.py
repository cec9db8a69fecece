"""A weight store for hosts that share no filesystem: each version stays in
the trainer's memory, and every host fetches it from there once, as one
Monarch message.

    store = await open_weight_store("actor")   # a WeightServer and its client
    # pass weight_store=store to the RLTrainer and to the Policy
    ...
    await store.aclose()

Three parts, each where its work is:

- The trainer's ``aput(v, state_dict)`` copies the state dict to the CPU
  (``host_cache.snapshot``: the next optimizer step must not change a
  published version) and keeps the newest ``keep_last`` (default 2) in its
  own process, served by a small `WeightHolder` actor there.
- A `WeightServer` actor is the directory: for each version, its layout and
  which holder has it. Its messages are small.
- A Policy replica's ``aget(v)`` asks the server where v is, and its host's
  `HostCache` either finds v in a local file or fetches it from the holder
  (once per host: the other replicas there wait for the file).

So a version crosses the network once per host, in one hop from the
trainer's process, and never passes through the notebook kernel. Measured
on this project's 2-core machine between two network-namespace hosts
(benchmarks/weights.py), a 298 MB bf16 version: publish + 1 replica loaded
0.93 s, + 4 replicas 1.03 s, against 0.69 s for one raw Monarch message of
the same bytes.

What a failure leaves:
- a trainer that dies mid-push: the server lists a version only after its
  holder has all of it, so either the new version is not listed (asking for
  it is a KeyError naming the versions held) or it is listed and its holder
  does not answer (a RuntimeError after ``HOLDER_TIMEOUT_S``). The replicas
  keep serving what they had; a replica respawned on a host where the
  version was written to a file (several replicas fetched it together)
  finds it there.
- a replica that dies mid-fetch: nothing is loaded from a partial message,
  no file appears under its final name, and the next replica on the host
  waiting for it fetches it itself.

A GRPO run picks its store with the config's ``weights`` setting through
`open_weight_store` ("auto": this actor store when the cluster has more than
one host, else the folder, which is faster on one host).

`ActorWeightStore` has the file `WeightStore`'s methods (`put`, `get`,
`versions`, `latest` and their async forms `aput`, `aget`, `aversions`,
`alatest`), so the trainer and the Policy take either store.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import torch
from monarch.actor import Actor, concurrent_endpoint, endpoint, this_proc

from forge_lite.actors.host_cache import HostCache, TensorSlot, file_size, host_cache, snapshot
from forge_lite.controller import ForgeActor

#: Seconds a holder has to say whether it has a version, before the fetch.
#: It answers in milliseconds even while its trainer computes (it has its own
#: endpoint), so no answer means its process is gone.
HOLDER_TIMEOUT_S = 30.0


def fetch_timeout_s(nbytes: int) -> float:
    """Seconds allowed for fetching ``nbytes`` from a holder: 60 s plus 5 MB/s,
    far slower than the rate benchmarks/weights.py measures between two
    hosts. Only a holder
    that died mid-transfer runs into it (Monarch would wait forever)."""
    return 60.0 + nbytes / 5e6


@dataclass(frozen=True)
class PublishedVersion:
    """What the server knows of one version: the publish's ``token`` (unique
    per ``put``), its ``layout`` (names, dtypes, shapes, file offsets), and
    the ``holder`` actor (in the publisher's process) that serves it."""

    token: str
    layout: list[TensorSlot]
    holder: object


class WeightServer(ForgeActor):
    """The directory of the newest ``keep_last`` published versions (default 2).

    Endpoints: ``put(version, published)``, ``locate(version)`` (a KeyError
    naming the versions held when it was dropped or never published),
    ``versions()`` (oldest first), ``latest()`` (None while empty), and
    ``claim(token)``/``publisher()`` (one trainer at a time, for the
    kernel's default store: ``forge_lite.actors.default_store``).
    Raises ValueError (in setup, so ``as_actor`` reports it) for ``keep_last < 1``.
    """

    def __init__(self, keep_last: int = 2):
        self.keep_last = keep_last
        self._versions: dict[int, PublishedVersion] = {}
        self._publisher: str | None = None

    @endpoint
    async def setup(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {self.keep_last!r}")

    @endpoint
    async def put(self, version: int, published: PublishedVersion) -> None:
        """List ``version`` (replacing it if it exists), then drop all but the
        newest ``keep_last``."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        self._versions[version] = published
        for old in sorted(self._versions)[: -self.keep_last]:
            del self._versions[old]

    @endpoint
    async def locate(self, version: int) -> PublishedVersion:
        """Where ``version`` is; KeyError naming the versions held."""
        try:
            return self._versions[version]
        except KeyError:
            raise KeyError(
                f"weight version {version} is not in the weight server (it keeps the newest "
                f"{self.keep_last}); available: {sorted(self._versions)}"
            ) from None

    @endpoint
    async def versions(self) -> list[int]:
        return sorted(self._versions)

    @endpoint
    async def claim(self, publisher: str) -> None:
        """Make ``publisher`` (a token) the only publisher: earlier versions are dropped."""
        self._versions.clear()
        self._publisher = publisher

    @endpoint
    async def publisher(self) -> str | None:
        return self._publisher

    @endpoint
    async def latest(self) -> int | None:
        return max(self._versions, default=None)


# This process's published versions, by token: (store id, version, tensors).
_held: dict[str, tuple[str, int, dict[str, torch.Tensor]]] = {}
_holder = None  # this process's WeightHolder, spawned at its first put


class WeightHolder(Actor):
    """Serves the versions this process published (one per process, spawned
    on the process by its first ``aput``; it stops with the process)."""

    @endpoint
    async def has(self, token: str) -> bool:
        return token in _held

    # Concurrent: every host fetches at once, not one transfer after another.
    @concurrent_endpoint
    async def get(self, token: str) -> dict[str, torch.Tensor]:
        """The tensors published as ``token``; KeyError once they were dropped."""
        if token not in _held:
            raise KeyError("weight version was dropped by its publisher, which keeps the newest "
                           "versions only; ask for a newer one")
        return _held[token][2]


def _hold(store_id: str, version: int, tensors: dict[str, torch.Tensor], keep_last: int):
    """Keep ``tensors`` as ``version`` of the store, drop this process's older
    versions of it; return (the publish's token, this process's holder)."""
    global _holder
    if _holder is None:
        _holder = this_proc().spawn("forge_lite_weight_holder", WeightHolder)
    token = uuid.uuid4().hex[:16]
    mine = sorted((v, t) for t, (s, v, _) in _held.items() if s == store_id and v != version)
    for _, old in mine[: max(0, len(mine) - (keep_last - 1))]:
        del _held[old]
    for t in [t for t, (s, v, _) in _held.items() if s == store_id and v == version]:
        del _held[t]  # a version published again replaces the old buffer
    _held[token] = (store_id, version, tensors)
    return token, _holder


class ActorWeightStore:
    """A client of a `WeightServer`: the same methods as the file `WeightStore`.

    ``handle``: what ``WeightServer.as_actor()`` returned (one process);
    ``keep_last``: versions a publisher keeps in memory and a host keeps on
    disk (the server's own setting should match). The client pickles with
    the handle and its id, so actors that receive it (a trainer, the Policy
    replicas, on any host) use the same versions.

    Inside an actor or any running event loop, use the async methods
    (``aput``, ``aget``, ``aversions``, ``alatest``). The sync ones (``put``,
    ``get``, ...) block until the answer arrives, for scripts and tests.
    ``get``/``aget`` of a version not held raise KeyError naming the versions
    held; of a version whose holder is gone, RuntimeError.
    """

    def __init__(self, handle, *, keep_last: int = 2, owned: bool = False):
        """``owned``: ``aclose()`` stops the server (``open_weight_store`` sets it)."""
        self.handle = handle
        self.keep_last = keep_last
        self.id = uuid.uuid4().hex[:16]
        self._owned = owned

    def __getstate__(self) -> dict:
        # A copy sent to an actor uses the server but never stops it.
        return {**self.__dict__, "_owned": False}

    @property
    def cache(self) -> HostCache:
        """This host's files of this store's versions (one per process)."""
        return host_cache(self.id, self.keep_last)

    async def aclose(self) -> None:
        """Stop using this host's cache (deleted by its last user), and stop
        the server if this client owns it; safe to call twice."""
        await self.cache.leave()
        if self._owned:
            self._owned = False
            await WeightServer.shutdown(self.handle)

    # Async: what the trainer and the Policy use.
    async def aput(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Publish ``state_dict`` as ``version``: held in this process, listed by the server."""
        tensors, layout = snapshot(state_dict)
        token, holder = _hold(self.id, version, tensors, self.keep_last)
        # Listed last: a version the server lists is whole in its holder.
        await self.handle.put.call_one(version, PublishedVersion(token, layout, holder))

    async def aget(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict published as ``version``, from this host's file or
        fetched once for the host from its holder."""
        try:
            published = await self.handle.locate.call_one(version)
        except Exception as error:
            missing = _missing_version(error)
            if missing is None:
                raise
            raise missing from None
        return await self.cache.load(version, published.token, published.layout,
                                     lambda: _fetch(version, published))

    async def aversions(self) -> list[int]:
        return await self.handle.versions.call_one()

    async def aclaim(self, publisher: str) -> None:
        """Make ``publisher`` the store's publisher, dropping earlier versions
        (as ``WeightStore.claim``)."""
        await self.handle.claim.call_one(publisher)

    async def apublisher(self) -> str | None:
        return await self.handle.publisher.call_one()

    async def alatest(self) -> int | None:
        return await self.handle.latest.call_one()

    # Sync: for scripts and tests, outside a running event loop (asyncio.run).
    def put(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Publish ``state_dict`` as ``version`` (blocks until the server lists it)."""
        asyncio.run(self.aput(version, state_dict))

    def get(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict published as ``version``, on the CPU; KeyError naming the versions held."""
        async def get_and_write():
            state_dict = await self.aget(version)
            await self.cache.flush()  # asyncio.run would cancel the host file's write
            return state_dict

        return asyncio.run(get_and_write())

    def versions(self) -> list[int]:
        """Versions held, oldest first."""
        return self.handle.versions.call_one().get()

    def latest(self) -> int | None:
        return self.handle.latest.call_one().get()

    def __repr__(self) -> str:
        return f"ActorWeightStore({self.handle!r})"


async def _fetch(version: int, published: PublishedVersion) -> dict[str, torch.Tensor]:
    """The tensors of ``published`` from its holder, bounded in time:
    Monarch waits forever for an actor whose process died."""
    gone = (f"weight version {version} is held only by the process that published it "
            "(the trainer's), and that process did not answer")
    try:
        held = await asyncio.wait_for(published.holder.has.call_one(published.token), HOLDER_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{gone} in {HOLDER_TIMEOUT_S:.0f} s: it has probably died; publish "
                           "the version again from a live trainer") from None
    if not held:
        raise KeyError(f"weight version {version} was dropped by its publisher (it keeps the newest "
                       "versions only)")
    nbytes = file_size(published.layout)
    timeout = fetch_timeout_s(nbytes)
    try:
        return await asyncio.wait_for(published.holder.get.call_one(published.token), timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{gone} while sending it ({nbytes / 1e6:.0f} MB, "
                           f"{timeout:.0f} s allowed)") from None


#: What a run's ``weights`` setting may say.
WEIGHT_STORE_KINDS = ("files", "actor", "auto")


def weight_store_kind(kind: str = "auto") -> str:
    """``"files"`` or ``"actor"``: ``kind`` itself, or for ``"auto"`` the one that
    works on the current cluster (``forge_lite.controller.cluster.current()``):
    the actor when it has more than one host (no shared folder can be assumed),
    else the folder, the faster path on one host.

    Raises ValueError for a kind not in ``WEIGHT_STORE_KINDS``.
    """
    if kind not in WEIGHT_STORE_KINDS:
        raise ValueError(f"weights must be one of {list(WEIGHT_STORE_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    from forge_lite.controller import cluster

    return "actor" if len(cluster.current().hosts) > 1 else "files"


async def open_weight_store(kind: str = "auto", keep_last: int | None = None, on_hosts=None):
    """A new store for one run: a ``WeightStore`` in a fresh temporary folder
    (``kind="files"``) or a ``WeightServer`` actor and its client
    (``kind="actor"``); ``"auto"`` picks as ``weight_store_kind`` says.

    ``keep_last``: versions kept (None: every version for the folder, 2 for
    the actor, whose versions take the trainer's memory). ``on_hosts``: where
    the server runs (as ``options(on_hosts=...)``; None: the least-occupied
    host). The server's messages are small, so its place matters little.
    Close it with ``await store.aclose()``. Raises ValueError for an unknown kind.
    """
    from forge_lite.actors.weights import WeightStore

    if weight_store_kind(kind) == "files":
        return WeightStore(keep_last=keep_last)
    keep_last = keep_last or 2
    handle = await WeightServer.options(procs=1, on_hosts=on_hosts).as_actor(keep_last=keep_last)
    return ActorWeightStore(handle, keep_last=keep_last, owned=True)


def describe_weight_store(store) -> str:
    """How weights travel through ``store``, in words, for a run's log."""
    if isinstance(store, ActorWeightStore):
        return ("as Monarch messages from the trainer's memory, fetched once per host "
                "(weights: actor)")
    # No path: a notebook's output must not carry this machine's folders.
    return "as files in the run's own folder on this host (weights: files)"


def weight_store_label(store) -> str:
    """The store's kind and how it moves weights, short enough for a
    dashboard header: ``"actor (Monarch messages)"`` or ``"files (one host)"``."""
    if isinstance(store, ActorWeightStore):
        return "actor (Monarch messages)"
    return "files (one host)"


def _missing_version(error: Exception) -> KeyError | None:
    """Monarch wraps an endpoint's exception in ActorError; a missing version
    is a KeyError for the caller, as with the file store. None for other errors."""
    if isinstance(error, KeyError):
        return error
    message = str(error)
    if "KeyError" not in message or "weight version" not in message:
        return None
    line = message[message.index("weight version") :].splitlines()[0]
    return KeyError(line.rstrip("'\""))
