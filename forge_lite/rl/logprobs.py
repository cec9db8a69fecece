"""From a causal LM's logits to the per-token logprobs the loss is computed from.

The reference model and the trainer must compute the same numbers the same
way: if they ran the model or took its softmax differently, the KL between
them would not be zero even with identical weights. So both call this
module, as does the transformers engine for the logprobs it reports with
each sampled token (``Completion.logprobs``, the behaviour policy's):

- ``causal_lm_logits``: a Hugging Face causal LM's logits for padded rows;
- ``response_logits``: only the logits that predict the response tokens,
  each distinct request run once (what the trainer and the reference use);
- ``token_logprobs``: logits -> the logprob of each given token, the one
  place a softmax becomes a logprob; ``response_logprobs`` is the same from
  the whole rows' logits.

Shapes: ``B`` rows of ``L`` tokens, the request ending at column
``request_len`` (left-padded), the response after it; ``V`` the vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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
    # Imported here, not at the top: transformers takes seconds to import, and
    # every process that imports forge_lite.rl would pay for it.
    from transformers import DynamicCache

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


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, request_len: int) -> torch.Tensor:
    """Logprobs of ``tokens[:, request_len:]`` under ``logits``: shape ``[B, L - request_len]``.

    ``logits[:, i]`` is the model's prediction for ``tokens[:, i + 1]``, hence
    the shift by one (``token_logprobs`` takes logits already shifted).
    """
    if tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"need logits [B, L, V] and tokens [B, L], got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    check_request_len(request_len, tokens.shape[1])
    return token_logprobs(logits[:, request_len - 1 : -1], tokens[:, request_len:])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logprobs ``[B, R]`` of ``tokens`` ``[B, R]`` under ``logits`` ``[B, R, V]``,
    where ``logits[:, i]`` is the prediction for ``tokens[:, i]``.

    The softmax runs in float32: in bfloat16 the logprobs of likely tokens
    round to 0 and the KL term turns into noise.
    """
    if tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"need logits [B, R, V] and tokens [B, R], got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def check_request_len(request_len: int, length: int) -> None:
    """ValueError unless a response token follows a request of ``request_len``
    tokens in sequences of ``length`` tokens."""
    if not 0 < request_len < length:
        raise ValueError(
            f"request_len={request_len} must be between 1 and the sequence length "
            f"{length} minus 1, so that at least one response token follows"
        )
