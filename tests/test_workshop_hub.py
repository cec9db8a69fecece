"""A workshop on one node: a real JupyterHub, three real Unix learners at once.

The Hub is started from the instructor's own config,
``docs/workshop/jupyterhub_config.py`` (ports, paths and a test password given
through the environment variables it reads), with configurable-http-proxy on
loopback. Three throwaway Unix users (tests/learners.py: ``useradd``, removed
at the end with everything they left) each get
a copy of the repository's notebooks in ``~/forge_lite``, as a learner's clone
would have them. Each one's server is started through the Hub's REST API, and
the notebooks run THROUGH THE PROXY as JupyterLab runs them: a session (a
kernel) made with ``/user/<name>/api/sessions``, one ``execute_request`` per
code cell over the kernel's websocket, every reply ``ok``. All three learners
run at the same time, with the notebooks shared out so that each one is run
by someone and two learners run notebook 03 at the same moment.

Then one learner's kernel is SIGKILLed in the middle of a GRPO run (what a
culled or crashed kernel is): all the processes it started exit within
seconds. Last, the Hub stops each learner's server: every process of that
Unix user is gone, and nothing of theirs is left in the temporary folder.

The notebooks run their short mode: the learners' servers get
``PYTEST_CURRENT_TEST`` in their environment, as under nbval
(tests/test_notebooks.py), which selects each notebook's test-sized
parameters and its teardown cell.

The venv's Python under ``/root`` (0700 here) is shown to the learners' servers
as ``tests/learners.py``'s ``as_user`` shows it, in a mount namespace of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from learners import User, learners as throwaway_learners

ROOT = Path(__file__).resolve().parents[1]
HUB_CONFIG = ROOT / "docs" / "workshop" / "jupyterhub_config.py"
VENV = Path(sys.prefix)
PROXY = VENV / "node" / "node_modules" / ".bin" / "configurable-http-proxy"

# Who runs what, in order. Every notebook is run by someone; learners 0 and 1
# start with notebook 03 (the lightest) at the same moment. 02, 04 and 06 are
# the longest; shared so that the three lists take about the same time.
PLAN = {
    0: ["03_monarch_101", "02_services"],
    1: ["03_monarch_101", "04_grpo_end_to_end"],
    2: ["01_rl_fundamentals", "05_services_across_hosts", "06_multiturn_tools"],
}
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
# A notebook added later is run too, by learner 1 (the shortest list: 03 and 04 took
# 476 s under load where the others took 560 s and 670 s).
PLAN[1] += [name for name in NOTEBOOKS if not any(name in names for names in PLAN.values())]
CELL_TIMEOUT_S = 300  # as nbval's per-cell bound under the project's pytest settings

pytestmark = [pytest.mark.slow]


# ---------------------------------------------------------------- learners


def processes_of(uid: int) -> list[psutil.Process]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        if process.info["uids"] and process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def leftovers_in_temp(uid: int) -> list[str]:
    """What ``uid`` owns at the top of the temporary folder (files, folders, links)."""
    temp = Path(tempfile.gettempdir())
    found = []
    for entry in temp.iterdir():
        try:
            if entry.lstat().st_uid == uid:
                found.append(str(entry))
        except FileNotFoundError:
            pass
    return found


@pytest.fixture(scope="module")
def learners():
    """Three throwaway Unix users (``tests/learners.py``), each with the notebooks
    in ~/forge_lite; removed at the end, with every process and file they left."""
    if sys.base_prefix.startswith("/root/") and shutil.which("setpriv") is None:
        pytest.skip("the venv's Python is under /root; setpriv is needed to start the learners' servers")
    with throwaway_learners(3, tag="flhub") as made:  # skips where users cannot be made
        for learner in made:
            # What a learner's clone holds that the notebooks use (../configs, ../docs).
            checkout = learner.home / "forge_lite"
            for folder in ("notebooks", "configs", "docs"):
                shutil.copytree(ROOT / folder, checkout / folder,
                                ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints", "__pycache__"))
            # "name:" is the user and their login group.
            subprocess.run(["chown", "-R", f"{learner.name}:", str(checkout)], check=True)
        yield made


# ---------------------------------------------------------------- the Hub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The test's additions to the instructor's file: an API token for this test,
# the notebooks' short mode, and (only where the venv's Python lives under
# /root, which learners may not enter) a spawner that starts each server in a
# mount namespace of its own where /root shows only that Python, then becomes
# the learner (setpriv), as tests/test_many_users.py does with runuser.
TEST_CONFIG = """
import os, pwd
load_subconfig({hub_config!r})
c.JupyterHub.services.append({{"name": "workshop-test", "api_token": os.environ["WORKSHOP_TEST_TOKEN"]}})
c.JupyterHub.load_roles.append({{
    "name": "workshop-test", "services": ["workshop-test"],
    "scopes": ["admin:users", "admin:servers", "tokens", "list:users"],
}})
c.Spawner.environment["PYTEST_CURRENT_TEST"] = "tests/test_workshop_hub.py (short mode of the notebooks)"
PREFIX = {prefix!r}
if PREFIX.startswith("/root/"):
    from jupyterhub.spawner import LocalProcessSpawner

    SCRIPT = ('set -e; mount --bind "$1" /mnt; mount -t tmpfs -o mode=755 tmpfs /root; '
              'mkdir -p "$1"; mount --bind /mnt "$1"; umount /mnt; shift; '
              'exec setpriv --reuid="$USER" --regid="$(id -g "$USER")" --init-groups -- "$@"')

    class LearnerWithRootsPython(LocalProcessSpawner):
        def make_preexec_fn(self, name):
            home = pwd.getpwnam(name).pw_dir
            return lambda: os.chdir(home)  # still root here: the wrapper below becomes the learner

    c.Spawner.cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", PREFIX,
                     *c.Spawner.cmd]
    c.JupyterHub.spawner_class = LearnerWithRootsPython
