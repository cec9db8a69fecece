"""``GRPORun(evaluate_every=N, on_evaluation=...)``: held-out accuracy while it trains.

What benchmarks/grpo_vs_trl.py needs from the run a user gets: an
evaluation every N steps with the training loop waiting (the evaluation
sees that step's weights), each one handed to a callback with its seconds,
and checkpoints that still carry the run's own config.
"""

from __future__ import annotations

import pytest

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.grpo import checkpoint
from forge_lite.grpo.config import load_config
from forge_lite.grpo.recorder import MetricsRecorder
from forge_lite.grpo.run import GRPORun, HeldoutEvaluation

# Small and quick, as tests/test_grpo_loop.py's runs.
FAST = ["group_size=2", "batch_size=4", "num_rollout_tasks=1", "prompts_per_rollout=2", "eval_samples=4",
        "policy.backend=transformers", "policy.max_tokens=32", "data.request_len=96", "progress=false"]


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "2"])
def test_evaluate_every_must_be_a_positive_int(every):
    with pytest.raises(ValueError, match="evaluate_every must be a positive int"):
        GRPORun(load_config(None, FAST), evaluate_every=every)


def test_evaluate_every_needs_held_out_problems():
    with pytest.raises(ValueError, match="evaluate_every=5 needs held-out problems.*eval_samples: 0"):
        GRPORun(load_config(None, FAST + ["eval_samples=0"]), evaluate_every=5)


def test_on_evaluation_must_be_callable():
    with pytest.raises(TypeError, match="on_evaluation must be callable, got int"):
        GRPORun(load_config(None, FAST), on_evaluation=3)


@pytest.mark.slow
async def test_a_run_evaluates_every_n_steps_with_training_paused(tmp_path):
    config = load_config(None, FAST + ["steps=5", "checkpoint_every=3", f"output_dir={tmp_path}"])
    recorder = MetricsRecorder()
    seen: list[tuple[HeldoutEvaluation, int]] = []
    served: list[tuple[int, ...]] = []  # what the replicas served as each evaluation ended

    def on_evaluation(evaluation: HeldoutEvaluation) -> None:
        # Called as the evaluation ends, the training still paused: no step was
        # recorded after the one it evaluates.
        seen.append((evaluation, len(recorder.steps)))
        served.append(recorder.versions[-1].replica_versions if recorder.versions else ())

    run = GRPORun(config, recorder, evaluate_every=2, on_evaluation=on_evaluation)
    try:
        await run.start()
        result = await run.train()
    finally:
        await run.shutdown()

    # Before training, after steps 2 and 4, and after the last (5).
    assert [e.step for e, _ in seen] == [0, 2, 4, 5]
    assert [steps for _, steps in seen] == [0, 2, 4, 5]
    assert [e for e, _ in seen] == run.evaluations
    assert all(0 <= e.accuracy <= 1 and e.seconds > 0 for e in run.evaluations)
    assert (result.eval_accuracy_before, result.eval_accuracy_after) == (
        run.evaluations[0].accuracy, run.evaluations[-1].accuracy)
    assert [s.step for s in recorder.steps] == [0, 1, 2, 3, 4] and result.steps_trained == 5
    # The versions go on across the pauses: one per step.
    assert [v.trainer_version for v in recorder.versions] == [1, 2, 3, 4, 5]
    # The replicas load a version while the trainer goes on, but an evaluation
    # waits for them: it scores the weights of the step it is after.
    assert served == [(), (2,), (4,), (5,)]
    # The checkpoint after step 3 (between two evaluations) holds the run's config, not a stretch's.
    saved = checkpoint.complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-000003"]
    assert checkpoint.read_manifest(saved[0])["step"] == 3
    assert checkpoint.checkpoint_config(saved[0]).steps == 5
    assert checkpoint.checkpoint_config(saved[0]).checkpoint_every == 3
