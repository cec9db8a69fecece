"""The policy loss variants (``forge_lite.rl.loss``) against their published
formulas and against TRL 1.16, and a short run of each.

One hand-built batch carries every case a loss must get right: ratios above
and below the clip range for positive and negative advantages, a stale
episode (sampled by much older weights: ratios of 6 and 0.2), responses of
2 to 5 tokens in a batch 6 columns wide, a truncated response, and, in a test
of its own, a group whose rewards were all equal.

Each variant's expected loss and gradient (d loss / d logprob of each token)
are written out below from its paper's formula, token by token in plain
Python floats (``expected_*``), not computed with the kit's functions.

TRL: ``GRPOTrainer._compute_loss`` is a method that runs the model and then
the loss. It is called here as it is, on an object that stands in for the
trainer: the model's forward returns our logprob tensor, and the
accelerator is one process. Everything from the ratio to the aggregation
and the clip metrics is TRL's own code, on the same float64 tensors.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo.config import GRPOConfig, load_config
from forge_lite.rl.advantages import group_advantages
from forge_lite.rl.collate import grpo_collate
from forge_lite.rl.episode import Episode
from forge_lite.rl.loss import LOSS_TYPES, VARIANTS, aggregate, grpo_loss, policy_loss

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# ---------------------------------------------------------------- the batch

WIDTH = 6  # columns: the longest response allowed (Dr. GRPO's constant)
# Per sequence: its advantage and the ratio pi_theta / pi_behaviour of each token.
ROWS = [
    # A > 0: in range, above the range (PPO clips it), below (PPO keeps it), far above (CISPO caps it)
    (1.0, [1.1, 1.5, 0.7, 5.5]),
    # A < 0: below the range (PPO clips it), above (PPO keeps it), in range
    (-0.5, [0.6, 1.4, 1.0, 0.95, 1.25]),
    # A > 0, the truncated response (nearly on-policy)
    (0.8, [1.0, 1.05]),
    # A < 0, a stale episode: its behaviour policy is far from the trainer's
    (-1.2, [6.0, 0.2, 2.0]),
]
TRUNCATED_ROW = 2
# GSPO's clip range is 3e-4 / 4e-4 around a ratio per sequence: a batch that is
# nearly on-policy, so that some sequences stay inside it.
NEAR_ROWS = [
    (1.0, [1.0002, 1.0001, 0.9999]),  # geometric mean 1.0000667: inside
    (-0.5, [1.001, 0.9995, 1.0004, 1.0, 1.0]),  # 1.00018: inside
    (0.8, [1.002, 1.0]),  # 1.001: above, A > 0: clipped
    (-1.2, [0.999, 0.999, 0.9994]),  # 0.99927: below, A < 0: clipped
]


def batch(rows=ROWS, seed: int = 0, masked_fill: float = -3.0):
    """Tensors ``[B, WIDTH]`` (float64) with the rows' ratios: logprobs (a leaf
    that takes gradients), behaviour logprobs = logprobs - log(ratio), the
    reference's, advantages ``[B, 1]`` and the mask. Masked positions hold
    ``masked_fill`` in every logprob tensor."""
    generator = torch.Generator().manual_seed(seed)
    count = len(rows)
    logprobs = -0.2 - 2 * torch.rand(count, WIDTH, generator=generator, dtype=torch.float64)
    ref = -0.2 - 2 * torch.rand(count, WIDTH, generator=generator, dtype=torch.float64)
    mask = torch.zeros(count, WIDTH, dtype=torch.bool)
    log_ratio = torch.zeros(count, WIDTH, dtype=torch.float64)
    for i, (_, ratios) in enumerate(rows):
        mask[i, : len(ratios)] = True
        log_ratio[i, : len(ratios)] = torch.log(torch.tensor(ratios, dtype=torch.float64))
    behaviour = logprobs - log_ratio
    fill = torch.tensor(masked_fill, dtype=torch.float64)
    logprobs, behaviour, ref = (torch.where(mask, t, fill) for t in (logprobs, behaviour, ref))
    advantages = torch.tensor([[a] for a, _ in rows], dtype=torch.float64)
    return logprobs.requires_grad_(True), behaviour, ref, advantages, mask


def kit(loss_type: str, logprobs, behaviour, ref, advantages, mask, beta: float, **settings):
    """The kit's loss, clip counts and gradient on a fresh copy of ``logprobs``."""
    logprobs = logprobs.detach().clone().requires_grad_(True)
    out = policy_loss(logprobs, ref, advantages, mask, behaviour, loss_type=loss_type, beta=beta,
                      constant_length=WIDTH, **settings)
    out.loss.backward()
    return out.loss.item(), logprobs.grad, out.clipped.item(), out.counted.item()


