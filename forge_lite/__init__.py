"""forge_lite: services, sessions and GRPO on Monarch actors, made to be watched.

The names below are the ones the tutorial uses; everything else is machinery.
Importing this package first also tunes Monarch for interactive use (see
``forge_lite.controller.runtime``), so import it before ``monarch``.
"""

from forge_lite.controller import runtime as _runtime  # noqa: F401  (sets env before monarch loads)
from forge_lite.controller import ForgeActor

__all__ = ["ForgeActor"]
__version__ = "0.1.0"
