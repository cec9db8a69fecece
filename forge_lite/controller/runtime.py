"""Process-wide Monarch settings and fault handling for the caller's process.

Monarch reads some settings only from the environment, and only once, when it
is first imported; this module sets them before that happens. It also owns the
one piece of global state every Monarch client must have: the fault hook.
Monarch's default hook ends the client process (a KeyboardInterrupt, or a
cancelled cell in Jupyter) whenever any child process dies, which would make
"kill a replica and watch it come back" impossible. Here a failure is handed
to whoever registered interest in that mesh (a service replica), and the
caller keeps running.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Callable

# Poll for a dead process every second instead of Monarch's default 10 s, so
# a death is noticed that much sooner. Only settable through the
# environment, before monarch is imported.
os.environ.setdefault("HYPERACTOR_MESH_SUPERVISION_POLL_FREQUENCY", "1s")
# Monarch's Rust log file grows by megabytes per run at INFO level.
os.environ.setdefault("MONARCH_FILE_LOG", "error")

import monarch  # noqa: E402
import monarch.actor  # noqa: E402

log = logging.getLogger("forge_lite")

FailureListener = Callable[[str, str], None]  # (mesh_name, report) -> None

_listeners: dict[str, FailureListener] = {}
_lock = threading.Lock()
_configured = False


WORKER_ENV = "FORGE_LITE_WORKER"  # set in every process the kit spawns
# Set by a service in its replicas' processes: the replica's index, and "1"
# when the replica joins a service that is already serving (a respawn after a
# failure, or a scale-up) rather than starting with it. A replica that joins
# should come up in the state its siblings are in (e.g. their weights).
REPLICA_ENV = "FORGE_LITE_REPLICA"
JOINING_ENV = "FORGE_LITE_REPLICA_JOINING"


def in_worker_process() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def _runs_the_worker_command() -> bool:
    """Is this process ``python -m forge_lite.worker``, importing its package now?

    Python imports ``forge_lite`` (its ``__init__``, and so this module)
    before the worker's own code runs, so the worker cannot set its
    environment before the package reads it. While ``-m`` imports the
    module's package, ``sys.argv[0]`` is ``"-m"`` (Python's placeholder until
    the module is found); the original command line names the module.
    """
    return sys.argv[:1] == ["-m"] and "forge_lite.worker" in getattr(sys, "orig_argv", ())


# A worker, and every process it starts, is not a client: it keeps Monarch's
# own fault handling (forge_lite/__init__.py installs the hook only outside
# workers). Set before that check runs.
if _runs_the_worker_command():
    os.environ[WORKER_ENV] = "1"


def replica_index() -> int | None:
    """This process's replica index in its service; None outside a service."""
    index = os.environ.get(REPLICA_ENV)
    return int(index) if index is not None else None


def joins_running_service() -> bool:
    """Was this replica started to join a service that already serves?"""
    return os.environ.get(JOINING_ENV) == "1"


def mesh_prefix(mesh_name: str) -> str:
    """The name given to ``spawn`` for a mesh Monarch reports as ``name-<random>``."""
    return mesh_name.rsplit("-", 1)[0]


def on_mesh_failure(actor_name: str, listener: FailureListener) -> None:
    """Call ``listener(mesh_name, report)`` when the actor mesh spawned as
    ``actor_name`` fails. The listener runs on a Monarch thread: keep it short
    and hand work to an event loop with ``call_soon_threadsafe``."""
    with _lock:
        _listeners[actor_name] = listener


def forget_mesh(actor_name: str) -> None:
    with _lock:
        _listeners.pop(actor_name, None)


def _fault_hook(failure) -> None:
    # Returning normally tells Monarch the failure is handled: the client lives.
    name = failure.mesh_name
    with _lock:
        listener = _listeners.get(mesh_prefix(name))
    if listener is None:
        # Monarch's own helper meshes (logger-*, log_forwarder-*) fail together
        # with the user's mesh; they need no action of ours.
        log.debug("mesh %s failed (no listener)", name)
        return
    try:
        listener(name, failure.report())
    except Exception:  # a broken listener must not take the client down
        log.exception("fault listener for %s raised", name)


def install_fault_hook() -> None:
    """Install the fault hook and turn off Monarch's log forwarding; idempotent.

    Touches no Monarch connection, so it is safe at import time: Monarch fixes
    its transport (Unix sockets, or TCP for hosts on other machines) at the
    first call that needs a client, and ``forge_lite.attach_cluster`` must
    still be able to choose TCP then.

    Log forwarding is turned off because IPython switches it on: with it,
    stopping a mesh whose process died hangs in a log flush (past nbval's
    cell timeout). Child processes inherit the kernel's stdout/stderr,
    so their prints still reach the cell.
    """
    global _configured
    if _configured:
        return
    monarch.actor.unhandled_fault_hook = _fault_hook
    try:
        monarch.configure(enable_log_forwarding=False)
    except Exception:  # older/newer Monarch without this key: keep defaults
        log.debug("could not turn off log forwarding", exc_info=True)
    _configured = True


_client_started = False


def client_started() -> bool:
    """Has this process started Monarch's client (so its transport is fixed)?"""
    return _client_started


def configure_client() -> None:
    """``install_fault_hook``, then create Monarch's client context quietly;
    idempotent. Called before the first spawn."""
    global _client_started
    install_fault_hook()
    if not _client_started:
        _quiet_first_context()
        _client_started = True


def _quiet_first_context() -> None:
    """Create Monarch's client context with stderr silenced.

    The first ``context()`` call prints "Monarch internal logs are being
    written to <path>; execution id <random>" from Rust, unconditionally. In a
    notebook that line lands in whatever cell spawns first, with a machine path
    and a random id; it says nothing a learner needs.
    """
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        monarch.actor.context()
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
