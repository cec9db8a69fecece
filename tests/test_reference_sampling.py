"""With beta 0 the reference model may score a sample of responses only, or none.

Its logprobs then feed nothing but the reported KL, so leaving them out of
the batch must not change the loss or its gradient, and a KL penalty
(beta > 0) without them is refused rather than computed from zeros.
"""

from pathlib import Path

import pytest
import torch
from test_grpo_actors import make_episodes

from forge_lite.actors.trainer import merge_dp_chunks
from forge_lite.rl.collate import grpo_collate
from forge_lite.grpo.config import GRPOConfig
from forge_lite.rl.loss import grpo_loss
from forge_lite.grpo.loop import mean_kl


def loss_and_gradient(targets: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logprobs = (torch.randn(targets["padding_mask"].shape) - 2).requires_grad_()
    loss = grpo_loss(logprobs, targets.get("ref_logprobs"), targets["advantages"], targets["padding_mask"], beta=beta)
    loss.backward()
    return loss.detach(), logprobs.grad


@pytest.mark.parametrize("dp_size", [1, 2])
def test_beta_zero_step_is_the_same_with_or_without_the_reference(dp_size):
    with_reference = make_episodes([1.0, -0.5, 0.25, -0.75])
    for episode in with_reference:
        episode.ref_logprobs = torch.randn(len(episode.response_tokens)) - 3  # a real-looking reference
    sampled = make_episodes([1.0, -0.5, 0.25, -0.75])
    for i, episode in enumerate(sampled):  # the reference scored the first response only
        episode.ref_logprobs = with_reference[i].ref_logprobs if i == 0 else None

    _, full = merge_dp_chunks(*grpo_collate(with_reference, dp_size=dp_size))
    _, partial = merge_dp_chunks(*grpo_collate(sampled, dp_size=dp_size))
    assert "ref_logprobs" in full and "ref_logprobs" not in partial

    loss_full, grad_full = loss_and_gradient(full, beta=0.0)
    loss_partial, grad_partial = loss_and_gradient(partial, beta=0.0)
    assert torch.equal(loss_full, loss_partial)
    assert torch.equal(grad_full, grad_partial)
    # With a penalty the reference matters: the same batch gives another loss...
    assert not torch.equal(loss_and_gradient(full, beta=0.1)[0], loss_full)
    # ...and without it the loss refuses instead of using zeros.
    with pytest.raises(ValueError, match="beta=0.1.*reference"):
        loss_and_gradient(partial, beta=0.1)


def test_beta_zero_leaves_out_a_kl_that_would_overflow():
    targets = {"advantages": torch.tensor([[1.0]]), "padding_mask": torch.ones(1, 3, dtype=torch.bool)}
    logprobs = torch.tensor([[-200.0, -1.0, -0.5]], requires_grad=True)
    loss = grpo_loss(logprobs, torch.zeros(1, 3), targets["advantages"], targets["padding_mask"], beta=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()  # 0 * inf would be NaN


def test_the_reported_kl_is_the_mean_over_the_scored_responses():
    episodes = make_episodes([1.0, -1.0, 0.5])
    for episode, kl in zip(episodes, [0.2, None, 0.4]):
        episode.behaviour_kl = kl
    assert mean_kl(episodes) == pytest.approx(0.3)
    for episode in episodes:
        episode.behaviour_kl = None
    assert mean_kl(episodes) != mean_kl(episodes)  # NaN: nothing measured in this batch


def test_kl_samples_needs_beta_zero():
    config = GRPOConfig.from_dict({"trainer": {"beta": 0.0}, "ref_model": {"kl_samples": 1}})
    assert config.ref_model.kl_samples == 1
    with pytest.raises(ValueError, match="ref_model.kl_samples=1 needs trainer.beta: 0"):
        GRPOConfig.from_dict({"trainer": {"beta": 0.1}, "ref_model": {"kl_samples": 1}})
    with pytest.raises(ValueError, match="ref_model.kl_samples must be >= 0"):
        GRPOConfig.from_dict({"trainer": {"beta": 0.0}, "ref_model": {"kl_samples": -1}})


def test_kl_samples_zero_means_no_reference_model_and_needs_beta_zero():
    assert GRPOConfig.from_dict({"trainer": {"beta": 0.0}, "ref_model": {"kl_samples": 0}}).uses_reference is False
    assert GRPOConfig.from_dict({"trainer": {"beta": 0.0}, "ref_model": {"kl_samples": 1}}).uses_reference
    assert GRPOConfig.from_dict({"trainer": {"beta": 0.1}}).uses_reference  # kl_samples None: every response
    with pytest.raises(ValueError, match="ref_model.kl_samples=0 needs trainer.beta: 0"):
        GRPOConfig.from_dict({"trainer": {"beta": 0.1}, "ref_model": {"kl_samples": 0}})


async def test_a_run_without_a_reference_model_starts_none_and_reports_no_kl(tmp_path):
    """``ref_model.kl_samples: 0`` (grpo_tiny.yaml's): no reference process is
    spawned, no group asks for reference logprobs, and the run trains, its
    KL NaN (nothing measured) rather than a made-up 0."""
    import math

    from forge_lite.controller import procs
    from forge_lite.grpo.config import load_config
    from forge_lite.grpo.run import GRPORun

    config = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "grpo_tiny.yaml"), [
        "steps=2", "group_size=4", "batch_size=8", "prompts_per_rollout=2", "eval_samples=0",
        "progress=false", f"output_dir={tmp_path}",
    ])
    assert config.ref_model.kl_samples == 0 and not config.uses_reference
    run = await GRPORun(config).start()
    try:
        assert run.services.ref_model is None and "ref_model" not in run.services.hosts()
        names = [p.name.lower() for p in procs._live]
        assert names and not any("reference" in name for name in names), names
        result = await run.train(on_interrupt="raise")
    finally:
        await run.shutdown()
    steps = result.recorder.steps
    assert [s.step for s in steps] == [0, 1]
    assert all(math.isnan(s.kl) and math.isfinite(s.loss) for s in steps)
    assert all(s.time_split_s["reference"] < 0.01 for s in steps)
