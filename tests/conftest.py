"""Shared test helpers: a way to check that no process outlives its actor or
service. (Child processes find the test modules because the kit gives every
process it spawns the caller's sys.path, which pytest extended.)"""

import asyncio
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

import forge_lite  # noqa: F401  (before monarch: sets Monarch's env)

def count_children() -> int:
    """Live child processes of this process (zombies don't count)."""
    alive = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive += 1
        except psutil.NoSuchProcess:
            pass
    return alive


async def wait_for_children(expected: int, timeout: float = 30.0) -> int:
    """Wait until at most ``expected`` children are alive; return the count.

    A stopped or killed process takes a moment to exit, so poll rather than
    count once. Callers assert ``<= expected``: a process of an earlier test
    may still have been exiting when they counted.
    """
    deadline = time.monotonic() + timeout
    while (count := count_children()) > expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_for_exit(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait for these processes to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return alive


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A weight store for this module's actors: pass it as ``weight_store=store``."""
    from forge_lite.actors.weights import WeightStore

    return WeightStore(str(tmp_path_factory.mktemp("weights")))


class HostsTestMode(UserWarning):
    """Which kind of hosts a file's host checks ran on: network namespaces (as
    root) or loopback workers. Reported in the summary, so no mode passes unseen."""


def run_host_checks(test_file: str, timeout: float) -> None:
    """Run the ``check_*`` functions of ``test_file`` in a fresh pytest process
    and assert that they passed.

    Monarch fixes its transport (Unix sockets or TCP) at its first call in a
    process, and hosts with their own network need TCP: in a process of their
    own, nothing the rest of the suite did with Monarch is in the way, and
    nothing they do leaks into it. Their ``hosts`` fixture prints
    ``HOSTS MODE: ...``, reported here as a HostsTestMode warning.
    """
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-o", "python_functions=check_*", str(Path(test_file).resolve().relative_to(root))],
        cwd=root, capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("FORGE_LITE_")},
    )
    mode = re.search(r"^HOSTS MODE: (.*)$", out.stdout, re.MULTILINE)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "no output"
    warnings.warn(HostsTestMode(f"{Path(test_file).name}: {mode.group(1) if mode else 'unknown'}; {summary}"))
    # A failure names its checks first: one pytest test stands for many here.
    failed = re.findall(r"^(?:FAILED|ERROR) \S+::(check_\w+)", out.stdout, re.MULTILINE)
    assert out.returncode == 0, (f"failed: {', '.join(failed) or 'see the output'}\n"
                                 + out.stdout[-8000:] + out.stderr[-3000:])
    assert mode is not None and " passed" in summary


def started_hosts(request, hosts):
    """Start ``hosts`` (a ``LocalHosts``) for a test module's ``hosts`` fixture:
    stopped when the module ends, even after a failed check (LocalHosts.start
    also registers stop() at exit, for a pytest that is killed), and its mode
    printed for run_host_checks to report."""
    request.addfinalizer(hosts.stop)
    hosts.start()
    print(f"\nHOSTS MODE: {hosts.mode}", flush=True)
    return hosts
