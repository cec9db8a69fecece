"""The dashboard in a real JupyterLab, in headless Chromium: kill a replica
with the dashboard's button and watch its card go FAILED, then HEALTHY.

Uses Debian's Chromium (/usr/bin/chromium): Playwright cannot download its own
browser on these machines. Without Chromium the test skips, except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling out, and this
# machine's closed network refuses it, noisily.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

CELLS = [
    "import forge_lite\nfrom forge_lite import ForgeActor\nfrom monarch.actor import endpoint\nfrom widgets import ServiceDashboard",
    "class Echo(ForgeActor):\n    @endpoint\n    def echo(self, x: int) -> int:\n        return x",
    "svc = await Echo.options(num_replicas=2).as_service()\nfor i in range(6):\n    await svc.echo.route(i)",
    "dashboard = ServiceDashboard(svc)\ndashboard",
]


def _notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
             for src in CELLS]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    _notebook(tmp_path / "dashboard.ipynb")
    port, token = _free_port(), "browser-test"
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(lab.pid, signal.SIGKILL)
        pytest.fail("JupyterLab did not start within 120 s")
    yield f"http://127.0.0.1:{port}/lab/tree/dashboard.ipynb?token={token}"
    os.killpg(lab.pid, signal.SIGTERM)
    try:
        lab.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(lab.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_button_shows_failed_then_healthy(jupyterlab):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            page.goto(jupyterlab)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            # JupyterLab sometimes asks which kernel to start, even with one on offer.
            select = page.locator(".jp-Dialog button", has_text="Select")
            try:
                select.wait_for(timeout=10_000)
                select.click()
            except PlaywrightTimeout:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            page.wait_for_selector(".fl-replica >> nth=1", timeout=180_000)
            assert page.locator(".fl-replica-healthy").count() == 2
            page.locator("button", has_text="kill").first.click()  # replica 0 is selected
            page.wait_for_selector(".fl-replica[data-replica='0'][data-state='FAILED']", timeout=60_000)
            page.wait_for_selector(".fl-replica[data-replica='0'][data-state='HEALTHY']", timeout=60_000)
            assert "respawned in" in page.locator(".fl-replica[data-replica='0']").inner_text()

            page.locator(".fl-cards").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "service_dashboard.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "service_dashboard_failure.png"), full_page=True)
            raise
        browser.close()
    assert errors == [], f"JavaScript errors in the console: {errors}"
