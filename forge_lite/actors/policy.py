"""Policy: the actor that generates responses, one inference engine per replica.

`Policy.options(num_replicas=2).as_service(engine_config=..., sampling_config=...)`
starts one engine in each replica process (vLLM where it is installed, else
the transformers engine; see `forge_lite.actors.engines`). Then:

- `generate(prompt, **overrides)` returns `list[Completion]` (`n` samples).
  Requests that arrive while the engine is busy wait in a queue and go to the
  engine together as one batch: an engine is much faster on one batch of 8
  prompts than on 8 prompts one after another. Requests sent together reach
  the actor over a few milliseconds, so a batch starts only once arrivals
  pause (`BATCH_GAP_S`), like the max queue delay of Triton's dynamic batcher.
- `update_weights(policy_version)` loads that version from the weight store,
  after the batch in flight finishes; requests queued meanwhile run on the new
  weights. The prefix cache is dropped with the old weights.
- `get_version()` is the version being served; every Completion carries it too
  (`generator_version`), so the replay buffer can drop stale episodes.

A replica that is (re)started loads the newest published version in `setup`,
so a respawned replica never silently serves the original weights.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from forge_lite.actors.engines import Completion, SamplingConfig, make_engine
from forge_lite.actors.weights import WEIGHTS_DIR_ENV, WeightStore
from forge_lite.controller import ForgeActor
from forge_lite.controller.service_config import ServiceConfig
from monarch.actor import concurrent_endpoint, endpoint

#: Set by the service in each replica's processes; a plain actor has none.
REPLICA_ENV = "FORGE_LITE_REPLICA"

# 64 concurrent `generate.route` calls reached one replica over 8-30 ms on 2
# busy cores. Starting the engine on the first arrival ran a batch of 1-3
# prompts and then the other 60 (two engine passes instead of one: 0.72 of the
# direct engine's tokens/s in benchmarks/policy.py). A batch now starts when no
# request came for BATCH_GAP_S, or BATCH_MAX_WAIT_S after it could have.
BATCH_GAP_S = 0.002
BATCH_MAX_WAIT_S = 0.02


@dataclass
class _Request:
    prompt: str
    sampling: SamplingConfig
    result: asyncio.Future


class Policy(ForgeActor):
    """Generates completions with an inference engine (see the module docstring).

    `engine_config`: `model` (default: the shipped model), `backend` ("auto",
    "vllm", "transformers") and engine options such as `tensor_parallel_size`.
    `sampling_config`: defaults for `SamplingConfig` (n, max_tokens,
    temperature, top_p, stop, seed); `generate(prompt, **overrides)` changes
    them per request.
    """

    # The engine batches whatever is waiting, so one replica should have many
    # requests in flight: with the service default of 10, 64 concurrent prompts
    # ran as batches of 10 (0.23-0.29x the engine's own throughput, measured).
    service_config = ServiceConfig(max_concurrent_requests=64)

    def __init__(self, engine_config: dict | None = None, sampling_config: dict | None = None):
        self.engine_config = dict(engine_config or {})
        self.sampling_config = dict(sampling_config or {})

    @endpoint
    async def setup(self) -> None:
        # Checked here rather than in __init__: errors raised in setup reach the
        # caller with their own type and message.
        self.sampling = SamplingConfig.from_dict(self.sampling_config)
        replica = os.environ.get(REPLICA_ENV)
        self.replica = int(replica) if replica is not None else None
        # Each replica samples with its own seed; a lone actor uses its pid.
        seed = self.replica if self.replica is not None else os.getpid()
        self.engine = make_engine(self.engine_config, seed=seed)

        self._queue: list[_Request] = []
        self._batcher: asyncio.Task | None = None
        # Held while the engine generates or loads weights: one at a time.
        self._engine_lock = asyncio.Lock()

        if os.environ.get(WEIGHTS_DIR_ENV):
            store = WeightStore()
            latest = store.latest()
            if latest is not None:
                self.engine.load_weights(store.get(latest), version=latest)

    @concurrent_endpoint
    async def generate(self, prompt: str, **overrides) -> list[Completion]:
        """`n` completions of `prompt`; keyword arguments override the sampling config."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        sampling = self.sampling.with_overrides(**overrides)
        request = _Request(prompt, sampling, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._serve_queue())
        return await request.result

    @endpoint
    async def get_version(self) -> int:
        return self.engine.weight_version

    @endpoint
    async def update_weights(self, policy_version: int) -> None:
        """Serve the weights the trainer published as `policy_version`."""
        if not os.environ.get(WEIGHTS_DIR_ENV):
            raise RuntimeError(
                f"no weight store: {WEIGHTS_DIR_ENV} is not set in this process. Create "
                "forge_lite.actors.weights.WeightStore() in the controller (notebook) before "
                "starting the trainer and the policy, so they share one directory"
            )
        # Read the file before taking the lock, so generation goes on meanwhile.
        state_dict = await asyncio.to_thread(WeightStore().get, policy_version)
        async with self._engine_lock:  # waits for the batch in flight
            await asyncio.to_thread(self.engine.load_weights, state_dict, policy_version)

    async def _serve_queue(self) -> None:
        while self._queue:
            await self._wait_for_arrivals_to_pause()
            # Everything that arrived while the last batch ran goes in this one.
            waiting, self._queue = self._queue, []
            async with self._engine_lock:
                for group in _group_by_sampling(waiting):
                    try:
                        await self._run(group)
                    except BaseException as error:
                        # Whatever went wrong, no caller may wait forever.
                        for request in group:
                            _settle(request, error=error)
                        raise

    async def _wait_for_arrivals_to_pause(self) -> None:
        """Let the rest of a burst of requests join the queue (costs a lone request BATCH_GAP_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BATCH_MAX_WAIT_S
        seen = 0
        while len(self._queue) != seen and loop.time() < deadline:
            seen = len(self._queue)
            await asyncio.sleep(BATCH_GAP_S)

    async def _run(self, group: list[_Request]) -> None:
        try:
            # In a thread, so the actor keeps receiving (and queueing) requests.
            prompts = [request.prompt for request in group]
            results = await asyncio.to_thread(self.engine.generate, prompts, group[0].sampling)
        except Exception as error:
            if len(group) == 1:
                _settle(group[0], error=error)
            else:  # one bad prompt (e.g. too long) must not fail the others
                for request in group:
                    await self._run([request])
            return
        for request, completions in zip(group, results):
            for completion in completions:
                completion.replica = self.replica
            _settle(request, completions=completions)


def _group_by_sampling(requests: list[_Request]) -> list[list[_Request]]:
    """One engine call per distinct sampling config, keeping arrival order."""
    groups: list[list[_Request]] = []
    for request in requests:
        group = next((g for g in groups if g[0].sampling == request.sampling), None)
        if group is None:
            groups.append([request])
        else:
            group.append(request)
    return groups


def _settle(request: _Request, completions=None, error: Exception | None = None) -> None:
    if request.result.done():  # the caller went away
        return
    if error is not None:
        request.result.set_exception(error)
    else:
        request.result.set_result(completions)
