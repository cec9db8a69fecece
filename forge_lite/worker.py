"""A Monarch worker: what makes a machine a host of a forge_lite cluster.

On each node, in the environment the kit is installed in:

    python -m forge_lite.worker --address tcp://0.0.0.0:26600

then, in the notebook, ``await forge_lite.attach_cluster(["tcp://NODE:26600", ...])``.
The worker waits for a client; when its client goes away it drops that
client's processes and waits for the next one.

Monarch 0.7.0 does not implement TLS: whoever reaches this port can run code
on this machine. Run workers only on a trusted network.

To play a cluster of several hosts on one machine (notebook 05, the tests,
the benchmarks), ``forge_lite.local_hosts.LocalHosts`` starts such workers
here; notebooks import it as ``from forge_lite import LocalHosts`` (this
module re-exports it too, for older code).
"""

from __future__ import annotations

import argparse
import os
import socket

from forge_lite.controller import runtime
from forge_lite.local_hosts import READY, LocalHosts, WorkerProcess, free_port

__all__ = ["DEFAULT_PORT", "READY", "LocalHosts", "WorkerProcess", "free_port", "main", "monarch_address"]

DEFAULT_PORT = 26600


def monarch_address(address: str, advertise: str | None = None) -> str:
    """The address to serve on, as Monarch wants it.

    ``tcp://0.0.0.0:PORT`` listens on every interface, but clients must be
    told a reachable one: it becomes ``tcp://ADVERTISED:PORT@tcp://0.0.0.0:PORT``
    (Monarch's "bind here, advertise there"). ``advertise`` defaults to this
    machine's address on its default route.
    """
    if not address.startswith("tcp://"):
        raise ValueError(f"--address {address!r}: expected tcp://HOST:PORT, e.g. tcp://0.0.0.0:{DEFAULT_PORT}")
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not port.isdigit() or not host:
        raise ValueError(f"--address {address!r}: expected tcp://HOST:PORT, e.g. tcp://0.0.0.0:{DEFAULT_PORT}")
    if host in ("0.0.0.0", "*"):
        public = advertise or _primary_address()
        return f"tcp://{public}:{port}@tcp://0.0.0.0:{port}"
    return address


def _primary_address() -> str:
    """This machine's address on its default route (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m forge_lite.worker",
        description="Serve this machine as a host of a forge_lite cluster (trusted networks only: no TLS).",
    )
    parser.add_argument("--address", default=f"tcp://0.0.0.0:{DEFAULT_PORT}",
                        help=f"tcp://HOST:PORT to listen on (default tcp://0.0.0.0:{DEFAULT_PORT})")
    parser.add_argument("--advertise", default=None,
                        help="with a 0.0.0.0 address: the host name or IP clients reach this machine at")
    args = parser.parse_args(argv)
    serve = monarch_address(args.address, args.advertise)

    # This process and every process it starts are the kit's workers, not a
    # client: they keep Monarch's own fault handling. Run as `python -m
    # forge_lite.worker`, the package import already said so (runtime.py);
    # set here too for a main() called from Python, so the processes it starts
    # inherit it.
    os.environ[runtime.WORKER_ENV] = "1"
    from monarch.actor import start_worker_loop_forever

    from forge_lite.controller.cluster.agent import host_facts

    running = start_worker_loop_forever(ca="trust_all_connections", address=serve)
    facts = host_facts()
    reach = serve.split("@", 1)[0]
    print(f"{READY}: {reach} (forge_lite {facts['forge_lite']}, torchmonarch {facts['monarch']}, "
          f"{facts['cpus']} CPUs, {len(facts['gpus'])} GPUs). No TLS: trusted networks only.", flush=True)
    print(f"attach with: await forge_lite.attach_cluster([\"{reach}\", ...])", flush=True)
    running.get()


if __name__ == "__main__":
    main()
