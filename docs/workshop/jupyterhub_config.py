"""JupyterHub for a forge_lite workshop on one node: the instructor's starting point.

Each learner is a Unix user of the node and gets a JupyterLab server of their
own (JupyterHub's LocalProcessSpawner: a process running as that user), all of
them run from ONE environment the instructor built once: ``make install`` in a
checkout every learner can read (see docs/workshop.md, "One environment for
everyone"). Learners keep their own copy of the notebooks in
``~/forge_lite`` (a ``git clone``, or an nbgitpuller link).

Start it as root from that checkout::

    .venv/bin/jupyterhub -f docs/workshop/jupyterhub_config.py

Settings read from the environment (default in brackets); everything else is
plain JupyterHub configuration below, to edit:

- ``FORGE_LITE_HUB_IP`` [all interfaces] and ``FORGE_LITE_HUB_PORT`` [8000]:
  where learners connect (the proxy). Put TLS in front of it (a reverse proxy,
  or ``c.JupyterHub.ssl_cert``/``ssl_key``) before any password crosses a network.
- ``FORGE_LITE_HUB_API_PORT`` [8081] and ``FORGE_LITE_HUB_PROXY_API_PORT``
  [8001]: the Hub's and the proxy's internal ports, on loopback.
- ``FORGE_LITE_HUB_STATE`` [the current folder]: the Hub's database, cookie
  secret and the proxy's pid file (keep it readable by root only).
- ``FORGE_LITE_HUB_VENV`` [this checkout's ``.venv``]: the environment the
  learners' servers and kernels run from.
- ``FORGE_LITE_HUB_CULL_TIMEOUT`` [3600] and ``FORGE_LITE_HUB_CULL_EVERY``
  [300], in seconds: the idle culler (below).
- ``FORGE_LITE_HUB_TEST_PASSWORD``: TESTS ONLY. When set, anyone who knows
  this one password can log in as any learner (JupyterHub's
  SharedPasswordAuthenticator); tests/test_workshop_hub.py sets it. Unset, the
  learners log in with their Unix password (PAM).

tests/test_workshop_hub.py starts a Hub from this very file, with three real
Unix users running the notebooks through the proxy at the same time.
"""

import importlib.util
import os
import pwd
import shutil
import stat
import sys
import tempfile
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub defines get_config() for its config files)

CHECKOUT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("FORGE_LITE_HUB_VENV", CHECKOUT / ".venv"))
STATE = Path(os.environ.get("FORGE_LITE_HUB_STATE", os.getcwd()))
CULL_TIMEOUT = int(os.environ.get("FORGE_LITE_HUB_CULL_TIMEOUT", 3600))
CULL_EVERY = int(os.environ.get("FORGE_LITE_HUB_CULL_EVERY", 300))

# ---------------------------------------------------------------- where it listens

c.JupyterHub.bind_url = f"http://{os.environ.get('FORGE_LITE_HUB_IP', '')}:{os.environ.get('FORGE_LITE_HUB_PORT', 8000)}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{os.environ.get('FORGE_LITE_HUB_API_PORT', 8081)}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ.get('FORGE_LITE_HUB_PROXY_API_PORT', 8001)}"
# `make install` puts configurable-http-proxy (npm) in .venv/node when npm is
# there; otherwise JupyterHub looks for it on PATH (`npm install -g configurable-http-proxy`).
proxy = VENV / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
if proxy.exists():
    c.ConfigurableHTTPProxy.command = [str(proxy)]
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")

# ---------------------------------------------------------------- who logs in

if os.environ.get("FORGE_LITE_HUB_TEST_PASSWORD"):
    # TESTS ONLY: one shared password for every account, no PAM needed.
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = os.environ["FORGE_LITE_HUB_TEST_PASSWORD"]
    c.Authenticator.allow_all = True
else:
    # The learners' Unix accounts and passwords (root runs the Hub, so PAM can check them).
    c.JupyterHub.authenticator_class = "pam"
    # Who may log in: list the learners, or admit a Unix group you put them in.
    # c.Authenticator.allowed_users = {"learner01", "learner02"}
    # c.PAMAuthenticator.allowed_groups = {"workshop"}
    # c.Authenticator.admin_users = {"instructor"}
    # For a cloud login instead (GitHub, Google, your institution's OAuth), see
    # the oauthenticator package; the Unix accounts must still exist
    # (c.LocalAuthenticator.create_system_users = True makes them at first login).

# ---------------------------------------------------------------- each learner's server

