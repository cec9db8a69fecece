"""The kernel's default weight store: why the tutorial's weight sync runs as printed.

The tutorial builds a trainer and a Policy service without naming any store,

    trainer = await RLTrainer.options(procs=1).as_actor(...)
    policy = await Policy.options(...).as_service(...)
    await trainer.push_weights.call_one(policy_version=1)
    await policy.update_weights.fanout(policy_version=1)

and expects the policy to serve the trainer's weights. They live in different
processes, so something must carry the weights between them. When a Policy
or an RLTrainer is started without ``weight_store=``, the process that starts
it (the notebook kernel, a script) hands it this process's default store:
a folder on one machine, a `WeightServer` when the cluster has several hosts
(``open_weight_store("auto")``). So the trainers and policies of one kernel
meet there.

What stays true:
- A new Policy starts at version 0 with its own model's weights; it loads a
  version only when asked (``update_weights(v)``, or ``policy_version=v``).
- Runs that pass their own store (``weight_store=store``) are isolated from
  each other and from the default store; the GRPO run always does.
- One trainer publishes into the default store at a time, and the newest
  wins: a trainer's first push drops every version an earlier trainer left
  there (a learner who re-runs the trainer's cell starts a new run), and the
  older trainer's next push is a RuntimeError that says to pass a store to
  each trainer. Two trainers interleaving their versions in one store would
  otherwise feed a policy a mix of two runs, silently.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Any

# The current cluster -> this process's default store on it. A store on a
# cluster that was detached is gone with it, so a new cluster gets a new one.
_defaults: dict[int, tuple[Any, Any]] = {}


async def default_weight_store():
    """This process's default store for the current cluster, created at the
    first call (a ``WeightStore`` folder on one host, an ``ActorWeightStore``
    on several). It lives as long as this process: its folder is deleted at
    exit, its server stops with the cluster."""
    from forge_lite.actors.weight_server import open_weight_store
    from forge_lite.controller import cluster

    current = cluster.current()
    entry = _defaults.get(id(current))
    if entry is None or entry[0] is not current or _failed(entry[1]):
        # A task, stored before its first await: the tutorial starts the
        # Policy and the trainer in one asyncio.gather, and both must get
        # the same store.
        entry = _defaults[id(current)] = (current, asyncio.ensure_future(_open_default(open_weight_store)))
    return await entry[1]


def _failed(task: asyncio.Future) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


async def _open_default(open_weight_store):
    store = await open_weight_store("auto")
    store.is_default = True
    return store


async def with_default_weight_store(actor_class: type, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with ``weight_store=`` this process's default store, when the
    call to ``actor_class(*args, **kwargs)`` gives it no store (or None).

    An actor class whose constructor takes no ``weight_store`` (a learner's
    subclass with its own signature), or arguments that do not fit the
    constructor (its own error is clearer), get ``kwargs`` unchanged.
    """
    signature = inspect.signature(actor_class.__init__)
    if "weight_store" not in signature.parameters:
        return kwargs
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return kwargs
    if bound.arguments.get("weight_store") is not None:
        return kwargs
    return {**kwargs, "weight_store": await default_weight_store()}


def is_default(store: Any) -> bool:
    """Is ``store`` (or the copy an actor received) a process's default store?"""
    return bool(getattr(store, "is_default", False))


class Publisher:
    """A trainer's claim on the default store (see the module's docstring).

    ``await publisher.check(store)`` before each push: the first claims the
    store (dropping an earlier trainer's versions); a later one raises
    RuntimeError when a newer trainer has claimed it since.
    """

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.claimed = False

    async def check(self, store: Any) -> None:
        if not self.claimed:
            await store.aclaim(self.token)
            self.claimed = True
        elif await store.apublisher() != self.token:
            raise RuntimeError(
                "a newer RLTrainer has published to this kernel's default weight store since this one "
                "did, and the default store takes one trainer at a time (the newest). To run trainers "
                "side by side, give each its own store and its policies the same one: "
                "`store = WeightStore()`, then `weight_store=store` to the RLTrainer and to the Policy"
            )