# ---------------------------------------------------------------- the formulas, written out


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def expected(loss_type: str, logprobs, behaviour, ref, advantages, mask, beta: float,
             clip_low=None, clip_high=None, temperatures=(1.0, 1.05)):
    """The loss, its gradient ``[B][WIDTH]`` and (clipped, counted), from the papers.

    Notation: A_i the advantage of sequence i, n_i its tokens, B the
    sequences, N = sum n_i, L = WIDTH, r_it = exp(lp_it - old_it),
    lo = 1 - clip_low, hi = 1 + clip_high.

    - PPO's clip (GRPO, DAPO, Dr. GRPO): l_it = -min(r A, clip(r, lo, hi) A),
      dl/dlp = -r A unless r > hi with A > 0 or r < lo with A < 0 (then 0).
    - GSPO: s_i = exp(mean_t(lp_it - old_it)), l_i = -min(s A, clip(s) A) for
      every token, dl_i/dlp_it = -s_i A_i / n_i unless clipped.
    - CISPO: w = clip(r, lo, hi) held constant, l_it = -w A lp_it, dl/dlp = -w A.
    - SAPO: g = sigmoid(tau (r - 1)), l_it = -(4 / tau) g A, dl/dlp = -4 g (1 - g) r A,
      tau = 1.0 for A > 0, else 1.05.
    - KL (beta > 0), every variant, per token: beta (e^(ref - lp) - (ref - lp) - 1),
      d/dlp = beta (1 - e^(ref - lp)).
    - Aggregation, the weight of each token's l: GRPO, GSPO, SAPO 1 / (B n_i);
      DAPO, CISPO 1 / N; Dr. GRPO 1 / (B L).
    """
    settings = VARIANTS[loss_type]
    clip_low = settings["clip_low"] if clip_low is None else clip_low
    clip_high = settings["clip_high"] if clip_high is None else clip_high
    lo = -math.inf if clip_low is None else 1 - clip_low
    hi = math.inf if clip_high is None else 1 + clip_high
    lp, old, rf, m = logprobs.tolist(), behaviour.tolist(), ref.tolist(), mask.tolist()
    A = [a for (a,) in advantages.tolist()]
    B = len(lp)
    n = [sum(row) for row in m]
    N = sum(n)

    def weight(i):
        if loss_type in ("grpo", "gspo", "sapo"):
            return 1 / (B * max(n[i], 1))
        if loss_type in ("dapo", "cispo"):
            return 1 / N
        return 1 / (B * WIDTH)  # dr_grpo

    loss, clipped, counted = 0.0, 0, 0
    grad = [[0.0] * WIDTH for _ in range(B)]
    for i in range(B):
        tokens = [t for t in range(WIDTH) if m[i][t]]
        if loss_type == "gspo" and tokens:
            s = math.exp(sum(lp[i][t] - old[i][t] for t in tokens) / len(tokens))
            cut = (s > hi and A[i] > 0) or (s < lo and A[i] < 0)
            counted += 1
            clipped += cut
        for t in tokens:
            r = math.exp(lp[i][t] - old[i][t])
            if loss_type in ("grpo", "dapo", "dr_grpo"):
                term = -min(r * A[i], min(max(r, lo), hi) * A[i])
                cut = (r > hi and A[i] > 0) or (r < lo and A[i] < 0)
                d = 0.0 if cut else -r * A[i]
                counted += 1
                clipped += cut
            elif loss_type == "gspo":
                # Every token carries l_i, weighted 1 / (B n_i): the loss gets l_i / B.
                # Each of those n_i copies depends on lp_it through s_i, so
                # d loss / d lp_it = (1 / B) dl_i/dlp_it = n_i * weight * (-s A / n_i).
                term = -min(s * A[i], min(max(s, lo), hi) * A[i])
                d = 0.0 if cut else len(tokens) * (-s * A[i] / len(tokens))
            elif loss_type == "cispo":
                w = min(max(r, lo), hi)
                term = -w * A[i] * lp[i][t]
                d = -w * A[i]
                counted += 1
                clipped += (r > hi or r < lo) and A[i] != 0
            else:  # sapo
                tau = temperatures[0] if A[i] > 0 else temperatures[1]
                g = sigmoid(tau * (r - 1))
                term = -(4 / tau) * g * A[i]
                d = -4 * g * (1 - g) * r * A[i]
            if beta:
                x = rf[i][t] - lp[i][t]
                term += beta * (math.exp(x) - x - 1)
                d += beta * (1 - math.exp(x))
            loss += weight(i) * term
            grad[i][t] = weight(i) * d
    return loss, torch.tensor(grad, dtype=torch.float64), clipped, counted


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("rows", [ROWS, NEAR_ROWS], ids=["far", "near"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_variant_matches_its_formula_in_loss_gradient_and_clip_count(loss_type, rows, beta):
    tensors = batch(rows)
    loss, grad, clipped, counted = kit(loss_type, *tensors, beta=beta)
    want_loss, want_grad, want_clipped, want_counted = expected(loss_type, *tensors, beta=beta)
    assert loss == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert (clipped, counted) == (want_clipped, want_counted)
    # The masked positions get no gradient.
    assert grad[~tensors[4]].eq(0).all()


def test_the_far_batch_clips_where_each_formula_says():
    """The counts the formula test compares, stated: the cases are really exercised."""
    tensors = batch(ROWS)
    # PPO's clip, 0.2 / 0.2: 1.5 and 5.5 (A > 0), 0.6 and 0.2 (A < 0) of 14 tokens.
    assert kit("grpo", *tensors, beta=0.0)[2:] == (4, 14)
    # DAPO's clip-higher, 0.28: 1.5 and 5.5 still above 1.28; 1.25 (A < 0) is kept either way.
    assert kit("dapo", *tensors, beta=0.0)[2:] == (4, 14)
    # CISPO caps at 5.0 only: 5.5 (A > 0) and 6.0 (the stale episode, A < 0).
    assert kit("cispo", *tensors, beta=0.0)[2:] == (2, 14)
    # GSPO, one ratio per sequence (the geometric mean): 1.588 (A > 0), 0.9995
    # (A < 0) and 1.025 (A > 0) are clipped; the stale 1.339 with A < 0 is not.
    assert kit("gspo", *tensors, beta=0.0)[2:] == (3, 4)
    # SAPO clips nothing: nothing counted.
    assert kit("sapo", *tensors, beta=0.0)[2:] == (0, 0)


def test_the_stale_episode_is_clipped_or_corrected():
    logprobs, behaviour, ref, advantages, mask = batch(ROWS)
    stale = 3  # ratios 6.0, 0.2, 2.0 with A = -1.2
    grpo_grad = kit("grpo", logprobs, behaviour, ref, advantages, mask, beta=0.0)[1][stale, :3]
    # PPO: the 0.2 token is clipped (pushing it further down would be beyond
    # the trust region); the others keep -r A / (B n): PPO is pessimistic.
    assert grpo_grad.tolist() == pytest.approx([6.0 * 1.2 / 12, 0.0, 2.0 * 1.2 / 12])
    # Without the behaviour logprobs the same episode would count as on-policy:
    # every token gets -A / (B n), however stale it is.
    on_policy = kit("grpo", logprobs, None, ref, advantages, mask, beta=0.0)[1][stale, :3]
    assert on_policy.tolist() == pytest.approx([1.2 / 12] * 3)
    # CISPO: the 6.0 weight is capped at 5.0, and the 0.2 token keeps its gradient.
    cispo_grad = kit("cispo", logprobs, behaviour, ref, advantages, mask, beta=0.0)[1][stale, :3]
    assert cispo_grad.tolist() == pytest.approx([5.0 * 1.2 / 14, 0.2 * 1.2 / 14, 2.0 * 1.2 / 14])


def test_the_aggregations_weigh_short_and_long_responses_differently():
    """On-policy (every ratio 1), so that the gradient of a token is -A times its weight."""
    rows = [(1.0, [1.0] * 2), (1.0, [1.0] * 5)]  # a 2-token and a 5-token response
    tensors = batch(rows)
    grads = {t: kit(t, *tensors, beta=0.0)[1] for t in ("grpo", "dapo", "dr_grpo")}
    # GRPO: each sequence weighs 1/B, shared by its tokens: 1/(2*2) and 1/(2*5).
    assert grads["grpo"][0, 0].item() == pytest.approx(-1 / 4)
    assert grads["grpo"][1, 0].item() == pytest.approx(-1 / 10)
    # DAPO: every token of the batch weighs the same, 1/7.
    assert grads["dapo"][0, 0].item() == grads["dapo"][1, 0].item() == pytest.approx(-1 / 7)
    # Dr. GRPO: every token weighs 1/(B * L), L the longest response allowed.
    assert grads["dr_grpo"][0, 0].item() == grads["dr_grpo"][1, 0].item() == pytest.approx(-1 / (2 * WIDTH))


def test_a_token_mean_over_micro_batches_is_the_whole_batchs():
    """What the trainer does: each micro-batch's loss, weighted by its share of
    the sequences, with the whole batch's tokens per sequence, sums to the loss
    of the whole batch."""
    per_token = torch.rand(4, WIDTH, dtype=torch.float64)
    _, _, _, _, mask = batch(ROWS)
    per_token = per_token * mask
    whole = aggregate(per_token, mask, "token_mean")
    tokens_per_sequence = mask.sum().item() / 4
    parts = sum(
        aggregate(per_token[rows], mask[rows], "token_mean", tokens_per_sequence=tokens_per_sequence) * 2 / 4
        for rows in (slice(0, 2), slice(2, 4))
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    assert whole.item() == pytest.approx(per_token.sum().item() / 14)


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_group_with_equal_rewards_teaches_nothing(loss_type, scale):
    advantages = group_advantages([0.5, 0.5, 0.5, 0.5], scale=scale)
    assert advantages == [0.0, 0.0, 0.0, 0.0]
    logprobs, behaviour, ref, _, mask = batch(ROWS)
    zero = torch.zeros(4, 1, dtype=torch.float64)
    loss, grad, _, _ = kit(loss_type, logprobs, behaviour, ref, zero, mask, beta=0.0)
    assert loss == 0.0 and grad.eq(0).all()
    # With the KL penalty only the KL pulls.
    _, grad, _, _ = kit(loss_type, logprobs, behaviour, ref, zero, mask, beta=0.1)
    assert grad.abs().sum() > 0


def test_dr_grpo_advantages_have_no_std():
    rewards = [1.0, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, scale="none") == pytest.approx([0.75, -0.25, -0.25, -0.25])
    std = torch.tensor(rewards).std().item()
    assert group_advantages(rewards) == pytest.approx([a / (std + 1e-4) for a in (0.75, -0.25, -0.25, -0.25)])
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(rewards, scale="batch")


def make_episode(i: int, ratios: list[float], advantage: float, truncated: bool) -> Episode:
    episode = Episode(f"e{i}", "prompt", 0, 0, 4, WIDTH)
    episode.request_tokens = [5, 6]
    episode.response_tokens = [7 + t for t in range(len(ratios))]
    episode.ref_logprobs = [-1.0] * len(ratios)
    episode.behaviour_logprobs = [-1.0 - math.log(r) for r in ratios]
    episode.reward, episode.advantage, episode.truncated = 0.0, advantage, truncated
    return episode


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_truncated_response_is_left_out_with_mask_truncated(loss_type):
    episodes = [make_episode(i, ratios, a, i == TRUNCATED_ROW) for i, (a, ratios) in enumerate(ROWS)]
    _, (kept,) = grpo_collate(episodes)
    _, (masked,) = grpo_collate(episodes, mask_truncated=True)
    assert kept["padding_mask"][TRUNCATED_ROW].sum() == 2
    assert not masked["padding_mask"][TRUNCATED_ROW].any()
    assert masked["padding_mask"][[0, 1, 3]].equal(kept["padding_mask"][[0, 1, 3]])
    # The behaviour logprobs travel with the batch, padded like the others.
    assert masked["behaviour_logprobs"][0, :4].tolist() == pytest.approx([-1.0 - math.log(r) for r in ROWS[0][1]])
    assert masked["behaviour_logprobs"][0, 4:].eq(0).all()

    logprobs = torch.full((4, WIDTH), -1.0, dtype=torch.float64, requires_grad=True)
    targets = {k: v.double() if v.is_floating_point() else v for k, v in masked.items()}
    out = policy_loss(logprobs, targets["ref_logprobs"], targets["advantages"], targets["padding_mask"],
                      targets["behaviour_logprobs"], loss_type=loss_type, beta=0.0, constant_length=WIDTH)
    out.loss.backward()
    assert logprobs.grad[TRUNCATED_ROW].eq(0).all()
    # The formula with the truncated row's tokens out; as in TRL, the row still
    # counts as a sequence (B = 4) in the means over sequences.
    behaviour = targets["behaviour_logprobs"]
    want_loss, want_grad, _, _ = expected(loss_type, logprobs.detach(), behaviour, targets["ref_logprobs"],
                                          targets["advantages"], targets["padding_mask"], beta=0.0)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-6)  # float32 behaviour logprobs
    assert torch.allclose(logprobs.grad, want_grad, rtol=1e-5, atol=1e-7)


def test_masked_positions_holding_nan_or_inf_change_nothing():
    clean = batch(ROWS)
    for loss_type in LOSS_TYPES:
        want = kit(loss_type, *clean, beta=0.1)
        for fill in (math.inf, -math.inf, math.nan):
            poisoned = batch(ROWS, masked_fill=fill)
            got = kit(loss_type, *poisoned, beta=0.1)
            assert got[0] == pytest.approx(want[0], rel=1e-12), (loss_type, fill)
            assert torch.allclose(got[1], want[1]), (loss_type, fill)


def test_grpo_loss_is_the_grpo_variant_and_on_policy_without_behaviour_logprobs():
    logprobs, behaviour, ref, advantages, mask = batch(ROWS)
    assert grpo_loss(logprobs, ref, advantages, mask, beta=0.04, behaviour_logprobs=behaviour).item() == \
        pytest.approx(kit("grpo", logprobs, behaviour, ref, advantages, mask, beta=0.04)[0], rel=1e-12)
    # On-policy: -mean over sequences of A (ratio 1), whatever the ratios would have been.
    assert grpo_loss(logprobs, ref, advantages, mask, beta=0.0).item() == pytest.approx(-(1.0 - 0.5 + 0.8 - 1.2) / 4)


def test_bad_settings_are_refused_by_name():
    logprobs, behaviour, ref, advantages, mask = batch(ROWS)
    with pytest.raises(ValueError, match="loss type must be one of"):
        policy_loss(logprobs, ref, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="sapo has no clip"):
        policy_loss(logprobs, ref, advantages, mask, loss_type="sapo", clip_high=0.2)
    with pytest.raises(ValueError, match="clip_low must be below 1"):
        policy_loss(logprobs, ref, advantages, mask, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        policy_loss(logprobs, ref, advantages, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        policy_loss(logprobs, ref, advantages, mask, aggregation="sum")
    with pytest.raises(ValueError, match="needs the reference model's logprobs"):
        policy_loss(logprobs, None, advantages, mask, beta=0.1)


# ---------------------------------------------------------------- against TRL


@pytest.fixture(scope="module")
def trl_trainer_class():
    """TRL's GRPOTrainer class (importing TRL takes ~25 s: it imports vLLM)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    import trl

    assert trl.__version__ == "1.16.0", trl.__version__
    return grpo_trainer.GRPOTrainer


# Our variant -> TRL's settings for the same loss.
TRL_SETTINGS = {
    "grpo": dict(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2),
    "dapo": dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28),
    "dr_grpo": dict(loss_type="dr_grpo", epsilon_low=0.2, epsilon_high=0.2),
    # TRL's GSPO: the grpo loss with one ratio per sequence.
    "gspo": dict(loss_type="grpo", epsilon_low=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence"),
    # TRL's cispo epsilon_high is the cap itself; ours is 1 + clip_high.
    "cispo": dict(loss_type="cispo", epsilon_low=0.2, epsilon_high=1 + 4.0),
    "sapo": dict(loss_type="sapo", epsilon_low=0.2, epsilon_high=0.2),
}


def trl_loss(trainer_class, variant: str, logprobs, behaviour, ref, advantages, mask, beta: float):
    """TRL's ``_compute_loss`` on these tensors: its loss, its gradient on
    ``logprobs`` and the metrics it logged. ``self`` is a stand-in whose
    model forward returns ``logprobs`` (entropies 0) and whose accelerator is
    one process without gradient accumulation."""
    logprobs = logprobs.detach().clone().requires_grad_(True)
    settings = {"importance_sampling_level": "token", **TRL_SETTINGS[variant]}
    one_process = lambda x, **_: x  # noqa: E731  (gather and reduce over one process)
    metrics = defaultdict(lambda: defaultdict(list))
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=WIDTH,
        accelerator=SimpleNamespace(num_processes=1, gather=one_process, reduce=one_process,
                                    gather_for_metrics=one_process),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=metrics, **settings,
    )
    count = mask.shape[0]
    inputs = dict(
        prompt_ids=torch.zeros(count, 1, dtype=torch.long), prompt_mask=torch.ones(count, 1, dtype=torch.long),
        completion_ids=torch.zeros(count, WIDTH, dtype=torch.long), completion_mask=mask.long(),
        advantages=advantages.flatten(), old_per_token_logps=behaviour, ref_per_token_logps=ref,
        num_items_in_batch=mask.sum(),
    )
    loss = trainer_class._compute_loss(stand_in, None, inputs)
    loss.backward()
    return loss.item(), logprobs.grad, metrics["train"]


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("rows", [ROWS, NEAR_ROWS], ids=["far", "near"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_variant_matches_trl(trl_trainer_class, loss_type, rows, beta):
    tensors = batch(rows)
    loss, grad, clipped, counted = kit(loss_type, *tensors, beta=beta)
    trl_value, trl_grad, metrics = trl_loss(trl_trainer_class, loss_type, *tensors, beta=beta)
    assert abs(loss - trl_value) < 1e-6
    assert (grad - trl_grad).abs().max().item() < 1e-6
    if loss_type in ("grpo", "dapo", "dr_grpo", "gspo"):
        # TRL's region clip ratio is the same count over the same ratios
        # (tokens; sequences under GSPO), logged in float32.
        assert metrics["clip_ratio/region_mean"][0] == pytest.approx(clipped / counted, abs=1e-6)
    elif loss_type == "cispo":
        # TRL counts a capped weight only where A > 0; we count every capped
        # weight (with A < 0 the cap changes the gradient too).
        assert metrics["cispo_clip_ratio"][0] <= clipped / counted


@pytest.mark.slow
def test_a_truncated_response_is_masked_as_trl_masks_it(trl_trainer_class):
    """TRL's mask_truncated_completions zeroes the completion mask of a
    truncated completion; our collate does the same to padding_mask."""
    logprobs, behaviour, ref, advantages, mask = batch(ROWS)
    mask = mask.clone()
    mask[TRUNCATED_ROW] = False
    for loss_type in LOSS_TYPES:
        loss, grad, _, _ = kit(loss_type, logprobs, behaviour, ref, advantages, mask, beta=0.04)
        trl_value, trl_grad, _ = trl_loss(trl_trainer_class, loss_type, logprobs, behaviour, ref, advantages,
                                          mask, beta=0.04)
        assert abs(loss - trl_value) < 1e-6 and (grad - trl_grad).abs().max().item() < 1e-6, loss_type


# ---------------------------------------------------------------- the config


def test_the_config_takes_each_variants_settings_unless_given():
    for loss_type, settings in VARIANTS.items():
        config = GRPOConfig.from_dict({"loss": {"type": loss_type}})
        for name in ("clip_low", "clip_high", "aggregation", "scale_rewards", "mask_truncated"):
            assert getattr(config.loss, name) == settings[name], (loss_type, name)
        assert config.skip_uniform_groups is settings["skip_uniform_groups"]
    assert GRPOConfig().loss.type == "grpo" and GRPOConfig().skip_uniform_groups is False
    config = load_config(None, ["loss.type=dapo", "loss.clip_high=0.3", "skip_uniform_groups=false",
                                "loss.mask_truncated=false"])
    assert (config.loss.clip_low, config.loss.clip_high) == (0.2, 0.3)
    assert config.skip_uniform_groups is False and config.loss.mask_truncated is False
    # The tiny config keeps its own skip_uniform_groups: true under every variant.
    tiny = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"), ["loss.type=dr_grpo"])
    assert tiny.skip_uniform_groups is True and tiny.loss.scale_rewards == "none"

    with pytest.raises(ValueError, match=r"loss.type must be one of \['grpo', 'dapo'"):
        GRPOConfig.from_dict({"loss": {"type": "ppo"}})
    with pytest.raises(ValueError, match="loss: loss type sapo has no clip"):
        GRPOConfig.from_dict({"loss": {"type": "sapo", "clip_low": 0.2}})
    with pytest.raises(ValueError, match="loss: scale_rewards must be one of"):
        GRPOConfig.from_dict({"loss": {"scale_rewards": "batch"}})
    with pytest.raises(ValueError, match="loss.sapo_temperature_neg must be > 0"):
        GRPOConfig.from_dict({"loss": {"type": "sapo", "sapo_temperature_neg": 0}})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['loss.epsilon'\]"):
        GRPOConfig.from_dict({"loss": {"epsilon": 0.2}})


# ---------------------------------------------------------------- on screen


def test_the_dashboard_says_how_often_the_clip_fired_and_how_many_groups_were_equal():
    from forge_lite.grpo.recorder import PHASES, MetricsRecorder
    from forge_lite.widgets import TrainingDashboard

    recorder = MetricsRecorder()
    dash = TrainingDashboard(recorder)
    values = dict(reward_mean=0.5, accuracy=0.5, loss=0.0, kl=0.0, episode_ages=(1,), buffer_size=0,
                  tokens_per_s=1.0, step_time_s=1.0, time_split_s=dict.fromkeys(PHASES, 0.1))
    recorder.record_step(step=0, trainer_version=1, clip_fraction=0.125, zero_std_fraction=0.75, **values)
    assert "clipped 12.5% of the ratios, 75% of the groups got equal rewards (they teach nothing)" in \
        dash.header_text()
    # SAPO clips nothing; a step that scored no group has no zero-std fraction.
    recorder.record_step(step=1, trainer_version=2, zero_std_fraction=1.0, **values)
    assert "clipped" not in dash.header_text() and "100% of the groups got equal rewards" in dash.header_text()
    recorder.record_step(step=2, trainer_version=3, clip_fraction=0.0, **values)
    assert dash.header_text().endswith("clipped 0.0% of the ratios")
    dash.detach()


# ---------------------------------------------------------------- the trainer


def trainer_episodes(ratios_per_episode: list[list[float]], advantages: list[float]) -> list[Episode]:
    """Episodes of different lengths whose behaviour logprobs are the shipped
    model's minus log(ratio): the trainer, holding the shipped weights, sees
    these ratios (to float rounding)."""
    from forge_lite.actors.hf_model import load_causal_lm
    from forge_lite.assets import DEFAULT_MODEL
    from forge_lite.rl.logprobs import causal_lm_logits, response_logprobs

    generator = torch.Generator().manual_seed(0)
    model = load_causal_lm(DEFAULT_MODEL)
    episodes = []
    for i, (ratios, advantage) in enumerate(zip(ratios_per_episode, advantages)):
        episode = Episode(f"e{i}", "prompt", 0, 0, 12, WIDTH)
        episode.request_tokens = torch.randint(3, 400, (6 + i,), generator=generator).tolist()
        episode.response_tokens = torch.randint(3, 400, (len(ratios),), generator=generator).tolist()
        tokens = torch.tensor(episode.request_tokens + episode.response_tokens).unsqueeze(0)
        with torch.no_grad():
            logprobs = response_logprobs(causal_lm_logits(model, tokens), tokens, len(episode.request_tokens))[0]
        episode.behaviour_logprobs = logprobs - torch.log(torch.tensor(ratios))
        episode.reward, episode.advantage = 0.0, advantage
        episodes.append(episode)
    return episodes


@pytest.mark.slow
async def test_the_trainer_takes_the_ratio_against_the_behaviour_logprobs_in_micro_batches_too(store):
    """DAPO in RLTrainer: the loss and the clip fraction of the batch whether it
    runs whole or one sequence at a time (its token mean spans the batch)."""
    import functools

    from forge_lite.actors.trainer import RLTrainer
    from forge_lite.assets import DEFAULT_MODEL

    advantages = [a for a, _ in ROWS]
    episodes = trainer_episodes([ratios for _, ratios in ROWS], advantages)
    loss = functools.partial(policy_loss, loss_type="dapo", beta=0.0, constant_length=WIDTH)
    settings = dict(model=DEFAULT_MODEL, optimizer={"name": "SGD", "lr": 0.0}, loss=loss, weight_store=store)
    whole, micro = await asyncio.gather(
        RLTrainer.options(procs=1).as_actor(**settings, training={"seq_len": 64}),
        RLTrainer.options(procs=1).as_actor(**settings, training={"seq_len": 64, "local_batch_size": 1}),
    )
    try:
        batch_of_four = grpo_collate(episodes)
        results = [await trainer.train_step.call_one(*batch_of_four, with_metrics=True) for trainer in (whole, micro)]
        plain = await whole.train_step.call_one(*batch_of_four)  # without metrics: the loss alone
    finally:
        await asyncio.gather(RLTrainer.shutdown(whole), RLTrainer.shutdown(micro))

    # DAPO on the ROWS ratios, written out: -sum min(r A, clip(r, 0.8, 1.28) A) / N.
    terms = [-min(r * a, min(max(r, 0.8), 1.28) * a) for a, ratios in ROWS for r in ratios]
    want = sum(terms) / len(terms)
    for result in results:
        assert result["loss"] == pytest.approx(want, abs=1e-5)
        assert result["clip_fraction"] == pytest.approx(4 / 14)  # see test_the_far_batch_clips_where_each_formula_says
    # One sequence at a time, the float32 forward rounds a little differently
    # (1.5e-6 measured); micro-batches normalised by their own tokens would
    # give 0.5375 instead of 0.5186.
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
    assert isinstance(plain, float) and plain == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- a short run of each


FAST = [
    "steps=2", "group_size=4", "batch_size=8", "num_rollout_tasks=1", "prompts_per_rollout=2",
    "eval_samples=0", "policy.backend=transformers", "policy.max_tokens=32", "data.request_len=96",
    "progress=false", "trainer.warmup_steps=0", "trainer.lr=1e-3",
]


def finite_fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
async def test_a_short_run_of_each_variant_records_clip_and_zero_std_fractions(loss_type, tmp_path):
    from forge_lite.grpo.recorder import MetricsRecorder
    from forge_lite.grpo.run import run_grpo

    config = load_config(os.path.join(CONFIGS, "grpo_tiny.yaml"),
                         FAST + [f"loss.type={loss_type}", f"output_dir={tmp_path}"])
    recorder = MetricsRecorder()
    await asyncio.wait_for(run_grpo(config, recorder=recorder), timeout=300)

    assert [s.step for s in recorder.steps] == [0, 1]
    print(loss_type, [(s.loss, s.clip_fraction, s.zero_std_fraction) for s in recorder.steps])  # shown with -s
    for step in recorder.steps:
        assert math.isfinite(step.loss)
        if loss_type == "sapo":
            assert math.isnan(step.clip_fraction)  # no clip
        else:
            assert finite_fraction(step.clip_fraction), step.clip_fraction
    # The steps scored groups (the first one's since the run began), and
    # skip_uniform_groups (the tiny config's) dropped the uniform ones after counting them.
    scored = [s.zero_std_fraction for s in recorder.steps if not math.isnan(s.zero_std_fraction)]
    assert scored and all(finite_fraction(f) for f in scored), recorder.steps
    # The saved metrics carry them too.
    with open(tmp_path / "metrics.jsonl") as metrics:
        assert all('"clip_fraction"' in line and '"zero_std_fraction"' in line for line in metrics)
