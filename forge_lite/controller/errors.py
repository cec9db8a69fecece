"""Endpoint exceptions that reach the caller intact.

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


class ClusterError(RuntimeError):
    """The cluster could not be attached, or cannot hold what was asked of it."""


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