"""


class Hub:
    def __init__(self, url: str, token: str, process: subprocess.Popen, log: Path):
        self.url, self.token, self.process, self.log = url, token, process, log

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def hub(learners, tmp_path_factory):
    if not PROXY.exists() and shutil.which("configurable-http-proxy") is None:
        pytest.skip("configurable-http-proxy is missing: `make install` puts it in .venv/node when npm is there")
    state = tmp_path_factory.mktemp("hub")
    state.chmod(0o700)
    token = uuid.uuid4().hex
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_LITE_", "PYTEST_"))}
    env.update(
        FORGE_LITE_HUB_IP="127.0.0.1", FORGE_LITE_HUB_PORT=str(port),
        FORGE_LITE_HUB_API_PORT=str(_free_port()), FORGE_LITE_HUB_PROXY_API_PORT=str(_free_port()),
        FORGE_LITE_HUB_STATE=str(state), FORGE_LITE_HUB_VENV=str(VENV),
        FORGE_LITE_HUB_TEST_PASSWORD=uuid.uuid4().hex, WORKSHOP_TEST_TOKEN=token,
    )
    config = state / "test_config.py"
    config.write_text(TEST_CONFIG.format(hub_config=str(HUB_CONFIG), prefix=sys.base_prefix))
    log = state / "hub.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(VENV / "bin" / "jupyterhub"), "-f", str(config)], cwd=state, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Hub(f"http://127.0.0.1:{port}", token, process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the Hub exited ({process.returncode}):\n{running.log_tail()}"
            try:  # the proxy answers first (404) until the Hub has given it its routes
                urllib.request.urlopen(f"{running.url}/hub/api/", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"the Hub did not answer in 60 s:\n{running.log_tail()}"
                time.sleep(0.5)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)  # the Hub stops every server it started (cleanup_servers), then the proxy
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # A Hub stopped while starting up leaves its proxy running (its own session): by its pid file.
        proxy_pid = state / "jupyterhub-proxy.pid"
        if proxy_pid.exists() and psutil.pid_exists(pid := int(proxy_pid.read_text())):
            if "configurable-http-proxy" in " ".join(psutil.Process(pid).cmdline()):
                psutil.Process(pid).kill()


# ---------------------------------------------------------------- talking to it as a browser does


async def _api(hub: Hub, method: str, path: str, body=None, token: str | None = None) -> dict:
    """One REST call through the proxy; the decoded JSON answer (or {})."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    request = HTTPRequest(hub.url + path, method=method, headers={"Authorization": f"token {token or hub.token}"},
                          body=None if body is None and method != "POST" else json.dumps(body or {}),
                          request_timeout=120)
    response = await AsyncHTTPClient().fetch(request)
    return json.loads(response.body) if response.body else {}


async def start_server(hub: Hub, learner: User) -> str:
    """Create the learner in the Hub, start their server; return a token of theirs."""
    from tornado.httpclient import HTTPClientError

    try:
        await _api(hub, "POST", f"/hub/api/users/{learner.name}")
    except HTTPClientError as error:
        if error.code != 409:  # 409: exists already
            raise
    token = (await _api(hub, "POST", f"/hub/api/users/{learner.name}/tokens",
                        {"note": "workshop test", "expires_in": 3600}))["token"]
    await _api(hub, "POST", f"/hub/api/users/{learner.name}/server")
    deadline = time.monotonic() + 180
    while not (await _api(hub, "GET", f"/hub/api/users/{learner.name}")).get("servers", {}).get("", {}).get("ready"):
        assert time.monotonic() < deadline, f"{learner}'s server not ready in 180 s:\n{hub.log_tail()}"
        await asyncio.sleep(0.5)
    return token


