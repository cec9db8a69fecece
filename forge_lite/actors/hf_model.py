"""Loading a Hugging Face causal LM and its tokenizer from a model spec.

The reference model and the trainer must see the same model the same way:
if they loaded it differently, the KL between them would not be zero even
with identical weights. So both load it here (and run it through
``forge_lite.rl.logprobs``, the one path from logits to logprobs).

A model spec is what the tutorial passes as ``model=``: a path, a hub id,
or a torchtitan-style dict (``forge_lite.actors.model_spec``).
"""

from __future__ import annotations

import torch

from forge_lite.actors.model_spec import resolve_model  # noqa: F401 (re-exported)


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
