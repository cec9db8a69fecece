"""Deploying actors: ForgeActor, services, processes."""

from forge_lite.controller import runtime  # noqa: F401  (before anything imports monarch)
from forge_lite.controller.actor import ForgeActor

__all__ = ["ForgeActor"]