async def stop_server(hub: Hub, learner: User) -> None:
    await _api(hub, "DELETE", f"/hub/api/users/{learner.name}/server")
    deadline = time.monotonic() + 60
    while (await _api(hub, "GET", f"/hub/api/users/{learner.name}")).get("servers"):
        assert time.monotonic() < deadline, f"{learner}'s server did not stop in 60 s:\n{hub.log_tail()}"
        await asyncio.sleep(0.5)


class Kernel:
    """A kernel of a learner's server, driven over its websocket (the Jupyter
    messaging protocol's JSON form, as JupyterLab speaks it)."""

    def __init__(self, hub: Hub, learner: User, token: str, notebook_path: str):
        self.hub, self.learner, self.token, self.path = hub, learner, token, notebook_path
        self.session = uuid.uuid4().hex

    async def open(self) -> "Kernel":
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        made = await _api(self.hub, "POST", f"/user/{self.learner.name}/api/sessions",
                          {"path": self.path, "name": Path(self.path).name, "type": "notebook",
                           "kernel": {"name": "python3"}}, token=self.token)
        self.session_id, self.kernel_id = made["id"], made["kernel"]["id"]
        url = self.hub.url.replace("http", "ws", 1)
        self.ws = await websocket_connect(HTTPRequest(
            f"{url}/user/{self.learner.name}/api/kernels/{self.kernel_id}/channels?session_id={self.session}",
            headers={"Authorization": f"token {self.token}"}), max_message_size=256 * 2**20)
        return self

    async def execute(self, code: str, timeout: float = CELL_TIMEOUT_S) -> tuple[str, str, str]:
        """Run ``code``; return (status of the execute_reply, stdout, error text)."""
        msg_id = uuid.uuid4().hex
        await self.ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session,
                       "username": self.learner.name, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        status, idle, out, errors = None, False, [], []
        deadline = time.monotonic() + timeout
        while status is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.learner} {self.path}: no reply in {timeout} s to:\n{code[:500]}")
            raw = await asyncio.wait_for(self.ws.read_message(), left)
            if raw is None:
                raise ConnectionError(f"{self.learner} {self.path}: the kernel's websocket closed")
            if isinstance(raw, bytes):  # a message with binary buffers (a widget's): not ours to read
                continue
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "execute_reply":
                status = msg["content"]["status"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            elif kind == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            elif kind == "error":
                errors.append("\n".join(msg["content"]["traceback"]))
        return status, "".join(out), "\n".join(errors)

    async def close(self, shutdown: bool = True) -> None:
        self.ws.close()
        if shutdown:  # as JupyterLab's "Shut Down Kernel"
            await _api(self.hub, "DELETE", f"/user/{self.learner.name}/api/sessions/{self.session_id}",
                       token=self.token)


async def run_notebook(hub: Hub, learner: User, token: str, name: str, keep_kernel: bool) -> dict:
    """Every code cell of ``name`` through the proxy; a record of the run."""
    path = f"forge_lite/notebooks/{name}.ipynb"
    notebook = (await _api(hub, "GET", f"/user/{learner.name}/api/contents/{path}?content=1", token=token))["content"]
    cells = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
             for c in notebook["cells"] if c["cell_type"] == "code"]
    started = time.monotonic()
    kernel = await Kernel(hub, learner, token, path).open()
    try:
        for index, code in enumerate(cells):
            status, _, error = await kernel.execute(code)
            assert status == "ok", f"{learner} {name}, code cell {index}: {status}\n{code[:800]}\n{error[-4000:]}"
    finally:
        await kernel.close(shutdown=not keep_kernel)
    return {"learner": learner.name, "notebook": name, "cells": len(cells), "start": started,
            "wall_s": time.monotonic() - started}


# ---------------------------------------------------------------- the checks


