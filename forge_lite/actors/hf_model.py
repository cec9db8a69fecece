"""Loading a Hugging Face causal LM from a model spec, and running it on padded batches.

The reference model and the trainer must see the same model the same way:
if they loaded or ran it differently, the KL between them would not be zero
even with identical weights. So both use this module.

A model spec is what the tutorial passes as ``model=``:

- a path or hub id: ``"Qwen/Qwen3-1.7B"``, or ``forge_lite.assets.DEFAULT_MODEL``;
- the torchtitan-style dict ``{"name": "qwen3", "flavor": "1.7B",
  "hf_assets_path": "hf://Qwen/Qwen3-1.7B"}``, which names the same hub model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from forge_lite.actors.engines import resolve_model as resolve_loadable_model
from forge_lite.rl.loss import check_request_len

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


def causal_lm_logits(
    model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``[B, L, V]`` for ``tokens`` ``[B, L]``, ignoring masked-out padding.

    With left padding, a token's position is how many real tokens precede it,
    not its column; position ids count only real tokens, so a padded row gets
    the same logits as the same sequence unpadded.
    """
    if attention_mask is None:
        return model(input_ids=tokens).logits
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return model(
        input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids
    ).logits


def response_logits(
    model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor | None, request_len: int
) -> torch.Tensor:
    """The logits that predict each response token: ``[B, L - request_len, V]``,
    row ``i`` for ``tokens[:, request_len + i]``, for ``tokens`` ``[B, L]``
    whose requests end at column ``request_len``.

    A GRPO batch holds each prompt ``group_size`` times, once per response.
    Running every row whole would compute each request ``group_size`` times;
    here each distinct request (its tokens and padding) runs once, with the
    model's KV cache kept (and its gradient), and every response runs on a
    copy of its own request's cache. Causal attention means a request token
    never sees the response after it, so the numbers are those of whole rows
    (to float rounding: tests/test_grpo_components.py compares logprobs and
    gradients) for a fraction of the compute: on the tiny config (32 rows of
    about 56 request and 32 response tokens, 4 distinct requests) a training
    step's forward and backward take about 2.2x less time
    (benchmarks/grpo_step_bound.py). This is the training-time twin of the
    prefix cache a service's sessions keep warm for inference.

    Raises ValueError when no response token follows ``request_len``.
    """
    from transformers import DynamicCache  # slow to import; see load_causal_lm

    check_request_len(request_len, tokens.shape[1])
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    request = torch.cat([tokens[:, :request_len], attention_mask[:, :request_len]], dim=1)
    distinct, row_of = torch.unique(request, dim=0, return_inverse=True)
    if len(distinct) == len(tokens):  # nothing shared: one pass over whole rows is cheaper
        return causal_lm_logits(model, tokens, attention_mask)[:, request_len - 1 : -1]

    request_mask = distinct[:, request_len:]
    cache = DynamicCache()
    requests = model(
        input_ids=distinct[:, :request_len], attention_mask=request_mask,
        position_ids=(request_mask.cumsum(dim=-1) - 1).clamp(min=0),
        past_key_values=cache, use_cache=True,
    )
    cache.batch_select_indices(row_of)  # each row gets its request's keys and values
    responses = model(
        input_ids=tokens[:, request_len:], attention_mask=attention_mask,
        position_ids=position_ids[:, request_len:], past_key_values=cache, use_cache=True,
    )
    # The request's last token predicts the first response token.
    return torch.cat([requests.logits[row_of, -1:], responses.logits[:, :-1]], dim=1)
