"""The GRPO loss, and the logprobs it is computed from.

Per response token t of a sequence with advantage A:

    ratio_t = exp(logprob_t - logprob_t.detach())        # 1.0, but carries the gradient
    kl_t    = exp(ref_t - logprob_t) - (ref_t - logprob_t) - 1
    loss_t  = -(ratio_t * A - beta * kl_t)

The ratio is 1 in value, so the policy term's gradient is A times the
gradient of logprob_t: push up tokens of better-than-average responses, push
down the others. This is the simplified form of TorchForge's GRPO app: every
sample is treated as on-policy (the replay buffer's ``max_policy_age`` bounds
how stale one can be), so there is no importance ratio to clip.

kl_t is the "k3" estimator of KL(policy || reference) (Schulman, "Approximating
KL divergence", 2020): always >= 0, zero when the two agree, and unbiased
while needing only the sampled token's logprob. beta = 0.1 sets how hard the
policy is held near the reference model.

The loss averages over each sequence's real tokens (``padding_mask``), then
over the batch, so a long response does not outweigh a short one. What a
masked position holds (padding, -inf, NaN, anything) never reaches the loss,
its KL or its gradient: both logprob tensors are set to 0 there before any
arithmetic (``unmasked``).

``token_logprobs`` (under ``response_logprobs``) is the one place logits
become per-token logprobs: the reference model and the trainer both call it,
on logits from ``forge_lite.actors.hf_model.response_logits``, so the two can
only differ by their weights.
"""

import torch
import torch.nn.functional as F

DEFAULT_BETA = 0.1


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


def unmasked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with 0 where ``mask`` is False.

    Selecting *before* any arithmetic is what keeps masked positions out: a
    mask applied afterwards multiplies, and NaN * 0 and inf * 0 are NaN, in
    the value and in the gradient. torch.where passes a zero gradient to the
    positions it did not select, so nothing flows back into them either.
    """
    return torch.where(mask, values, torch.zeros_like(values))


def k3_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(policy || reference) per token, 0 where ``mask`` is False.

    ``exp(r) - r - 1`` with ``r = ref - policy``, written ``expm1(r) - r``: the
    same number, but accurate for the tiny r of nearly equal models, where
    ``exp(r) - 1`` loses its digits to rounding and can even come out below
    0, which the estimator never is. All three tensors have one shape
    (``[B, T]`` in the loss, ``[T]`` for one response); so does the result,
    in the logprobs' dtype. This is the one definition of the KL: the loss
    and the rollout's reported KL (``response_kl``) both use it.
    """
    mask = mask.bool()
    # Both 0 at masked positions, so r = 0 and the KL there is exactly 0.
    log_ratio = unmasked(ref_logprobs, mask) - unmasked(logprobs, mask)
    return torch.expm1(log_ratio) - log_ratio


def response_kl(
    ref_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """One response's KL to the reference: the mean over its tokens (``[T]``
    each) of ``k3_kl``, in float64 for the tiny KLs of nearly equal models.

    ``mask`` (``[T]`` bool): average over the True positions only, the model's
    tokens of a multi-turn response (None: every token). NaN when it selects none.
    """
    if mask is None:
        every_token = torch.ones_like(logprobs, dtype=torch.bool)
        return float(k3_kl(ref_logprobs.double(), logprobs.double(), every_token).mean())
    mask = mask.bool()
    kl = k3_kl(ref_logprobs.double(), logprobs.double(), mask)
    return float(kl.sum() / mask.sum()) if mask.any() else float("nan")


def grpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    padding_mask: torch.Tensor,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """The scalar GRPO loss of a batch; every tensor is ``[B, response_len]`` but
    ``advantages``, ``[B, 1]``.

    Only positions where ``padding_mask`` is true count (the collate sets it
    to the tokens the model wrote: not padding, not a multi-turn episode's
    environment turns): the loss and its
    gradient are the same whatever ``logprobs`` and ``ref_logprobs`` hold at
    the others, inf and NaN included (the gradient there is 0).

    With ``beta == 0`` the KL term is left out, not multiplied by 0 (0 * inf
    is NaN), and ``ref_logprobs`` may be None: a run that skips the reference
    model. Raises ValueError for ``ref_logprobs=None`` with ``beta > 0``.
    """
    mask = padding_mask.bool()
    policy = unmasked(logprobs, mask)
    ratio = torch.exp(policy - policy.detach())
    per_token = -ratio * advantages
    if beta:
        if ref_logprobs is None:
            raise ValueError(
                f"the KL penalty (beta={beta}) needs the reference model's logprobs of every "
                "response, but the batch has none; score every response with the reference "
                "(reference.kl_samples unset) or set beta to 0"
            )
        per_token = per_token + beta * k3_kl(ref_logprobs, policy, mask)
    per_token = unmasked(per_token, mask)
    tokens_per_sequence = mask.sum(dim=1).clamp(min=1)
    per_sequence = per_token.sum(dim=1) / tokens_per_sequence
    return per_sequence.mean()
