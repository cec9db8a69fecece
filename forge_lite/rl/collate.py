"""GRPO collate: a list of Episodes becomes the trainer's ``(inputs, targets)``.

The replay buffer samples episodes; the trainer wants tensors. Both sides of
the batch come as one dict per data-parallel rank, so with ``dp_size=2`` the
first half of the episodes goes to rank 0 and the second half to rank 1:

    inputs  = [{"tokens": [b, req+res], "attention_mask": [b, req+res]}, ...]
    targets = [{"response": [b, res], "ref_logprobs": [b, res],
                "behaviour_logprobs": [b, res],
                "advantages": [b, 1], "padding_mask": [b, res]}, ...]

``ref_logprobs`` is left out when some episode has none: a run with beta 0
that asks the reference model about a sample of responses only (for the
reported KL); the GRPO loss then leaves the KL term out.
``behaviour_logprobs`` (the sampler's, ``Episode.behaviour_logprobs``) is
left out when some episode has none; the loss then treats every sample as
on-policy.

``tokens`` is each episode's left-padded request followed by its
right-padded response, so every response starts at column ``req``; the
trainer finds ``req`` as ``tokens.shape[1] - response.shape[1]``.
``attention_mask`` marks real tokens, so the model never attends to the
left padding (padding it attended to would change every logprob after it,
and the trainer's logprobs would no longer match the reference model's).
``padding_mask`` marks the response tokens the loss counts: the real ones
the model wrote (``Episode.model_mask``). In a single-turn episode that is
every real response token; in a multi-turn one the environment's tokens are
left out: the model reads them (``attention_mask``) but is not trained on them.
With ``mask_truncated`` a truncated episode's row is all False: a response
cut at the length limit has no ending to be judged by, and its reward
(usually that of a wrong answer) would push down tokens that were fine
(DAPO's "overlong filtering"; TRL's ``mask_truncated_completions``). It
still counts as a sequence in a mean over sequences, as in TRL.
"""

from __future__ import annotations

from forge_lite.rl.episode import Episode, check_finite

# The replay buffer's process imports this module (its default collate) but,
# with collate=None as a GRPO run sets it, never collates: torch is imported
# when a batch is first built, not before (see forge_lite.rl.episode).


def grpo_collate(
    episodes: list[Episode], dp_size: int = 1, mask_truncated: bool = False
) -> tuple[list[dict], list[dict]]:
    """``(inputs, targets)``: one dict each per data-parallel rank, in rank order;
    with ``mask_truncated``, episodes marked ``truncated`` get no loss tokens.

    Raises ValueError for episodes that cannot stack into one batch, one
    without an advantage, or one whose reward, advantage or ref_logprobs are
    not finite; TypeError for items that are not Episodes.
    """
    import torch

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
        check_finite(episode)

    with_reference = all(e.ref_logprobs is not None for e in episodes)
    with_behaviour = all(e.behaviour_logprobs is not None for e in episodes)
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
        target = {
            "response": response,
            "advantages": torch.tensor([[float(e.advantage)] for e in chunk], dtype=torch.float32),
            "padding_mask": torch.stack([
                e.model_mask & (not (mask_truncated and e.truncated)) for e in chunk
            ]),
        }
        if with_reference:
            target["ref_logprobs"] = torch.stack([e.padded_ref_logprobs for e in chunk])
        if with_behaviour:
            target["behaviour_logprobs"] = torch.stack([e.padded_behaviour_logprobs for e in chunk])
        targets.append(target)
    return inputs, targets


def drop_padding_columns(batch: dict, target: dict) -> tuple[dict, dict]:
    """The same batch without the columns that are padding in every row.

    Episodes are padded to the longest request and response the run allows
    (96 + 32 tokens in the tiny config), but a batch's real tokens often span
    far fewer columns; a model's cost grows with the columns it runs. Only
    whole columns of padding go: the left padding every request has, and the
    response columns after the batch's longest response. Padding is masked
    out and positions count real tokens only, so the logprobs of the real
    tokens do not change.
    """
    mask = batch.get("attention_mask")
    if mask is None:
        return batch, target
    response_len = target["response"].shape[1]
    request_len = batch["tokens"].shape[1] - response_len
    real_columns = mask.bool().any(dim=0)
    # The first column any row uses; the trainer needs one request column at least.
    first = min(int(real_columns.nonzero()[0]), request_len - 1) if real_columns.any() else 0
    used = target["padding_mask"].bool().any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1  # response columns up to the last real token
    end = request_len + keep
    batch = {**batch, "tokens": batch["tokens"][:, first:end], "attention_mask": mask[:, first:end]}
    target = {
        key: value[:, :keep] if key in ("response", "ref_logprobs", "behaviour_logprobs", "padding_mask")
        else value
        for key, value in target.items()
    }
    return batch, target
