"""Worker addresses, and how this process reaches the workers.

One idea: everything about an address before and around attaching it. An
address must be ``tcp://HOST:PORT`` (``host_port``); something must listen
there (``accepts_connections``: a plain TCP connect, so an address where
nothing listens is named at once); and one worker must not be
attached twice under two spellings (``refuse_same_endpoint`` before
attaching, by IP and port after name resolution; ``refuse_same_worker``
after, by the worker's own pid), or "two hosts" would be one machine whose
replicas die together. Last, this process must be reachable from the
workers: Monarch's default Unix sockets reach only this machine, so for a
remote worker ``choose_transport`` switches Monarch to TCP, once, before
its client starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Sequence

import psutil

from forge_lite.controller import runtime
from forge_lite.controller.cluster.hosts import Host, strip_scheme
from forge_lite.controller.errors import ClusterError


async def accepts_connections(address: str, timeout: float) -> bool:
    """Does something listen at ``tcp://HOST:PORT`` (checked with a plain TCP connect)?"""
    host, port = host_port(address)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def host_port(address: str) -> tuple[str, int]:
    """``tcp://10.0.0.2:26600`` -> ``("10.0.0.2", 26600)``; ValueError otherwise."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise ValueError(f"worker address {address!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.2:26600")
    where = strip_scheme(address)
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker address {address!r}: expected tcp://HOST:PORT, e.g. tcp://10.0.0.2:26600")
    return host.strip("[]"), int(port)


def _endpoint(address: str) -> tuple[str, int]:
    """Where ``tcp://HOST:PORT`` connects: (IP, port) after name resolution,
    with IPv4 written one way (``localhost``, ``127.1`` and ``127.0.0.1`` are
    one endpoint). On this machine, a port that one socket listens on for
    every address (a worker started with ``tcp://0.0.0.0:PORT``) is one
    endpoint however it is reached: ``("this machine", PORT)``."""
    host, port = host_port(address)
    try:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, ValueError, IndexError):
        return host, port  # unresolvable: attaching will say so
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if _is_local(ip) and port in _wildcard_listeners():
        return "this machine", port
    return str(ip), port


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Is ``ip`` an address of this machine (in this network namespace)?"""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))  # only an address this machine has can be bound
        return True
    except OSError:
        return False


def _wildcard_listeners() -> set[int]:
    """TCP ports this machine listens on for every address (0.0.0.0 or ::).
    Read from the kernel's socket table, which any user may read."""
    try:
        listening = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return set()
    return {c.laddr.port for c in listening
            if c.status == psutil.CONN_LISTEN and c.laddr and ipaddress.ip_address(c.laddr.ip).is_unspecified}


def refuse_same_endpoint(addresses: Sequence[str]) -> None:
    """ClusterError when two addresses resolve to the same IP and port: one
    worker would be attached as two hosts, and everything placed "on two
    hosts" would share one machine's memory and die together."""
    seen: dict[tuple[str, int], str] = {}
    for address in addresses:
        endpoint = _endpoint(address)
        if endpoint in seen:
            ip, port = endpoint
            where = f"{ip}:{port} after name resolution" if ip != "this machine" else \
                f"one worker listens on port {port} of this machine for every address"
            raise ClusterError(f"{seen[endpoint]} and {address} are the same worker ({where}): attach each worker once")
        seen[endpoint] = address


def refuse_same_worker(hosts: Sequence[Host]) -> None:
    """ClusterError when two attached hosts are one worker process (same boot
    of the same machine, same pid): addresses that resolve differently but
    reach one worker, e.g. ``127.0.0.1`` and this machine's own IP for a worker
    listening on ``0.0.0.0``."""
    seen: dict[tuple, str] = {}
    for host in hosts:
        facts = host.facts or {}
        if host.address is None or facts.get("worker_pid") is None:
            continue
        key = (facts.get("boot_id"), facts.get("hostname"), facts["worker_pid"])
        if key in seen:
            raise ClusterError(
                f"{seen[key]} and {host.address} are the same worker (pid {facts['worker_pid']} on "
                f"{facts.get('hostname')}): attach each worker once"
            )
        seen[key] = host.address


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _address_towards(host: str) -> str:
    """This machine's IP address on the route to ``host`` (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


_transport: str | None = None


def choose_transport(addresses: Sequence[str], client_address: str | None) -> None:
    """Make this process reachable from the workers' processes.

    Monarch talks over Unix sockets by default: fine for workers on this
    machine (loopback addresses), unreachable from any other. For those it
    must use TCP, on an address the workers can reach, and Monarch fixes
    that at its first call in a process.
    """
    global _transport
    remote = [h for h, _ in map(host_port, addresses) if not _is_loopback(h)]
    if not remote and client_address is None:
        return
    wanted = client_address or f"tcp://{_address_towards(remote[0])}:0"
    if _transport is not None:
        return  # chosen by an earlier attach: one transport per process
    import monarch.actor

    started = ClusterError(
        "this process already started Monarch over Unix sockets, which other machines "
        "cannot reach. Attach the cluster before anything is spawned: restart the kernel "
        "(or start a fresh script), import forge_lite, then `await forge_lite.attach_cluster(...)` first."
    )
    if runtime.client_started():
        raise started
    try:
        monarch.actor.enable_transport(wanted)
    except RuntimeError as e:  # raw Monarch used before the kit
        raise started from e
    _transport = wanted
