"""Names a package re-exports but imports only on first use (PEP 562).

``forge_lite``, ``forge_lite.grpo`` and ``forge_lite.rl`` offer names whose
modules import torch or transformers (seconds of CPU). Every worker process
imports these packages, and a light one (a RewardActor replica) needs none
of those names, so each is imported when somebody first reads it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``homes`` maps each name to
    the module it is imported from when first read. Reading another name
    raises AttributeError, as for any module.

    Example, in a package's ``__init__.py``:
    ``__getattr__, __dir__ = lazy_exports(__name__, {"grpo_loss": "forge_lite.rl.loss"})``.
    """

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(homes)

    return __getattr__, __dir__
