"""Processes spawned from a Jupyter kernel go away with the kernel."""

from __future__ import annotations

import os
import time

import pytest
from jupyter_client.manager import start_new_kernel

SPAWN = """
import os, forge_lite
from forge_lite import ForgeActor
from monarch.actor import endpoint

class Pid(ForgeActor):
    @endpoint
    def pid(self) -> int:
        return os.getpid()

pids = await Pid.options(procs=2).as_actor()
print(sorted(p for _, p in (await pids.pid.call()).items()))
"""


def _run(client, code: str) -> str:
    msg_id = client.execute(code)
    out = []
    while True:
        msg = client.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "shutdown"])
def test_kernel_restart_or_shutdown_leaves_no_processes(how):
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        printed = _run(client, SPAWN)
        pids = [int(p) for p in printed.strip().strip("[]").split(",")]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        if how == "restart":
            manager.restart_kernel(now=False)
        else:
            manager.shutdown_kernel(now=False)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), f"orphans after kernel {how}: {pids}"
    finally:
        client.stop_channels()
        if manager.is_alive():
            manager.shutdown_kernel(now=True)
