"""``python -m forge_lite.worker`` is a worker from its first import on.

Python imports the ``forge_lite`` package before the worker's own code, and
the package installs the caller's fault hook unless the process is a worker.
So the worker's environment must be right before that import: checked on the
real command, with a ``sitecustomize`` (run by Python before ``-m`` imports
anything) whose exit hook reports what the command left in place.
"""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import atexit, os, sys

    def report():
        runtime = sys.modules.get("forge_lite.controller.runtime")
        hook = runtime is not None and runtime._configured
        print(f"PROBE worker_env={os.environ.get('FORGE_LITE_WORKER')} fault_hook={hook}", flush=True)

    atexit.register(report)
""")


@pytest.fixture
def run_probed(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(PROBE)

    def run(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "FORGE_LITE_WORKER"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
        probes = [line for line in done.stdout.splitlines() if line.startswith("PROBE")]
        assert len(probes) == 1, f"no report from the probe (rc {done.returncode}):\n{done.stdout}\n{done.stderr[-2000:]}"
        return probes[0]

    return run


def test_the_worker_command_keeps_monarchs_fault_handling(run_probed):
    # A bad address: the command stops in main(), after the package import
    # this test is about, without starting a worker.
    assert run_probed("-m", "forge_lite.worker", "--address", "not-an-address") == \
        "PROBE worker_env=1 fault_hook=False"


def test_a_client_installs_the_fault_hook(run_probed):
    """The probe tells the two apart: a client's import installs the hook."""
    assert run_probed("-c", "import forge_lite") == "PROBE worker_env=None fault_hook=True"
