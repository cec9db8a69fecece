"""What the service layer costs, and what it buys, measured side by side.

    python benchmarks/services.py            # about a minute on 2 cores

1. Overhead: ``route()`` on a one-replica service against a raw Monarch
   ``call_one``, on the replica's own actor (same process: only the service
   layer differs) and on an ``as_actor`` of the same class (its own process).
   Sequential latency (rounds interleaved, so machine noise hits all alike)
   and throughput with 256 concurrent callers. Targets: median route/raw
   <= 1.10, throughput route/raw >= 0.80.
2. Scaling: an endpoint that holds its replica for 20 ms (``time.sleep``),
   64 concurrent callers, 1/2/4/8 replicas; efficiency against linear.
3. Failover: SIGKILL a replica under load; time to the first retried request
   that succeeds and to the replica being HEALTHY again; then the same with
   a single replica, where requests in flight wait for the respawn.

Prints a table and writes ``benchmarks/results/services.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import forge_lite  # noqa: F401  (before monarch)
from monarch.actor import endpoint

from forge_lite.controller import ForgeActor
from forge_lite.controller.service.events import (
    ReplicaStateChanged,
    RequestFinished,
    RequestRetried,
)

# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "services.json"
HOLD_S = 0.020  # how long the scaling endpoint keeps its replica busy


class Bench(ForgeActor):
    @endpoint
    async def noop(self) -> None:
        return None

    @endpoint
    def hold(self, seconds: float) -> None:
        # Blocks the actor, as a model forward pass would: one request at a
        # time per replica, so throughput can only grow with replicas.
        time.sleep(seconds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- 1. overhead


async def timed_calls(call, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    return latencies


async def throughput(call, callers: int, calls_each: int) -> float:
    async def caller():
        for _ in range(calls_each):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return callers * calls_each / (time.perf_counter() - start)


async def measure_overhead(args) -> dict:
    service = await Bench.options(num_replicas=1, max_concurrent_requests=1024).as_service()
    actor = await Bench.as_actor()
    modes = {
        "route": service.noop.route,
        # The replica's ActorMesh (internal): the very actor route() calls.
        # Two processes on a loaded 2-core machine can differ by 20 % on
        # their own, so this is the comparison that isolates the service.
        "raw": service.replicas[0].mesh.noop.call_one,
        "as_actor": actor.noop.call_one,
    }
    names = list(modes)

    def rotated(r: int) -> list[str]:
        # Change which mode goes first each round, so none always runs warmer.
        return names[r % len(names):] + names[: r % len(names)]

    try:
        for call in modes.values():
            await timed_calls(call, args.warmup)
        latencies: dict[str, list[float]] = {m: [] for m in modes}
        per_round = args.sequential // args.rounds
        for r in range(args.rounds):
            for mode in rotated(r):
                latencies[mode] += await timed_calls(modes[mode], per_round)

        rates: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.throughput_rounds):
            for mode in rotated(r):
                rates[mode].append(await throughput(modes[mode], args.callers, args.calls_per_caller))
    finally:
        await service.shutdown()
        await Bench.shutdown(actor)

    result = {}
    for mode in modes:
        result[mode] = {
            "median_us": statistics.median(latencies[mode]) * 1e6,
            "p99_us": percentile(latencies[mode], 0.99) * 1e6,
            "calls": len(latencies[mode]),
            "throughput_per_s": statistics.median(rates[mode]),
            "throughput_rounds": rates[mode],
        }
    for base in ("raw", "as_actor"):
        suffix = "" if base == "raw" else "_vs_as_actor"
        result["median_ratio" + suffix] = result["route"]["median_us"] / result[base]["median_us"]
        result["p99_ratio" + suffix] = result["route"]["p99_us"] / result[base]["p99_us"]
        result["throughput_ratio" + suffix] = (
            result["route"]["throughput_per_s"] / result[base]["throughput_per_s"]
        )
    result["callers"] = args.callers
    return result


# ---------------------------------------------------------------- 2. scaling


async def measure_scaling(args) -> list[dict]:
    rows = []
    for replicas in args.replicas:
        service = await Bench.options(num_replicas=replicas).as_service()
        try:
            await service.hold.fanout(HOLD_S)  # every replica warm
            per_caller = max(2, int(args.scaling_seconds * replicas / HOLD_S / args.scaling_callers))
            rate = await throughput(lambda: service.hold.route(HOLD_S), args.scaling_callers, per_caller)
        finally:
            await service.shutdown()
        rows.append({"replicas": replicas, "throughput_per_s": rate, "ideal_per_s": replicas / HOLD_S})
    base = rows[0]["throughput_per_s"] / rows[0]["replicas"]
    for row in rows:
        row["efficiency_vs_1"] = row["throughput_per_s"] / (base * row["replicas"])
        row["efficiency_vs_ideal"] = row["throughput_per_s"] / row["ideal_per_s"]
    return rows


# ---------------------------------------------------------------- 3. failover


async def one_failover(num_replicas: int, callers: int, victim: int) -> dict:
    """Kill ``victim`` while ``callers`` loop on route(); time what follows."""
    service = await Bench.options(num_replicas=num_replicas).as_service()
    events = []
    unsubscribe = service.events.subscribe(events.append)
    done = lost = 0
    running = True

    async def caller():
        nonlocal done, lost
        while running:
            try:
                await service.hold.route(0.005)
                done += 1
            except Exception:
                lost += 1

    load = [asyncio.create_task(caller()) for _ in range(callers)]
    try:
        await asyncio.sleep(0.5)  # steady state
        killed_at = time.time()
        await service.kill_replica(victim)
        await service.wait_for_state(victim, "FAILED", timeout=60)
        await service.wait_for_state(victim, "HEALTHY", timeout=60)
        await asyncio.sleep(0.3)  # a little traffic on the respawned replica
    finally:
        running = False
        await asyncio.gather(*load)
        unsubscribe()
        await service.shutdown()

    retried = {e.request_id for e in events if isinstance(e, RequestRetried)}
    first_retry_ok = min(
        (e.time for e in events if isinstance(e, RequestFinished) and e.ok and e.request_id in retried),
        default=None,
    )

    def first_state(state: str) -> float:
        return min(
            e.time for e in events
            if isinstance(e, ReplicaStateChanged) and e.replica == victim and e.new == state and e.time >= killed_at
        )

    return {
        "replicas": num_replicas,
        "detected_s": first_state("FAILED") - killed_at,
        "first_retry_ok_s": None if first_retry_ok is None else first_retry_ok - killed_at,
        "healthy_s": first_state("HEALTHY") - killed_at,
        "retried_requests": len(retried),
        "requests_done": done,
        "requests_lost": lost,
    }


async def measure_failover(args) -> list[dict]:
    runs = []
    for num_replicas in (3, 1):
        for _ in range(args.failover_repeats):
            runs.append(await one_failover(num_replicas, callers=16, victim=num_replicas - 1))
    return runs


# ---------------------------------------------------------------- report


def summarize_failover(runs: list[dict]) -> list[dict]:
    rows = []
    for num_replicas in sorted({r["replicas"] for r in runs}, reverse=True):
        mine = [r for r in runs if r["replicas"] == num_replicas]
        ok = [r["first_retry_ok_s"] for r in mine if r["first_retry_ok_s"] is not None]
        rows.append({
            "replicas": num_replicas,
            "runs": len(mine),
            "detected_s": statistics.median(r["detected_s"] for r in mine),
            "first_retry_ok_s": statistics.median(ok) if ok else None,
            "healthy_s": statistics.median(r["healthy_s"] for r in mine),
            "retried": sum(r["retried_requests"] for r in mine),
            "done": sum(r["requests_done"] for r in mine),
            "lost": sum(r["requests_lost"] for r in mine),
        })
    return rows


def print_report(overhead: dict, scaling: list[dict], failover: list[dict]) -> None:
    print("\n1. route() vs raw Monarch call_one (no-op endpoint, 1 replica)")
    print("   raw = call_one on the replica's own actor; as_actor = call_one on an as_actor() of the class")
    print(f"   {'':28}{'route':>9}{'raw':>9}{'as_actor':>10}{'route/raw':>11}{'route/as_actor':>16}  target")
    concurrent = f"{overhead['callers']} callers (calls/s)"
    for label, key, ratio, target in (
        ("sequential median (us)", "median_us", "median_ratio", "<= 1.10"),
        ("sequential p99 (us)", "p99_us", "p99_ratio", ""),
        (concurrent, "throughput_per_s", "throughput_ratio", ">= 0.80"),
    ):
        values = "".join(f"{overhead[m][key]:{w}.0f}" for m, w in (("route", 9), ("raw", 9), ("as_actor", 10)))
        line = f"   {label:28}{values}{overhead[ratio]:11.2f}{overhead[ratio + '_vs_as_actor']:16.2f}  {target}"
        print(line.rstrip())

    print(f"\n2. scaling: endpoint holds its replica {HOLD_S * 1e3:.0f} ms, 64 callers")
    print(f"   {'replicas':>10}{'calls/s':>10}{'ideal':>10}{'vs 1 replica':>14}{'vs ideal':>10}")
    for row in scaling:
        print(f"   {row['replicas']:>10}{row['throughput_per_s']:10.0f}{row['ideal_per_s']:10.0f}"
              f"{row['efficiency_vs_1']:14.2f}{row['efficiency_vs_ideal']:10.2f}")

    print("\n3. failover: SIGKILL one replica under load (16 callers), seconds after the kill (median)")
    print(f"   {'replicas':>10}{'runs':>6}{'detected':>10}{'retry ok':>10}{'HEALTHY':>10}"
          f"{'retried':>9}{'served':>8}{'lost':>6}")
    for row in failover:
        retry_ok = "-" if row["first_retry_ok_s"] is None else f"{row['first_retry_ok_s']:.2f}"
        print(f"   {row['replicas']:>10}{row['runs']:>6}{row['detected_s']:10.2f}{retry_ok:>10}"
              f"{row['healthy_s']:10.2f}{row['retried']:>9}{row['done']:>8}{row['lost']:>6}")


async def main(args) -> None:
    overhead = await measure_overhead(args)
    scaling = await measure_scaling(args)
    failover_runs = await measure_failover(args)
    failover = summarize_failover(failover_runs)
    print_report(overhead, scaling, failover)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": vars(args),
        "overhead": overhead,
        "scaling": scaling,
        "failover": failover,
        "failover_runs": failover_runs,
    }, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sequential", type=int, default=1000, help="calls per mode, sequential")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds for the sequential calls")
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--calls-per-caller", type=int, default=20)
    parser.add_argument("--throughput-rounds", type=int, default=4)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--scaling-callers", type=int, default=64)
    parser.add_argument("--scaling-seconds", type=float, default=2.0, help="about how long each scaling run lasts")
    parser.add_argument("--failover-repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