# LocalProcessSpawner: the learner's server is a process of the learner's own
# Unix user, started in their home folder; everything it starts (kernels, the
# kit's worker processes) is theirs too, so one learner cannot signal, read
# or delete another's (the kit keeps its temporary files private per user).
c.JupyterHub.spawner_class = "localprocess"
# The one environment built by `make install`: every learner runs the same
# Python, torch, Monarch and vLLM, read-only, without installing anything.
c.Spawner.cmd = [str(VENV / "bin" / "jupyterhub-singleuser")]
c.Spawner.environment = {
    "PATH": f"{VENV / 'bin'}:/usr/local/bin:/usr/bin:/bin",
    "VIRTUAL_ENV": str(VENV),
}
c.Spawner.notebook_dir = "~"  # the learner's home: ~/forge_lite/notebooks and ../configs both in reach
c.Spawner.default_url = "/lab/tree/forge_lite/notebooks"
# A server starts in seconds on an idle node, but 30 learners logging in at 9:00
# on a few cores take longer than JupyterHub's default 10 s (http) / 60 s (start).
c.Spawner.http_timeout = 120
c.Spawner.start_timeout = 180

# A temporary folder of each learner's own, deleted when their server stops:
# what systemd's PrivateTmp or a Kubernetes pod gives for free. What a
# learner's processes write to the temporary folder (the kit's weight stores
# and worker logs, torch's compile cache) goes there, so a stopped learner
# leaves nothing in the node's /tmp, and nobody else sees it meanwhile.
# (mkdtemp: a fresh random name made by root, so no learner can squat it.)


def make_private_tmp(spawner):
    user = pwd.getpwnam(spawner.user.name)
    folder = tempfile.mkdtemp(prefix=f"jupyter-{spawner.user.name}-")  # mode 0700
    os.chown(folder, user.pw_uid, user.pw_gid)
    spawner.environment = {**spawner.environment, "TMPDIR": folder}


def remove_private_tmp(spawner):
    folder = spawner.environment.get("TMPDIR", "")
    if folder.startswith(os.path.join(tempfile.gettempdir(), "jupyter-")):
        shutil.rmtree(folder, ignore_errors=True)
    # Monarch 0.7 writes its own log to /tmp/<user>/monarch_log.log whatever
    # TMPDIR says: removed too, if it is the learner's own folder (not a link).
    monarch_logs = os.path.join("/tmp", spawner.user.name)
    try:
        info = os.lstat(monarch_logs)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == pwd.getpwnam(spawner.user.name).pw_uid:
        shutil.rmtree(monarch_logs, ignore_errors=True)


c.Spawner.pre_spawn_hook = make_private_tmp
c.Spawner.post_stop_hook = remove_private_tmp

# Memory and CPU limits: LocalProcessSpawner IGNORES c.Spawner.mem_limit and
# cpu_limit (it only passes them to the server as MEM_LIMIT/CPU_LIMIT, which
# JupyterLab's resource indicator displays). To enforce them on one node, use
# SystemdSpawner (pip install jupyterhub-systemdspawner): each learner's
# server, kernels and workers in one systemd unit, i.e. one cgroup, killed as a
# whole when the server stops; the sizing table in docs/workshop.md says how
# much a notebook needs.
# c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
# c.SystemdSpawner.mem_limit = "4G"          # a hard limit: over it, the kernel or a worker is OOM-killed
# c.SystemdSpawner.cpu_limit = 2.0           # cores
# c.SystemdSpawner.isolate_tmp = True        # a private /tmp per learner
# c.SystemdSpawner.unit_extra_properties = {"TasksMax": "256"}
# On Kubernetes, Zero to JupyterHub sets the same limits per profile (docs/workshop.md).

# ---------------------------------------------------------------- the idle culler

# Stops a learner's server after CULL_TIMEOUT seconds without activity, which
# shuts its kernels down and, with them, every worker process the kit started.
# Activity is what the server reports to the Hub: a browser request, or any
# message from a kernel (a cell's output, a progress bar or a dashboard
# update). A GRPO run that prints or updates its dashboard every step keeps
# its server alive however long it trains; a cell silent for longer than
# CULL_TIMEOUT (a long computation with no output) does not, so pick a timeout
# above your longest silent cell. The kernels' own culler inside each server
# (c.MappingKernelManager.cull_idle_timeout) is off by default; if you turn it
# on, keep c.MappingKernelManager.cull_busy = False (its default) so that a
# training kernel is never culled.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                    f"--timeout={CULL_TIMEOUT}", f"--cull-every={CULL_EVERY}"],
    },
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "description": "Stop the servers of idle learners",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
]
if importlib.util.find_spec("jupyterhub_idle_culler") is None:  # `pip install jupyterhub-idle-culler`
    c.JupyterHub.services, c.JupyterHub.load_roles = [], []
