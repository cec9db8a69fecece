"""Shared test helpers: a way to check that no process outlives its actor or
service. (Child processes find the test modules because the kit gives every
process it spawns the caller's sys.path, which pytest extended.)"""

import asyncio
import time

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
