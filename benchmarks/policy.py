"""What serving the Policy as a service costs and what its KV cache buys, measured side by side.

    python benchmarks/policy.py              # a few minutes on 2 cores
    python benchmarks/policy.py --only a     # one part (a, b or c)

All with the shipped model and the shipped math questions, greedy sampling
(so every mode generates the same tokens) and the prefix caches emptied before
each timed round unless a row is about the cache.

a. Service overhead: tokens/s of 64 concurrent `policy.generate.route` calls
   on a 1-replica vLLM Policy service, against the same vLLM engine class
   (`make_engine`) called directly in this process with the 64 prompts as one
   batch. Target route/direct >= 0.85. Also the replica's actor called with
   Monarch's `call_one` (no service layer). The replica's engine steps (how
   many, how many requests the first one held) and the time spent inside them
   say where the rest goes.
b. KV-cache reuse: 16 conversations of 5 turns at once (turn n+1 = turn n's
   prompt + reply + a new question) on 2 replicas, with round robin, sticky
   sessions, and the prefix router. Fraction of turn-2+ prompt tokens served
   from the cache, against the most the engine could reuse ("ideal": every
   token of the previous turn for the transformers engine; only whole
   128-token blocks for vLLM on CPU). Target sessions and prefix >= 0.80.
c. Engines: vLLM against the transformers engine, tokens/s on the same 64
   prompts as one batch, both in this process.

Prints a table and writes ``benchmarks/results/policy.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import forge_lite  # noqa: F401  (before monarch)
from monarch.actor import endpoint

from forge_lite.actors.engines import SamplingConfig, make_engine
from forge_lite.actors.policy import Policy
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL, MATH_DATA_DIR
from forge_lite.data.prompts import format_request

# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "policy.json"
TARGET_ROUTE_RATIO = 0.85
TARGET_CACHED = 0.80
# vLLM on CPU caches whole blocks of this many tokens (16 on GPU).
VLLM_CPU_BLOCK = 128

ENGINE_CONFIGS = {
    "vllm": {"backend": "vllm", "max_model_len": 1024, "enforce_eager": True},
    "transformers": {"backend": "transformers", "max_model_len": 1024},
}


class StepRecord(NamedTuple):
    """One call of the Policy's `_step` in the replica."""

    requests: int  # requests in the engine when it began
    seconds: float  # the whole call: to the worker thread, engine steps, back
    engine_seconds: float  # inside engine.step
    engine_steps: int


