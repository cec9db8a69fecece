"""Run a redraw at most every ``interval`` seconds, from the kernel's event loop.

Events can arrive hundreds of times a second; a browser needs a few frames.
The first call schedules the function on the running asyncio loop; calls
until it runs are merged into that one run. No threads: the kernel's loop
runs callbacks between (and during the awaits of) notebook cells.

That loop is also the controller of every service the notebook started, so
a redraw's time is taken from the work it draws. ``max_share`` bounds it:
after a redraw that took ``d`` seconds the next one waits at least
``d / max_share`` (a 0.2 s figure with ``max_share=0.05`` redraws at most
every 4 s), so an expensive picture slows itself down, not the training.
The first run is not counted: it pays once for imports and font caches.
``flush()`` runs it now, for a last state that must not wait (a run that ended).

A redraw that raises is reported once (a ``CallbackWarning``) and tried again
next time: an error there must not reach the kernel's loop, or the code that
published the event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from forge_lite.controller.service.events import CallbackErrors


class Throttle:
    """Calls ``fn`` (no arguments) at most once every ``interval`` seconds,
    merging the calls made meanwhile; see the module docstring.

    ``max_share`` (0 to 1] bounds the share of the event loop's time ``fn``
    may take: after a run of ``d`` seconds the next waits ``d / max_share``.
    ``runs`` counts the runs and ``busy_s`` their seconds, for tests and for
    a learner who wants to see what the drawing costs. An exception from
    ``fn`` is reported once as a warning and never raised to the caller.

    Example: ``redraw = Throttle(view.draw, interval=0.25, max_share=0.05)``;
    call ``redraw()`` on every event, ``redraw.flush()`` for the last one.
    """

    def __init__(self, fn: Callable[[], None], interval: float = 0.1, max_share: float = 1.0):
        self.fn = fn
        self.interval = interval
        self.max_share = max_share
        self.runs = 0
        self.busy_s = 0.0  # seconds spent in fn, over all runs
        self._gap = interval  # the wait before the next run may start
        self._last = float("-inf")
        self._pending: asyncio.TimerHandle | None = None
        self._errors = CallbackErrors("redraw")

    def __call__(self) -> None:
        """Schedule a run on the running loop (merged with one already
        scheduled); with no running loop (a plain script), run now."""
        if self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (plain script): draw now
            self._run()
            return
        delay = max(0.0, self._last + self._gap - time.monotonic())
        self._pending = loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        started = time.monotonic()
        self.runs += 1
        self._errors.call(self.fn)
        self._last = time.monotonic()
        took = self._last - started
        self.busy_s += took
        if self.runs > 1:
            self._gap = max(self.interval, took / self.max_share)

    def flush(self) -> None:
        """Run now (a pending run is merged into this one)."""
        self.cancel()
        self._run()

    def cancel(self) -> None:
        """Drop a scheduled run, if any."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
