"""How fast a new policy version reaches every replica, on one host and across hosts.

    sudo python benchmarks/weights.py --shape quarter    # the shipped model and a 298 MB Qwen3-shaped model
    sudo python benchmarks/weights.py --models random --shape qwen3-0.6b --paths actor
    python benchmarks/weights.py --models shipped --rounds 5

Side by side in one run, for each model:

- **one host, folder**: a publisher, the `WeightStore` folder and a Policy
  service all on host1;
- **across hosts, actor**: the publisher (it keeps each version in its own
  memory) and the `WeightServer` (the list of versions) on host0, the Policy
  service on host1: each version goes from the publisher's process to host1
  as one Monarch message, once for all the replicas there;
- **raw copy**: the same state dict sent once, as one plain Monarch actor
  message, from the publisher's process to a process on host1: the physical
  limit of a transfer between those hosts on this machine.

A round is "publish + all replicas loaded": the publisher `aput`s version v
(what `RLTrainer.push_weights` does with its model's state dict), then
`update_weights` returns on 1 replica (`route`) or on all 4 (`fanout`) of a
4-replica service. MB/s = the state dict's bytes / that time. Rounds are
interleaved (raw, folder, actor, ...) so the machine's noise hits all alike;
the table shows medians. Targets: across hosts >= 70% of the raw copy rate;
4 replicas <= 2x the time of 1.

Measured on the 2-core, 23 GB machine this was written on (network
namespaces, quiet machine; medians of 5 rounds, of 3 for 0.6B):

    model        MB      raw copy   across hosts, 1 replica   4 replicas   4/1   vs raw
    quarter      298.0   0.687 s    0.925 s                   1.030 s      1.11  74%
    qwen3-0.6b   1192.1  4.366 s    5.885 s                   7.109 s      1.21  74%
    shipped      3.4     0.013 s    0.036 s                   0.051 s      1.43  36%

The shipped model is small enough that a round is messages, not bytes: the
publish, the route, the lookup and the fetch each take a few milliseconds.

The hosts are ``forge_lite.worker.LocalHosts`` (as root: network namespaces,
a real network hop; else loopback workers). The "Qwen3-0.6B" model is random,
built from its shape with transformers (nothing is downloaded); ``--shape``
picks a smaller one. On that machine 0.6B fits only with ``--paths actor``
(two 4-replica services ran out of memory; one left 1 GB free at its peak).
Prints a table and writes ``benchmarks/results/weights.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import forge_lite  # noqa: F401  (before monarch)
import torch
from monarch.actor import endpoint

from forge_lite.actors.policy import Policy
from forge_lite.actors.weight_server import ActorWeightStore, WeightServer
from forge_lite.actors.weights import WeightStore
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.controller import ForgeActor
from forge_lite.worker import LocalHosts

# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "weights.json"
REPLICAS = 4

# Qwen3-0.6B's shape (its config.json); "half" and "quarter" keep the layer
# and head layout and shrink depth and vocabulary, for machines where 0.6B
# does not fit in a few minutes.
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "half": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=14,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=75968),
    "quarter": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=7,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=37984),
}


def build_random_model(shape: str, folder: str) -> str:
    """A random Qwen3 model of ``shape`` in bfloat16, with the shipped model's
    tokenizer (its ids are all below the vocabulary size), saved to ``folder``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(DEFAULT_MODEL) / name, Path(folder) / name)
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


class Publisher(ForgeActor):
    """Holds a model's state dict, as a trainer does, and publishes it."""

    def __init__(self, model: str):
        self.model = model

    @endpoint
    async def setup(self) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(self.model) / "model.safetensors"))
        if "lm_head.weight" not in state:  # tied: the trainer's state dict has both names, one tensor
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.state = state

    @endpoint
    async def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.state.values()}
        return sum(storages.values())

    @endpoint
    async def publish(self, store, version: int) -> float:
        began = time.perf_counter()
        await store.aput(version, self.state)
        return time.perf_counter() - began

    @endpoint
    async def hello(self, sink) -> None:
        """A small first message to ``sink``: it opens the connection between
        the two processes, and a host-to-host link that does not work shows
        up here, named by ``bounded``, before any timing starts."""
        await sink.take.call_one({})

    @endpoint
    async def send_raw(self, sink) -> float:
        """Seconds to hand the whole state dict to ``sink`` in one message."""
        began = time.perf_counter()
        await sink.take.call_one(self.state)
        return time.perf_counter() - began


class Sink(ForgeActor):
    @endpoint
    async def take(self, state: dict) -> int:
        return len(state)


STEP_TIMEOUT_S = 300


async def bounded(awaitable, what: str):
    """Await ``awaitable``; TimeoutError naming ``what`` after STEP_TIMEOUT_S
    (a lost message would otherwise leave the benchmark waiting forever)."""
    async def wait():
        return await awaitable

    try:
        return await asyncio.wait_for(wait(), STEP_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what}: no answer in {STEP_TIMEOUT_S} s") from None


async def one_round(publisher, policy, store, version: int, replicas: int) -> tuple[float, float]:
    """(publish s, publish + all ``replicas`` loaded s)."""
    began = time.perf_counter()
    publish_s = await bounded(publisher.publish.call_one(store, version), f"publish v{version}")
    if replicas == 1:
        await bounded(policy.update_weights.route(version), f"update_weights.route({version})")
    else:
        await bounded(policy.update_weights.fanout(version), f"update_weights.fanout({version})")
    return publish_s, time.perf_counter() - began


