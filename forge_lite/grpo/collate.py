"""GRPO collate: a list of Episodes becomes the trainer's ``(inputs, targets)``.

The replay buffer samples episodes; the trainer wants tensors. Both sides of
the batch come as one dict per data-parallel rank, so with ``dp_size=2`` the
first half of the episodes goes to rank 0 and the second half to rank 1:

    inputs  = [{"tokens": [b, req+res], "attention_mask": [b, req+res]}, ...]
    targets = [{"response": [b, res], "ref_logprobs": [b, res],
                "advantages": [b, 1], "padding_mask": [b, res]}, ...]

``tokens`` is each episode's left-padded request followed by its
right-padded response, so every response starts at column ``req``; the
trainer finds ``req`` as ``tokens.shape[1] - response.shape[1]``.
``attention_mask`` marks real tokens, so the model never attends to the
left padding (padding it attended to would change every logprob after it,
and the trainer's logprobs would no longer match the reference model's).
``padding_mask`` marks the response tokens the loss counts.
"""

from __future__ import annotations

import torch

from forge_lite.grpo.episode import Episode


def grpo_collate(episodes: list[Episode], dp_size: int = 1) -> tuple[list[dict], list[dict]]:
    """``(inputs, targets)``: one dict each per data-parallel rank, in rank order."""
    if not episodes:
        raise ValueError("cannot collate an empty list of episodes")
    if len(episodes) % dp_size:
        raise ValueError(
            f"{len(episodes)} episodes do not split evenly over dp_size={dp_size}"
        )
    not_episodes = sorted({type(e).__name__ for e in episodes if not isinstance(e, Episode)})
    if not_episodes:
        raise TypeError(
            f"grpo_collate takes Episodes, got {not_episodes}; for other items give the "
            "ReplayBuffer collate=None (lists of items) or your own collate function"
        )
    shapes = {(e.request_len, e.response_len) for e in episodes}
    if len(shapes) > 1:
        raise ValueError(
            f"episodes have different (request_len, response_len): {sorted(shapes)}; "
            "use the same lengths for every episode so that they stack into one batch"
        )
    for episode in episodes:
        if episode.advantage is None:
            raise ValueError(
                f"episode {episode.episode_id!r} has no advantage; compute the group's "
                "advantages (ComputeAdvantages) and set episode.advantage before adding it"
            )

    per_rank = len(episodes) // dp_size
    inputs, targets = [], []
    for rank in range(dp_size):
        chunk = episodes[rank * per_rank : (rank + 1) * per_rank]
        request = torch.stack([e.request_tensor for e in chunk])
        response = torch.stack([e.response_tensor for e in chunk])
        request_mask = torch.stack([e.request_mask for e in chunk])
        response_mask = torch.stack([e.response_mask for e in chunk])
        inputs.append(
            {
                "tokens": torch.cat([request, response], dim=1),
                "attention_mask": torch.cat([request_mask, response_mask], dim=1),
            }
        )
        targets.append(
            {
                "response": response,
                "ref_logprobs": torch.stack([e.padded_ref_logprobs for e in chunk]),
                "advantages": torch.tensor(
                    [[float(e.advantage)] for e in chunk], dtype=torch.float32
                ),
                "padding_mask": response_mask,
            }
        )
    return inputs, targets
