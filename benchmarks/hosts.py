"""What crossing hosts costs, and how fast a lost host is survived, side by side.

    sudo python benchmarks/hosts.py      # about a minute on 2 cores (as root: namespaces)

The hosts are ``forge_lite.worker.LocalHosts``: as root, workers in their own
network namespaces (a real network hop, a real partition); otherwise workers
on loopback ports (then "remote" means another worker process, and a frozen
host stands in for a cut link). The table says which ran.

1. Overhead: ``route()`` on a one-replica service against raw Monarch
   ``call_one`` on that replica's own actor, with the replica on this host
   and on another host. Sequential latency (rounds interleaved, so machine
   noise hits all alike) and throughput with 256 concurrent callers.
   Target: route/raw <= 1.10 on either placement (and throughput >= 0.90).
2. A lost host: two replicas on two hosts, 32 callers looping on
   ``route()``; one host is SIGKILLed (worker and processes), or its link is
   cut. Seconds from then to the service knowing (host LOST), to the first
   retried request that succeeds, and to the replacement replica HEALTHY;
   requests lost. Target: first retried request <= 3 s, 0 lost. (Monarch
   alone lets such calls hang 40-70 s: ``--monarch-alone`` measures it.)

Prints a table and writes ``benchmarks/results/hosts.json``.
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
    HostStateChanged,
    ReplicaStateChanged,
    RequestFinished,
    RequestRetried,
)
from forge_lite.worker import LocalHosts
# The same latency and throughput measures as the single-host benchmark.
from services import percentile, throughput, timed_calls  # noqa: E402  (benchmarks/services.py)

# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "hosts.json"


class Bench(ForgeActor):
    @endpoint
    async def noop(self) -> None:
        return None

    @endpoint
    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)




# ---------------------------------------------------------------- 1. overhead


async def measure_overhead(args, hosts: LocalHosts) -> dict:
    # host0 is this machine, host1 the first LocalHost: the first service
    # goes to the least-occupied host (host0), the second to host1.
    cluster = await forge_lite.attach_cluster(hosts.addresses[:1], include_this_host=True,
                                              client_address=hosts.client_address)
    here = await Bench.options(max_concurrent_requests=1024).as_service()
    there = await Bench.options(max_concurrent_requests=1024).as_service()
    assert here.replicas[0].host == "host0" and there.replicas[0].host == "host1", cluster.table()
    modes = {
        "route_here": here.noop.route,
        "raw_here": here.replicas[0].mesh.noop.call_one,
        "route_there": there.noop.route,
        "raw_there": there.replicas[0].mesh.noop.call_one,
    }
    names = list(modes)
    try:
        for call in modes.values():
            await timed_calls(call, args.warmup)
        latencies: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in names[r % 4:] + names[:r % 4]:  # who goes first changes every round
                latencies[mode] += await timed_calls(modes[mode], args.sequential // args.rounds)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.throughput_rounds):
            for mode in names[r % 4:] + names[:r % 4]:
                rates[mode].append(await throughput(modes[mode], args.callers, args.calls_per_caller))
    finally:
        await here.shutdown()
        await there.shutdown()
        await forge_lite.detach_cluster()
    result = {mode: {
        "median_us": statistics.median(latencies[mode]) * 1e6,
        "p99_us": percentile(latencies[mode], 0.99) * 1e6,
        "throughput_per_s": statistics.median(rates[mode]),
    } for mode in modes}
    for where in ("here", "there"):
        route, raw = result[f"route_{where}"], result[f"raw_{where}"]
        result[f"median_ratio_{where}"] = route["median_us"] / raw["median_us"]
        result[f"throughput_ratio_{where}"] = route["throughput_per_s"] / raw["throughput_per_s"]
    result["network_cost_raw"] = result["raw_there"]["median_us"] / result["raw_here"]["median_us"]
    return result


# ---------------------------------------------------------------- 2. a lost host


async def one_loss(hosts: LocalHosts, pair: tuple[int, int], how: str, callers: int) -> dict:
    """Lose the second host of ``pair`` (``how``: "kill" or "cut") under load."""
    await forge_lite.attach_cluster([hosts.addresses[i] for i in pair], client_address=hosts.client_address)
    service = await Bench.options(num_replicas=2).as_service()
    victim = next(r for r in service.replicas if r.host == "host1")
    events: list = []
    unsubscribe = service.events.subscribe(events.append)
    done = lost = 0
    running = True

    async def caller():
        nonlocal done, lost
        while running:
            try:
                await service.hold.route(0.002)
                done += 1
            except Exception:
                lost += 1

    load = [asyncio.create_task(caller()) for _ in range(callers)]
    back_s = None
    try:
        await asyncio.sleep(1.0)  # steady state
        lost_at = time.time()
        (hosts.kill if how == "kill" else hosts.cut)(pair[1])
        await service.service.wait_for_host(1, "LOST", timeout=30)
        await service.wait_for_state(victim.index, "HEALTHY", timeout=60)
        await asyncio.sleep(0.5)
        if how == "cut":  # the link comes back: time until the replica is home again
            healed_at = time.time()
            hosts.heal(pair[1])
            await service.service.wait_for_host(1, "UP", timeout=60)
            deadline = time.monotonic() + 60
            while not (victim.host == "host1" and victim.accepting) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            back_s = time.time() - healed_at
    finally:
        running = False
        await asyncio.gather(*load)
        unsubscribe()
        await service.shutdown()
        await forge_lite.detach_cluster()

    retried = {e.request_id for e in events if isinstance(e, RequestRetried)}
    first_retry_ok = min((e.time for e in events if isinstance(e, RequestFinished) and e.ok
                          and e.request_id in retried), default=None)

    def first(kind, **match) -> float | None:
        times = [e.time for e in events if isinstance(e, kind) and e.time >= lost_at
                 and all(getattr(e, k) == v for k, v in match.items())]
        return min(times) - lost_at if times else None

    return {
        "how": how,
        "noticed_s": first(HostStateChanged, host="host1", new="LOST"),
        "first_retry_ok_s": None if first_retry_ok is None else first_retry_ok - lost_at,
        "healthy_s": first(ReplicaStateChanged, replica=victim.index, new="HEALTHY"),
        "home_again_after_heal_s": back_s,
        "retried": len(retried),
        "done": done,
        "lost": lost,
    }


async def monarch_alone(hosts: LocalHosts, index: int) -> float:
    """Seconds until a raw Monarch call to a killed host fails (no deadline)."""
    await forge_lite.attach_cluster([hosts.addresses[index]], client_address=hosts.client_address)
    actor = await Bench.as_actor()
    try:
        await actor.noop.call_one()
        hosts.kill(index)
        start = time.time()
        try:
            await asyncio.wait_for(actor.noop.call_one().as_asyncio(), 180)
        except Exception:
            pass
        return time.time() - start
    finally:
        await Bench.shutdown(actor)
        await forge_lite.detach_cluster()


# ---------------------------------------------------------------- report


def print_report(mode: str, overhead: dict, losses: list[dict], alone: float | None) -> None:
    print(f"\nhosts: {mode}")
    print("\n1. route() vs raw Monarch call_one on the same replica (no-op endpoint)")
    print(f"   {'':26}{'here':>10}{'there':>10}    (here: this machine; there: another host)")
    for label, key in (("route median (us)", "median_us"), ("raw median (us)", "median_us"),
                       ("route p99 (us)", "p99_us"), ("raw p99 (us)", "p99_us")):
        kind = label.split()[0]
        print(f"   {label:26}{overhead[f'{kind}_here'][key]:10.0f}{overhead[f'{kind}_there'][key]:10.0f}")
    for label, key in (("route calls/s (256 callers)", "throughput_per_s"), ("raw calls/s (256 callers)", "throughput_per_s")):
        kind = label.split()[0]
        print(f"   {label:26}{overhead[f'{kind}_here'][key]:10.0f}{overhead[f'{kind}_there'][key]:10.0f}")
    print(f"   {'median route/raw':26}{overhead['median_ratio_here']:10.2f}{overhead['median_ratio_there']:10.2f}"
          "    target <= 1.10")
    print(f"   {'throughput route/raw':26}{overhead['throughput_ratio_here']:10.2f}"
          f"{overhead['throughput_ratio_there']:10.2f}    target >= 0.90")
    print(f"   the network hop alone (raw there / raw here): {overhead['network_cost_raw']:.2f}x")

    print("\n2. a lost host under load (32 callers), seconds after the kill / the cut")
    print(f"   {'':8}{'LOST':>8}{'retry ok':>10}{'HEALTHY':>9}{'home again':>12}{'retried':>9}{'served':>8}{'lost':>6}")
    for row in losses:
        def f(key):
            return "-" if row[key] is None else f"{row[key]:.2f}"
        print(f"   {row['how']:8}{f('noticed_s'):>8}{f('first_retry_ok_s'):>10}{f('healthy_s'):>9}"
              f"{f('home_again_after_heal_s'):>12}{row['retried']:>9}{row['done']:>8}{row['lost']:>6}")
    print("   target: retry ok <= 3 s, lost 0   (home again: after the link is back)")
    if alone is not None:
        print(f"   Monarch alone: a call to the killed host failed after {alone:.1f} s")


async def main(args) -> None:
    hosts = LocalHosts(5 if args.monarch_alone else 4).start()
    try:
        overhead = await measure_overhead(args, hosts)
        losses = [await one_loss(hosts, (1, 2), "kill", args.loss_callers),
                  await one_loss(hosts, (1, 3), "cut", args.loss_callers)]
        alone = await monarch_alone(hosts, 4) if args.monarch_alone else None
    finally:
        hosts.stop()
    print_report(hosts.mode, overhead, losses, alone)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "hosts": hosts.mode,
        "settings": vars(args),
        "overhead": overhead,
        "losses": losses,
        "monarch_alone_s": alone,
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
    parser.add_argument("--loss-callers", type=int, default=32)
    parser.add_argument("--monarch-alone", action="store_true",
                        help="also time a raw Monarch call to a killed host (adds about a minute)")
    asyncio.run(main(parser.parse_args()))
