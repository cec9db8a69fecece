"""Run a redraw at most every ``interval`` seconds, from the kernel's event loop.

Events can arrive hundreds of times a second; a browser needs a few frames.
The first call schedules the function on the running asyncio loop; calls
until it runs are merged into that one run. No threads: the kernel's loop
runs callbacks between (and during the awaits of) notebook cells. A redraw
that raises is reported once (a ``CallbackWarning``) and tried again next
time: an error there must not reach the kernel's loop, or the code that
published the event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from forge_lite.controller.service.events import CallbackErrors


class Throttle:
    def __init__(self, fn: Callable[[], None], interval: float = 0.1):
        self.fn = fn
        self.interval = interval
        self.runs = 0
        self._last = 0.0
        self._pending: asyncio.TimerHandle | None = None
        self._errors = CallbackErrors("redraw")

    def __call__(self) -> None:
        if self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (plain script): draw now
            self._run()
            return
        delay = max(0.0, self._last + self.interval - time.monotonic())
        self._pending = loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        self._last = time.monotonic()
        self.runs += 1
        self._errors.call(self.fn)

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