@pytest.mark.timeout(1200)
async def test_three_learners_run_the_notebooks_through_the_hub_at_once(hub, learners):
    tokens = await asyncio.gather(*(start_server(hub, learner) for learner in learners))
    # The config's idle culler runs, with the scopes it needs to list the learners.
    assert "200 GET /hub/api/users?state=[secret] (idle-culler@" in hub.log_tail(10**6), hub.log_tail()

    # Learner 1 may not reach learner 0's server with their own token.
    from tornado.httpclient import HTTPClientError

    with pytest.raises(HTTPClientError) as refused:
        await _api(hub, "GET", f"/user/{learners[0].name}/api/status", token=tokens[1])
    assert refused.value.code in (403, 404, 302), refused.value

    async def one_learner(i: int) -> list[dict]:
        records = []
        for position, name in enumerate(PLAN[i]):
            last = position == len(PLAN[i]) - 1
            records.append(await run_notebook(hub, learners[i], tokens[i], name, keep_kernel=last))
            print(f"{learners[i].name} {name}: {records[-1]['cells']} cells in {records[-1]['wall_s']:.0f} s",
                  flush=True)
        return records

    began = time.monotonic()
    records = [r for per_learner in await asyncio.gather(*(one_learner(i) for i in PLAN)) for r in per_learner]
    wall = time.monotonic() - began
    print(f"three learners at once: {wall:.0f} s")
    # Every notebook ran, and two learners ran 03 at the same moment.
    assert sorted({r["notebook"] for r in records}) == NOTEBOOKS
    firsts = [r for r in records if r["notebook"] == "03_monarch_101"]
    assert len(firsts) == 2 and abs(firsts[0]["start"] - firsts[1]["start"]) < 30

    # The Hub stops each server (the last notebook's kernel still running):
    # every process of that learner goes, and their temporary files with it.
    for learner in learners:
        assert processes_of(learner.uid), f"{learner} has no process before the stop"
        for private in Path(tempfile.gettempdir()).glob(f"jupyter-{learner.name}-*"):  # the config's TMPDIR
            print(f"{learner.name}'s temporary folder before the stop:", sorted(p.name for p in private.iterdir()))
        await stop_server(hub, learner)
        deadline = time.monotonic() + 10
        while (alive := processes_of(learner.uid)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not alive, f"{learner}: still running 10 s after the Hub stopped the server: " + \
            "; ".join(f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in alive)
        assert leftovers_in_temp(learner.uid) == [], f"{learner} left files in {tempfile.gettempdir()}: {leftovers_in_temp(learner.uid)}"


KILLED_RUN = """
import os, asyncio, psutil
import forge_lite
from forge_lite.grpo import GRPORun, MetricsRecorder, load_config
config = load_config("../configs/grpo_tiny.yaml", ["steps=1000", "eval_samples=0", "output_dir=runs/killed"])
recorder = MetricsRecorder()
run = await GRPORun(config, recorder).start()
training = asyncio.ensure_future(run.train())
while len(recorder.steps) < 1 and not training.done():  # training: a step done, the next under way
    await asyncio.sleep(0.2)
assert not training.done(), training.exception()
print("PIDS", os.getpid(), *[p.pid for p in psutil.Process().children(recursive=True)])
"""


@pytest.mark.timeout(600)
async def test_a_kernel_killed_mid_training_leaves_no_process(hub, learners):
    """A culled or crashed kernel: SIGKILL, no goodbye. Its workers notice and exit."""
    learner = learners[0]
    from tornado.httpclient import HTTPClientError

    try:
        running = (await _api(hub, "GET", f"/hub/api/users/{learner.name}")).get("servers")
    except HTTPClientError as error:
        if error.code != 404:  # 404: not a user of the Hub yet (this check runs alone)
            raise
        running = False
    if running:
        await stop_server(hub, learner)  # left running by a failed check before this one
    token = await start_server(hub, learner)
    server_pids = {p.pid for p in processes_of(learner.uid)}
    kernel = await Kernel(hub, learner, token, "forge_lite/notebooks/04_grpo_end_to_end.ipynb").open()
    status, out, error = await kernel.execute(KILLED_RUN)
    assert status == "ok", error[-4000:]
    kernel_pid, *workers = [int(p) for p in out.split("PIDS")[-1].split()]
    assert len(workers) >= 3, out  # the run's actors and replicas, each a process
    assert all(psutil.Process(p).uids().real == learner.uid for p in [kernel_pid, *workers])
    os.kill(kernel_pid, signal.SIGKILL)
    killed = time.monotonic()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"alive {time.monotonic() - killed:.1f} s after the kernel was killed: {[p.pid for p in alive]}"
    print(f"{len(workers)} workers gone {time.monotonic() - killed:.1f} s after the kernel's SIGKILL")
    # Besides the server, only the kernel the server restarts on its own (as
    # JupyterLab shows "Kernel restarting"): no worker of the killed one.
    left = [p for p in processes_of(learner.uid) if p.pid not in server_pids]
    assert all(p.ppid() in server_pids and "ipykernel_launcher" in " ".join(p.cmdline()) for p in left), \
        [" ".join(p.cmdline())[:200] for p in left]
    kernel.ws.close()
    await stop_server(hub, learner)
    _, alive = psutil.wait_procs(processes_of(learner.uid), timeout=10)
    assert not alive, f"{learner}: still running 10 s after the Hub stopped the server: {[p.pid for p in alive]}"
