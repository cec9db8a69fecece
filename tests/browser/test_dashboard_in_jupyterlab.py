"""The dashboards in a real JupyterLab, in headless Chromium, as a learner meets them.

- A small notebook: kill a replica with the dashboard's button and watch its
  card go FAILED, then HEALTHY.
- The kit's own notebooks 01, 02 and 04 (04 in its fast mode), each with
  Run > Run All Cells: afterwards the dashboards of 01 and 02 are still live
  (a card reads HEALTHY, the kill button works), because the last cell no
  longer tears everything down; 04's TrainingDashboard shows step N/total and
  the held-out accuracy before and after training.

Every dashboard is saved as a picture in ``test-artifacts/`` for a reviewer.
The notebooks run on copies in a temporary directory (JupyterLab saves what it
opens), one at a time, and each kernel is shut down before the next starts:
about 4 minutes on 2 cores. 03 has no dashboard and is left out.

Uses Debian's Chromium (/usr/bin/chromium): Playwright cannot download its own
browser on these machines. Without Chromium the tests skip, except in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
TOKEN = "browser-test"

CELLS = [
    "import forge_lite\nfrom forge_lite import ForgeActor\nfrom monarch.actor import endpoint\nfrom forge_lite.widgets import ServiceDashboard",
    "class Echo(ForgeActor):\n    @endpoint\n    def echo(self, x: int) -> int:\n        return x",
    "svc = await Echo.options(num_replicas=2).as_service()\nfor i in range(6):\n    await svc.echo.route(i)",
    "dashboard = ServiceDashboard(svc)\ndashboard",
]


def _small_notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
             for src in CELLS]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")


class Lab:
    """A JupyterLab server on a directory of copies, and its REST API."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        # As a learner's kernel: not under pytest (so the notebooks' TEARDOWN is
        # False), and 04 in its fast mode.
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST" and not k.startswith("FORGE_LITE_")}
        env.update(FORGE_LITE_FAST="1", JUPYTER_RUNTIME_DIR=str(root / ".runtime"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                self.api("GET", "status")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("JupyterLab did not start within 120 s")

    def url(self, path: str) -> str:
        # A workspace of its own: JupyterLab would otherwise reopen the notebooks
        # of the previous test beside this one.
        workspace = re.sub(r"\W", "-", path)
        return f"http://127.0.0.1:{self.port}/lab/workspaces/{workspace}/tree/{path}?token={TOKEN}"

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}?token={TOKEN}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        """Every kernel (and with it every process a notebook started) goes."""
        for kernel in self.api("GET", "kernels"):
            self.api("DELETE", f"kernels/{kernel['id']}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    _small_notebook(root / "dashboard.ipynb")
    # Copies of the kit's notebooks, with what their relative paths reach.
    (root / "notebooks").mkdir()
    for name in ("01_rl_fundamentals.ipynb", "02_services.ipynb", "04_grpo_end_to_end.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, root / "notebooks" / name)
    for linked in ("configs", "docs"):
        (root / linked).symlink_to(ROOT / linked)
    server = Lab(root)
    yield server
    server.stop()


@pytest.fixture
def page(lab):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
    lab.shut_down_kernels()
    assert errors == [], f"JavaScript errors in the console: {errors}"


def run_all(page, url: str) -> None:
    """Open a notebook and choose Run > Run All Cells once its kernel is idle."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
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


def wait_for_the_last_cell(page, timeout_s: float) -> None:
    """Run All reached the end: the teardown cell printed that everything still runs."""
    page.locator(".jp-OutputArea-output", has_text="Still running").wait_for(timeout=timeout_s * 1000)


def dashboard(page, title: str):
    """The ServiceDashboard whose header names ``title`` (e.g. "ForgeCounter service")."""
    return page.locator(".widget-vbox", has=page.locator("b", has_text=re.compile(f"^{title}$"))).last


def assert_live(board) -> None:
    """A card reads HEALTHY and the kill button can be pressed."""
    board.scroll_into_view_if_needed()
    assert board.locator(".fl-replica[data-state='HEALTHY']").count() >= 1
    assert board.locator("button", has_text="kill").is_enabled()


@contextlib.contextmanager
def screenshot_on_failure(page, name: str):
    """Save the whole page as ARTIFACTS/``name`` if the block fails, then fail."""
    try:
        yield
    except Exception:
        page.screenshot(path=str(ARTIFACTS / name), full_page=True)
        raise


def snap(locator, name: str) -> str:
    path = ARTIFACTS / name
    # JupyterLab's "notified about official Jupyter news?" toast would sit on the picture.
    for button in locator.page.get_by_role("button", name="No", exact=True).all():
        if button.is_visible():
            button.click()
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_button_shows_failed_then_healthy(lab, page):
    with screenshot_on_failure(page, "service_dashboard_failure.png"):
        run_all(page, lab.url("dashboard.ipynb"))
        page.wait_for_selector(".fl-replica >> nth=1", timeout=180_000)
        assert page.locator(".fl-replica-healthy").count() == 2
        page.locator("button", has_text="kill").first.click()  # replica 0 is selected
        page.wait_for_selector(".fl-replica[data-replica='0'][data-state='FAILED']", timeout=60_000)
        page.wait_for_selector(".fl-replica[data-replica='0'][data-state='HEALTHY']", timeout=60_000)
        assert "respawned in" in page.locator(".fl-replica[data-replica='0']").text_content()
        snap(dashboard(page, "Echo service"), "service_dashboard.png")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_run_all_the_dashboards_of_01_and_02_are_live(lab, page):
    # 01: the policy's dashboard, after the kill in section 6 and everything after it.
    with screenshot_on_failure(page, "01_failure.png"):
        run_all(page, lab.url("notebooks/01_rl_fundamentals.ipynb"))
        wait_for_the_last_cell(page, 300)
        policy = dashboard(page, "Policy service")
        assert_live(policy)
        assert "KV cache" not in policy.text_content()  # 01 has not taught the KV cache yet
        snap(policy, "01_policy_dashboard.png")
    lab.shut_down_kernels()

    # 02: the slow reward service of section 11 and the counter of the exercises stay up; the
    # policy of section 3 was stopped by section 13, which starts the whole job anew.
    with screenshot_on_failure(page, "02_failure.png"):
        run_all(page, lab.url("notebooks/02_services.ipynb"))
        wait_for_the_last_cell(page, 400)
        for title in ("RewardActor service", "ForgeCounter service"):
            board = dashboard(page, title)
            assert_live(board)
            assert "KV cache" not in board.text_content()  # they generate nothing
        snap(dashboard(page, "RewardActor service"), "02_reward_dashboard.png")
        counter = dashboard(page, "ForgeCounter service")
        # The replica killed in the exercise: its card says FAILED for 2 s from the first
        # drawing that shows the failure, then that it came back; the strip keeps the ✖.
        counter.locator(".fl-replica[data-replica='1'][data-state='HEALTHY']").wait_for(timeout=30_000)
        assert "respawned in" in counter.locator(".fl-replica[data-replica='1']").text_content()
        snap(counter, "02_counter_dashboard.png")
        policy = dashboard(page, "Policy service")
        assert "KV cache" in policy.text_content()  # section 7 measured it
        snap(policy, "02_policy_dashboard.png")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_04_training_dashboard_shows_progress_and_the_held_out_accuracy(lab, page):
    with screenshot_on_failure(page, "04_failure.png"):
        run_all(page, lab.url("notebooks/04_grpo_end_to_end.ipynb"))
        header = page.locator(".fl-training-header")
        # While it trains: step N of the total and the held-out accuracy measured before.
        header.filter(has_text=re.compile(r"step \d+/30")).wait_for(timeout=300_000)
        header.filter(has_text=re.compile(r"before 0\.\d{3}")).wait_for(timeout=60_000)
        # At the end of training: both held-out accuracies.
        header.filter(has_text=re.compile(r"finished: step 30/30")).wait_for(timeout=300_000)
        assert re.search(r"before 0\.\d{3}, after 0\.\d{3}", header.text_content())
        training = page.locator(".widget-vbox", has=header).last
        figure = training.locator("img").first
        figure.wait_for()
        assert figure.evaluate("img => img.naturalWidth") > 500  # the four panels were drawn
        snap(training, "04_training_dashboard.png")
        wait_for_the_last_cell(page, 400)
        snap(dashboard(page, "Policy service"), "04_policy_dashboard.png")
