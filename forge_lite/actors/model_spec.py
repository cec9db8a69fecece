"""A model spec, as the tutorial passes it (``model=``), turned into what
``from_pretrained`` takes.

A model spec is:

- a path or hub id: ``"Qwen/Qwen3-1.7B"``, or ``forge_lite.assets.DEFAULT_MODEL``;
- the torchtitan-style dict ``{"name": "qwen3", "flavor": "1.7B",
  "hf_assets_path": "hf://Qwen/Qwen3-1.7B"}``, which names the same hub model.

This module imports neither torch nor transformers: the dataset actor
resolves the model to read its tokenizer, in the light actors' process,
which runs no model and never loads torch (see ``forge_lite.rl.episode``).
"""

from __future__ import annotations

import os

from forge_lite.actors.engines import resolve_model as resolve_loadable_model

# torchtitan names models by family and flavor; these families map to a hub
# organisation and name prefix, so {"name": "qwen3", "flavor": "1.7B"} is
# "Qwen/Qwen3-1.7B".
HUB_FAMILIES = {"qwen3": "Qwen/Qwen3-"}


def resolve_model(spec: str | dict | None = None) -> str:
    """The local directory or hub id that ``from_pretrained`` takes for a model spec.

    A dict is turned into a hub id here; the check that the model can be
    loaded at all (a local directory, the hub cache, or a reachable hub) is
    the engines' ``resolve_model``, so a bad name fails at once, naming the
    shipped model, instead of after a minute of network retries.
    """
    if isinstance(spec, dict):
        spec = _hub_id_from_dict(spec)
    elif spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"model must be a path, a hub id or a dict like {{'name': 'qwen3', 'flavor': "
            f"'1.7B', 'hf_assets_path': 'hf://Qwen/Qwen3-1.7B'}}, got {type(spec).__name__}"
        )
    return resolve_loadable_model(None if spec is None else os.fspath(spec))


def _hub_id_from_dict(spec: dict) -> str:
    if spec.get("hf_assets_path"):
        return str(spec["hf_assets_path"]).removeprefix("hf://")
    family = str(spec.get("name", "")).lower()
    if family in HUB_FAMILIES and spec.get("flavor"):
        return f"{HUB_FAMILIES[family]}{spec['flavor']}"
    raise ValueError(
        f"cannot tell which model {spec!r} names: give 'hf_assets_path' (a path, or "
        f"hf://<hub id>), or a 'name' among {sorted(HUB_FAMILIES)} with a 'flavor'"
    )
