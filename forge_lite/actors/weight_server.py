"""A weight store whose versions live in an actor's memory and travel as
Monarch messages, so it works when the trainer and the Policy replicas run on
hosts that share no filesystem.

    server = await WeightServer.options(procs=1).as_actor(keep_last=2)
    store = ActorWeightStore(server)          # pass weight_store=store to both
    ...
    await WeightServer.shutdown(server)

The trainer `aput`s a state dict (one message from the trainer to the server);
each Policy replica `aget`s it (one message from the server to the replica).
A state dict of CPU tensors pickles as its raw bytes: Monarch moved 50 MB in
about 0.1 s on this project's 2-core machine (measured with Monarch 0.7).
The replicas of a service fetch at the same time (`get` is a concurrent
endpoint), so every replica's bytes leave the server at once, not one
replica after another. Each replica still receives its own copy: placed on
the replicas' host (``open_weight_store(on_hosts=...)``), the server makes a
version cross the network once, when it is published.

A GRPO run picks its store with the config's ``weights`` setting through
`open_weight_store` ("auto": this actor store when the cluster has more than
one host, else the folder, which is faster on one host).

The server is a process of its own: a trainer that dies mid-push leaves the
versions already held (a message is applied whole or not at all), and a
Policy replica fetches a whole version before its engine loads any of it.
Measured for the shipped model (3.4 MB, float32) on 2 busy cores, the median
of 6: put 0.010 s / get 0.008 s through the actor, 0.006 s / 0.002 s (page
cache) through the folder.

`ActorWeightStore` has the file `WeightStore`'s methods (`put`, `get`,
`versions`, `latest` and their async forms `aput`, `aget`, `aversions`,
`alatest`), so the trainer and the Policy take either store.
"""

from __future__ import annotations

import torch
from monarch.actor import concurrent_endpoint, endpoint

from forge_lite.controller import ForgeActor


class WeightServer(ForgeActor):
    """Holds the newest ``keep_last`` published versions (default 2) in memory.

    Endpoints: ``put(version, state_dict)``, ``get(version)`` (a KeyError naming
    the versions held when it was dropped or never published), ``versions()``
    (oldest first) and ``latest()`` (None while empty).
    Raises ValueError (in setup, so ``as_actor`` reports it) for ``keep_last < 1``.
    """

    def __init__(self, keep_last: int = 2):
        self.keep_last = keep_last
        self._versions: dict[int, dict[str, torch.Tensor]] = {}

    @endpoint
    async def setup(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {self.keep_last!r}")

    @endpoint
    async def put(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Publish ``state_dict`` as ``version`` (replacing it if it exists),
        then drop all but the newest ``keep_last`` versions."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"weight version must be an int >= 0, got {version!r}")
        # The message arrived whole before this line runs, so a sender that dies
        # mid-transfer leaves nothing here: readers see a version whole or not at all.
        self._versions[version] = state_dict
        for old in sorted(self._versions)[: -self.keep_last]:
            del self._versions[old]

    # Concurrent: the replicas of a service fetch a version at the same time
    # (update_weights.fanout), and an actor otherwise answers one message at a
    # time, so each replica would wait for the transfers of those before it.
    @concurrent_endpoint
    async def get(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict published as ``version``; KeyError naming the versions held."""
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
    async def latest(self) -> int | None:
        return max(self._versions, default=None)


class ActorWeightStore:
    """A client of a `WeightServer`: the same methods as the file `WeightStore`.

    ``handle``: what ``WeightServer.as_actor()`` returned (one process). The
    client pickles with the handle, so actors that receive it (a trainer, the
    Policy replicas, on any host) call the server directly.

    Inside an actor or any running event loop, use the async methods
    (``aput``, ``aget``, ``aversions``, ``alatest``). The sync ones (``put``,
    ``get``, ...) block until the answer arrives, for scripts and tests.
    Errors of the server come back as Monarch's ActorError; ``get``/``aget``
    of a version not held raise KeyError with the server's message.
    """

    def __init__(self, handle, *, owned: bool = False):
        """``owned``: ``aclose()`` stops the server (``open_weight_store`` sets it)."""
        self.handle = handle
        self._owned = owned

    def __getstate__(self) -> dict:
        # A copy sent to an actor uses the server but never stops it.
        return {**self.__dict__, "_owned": False}

    async def aclose(self) -> None:
        """Stop the server if this client owns it; safe to call twice."""
        if self._owned:
            self._owned = False
            await WeightServer.shutdown(self.handle)

    # Async: what the trainer and the Policy use.
    async def aput(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        await self.handle.put.call_one(version, _to_cpu(state_dict))

    async def aget(self, version: int) -> dict[str, torch.Tensor]:
        try:
            return await self.handle.get.call_one(version)
        except Exception as error:
            missing = _missing_version(error)
            if missing is None:
                raise
            raise missing from None

    async def aversions(self) -> list[int]:
        return await self.handle.versions.call_one()

    async def alatest(self) -> int | None:
        return await self.handle.latest.call_one()

    # Sync: Monarch futures block with .get() outside an event loop.
    def put(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Publish ``state_dict`` as ``version`` (blocks until the server holds it)."""
        self.handle.put.call_one(version, _to_cpu(state_dict)).get()

    def get(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict published as ``version``, on the CPU; KeyError naming the versions held."""
        try:
            return self.handle.get.call_one(version).get()
        except Exception as error:
            missing = _missing_version(error)
            if missing is None:
                raise
            raise missing from None

    def versions(self) -> list[int]:
        """Versions held, oldest first."""
        return self.handle.versions.call_one().get()

    def latest(self) -> int | None:
        return self.handle.latest.call_one().get()

    def __repr__(self) -> str:
        return f"ActorWeightStore({self.handle!r})"


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
    the actor, whose versions take memory). ``on_hosts``: where the server
    runs (as ``options(on_hosts=...)``; None: the least-occupied host). On
    the Policy replicas' host, a version crosses the network once, when it is
    published, and each replica fetches it without leaving its host
    (benchmarks/weights.py measures both placements).
    Close it with ``await store.aclose()``. Raises ValueError for an unknown kind.
    """
    from forge_lite.actors.weights import WeightStore

    if weight_store_kind(kind) == "files":
        return WeightStore(keep_last=keep_last)
    handle = await WeightServer.options(procs=1, on_hosts=on_hosts).as_actor(keep_last=keep_last or 2)
    return ActorWeightStore(handle, owned=True)


def describe_weight_store(store) -> str:
    """How weights travel through ``store``, in words, for a run's log."""
    if isinstance(store, ActorWeightStore):
        return "as Monarch messages through a WeightServer actor (weights: actor)"
    # No path: a notebook's output must not carry this machine's folders.
    return "as files in the run's own folder on this host (weights: files)"


def weight_store_label(store) -> str:
    """The store's kind and how it moves weights, short enough for a
    dashboard header: ``"actor (Monarch messages)"`` or ``"files (one host)"``."""
    if isinstance(store, ActorWeightStore):
        return "actor (Monarch messages)"
    return "files (one host)"


def _to_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Detached CPU tensors: a GPU tensor would be rebuilt on the server's GPU,
    # and autograd state has no business in a message.
    return {name: tensor.detach().to("cpu") for name, tensor in state_dict.items()}


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