class StepRecordingPolicy(Policy):
    """The Policy, noting each `_step` (see StepRecord)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[StepRecord] = []

    async def _step(self):
        requests = len(self._running)
        engine_step, engine_seconds = self.engine.step, []

        def timed_engine_step():
            start = time.perf_counter()
            finished = engine_step()
            engine_seconds.append(time.perf_counter() - start)
            return finished

        self.engine.step = timed_engine_step  # for this call only
        start = time.perf_counter()
        try:
            await super()._step()
        finally:
            del self.engine.step
        self.records.append(
            StepRecord(requests, time.perf_counter() - start, sum(engine_seconds), len(engine_seconds))
        )

    @endpoint
    async def take_records(self) -> list[StepRecord]:
        records, self.records = self.records, []
        return records


def load_questions() -> list[str]:
    with open(os.path.join(MATH_DATA_DIR, "train.jsonl")) as file:
        return [json.loads(line)["question"] for line in file]


def tokens_in(results) -> int:
    return sum(len(c.token_ids) for completions in results for c in completions)


class CacheReset:
    """Empties every replica's prefix cache by reloading the weights they already
    serve: `update_weights` drops the cache, and the kit has no other remote call for it.
    Every service is spawned with `weight_store=reset.store`, the store that holds them."""

    def __init__(self):
        from transformers import AutoModelForCausalLM

        self.store = WeightStore()
        self.version = 1
        self.store.put(self.version, AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).state_dict())

    async def __call__(self, service) -> None:
        await service.update_weights.fanout(self.version)


# ---------------------------------------------------------------- a. route vs direct


async def measure_route_vs_direct(args, prompts: list[str], engine, reset: CacheReset) -> dict:
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    service = await StepRecordingPolicy.options(num_replicas=1).as_service(
        engine_config=ENGINE_CONFIGS["vllm"], sampling_config=sampling, weight_store=reset.store
    )
    limit = service.service.config.max_concurrent_requests

    # Each run returns (tokens, seconds, the replica's StepRecords or None in
    # this process); only the generation itself is timed, not the cache reset
    # before it.
    async def run_direct():
        engine.reset_prefix_cache()
        start = time.perf_counter()
        results = await asyncio.to_thread(engine.generate, prompts, SamplingConfig(**sampling))
        return tokens_in(results), time.perf_counter() - start, None

    def run_remote(generate, take_records):
        async def run():
            await reset(service)
            await take_records()
            start = time.perf_counter()
            results = await asyncio.gather(*(generate(p) for p in prompts))
            seconds = time.perf_counter() - start
            return tokens_in(results), seconds, await take_records()

        return run

    # The replica's own actor, called without the service (internal handle, as
    # in benchmarks/services.py): Monarch messaging and the Policy only.
    replica_actor = service.replicas[0].mesh
    modes = {
        "direct engine, one batch": run_direct,
        f"route (limit {limit})": run_remote(service.generate.route, service.take_records.route),
        "call_one on the replica": run_remote(replica_actor.generate.call_one, replica_actor.take_records.call_one),
    }

    rates: dict[str, list[float]] = {name: [] for name in modes}
    walls: dict[str, list[float]] = {name: [] for name in modes}
    records: dict[str, list[list[StepRecord] | None]] = {name: [] for name in modes}
    tokens: dict[str, int] = {}
    try:
        for run in modes.values():  # warm up: first calls compile and allocate
            await run()
        names = list(modes)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                tokens[name], seconds, round_records = await modes[name]()
                walls[name].append(seconds)
                rates[name].append(tokens[name] / seconds)
                records[name].append(round_records)
    finally:
        await service.shutdown()

    direct = statistics.median(rates["direct engine, one batch"])
    rows = {}
    for name in modes:
        rows[name] = {
            "tokens_per_s": statistics.median(rates[name]),
            "rounds": rates[name],
            "tokens": tokens[name],
            "ratio_vs_direct": statistics.median(rates[name]) / direct,
            "wall_s": statistics.median(walls[name]),  # a whole round
        }
        if records[name][0] is not None:
            per_round = records[name]
            rows[name].update({
                # The part of a round the replica spent in engine steps, and in
                # handing them to its worker thread and back.
                "engine_s": statistics.median(sum(r.engine_seconds for r in rs) for rs in per_round),
                "handover_s": statistics.median(sum(r.seconds - r.engine_seconds for r in rs) for rs in per_round),
                "engine_steps": [sum(r.engine_steps for r in rs) for rs in per_round],
                # How many of the prompts the engine started with.
                "first_step_requests": [rs[0].requests for rs in per_round],
            })
    return rows


# ---------------------------------------------------------------- b. KV-cache reuse


def follow_up(tokenizer, prompt: str, reply: str, question: str) -> str:
    """The tutorial's next turn: previous prompt + reply + a new user question."""
    user_turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return prompt + reply + tokenizer.eos_token + "\n" + user_turn


def reusable_tokens(previous, current, block: int) -> int:
    """The most prompt tokens of `current` an engine could take from the cache
    after serving `previous`: their common prefix (the last sampled token of
    `previous` never went through the model, and the last prompt token always
    does), in whole blocks."""
    served = previous.prompt_ids.tolist() + previous.token_ids.tolist()[:-1]
    prompt = current.prompt_ids.tolist()
    common = 0
    for a, b in zip(served, prompt):
        if a != b:
            break
        common += 1
    common = min(common, len(prompt) - 1)
    return common // block * block


async def conversation(service, tokenizer, questions: list[str], sticky: bool) -> list[tuple]:
    """One conversation; returns (completion, seconds) per turn."""
    async def turns():
        prompt = format_request(tokenizer, questions[0])
        answered = []
        for question in questions[1:] + [None]:
            start = time.perf_counter()
            completion = (await service.generate.route(prompt))[0]
            answered.append((completion, time.perf_counter() - start))
            if question is not None:
                prompt = follow_up(tokenizer, prompt, completion.text, question)
        return answered

    if not sticky:
        return await turns()
    async with service.session():
        return await turns()