async def measure_model(name: str, model: str, rounds: int, paths: list[str]) -> dict:
    engine = {"backend": "transformers", "model": model, "dtype": "bfloat16" if name != "shipped" else "auto"}
    sampling = {"n": 1, "temperature": 0.0, "max_tokens": 4}
    here = await Publisher.options(on_hosts="host1").as_actor(model)
    there = await Publisher.options(on_hosts="host0").as_actor(model)
    sink = await Sink.options(on_hosts="host1").as_actor()
    server = await WeightServer.options(on_hosts="host0").as_actor(keep_last=2)
    stores = {"folder": (here, WeightStore(keep_last=2)),
              "actor": (there, ActorWeightStore(server, keep_last=2))}
    stores = {kind: stores[kind] for kind in paths}
    size = await there.nbytes.call_one()
    print(f"{name}: {size / 1e6:.1f} MB; starting {REPLICAS} replicas for each of {paths}", flush=True)
    began = time.perf_counter()
    policies = {
        kind: await Policy.options(num_replicas=REPLICAS, on_hosts="host1").as_service(
            engine_config=engine, sampling_config=sampling, weight_store=store)
        for kind, (_, store) in stores.items()
    }
    print(f"  services up in {time.perf_counter() - began:.0f} s", flush=True)
    for publisher in (here, there):
        await bounded(publisher.hello.call_one(sink), "hello")
    samples: dict[str, list[float]] = {}
    try:
        version = 0
        # A warm-up round, not counted: the first message between two
        # processes also opens their connection.
        for _ in range(-1, rounds):
            samples.setdefault("raw", []).append(await bounded(there.send_raw.call_one(sink), "raw copy"))
            samples.setdefault("raw_one_host", []).append(
                await bounded(here.send_raw.call_one(sink), "raw copy on host1"))
            for replicas in (1, REPLICAS):
                for kind, (publisher, store) in stores.items():
                    version += 1
                    publish_s, total_s = await one_round(publisher, policies[kind], store, version, replicas)
                    samples.setdefault(f"{kind}_{replicas}", []).append(total_s)
                    samples.setdefault(f"{kind}_{replicas}_publish", []).append(publish_s)
            if _ < 0:
                samples = {}
                continue
            print(f"  round {_ + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()
                                                          if not k.endswith("publish")), flush=True)
    finally:
        for policy in policies.values():
            await policy.shutdown()
        for handle in (here, there, sink):
            await ForgeActor.shutdown(handle)
        await WeightServer.shutdown(server)
        for _, store in stores.values():
            await store.aclose()
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {"model": name, "mb": size / 1e6, "rounds": rounds, "median_s": medians, "samples_s": samples}


def table(results: list[dict], mode: str) -> str:
    lines = [f"hosts: {mode}",
             f"{'model':<12} {'MB':>7}  {'path':<26} {'1 replica':>16} {'4 replicas':>16} {'4/1':>5} "
             f"{'vs raw':>7} {'publish':>8}"]
    for r in results:
        m, mb = r["median_s"], r["mb"]
        lines.append(f"{r['model']:<12} {mb:7.1f}  {'raw copy host0->host1':<26} "
                     f"{m['raw']:7.3f} s {mb / m['raw']:5.0f} MB/s")
        lines.append(f"{'':<12} {'':>7}  {'raw copy on host1':<26} "
                     f"{m['raw_one_host']:7.3f} s {mb / m['raw_one_host']:5.0f} MB/s")
        for kind, label, raw in (("folder", "one host, folder", m["raw_one_host"]),
                                 ("actor", "across hosts, actor", m["raw"])):
            if f"{kind}_1" not in m:
                continue
            one, four = m[f"{kind}_1"], m[f"{kind}_{REPLICAS}"]
            lines.append(
                f"{'':<12} {'':>7}  {label:<26} {one:7.3f} s {mb / one:5.0f} MB/s "
                f"{four:7.3f} s {mb / four:5.0f} MB/s {four / one:5.2f} {raw / one:6.0%} "
                f"{m[f'{kind}_1_publish']:6.3f} s"
            )
    lines.append("vs raw: the 1-replica rate as a share of the raw copy's between the same hosts "
                 "(target across hosts >= 70%); 4/1: target <= 2; publish: of the 1-replica time, "
                 "the publisher's aput (to the folder, or packed in its own memory)")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="shipped,random", help="shipped, random (comma-separated)")
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES), help="the random model's shape")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="folder,actor", help="folder, actor (comma-separated)")
    args = parser.parse_args()

    paths = args.paths.split(",")
    hosts = LocalHosts(2).start()
    work = tempfile.mkdtemp(prefix="fl_bench_weights_")
    results = []
    try:
        await forge_lite.attach_cluster(hosts.addresses, client_address=hosts.client_address)
        for name in args.models.split(","):
            if name == "shipped":
                results.append(await measure_model("shipped", DEFAULT_MODEL, args.rounds, paths))
            else:
                began = time.perf_counter()
                model = build_random_model(args.shape, work)
                print(f"built a random {args.shape} model in {time.perf_counter() - began:.0f} s", flush=True)
                results.append(await measure_model(args.shape, model, args.rounds, paths))
        await forge_lite.detach_cluster()
    finally:
        hosts.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results, hosts.mode))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"hosts": hosts.mode, "machine": platform.platform(),
                                   "cpus": __import__("os").cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
