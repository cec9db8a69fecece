"""Policy: the actor that generates responses, one inference engine per replica.

`Policy.options(num_replicas=2).as_service(engine_config=..., sampling_config=...)`
starts one engine in each replica process (vLLM where it is installed, else
the transformers engine; see `forge_lite.actors.engines`). Then:

- `generate(prompt, **overrides)` returns `list[Completion]` (`n` samples).
  One task per replica, the serving loop, drives the engine step by step.
  Before each step it hands the engine every request that arrived meanwhile,
  and after it answers each request that finished. On both engines a step is
  one token for every running sequence, so a request that arrives while
  others generate joins them at the next token ("continuous batching") and
  nobody waits for a whole batch. An idle engine starts once arrivals pause
  (`BATCH_GAP_S`), so that a burst of requests is prefilled and starts
  together, like the max queue delay of Triton's dynamic batcher.
- `update_weights(policy_version)` loads that version from the run's weight
  store (`weight_store=`, shared with the trainer that publishes to it):
  new requests stop joining, the ones in flight finish on the old weights,
  then the new weights are loaded and the prefix cache is dropped with the
  old ones. Requests that arrived meanwhile run on the new weights.
- `get_version()` is the version being served; every Completion carries it too
  (`generator_version`), so the replay buffer can drop stale episodes.

A new Policy starts from the weights of the model it is given (version 0),
or, when asked with `policy_version=v`, from version v of its store. A replica
that joins a running service (respawned after a failure, or added by
`scale`) loads the newest version in the store, which is the one its
siblings serve: failover never silently serves the original weights.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from forge_lite.actors.default_store import with_default_weight_store
from forge_lite.actors.engines import Completion, SamplingConfig, make_engine
from forge_lite.actors.weight_server import ActorWeightStore
from forge_lite.actors.weights import WeightStore
from forge_lite.controller import ForgeActor, runtime
from forge_lite.controller.service_config import ServiceConfig
from monarch.actor import concurrent_endpoint, endpoint

# 64 concurrent `generate.route` calls reached one replica over 8-30 ms on 2
# busy cores. When the transformers engine ran whole batches, starting an idle
# engine on the first arrival ran a batch of 1-3 prompts and then the other 60
# (0.72 of the direct engine's tokens/s in benchmarks/policy.py). Late arrivals
# now join at the next token on both engines, but starting together still
# saves the first ones decoding alone. An idle engine starts when no request
# came for BATCH_GAP_S, or BATCH_MAX_WAIT_S after it could have.
BATCH_GAP_S = 0.002
BATCH_MAX_WAIT_S = 0.02


@dataclass
class _Request:
    prompt: str
    sampling: SamplingConfig
    result: asyncio.Future  # -> list[Completion]


@dataclass
class _WeightUpdate:
    state_dict: dict
    version: int
    done: asyncio.Future  # -> None


class Policy(ForgeActor):
    """Generates completions with an inference engine (see the module docstring).

    `engine_config`: `model` (default: the shipped model), `backend` ("auto",
    "vllm", "transformers") and engine options such as `tensor_parallel_size`.
    `sampling_config`: defaults for `SamplingConfig` (n, max_tokens,
    temperature, top_p, stop, seed); `generate(prompt, **overrides)` changes
    them per request.
    `weight_store`: the run's weight store, the one its trainer pushes to: a
    `WeightStore` (a folder, one host) or an `ActorWeightStore` (versions
    fetched from the trainer's process, any host). Without it, the service gets
    the kernel's default store, where the kernel's trainers without a store
    publish (`forge_lite.actors.default_store`), so the tutorial's weight sync
    runs as printed; pass a store to keep two runs apart.
    `policy_version`: start from this version of `weight_store` instead of
    the model's own weights (a KeyError naming the versions held if it is
    not there).
    """

    # The engine batches whatever is in flight, so one replica should have many
    # requests in flight: with the service default of 10, 64 concurrent prompts
    # ran as batches of 10, far below the engine's own throughput
    # (benchmarks/policy.py, part a, compares the service with the engine).
    service_config = ServiceConfig(max_concurrent_requests=64)

    def __init__(
        self,
        engine_config: dict | None = None,
        sampling_config: dict | None = None,
        weight_store: WeightStore | ActorWeightStore | None = None,
        policy_version: int | None = None,
    ):
        self.engine_config = dict(engine_config or {})
        self.sampling_config = dict(sampling_config or {})
        self.weight_store = weight_store
        self.policy_version = policy_version

    @classmethod
    async def caller_defaults(cls, args: tuple, kwargs: dict) -> dict:
        """Without ``weight_store=``, the kernel's default store, where the
        trainers of this kernel publish (``forge_lite.actors.default_store``)."""
        return await with_default_weight_store(cls.actor_class(), args, kwargs)

    @endpoint
    async def setup(self) -> None:
        # Checked here rather than in __init__: errors raised in setup reach the
        # caller with their own type and message.
        self.sampling = SamplingConfig.from_dict(self.sampling_config)
        if self.policy_version is not None and self.weight_store is None:
            raise ValueError(
                f"policy_version={self.policy_version} needs the store that holds it: "
                "pass weight_store= as well"
            )
        self.replica = runtime.replica_index()
        # Each replica samples with its own seed; a lone actor uses its pid.
        seed = self.replica if self.replica is not None else os.getpid()
        self.engine = make_engine(self.engine_config, seed=seed)

        # Only the serving loop (`_serve`) touches the engine after setup.
        self._queue: list[_Request] = []  # arrived, not yet in the engine
        self._running: dict[int, _Request] = {}  # in the engine, by its request id
        self._weight_updates: list[_WeightUpdate] = []
        self._serving: asyncio.Task | None = None

        start_version = self.policy_version
        if runtime.joins_running_service() and self.weight_store is not None:
            newest = await self.weight_store.alatest()
            if newest is not None:
                start_version = newest
        if start_version is not None:
            # The whole state dict is here before the engine sees any of it.
            weights = await self.weight_store.aget(start_version)
            self.engine.load_weights(weights, version=start_version)

    async def __cleanup__(self, exc: Exception | None) -> None:
        # Monarch calls this when the replica stops. The actor store keeps
        # this host's copies of the versions in a folder; the last replica on
        # the host to stop deletes it.
        if self.weight_store is not None:
            await self.weight_store.aclose()

    @concurrent_endpoint
    async def generate(self, prompt: str, **overrides) -> list[Completion]:
        """`n` completions of `prompt`; keyword arguments override the sampling config."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        sampling = self.sampling.with_overrides(**overrides)
        request = _Request(prompt, sampling, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._serve_soon()
        return await request.result

    @endpoint
    async def get_version(self) -> int:
        return self.engine.weight_version

    @endpoint
    async def update_weights(self, policy_version: int) -> None:
        """Serve the weights the trainer published as `policy_version`."""
        if self.weight_store is None:
            raise RuntimeError(
                "this Policy has no weight store: it was spawned without Policy.as_service/as_actor, "
                "which give it one; pass `weight_store=store` (the RLTrainer's store) to it"
            )
        # Fetch the whole version first (a file read or an actor message), so
        # generation goes on meanwhile, and a transfer that fails leaves the
        # engine on its old weights: nothing is half-loaded.
        state_dict = await self.weight_store.aget(policy_version)
        update = _WeightUpdate(state_dict, policy_version, asyncio.get_running_loop().create_future())
        self._weight_updates.append(update)
        self._serve_soon()
        await update.done

    def _serve_soon(self) -> None:
        if self._serving is None or self._serving.done():
            self._serving = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        """The serving loop: the one task that uses the engine, so steps, new
        requests and weight loads never overlap. Ends when there is no work."""
        try:
            while self._queue or self._running or self._weight_updates:
                if self._weight_updates:
                    # New requests wait in the queue for the new weights.
                    if not self._running:  # the generations in flight are done
                        await self._load_weights(self._weight_updates.pop(0))
                        continue
                elif self._running:
                    self._admit_queue()
                else:
                    await self._admit_burst()
                if self._running:
                    await self._step()
        except BaseException as error:
            # Whatever went wrong, no caller may wait forever. A failed step
            # leaves nothing in the engine (see Engine.step).
            futures = [request.result for request in [*self._queue, *self._running.values()]]
            futures += [update.done for update in self._weight_updates]
            self._queue, self._running, self._weight_updates = [], {}, []
            for future in futures:
                _settle(future, error=error)
            if not isinstance(error, Exception):  # cancelled: the actor is stopping
                raise

    async def _admit_burst(self) -> None:
        """Give an idle engine the whole burst of requests that is arriving:
        admit them as they come, until none came for BATCH_GAP_S (a lone
        request pays that) or BATCH_MAX_WAIT_S passed.

        Admitting (tokenizing) a prompt takes a moment; doing it while the
        rest of the burst arrives, instead of after, overlaps the two."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BATCH_MAX_WAIT_S
        while self._queue and not self._weight_updates and loop.time() < deadline:
            self._admit_queue()
            await asyncio.sleep(BATCH_GAP_S)

    def _admit_queue(self) -> None:
        for request in self._queue:
            try:
                request_id = self.engine.add_request(request.prompt, request.sampling)
            except Exception as error:  # e.g. a prompt too long: that caller's error only
                _settle(request.result, error=error)
            else:
                self._running[request_id] = request
        self._queue = []

    async def _step(self) -> None:
        # In a thread, so the actor keeps receiving (and queueing) requests.
        finished = await asyncio.to_thread(self._step_until_news)
        for request_id, completions in finished.items():
            for completion in completions:
                completion.replica = self.replica
            _settle(self._running.pop(request_id).result, completions)

    def _step_until_news(self) -> dict[int, list[Completion]]:
        """Engine steps until a request finishes or the loop has something new
        for the engine (a request or a weight update).

        Runs in the worker thread: coming back to the event loop after every
        step would cost a few percent of a 64-prompt batch's time on 2 busy
        cores. Reading the two lists from this thread is safe: the
        event loop only appends to them while a step runs.
        """
        while True:
            finished = self.engine.step()
            if finished or self._queue or self._weight_updates:
                return finished

    async def _load_weights(self, update: _WeightUpdate) -> None:
        try:
            await asyncio.to_thread(self.engine.load_weights, update.state_dict, update.version)
        except Exception as error:  # the caller of update_weights gets it; serving goes on
            _settle(update.done, error=error)
        else:
            _settle(update.done, None)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
