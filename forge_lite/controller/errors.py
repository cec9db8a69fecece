"""The controller's exceptions, and what each call can raise.

``svc.<endpoint>.route(...)`` (``Service.route``) raises:
  - the endpoint's own exception, as itself (or a ``RemoteError`` named like
    it when it cannot be rebuilt here, see below): not retried, and the
    replica stays healthy;
  - ``NoHealthyReplicaError`` when no replica can take the request: every one
    failed and none is respawning, it failed on ``max_retries + 1`` replicas
    (its ``__cause__`` is the last ``ReplicaFailure``), or it waited
    ``request_timeout`` seconds for a replica with room;
  - ``ServiceShutdownError`` after ``shutdown()``, also to a request that was
    waiting for a replica then;
  - ``TypeError`` for arguments that do not fit the endpoint's signature;
  - what a router of your own raises in ``choose`` (TypeError or ValueError
    when it answers with something that is not one of its candidates).
  A ``ReplicaFailure`` never reaches the caller of ``route``: it is retried.

``svc.<endpoint>.fanout(...)`` (``Service.fanout``), no retries, raises:
  - ``FanoutError`` when the call failed on any replica: ``.failures`` maps a
    replica's index to the endpoint's exception or a ``ReplicaFailure``
    (``HostLost`` when its host was lost), ``.results`` the others' answers;
  - ``NoHealthyReplicaError`` when no replica is up;
  - ``ServiceShutdownError`` after ``shutdown()``.

``actor.<endpoint>.call_one(...)`` / ``call`` / ``choose`` / ``stream`` on the
handle ``as_actor()`` returns (``forge_lite.controller.actor_handle``) raise:
  - the endpoint's own exception, as itself or as a ``RemoteError``;
  - Monarch's own supervision error, unchanged, when a process died.

Sessions: ``svc.session()`` and ``svc.start_session()`` raise
``ServiceShutdownError`` after ``shutdown()``; a ``route`` inside a session
raises what any ``route`` raises. A session whose replica failed is not an
error: it moves to another replica (a ``SessionMoved`` event says so).

The teaching controls (``kill_replica``, ``kill_host``, ``slow_replica``,
``scale``, ``wait_for_state``, ``wait_for_host``) raise IndexError for a
replica or host that does not exist, ValueError for a bad argument (and
``kill_host`` on a cluster of this machine alone), ``ClusterError`` from
``kill_host`` for a host already lost, TimeoutError when the service did not
notice in time, and ``ServiceShutdownError`` after ``shutdown()``.

Inside the controller, never raised to a caller of ``route``: ``UserError``
carries the endpoint's exception from ``Replica.call`` to the service, which
raises the original; ``ReplicaFailure`` (and its ``HostLost``) says the
replica could not run the call, and makes the service retry elsewhere.

Endpoint exceptions that reach the caller intact
------------------------------------------------
An exception raised in an endpoint travels to the caller pickled. Python
pickles an exception as ``(its class, its args)`` and rebuilds it by calling
``cls(*args)``, which fails for a class whose ``__init__`` takes other
arguments than the ones it passes to ``Exception.__init__``:

    class CodedError(Exception):
        def __init__(self, code, detail):
            super().__init__(f"{code}: {detail}")   # args == ("404: no such item",)

    CodedError(404, "no such item") is rebuilt as CodedError("404: no such item")
    -> TypeError: __init__() missing 1 required positional argument: 'detail'

The caller would see that TypeError instead of the endpoint's error. So every
ForgeActor endpoint checks, on the actor's side and only when it raises,
whether its exception survives the trip (``portable``); if it does not, the
caller gets a ``RemoteError`` with the original's class name, module, message
and traceback.
"""

from __future__ import annotations

import functools
import traceback

import cloudpickle

# ------------------------------------------------------------ a service's calls


class NoHealthyReplicaError(RuntimeError):
    """No replica could take the request (all failed, or the wait timed out)."""


class ServiceShutdownError(RuntimeError):
    """The service was shut down."""