async def measure_cache_reuse(args, engine_name: str, tokenizer, questions, reset: CacheReset) -> dict:
    block = VLLM_CPU_BLOCK if engine_name == "vllm" else 1
    service = await Policy.options(num_replicas=2).as_service(
        engine_config=ENGINE_CONFIGS[engine_name],
        sampling_config={"temperature": 0.0, "max_tokens": args.max_tokens},
        weight_store=reset.store,
    )
    per_conversation = [
        questions[i * args.turns : (i + 1) * args.turns] for i in range(args.conversations)
    ]
    rows = {}
    try:
        await service.generate.fanout("Warm up.")  # a fresh engine's first call is slow
        for mode in ("round robin", "sessions", "prefix router"):
            service.set_router("prefix" if mode == "prefix router" else "round_robin")
            await reset(service)  # every mode starts from empty caches
            start = time.perf_counter()
            conversations = await asyncio.gather(
                *(conversation(service, tokenizer, qs, sticky=mode == "sessions") for qs in per_conversation)
            )
            wall = time.perf_counter() - start
            later = [turn for conv in conversations for turn in conv[1:]]
            prompt_tokens = sum(len(c.prompt_ids) for c, _ in later)
            ideal = sum(
                reusable_tokens(conv[t - 1][0], conv[t][0], block)
                for conv in conversations for t in range(1, len(conv))
            )
            replicas = [c.replica for conv in conversations for c, _ in conv]
            rows[mode] = {
                "cached_fraction": sum(c.num_cached_tokens for c, _ in later) / prompt_tokens,
                "ideal_fraction": ideal / prompt_tokens,
                "turn2plus_prompt_tokens": prompt_tokens,
                "mean_turn_latency_s": statistics.mean(s for conv in conversations for _, s in conv),
                "wall_s": wall,
                "requests_per_replica": [replicas.count(i) for i in range(2)],
                "conversations_on_one_replica": sum(len({c.replica for c, _ in conv}) == 1 for conv in conversations),
            }
    finally:
        await service.shutdown()
    return rows


# ---------------------------------------------------------------- c. engines


async def measure_engines(args, prompts: list[str], engines: dict) -> dict:
    sampling = SamplingConfig(temperature=0.0, max_tokens=args.max_tokens)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    names = list(engines)
    for name in names:  # warm up
        await asyncio.to_thread(engines[name].generate, prompts, sampling)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            engines[name].reset_prefix_cache()
            start = time.perf_counter()
            results = await asyncio.to_thread(engines[name].generate, prompts, sampling)
            tokens[name] = tokens_in(results)
            rates[name].append(tokens[name] / (time.perf_counter() - start))
    return {name: {"tokens_per_s": statistics.median(rates[name]), "rounds": rates[name], "tokens": tokens[name]}
            for name in names}


# ---------------------------------------------------------------- report


