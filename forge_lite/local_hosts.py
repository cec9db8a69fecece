"""Hosts on this machine: a cluster to try things on, without other machines.

One idea: ``LocalHosts`` starts ``count`` Monarch workers here (``python -m
forge_lite.worker``, each a ``WorkerProcess``), each a host of its own: on a
loopback port for anyone, or, as root, in its own network namespace with its
own address and link. Then a host can be killed (the machine is gone), cut
off (its link goes down, or it is frozen) and healed, so notebook 05, the
tests and the benchmarks can watch a cluster lose and regain machines.

It is a harness around the worker command line (``forge_lite/worker.py``),
not part of it: a real node runs only that command.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forge_lite.paths import private_temp_dir

# The line ``python -m forge_lite.worker`` prints once it serves: a worker
# started here is ready when its log has it (and its port accepts).
READY = "forge_lite worker ready"


class WorkerProcess:
    """One worker started by this process (``start``); ``kill`` ends it like a lost machine.

    ``prefix`` runs the worker under another command, e.g. ``["ip", "netns",
    "exec", "ns1"]`` for a host with its own network stack.
    """

    def __init__(self, address: str, prefix: list[str] | None = None, log_path: str | None = None):
        self.address = address
        self.prefix = list(prefix or [])
        self._own_log = log_path is None  # a log the kit named goes when this process exits
        if log_path is None:
            # A fresh file in this user's private folder (0700): no other user
            # can read the log, or put a file or a symlink at its name first.
            fd, log_path = tempfile.mkstemp(prefix="worker_", suffix=".log", dir=private_temp_dir())
            os.close(fd)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "WorkerProcess":
        """Start it and wait until it serves; RuntimeError (with its log) if it does not."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process; ``wait_ready`` waits until it serves."""
        command = [*self.prefix, sys.executable, "-m", "forge_lite.worker", "--address", self.address]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the notebook is not meant for it
        )
        log.close()
        _started.append(self)

    def wait_ready(self, timeout: float = 60.0) -> "WorkerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The worker prints READY a moment before Monarch listens on its
            # port (seen on a busy machine: a connect right after READY was
            # refused, and an attach then failed): ready means both.
            if READY in Path(self.log_path).read_text(errors="replace") and self._listens():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        output = Path(self.log_path).read_text(errors="replace")[-2000:]
        self.kill()
        raise RuntimeError(f"the worker at {self.address} did not start:\n{output}")

    def _listens(self) -> bool:
        host, _, port = self.address[len("tcp://"):].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return True
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def children(self) -> list[int]:
        """Pids of the processes this worker started (replicas, agents)."""
        import psutil

        if not self.alive:
            return []
        try:
            return [c.pid for c in psutil.Process(self._worker_pid()).children(recursive=True)
                    if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def _worker_pid(self) -> int:
        # Under a prefix (`ip netns exec`) the command execs the worker, same pid.
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the worker and every process it started: the host is gone."""
        import psutil

        if self.process is None:
            return
        try:
            worker = psutil.Process(self._worker_pid())
            victims = worker.children(recursive=True) + [worker]
        except psutil.NoSuchProcess:
            victims = []
        for victim in victims:
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class LocalHosts:
    """``count`` hosts on this machine, each one worker: a cluster to try things on.

    Two kinds of host:
    - loopback (anyone): workers on ports of 127.0.0.1. A frozen host (its
      processes stopped with SIGSTOP) stands in for a cut network link.
    - network namespaces (root, with Debian's ``iproute2``): each worker in
      its own network namespace, joined to this one by a veth pair, so it has
      its own address, and ``cut`` takes its link down: a real partition.

    Args:
        count: how many hosts.
        namespaces: True for namespaces, False for loopback, None (default)
            for namespaces where they can be made.

    Example:
        >>> hosts = LocalHosts(3, namespaces=False).start()
        >>> cluster = await forge_lite.attach_cluster(hosts.addresses, client_address=hosts.client_address)
        >>> hosts.kill(1)                      # host1 is gone, as if unplugged
        >>> await forge_lite.detach_cluster(); hosts.stop()
    """

    def __init__(self, count: int = 2, namespaces: bool | None = None):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.count = count
        self.namespaces = can_make_namespaces() if namespaces is None else namespaces
        # The pid, and a random part: a namespace left by a killed process
        # whose pid comes round again must not be taken for this one's.
        # (veth names stay within Linux's 15 characters: flv<tag>x<i>.)
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.subnet = _free_subnet() if self.namespaces else None  # "10.N": the hosts' addresses
        self._ns = [f"fl{tag}h{i}" for i in range(count)]
        self._veth = [f"flv{tag}x{i}" for i in range(count)]
        self._made: list[str] = []  # namespaces and addresses to take down in stop()
        self.frozen: set[int] = set()
        self.workers: list[WorkerProcess] = []
        if self.namespaces:
            # This process's own address sits on the loopback interface, so
            # cutting any host's link leaves the others able to reach it.
            self.client_address: str | None = f"tcp://{self.subnet}.250.1:0"
            self.mode = f"network namespaces ({count} hosts, each with its own address and link)"
        else:
            self.client_address = None
            self.mode = f"loopback ({count} workers on 127.0.0.1; a frozen host stands in for a cut link)"

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def start(self) -> "LocalHosts":
        """Make the namespaces (if any) and start every worker; RuntimeError if one does not start."""
        atexit.register(self.stop)  # even when the caller forgets, or fails half-way
        if self.namespaces:
            self._make_namespaces()
        self.workers = [self._new_worker(i) for i in range(self.count)]
        for worker in self.workers:  # all at once: each takes a second or so
            worker.launch()
        for worker in self.workers:
            worker.wait_ready()
        return self

    def _make_namespaces(self) -> None:
        _ip("addr", "add", f"{self.subnet}.250.1/32", "dev", "lo")
        self._made.append("lo-address")
        # Hosts reach each other too (the ranks of a trainer over two hosts
        # meet at host 0), through this namespace, which must forward
        # between their links as a router between machines does.
        if _IP_FORWARD.read_text().strip() != "1":
            _IP_FORWARD.write_text("1")
            self._made.append("ip-forward")
        for i, (ns, veth) in enumerate(zip(self._ns, self._veth)):
            peer = veth.replace("flv", "flp")
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("addr", "add", f"{self.subnet}.{i}.1/24", "dev", veth)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.subnet}.{i}.2/24", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{self.subnet}.{i}.1")

    def _new_worker(self, i: int) -> WorkerProcess:
        if self.namespaces:
            return WorkerProcess(f"tcp://{self.subnet}.{i}.2:{free_port()}", prefix=["ip", "netns", "exec", self._ns[i]])
        return WorkerProcess(f"tcp://127.0.0.1:{free_port()}")

    def processes(self, i: int) -> set[int]:
        """Every live process of host ``i`` but its worker."""
        if self.namespaces:
            out = subprocess.run(["ip", "netns", "pids", self._ns[i]], capture_output=True, text=True).stdout
            return {int(p) for p in out.split() if _alive(int(p))} - {self.workers[i].pid}
        return set(self.workers[i].children())

    def kill(self, i: int) -> None:
        """SIGKILL host ``i``'s worker and every process on it: the machine is gone."""
        self.workers[i].kill()

    def replace(self, i: int) -> WorkerProcess:
        """A fresh worker for host ``i``, on a new port; give it to ``cluster.replace_host``."""
        self.heal(i)
        self.workers[i].kill()
        self.workers[i] = self._new_worker(i).start()
        return self.workers[i]

    def cut(self, i: int) -> None:
        """Host ``i`` stops answering: its link goes down (namespaces) or it freezes (loopback)."""
        if self.namespaces:
            _ip("link", "set", self._veth[i], "down")
        else:
            self._signal(i, signal.SIGSTOP)
        self.frozen.add(i)

    def heal(self, i: int) -> None:
        """Undo ``cut``."""
        if i not in self.frozen:
            return
        if self.namespaces:
            _ip("link", "set", self._veth[i], "up")
        else:
            self._signal(i, signal.SIGCONT)
        self.frozen.discard(i)

    def _signal(self, i: int, sig: int) -> None:
        for pid in [self.workers[i].pid, *self.workers[i].children()]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kill every worker and process, take the namespaces down; safe to call twice."""
        for i in list(self.frozen):
            self.heal(i)
        for worker in self.workers:
            worker.kill()
        for made in reversed(self._made):
            if made == "lo-address":
                subprocess.run(["ip", "addr", "del", f"{self.subnet}.250.1/32", "dev", "lo"], capture_output=True)
                continue
            if made == "ip-forward":
                # Turned back off only when no other LocalHosts (another test
                # process, a notebook) still routes between its namespaces:
                # theirs would lose every host-to-host message, silently.
                if not _namespaces_in_use():
                    _IP_FORWARD.write_text("0")
                continue
            out = subprocess.run(["ip", "netns", "pids", made], capture_output=True, text=True).stdout
            for pid in out.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", made], capture_output=True)  # its veth pair goes with it
        self._made = []

    def __enter__(self) -> "LocalHosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def can_make_namespaces() -> bool:
    """Root, ``ip`` present, and a network namespace can really be made here."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"flprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_NAMESPACE_NAME = re.compile(r"^fl\d+[0-9a-f]{4}h\d+\b")  # LocalHosts' namespaces: fl<pid><random>h<host>


def _namespaces_in_use() -> bool:
    """Whether any LocalHosts' network namespace exists on this machine."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(_NAMESPACE_NAME.match(line) for line in out.splitlines())


def _free_subnet() -> str:
    """``"10.N"`` for an N in 200-249 that no address on this machine uses: two
    LocalHosts at once (two test processes) must not share one."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    used = {int(m.group(1)) for m in re.finditer(r"inet 10\.(\d+)\.", out)}
    start = os.getpid() % 50  # processes started together try different ones first
    for offset in range(50):
        second = 200 + (start + offset) % 50
        if second not in used:
            return f"10.{second}"
    raise RuntimeError("every subnet 10.200-10.249 is in use on this machine; stop other LocalHosts first")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_started: list[WorkerProcess] = []


@atexit.register
def _kill_started() -> None:
    # Workers this process started end with it: none is left behind by a
    # notebook kernel that restarts. So do the logs the kit named for them.
    for worker in _started:
        if worker.alive:
            worker.kill()
        if worker._own_log:
            Path(worker.log_path).unlink(missing_ok=True)