class FanoutError(RuntimeError):
    """Some replicas failed a fanout; ``results`` holds the others' answers."""

    def __init__(self, endpoint: str, failures: dict[int, BaseException], results: dict[int, object]):
        listed = "; ".join(f"replica {i}: {type(e).__name__}: {e}" for i, e in failures.items())
        super().__init__(f"fanout of {endpoint!r} failed on {len(failures)} replica(s): {listed}")
        self.failures = failures
        self.results = results


# ------------------------------------------------------------ the cluster


class ClusterError(RuntimeError):
    """The cluster could not be attached, or cannot hold what was asked of it."""


# ------------------------------------------------------------ inside the controller


class UserError(Exception):
    """Carries an exception raised by the endpoint's own code back to the caller."""

    def __init__(self, original: BaseException):
        super().__init__(original)
        self.original = original


class ReplicaFailure(Exception):
    """The replica could not run the call: its process died or is unreachable."""


class HostLost(ReplicaFailure):
    """The replica's host was lost; calls in flight there were given up."""


# ------------------------------------------------------------ endpoint exceptions, intact


class RemoteError(Exception):
    """An endpoint's exception that could not be rebuilt on the caller's side.

    The instance the caller catches is of a subclass named after the original
    class (``type(e).__name__ == "CodedError"``, in the original's module), so
    tracebacks read like the original; ``except RemoteError`` catches all of
    them. ``str(e)`` is the original message.

    Attributes: ``type_name`` and ``module`` of the original class,
    ``message`` (``str`` of the original), ``remote_traceback`` (the text of
    the traceback on the actor's process, also attached as a note).
    """

    def __init__(self, type_name: str, module: str, message: str, remote_traceback: str):
        super().__init__(message)
        self.type_name = type_name
        self.module = module
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return _rebuild, (self.type_name, self.module, self.message, self.remote_traceback)


@functools.lru_cache(maxsize=None)
def _named_like(type_name: str, module: str) -> type:
    """A RemoteError subclass that carries the original class's name."""
    return type(type_name, (RemoteError,), {"__module__": module, "__qualname__": type_name})


def _rebuild(type_name: str, module: str, message: str, remote_traceback: str) -> RemoteError:
    error = _named_like(type_name, module)(type_name, module, message, remote_traceback)
    error.add_note(f"(raised on the actor's process; its traceback:)\n{remote_traceback.rstrip()}")
    return error


def portable(error: BaseException) -> BaseException:
    """``error`` itself if the caller can rebuild it with its type and
    message; otherwise a RemoteError that keeps its name, message and traceback."""
    if isinstance(error, RemoteError):
        return error
    try:
        rebuilt = cloudpickle.loads(cloudpickle.dumps(error))
        if type(rebuilt) is type(error) and str(rebuilt) == str(error):
            return error
    except Exception:  # its __init__ refused the args, or an attribute does not pickle
        pass
    return RemoteError(
        type(error).__qualname__,
        type(error).__module__,
        str(error),
        "".join(traceback.format_exception(error)),
    )


def remote_exception(actor_error: BaseException) -> BaseException:
    """The endpoint's own exception out of Monarch's ``ActorError`` wrapper,
    with the traceback from the actor's process attached as a note (once).

    Both ways of calling an actor raise what this returns: a service's
    ``route``/``fanout`` and an actor handle's ``call_one``/``call``/``choose``
    (``forge_lite.controller.actor_handle``). Anything other than an
    ``ActorError`` (a dead process, a timeout) is returned unchanged.
    """
    original = getattr(actor_error, "exception", None)
    formatted = getattr(actor_error, "exception_formatted", None)
    if not isinstance(original, BaseException):
        return actor_error
    if isinstance(original, RemoteError):
        return original  # already carries its traceback as a note
    note = f"(raised on the actor's process; its traceback:)\n{(formatted or '').rstrip()}"
    if formatted and note not in getattr(original, "__notes__", ()):
        original.add_note(note)
    return original