def print_report(route: dict | None, cache: dict, engines: dict, args) -> None:
    if route:
        print(f"\na. {args.prompts} concurrent generate.route on 1 vLLM replica vs the engine called directly "
              f"(max_tokens={args.max_tokens}, greedy, median of {args.rounds})")
        print(f"   {'':28}{'tokens/s':>10}{'vs direct':>11}{'wall ms':>9}{'engine ms':>11}{'hand-over':>11}"
              f"{'steps':>7}  requests in the first step, per round")
        for name, row in route.items():
            mark = "" if not name.startswith("route") else ("  ok" if row["ratio_vs_direct"] >= TARGET_ROUTE_RATIO else "  MISS")
            replica = ""
            if "engine_s" in row:
                replica = (f"{row['engine_s'] * 1e3:11.0f}{row['handover_s'] * 1e3:11.0f}"
                           f"{statistics.median(row['engine_steps']):7.0f}  {row['first_step_requests']}")
            print(f"   {name:28}{row['tokens_per_s']:10.0f}{row['ratio_vs_direct']:11.2f}"
                  f"{row['wall_s'] * 1e3:9.0f}{replica}{mark}")
        direct = route["direct engine, one batch"]["tokens_per_s"]
        for name, row in list(route.items())[1:]:
            print(f"   {name}, each round vs direct: {[round(rate / direct, 2) for rate in row['rounds']]}")
        print(f"   target route/direct >= {TARGET_ROUTE_RATIO}. In the replica (medians): engine ms inside engine "
              "steps, hand-over ms to its worker thread and back; wall - both: messages, the service, waiting "
              "for arrivals. A step is one token for every running request; later requests join at the next one.")

    for engine_name, rows in cache.items():
        print(f"\nb. {args.conversations} conversations x {args.turns} turns at once, 2 replicas, {engine_name} engine")
        print(f"   {'':16}{'cached':>8}{'ideal':>8}{'turn ms':>9}{'wall s':>8}{'per replica':>13}{'stayed':>8}")
        for mode, row in rows.items():
            target = "" if mode == "round robin" else ("  ok" if row["cached_fraction"] >= TARGET_CACHED else "  MISS")
            print(f"   {mode:16}{row['cached_fraction']:8.2f}{row['ideal_fraction']:8.2f}"
                  f"{row['mean_turn_latency_s'] * 1e3:9.0f}{row['wall_s']:8.1f}"
                  f"{str(row['requests_per_replica']):>13}{row['conversations_on_one_replica']:>5}/{args.conversations}{target}")
        print(f"   cached: fraction of turn-2+ prompt tokens served from the KV cache (target >= {TARGET_CACHED} "
              "for sessions and prefix)")
        if engine_name == "vllm":
            print(f"   ideal: the most vLLM can reuse with {VLLM_CPU_BLOCK}-token blocks on CPU; "
                  "short conversations leave most tokens in a partial block")
        else:
            print("   ideal: every token the previous turn put through the model")

    if engines:
        print(f"\nc. engines, {args.prompts} prompts as one batch in this process (max_tokens={args.max_tokens}, greedy)")
        base = engines.get("transformers", {}).get("tokens_per_s")
        for name, row in engines.items():
            ratio = f"{row['tokens_per_s'] / base:8.2f}x" if base else ""
            print(f"   {name:16}{row['tokens_per_s']:10.0f} tokens/s{ratio}")


async def main(args) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    questions = load_questions()
    prompts = [format_request(tokenizer, q) for q in questions[: args.prompts]]
    reset = CacheReset()
    has_vllm = importlib.util.find_spec("vllm") is not None and not args.no_vllm

    parts = set(args.only or "abc")
    if "a" in parts and not has_vllm:
        print("a. skipped: it measures the vLLM engine, which is not installed here (or --no-vllm)")

    route, cache, engine_rows = None, {}, {}
    engines = {}
    if has_vllm and parts & {"a", "c"}:
        engines["vllm"] = await asyncio.to_thread(make_engine, ENGINE_CONFIGS["vllm"], seed=0)
    if has_vllm and "a" in parts:
        route = await measure_route_vs_direct(args, prompts, engines["vllm"], reset)
    if "c" in parts:
        engines["transformers"] = await asyncio.to_thread(make_engine, ENGINE_CONFIGS["transformers"], seed=0)
        engine_rows = await measure_engines(args, prompts, engines)

    if "b" in parts:
        conversation_questions = questions[args.prompts :]
        for engine_name in ["transformers"] + (["vllm"] if has_vllm else []):
            cache[engine_name] = await measure_cache_reuse(args, engine_name, tokenizer, conversation_questions, reset)

    print_report(route, cache, engine_rows, args)
    if args.only:  # a partial run must not overwrite the full results
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "args": vars(args),
        "route_vs_direct": route,
        "cache_reuse": cache,
        "engines": engine_rows,
    }, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="concurrent prompts in a. and c.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds in a. and c.")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--no-vllm", action="store_true", help="transformers engine only")
    parser.add_argument("--only", choices=["a", "b", "c"],
                        help="run one part (a: route vs direct, b: KV-cache reuse, c: engines); writes no json")
    asyncio.run(main(parser.parse_args()))
