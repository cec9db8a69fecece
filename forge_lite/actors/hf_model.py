"""Loading a Hugging Face causal LM and its tokenizer from a model spec.

The reference model and the trainer must see the same model the same way:
if they loaded it differently, the KL between them would not be zero even
with identical weights. So both load it here (and run it through
``forge_lite.rl.logprobs``, the one path from logits to logprobs).

A model spec is what the tutorial passes as ``model=``:

- a path or hub id: ``"Qwen/Qwen3-1.7B"``, or ``forge_lite.assets.DEFAULT_MODEL``;
- the torchtitan-style dict ``{"name": "qwen3", "flavor": "1.7B",
  "hf_assets_path": "hf://Qwen/Qwen3-1.7B"}``, which names the same hub model.
"""

from __future__ import annotations

import os

import torch

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


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return resolved


def default_device() -> torch.device:
    """The GPU when this process was given one (``with_gpus=True``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(spec: str | dict | None, dtype: str | torch.dtype = "float32", device=None):
    """The model named by ``spec``, on ``device`` (default: see ``default_device``)."""
    # Imported here, not at the top: transformers takes seconds to import, and
    # every actor process that imports forge_lite.grpo would pay for it.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch_dtype(dtype))
    return model.to(device or default_device())


def load_tokenizer(spec: str | dict | None):
    """The tokenizer that belongs to the model named by ``spec``."""
    from transformers import AutoTokenizer  # slow to import; see load_causal_lm

    return AutoTokenizer.from_pretrained(resolve_model(spec))
