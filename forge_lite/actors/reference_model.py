"""ReferenceModel: the frozen starting model the GRPO loss measures drift from.

The loss's KL term keeps the policy near where it started; for that it needs
the logprobs the *original* model gives each response token. This actor holds
a frozen copy and computes them.

``forward(input_ids, max_req_tokens)`` takes prompt and response as one
sequence and returns the logprobs of every token after the first
``max_req_tokens``, shape ``[B, L - max_req_tokens]``. ``max_req_tokens`` is
where the request ends: ``len(completion.prompt_ids)`` for an unpadded
sequence, or the episode's ``request_len`` for padded episode tensors (then
pass ``attention_mask`` too, so the padding is ignored). The tutorial passes
512 for an unpadded prompt, which silently shifts every logprob onto the
wrong token.
"""

from __future__ import annotations

import torch

from forge_lite.actors.hf_model import load_causal_lm
from forge_lite.controller import ForgeActor
from forge_lite.rl.logprobs import response_logits, token_logprobs
from monarch.actor import endpoint


class ReferenceModel(ForgeActor):
    """A frozen causal LM that scores response tokens.

    ``model`` is a path, a hub id or the tutorial's dict (see
    ``forge_lite.actors.hf_model``); default: the shipped model. ``device``
    defaults to the GPU when the process has one.
    """

    def __init__(self, model: str | dict | None = None, dtype: str = "float32", device=None):
        self.model_spec = model
        self.dtype = dtype
        self.device = device

    @endpoint
    async def setup(self) -> None:
        self.model = load_causal_lm(self.model_spec, self.dtype, self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    @endpoint
    def forward(
        self,
        input_ids: torch.Tensor,
        max_req_tokens: int,
        return_logprobs: bool = True,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logprobs ``[B, L - max_req_tokens]`` of the tokens after the request.

        With ``return_logprobs=False``, the logits that predict those same
        tokens, ``[B, L - max_req_tokens, V]``: row i of either output is
        about response token i.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "input_ids must be a [batch, length] tensor; for one sequence use "
                "torch.cat([prompt_ids, token_ids]).unsqueeze(0)"
            )
        length = input_ids.shape[1]
        if not 0 < max_req_tokens < length:
            raise ValueError(
                f"max_req_tokens={max_req_tokens} must be at least 1 and shorter than the "
                f"sequence ({length} tokens): it says where the request ends, so pass "
                "len(prompt_ids) for an unpadded sequence or request_len for padded episodes"
            )
        device = next(self.model.parameters()).device
        tokens = input_ids.to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        with torch.inference_mode():
            # The same logits as the trainer's, each distinct request run once.
            logits = response_logits(self.model, tokens, mask, max_req_tokens)
            if return_logprobs:
                return token_logprobs(logits, tokens[:, max_req_tokens:]).cpu()
            return logits.float().cpu()
