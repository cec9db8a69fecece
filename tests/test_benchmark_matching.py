"""benchmarks/grpo_vs_trl.py gives TRL and forge_lite the same job.

The benchmark is only a comparison if both sides train on the same prompts,
reward the same responses alike and judge held-out answers by the same code.
These checks need no training run of forge_lite and one step of TRL's:

- the prompts: the benchmark's held-out problems are the ones a forge_lite
  run evaluates (a DatasetActor on the test split, as the run starts it),
  in the same order, and TRL's training rows are the problems forge_lite's
  dataloader serves, in its order, across an epoch boundary too;
- the reward: TRL's reward function, called as GRPOTrainer calls it, gives
  the numbers forge_lite's reward actor (configured as the run's) gives;
- the held-out scoring: one function (``is_correct``) on both sides, and
  the TRL side's greedy generation answers exactly what forge_lite's engine
  answers for the untrained model (0.645 on the 200 problems);
- TRL's settings and one training step: 4 prompts of 8 completions, drawn
  in forge_lite's order, rewarded by the benchmark's function.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "trl", reason="TRL is not installed: it is the optional `bench` extra (pip install -e '.[bench]')"
)

import forge_lite  # noqa: F401, E402  (before monarch)
from forge_lite.data.rewards import MATH_EXAMPLES, MathReward  # noqa: E402
from forge_lite.grpo import DatasetActor, RewardActor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", ROOT / "benchmarks" / "grpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


@pytest.fixture(scope="module")
def tokenizer():
    return bench.load_tokenizer()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return bench.forge_lite_config(20, tmp_path_factory.mktemp("forge_lite_run"))


def dataset_actor(config, split: str):
    """A DatasetActor started as forge_lite's run starts its own."""
    d = config.data
    return DatasetActor.options(procs=1).as_actor(
        path=d.path, revision=d.revision, data_split=split, streaming=d.streaming, model=config.model,
    )


async def test_heldout_prompts_are_the_ones_a_forge_lite_run_evaluates(tokenizer, config):
    assert config.eval_samples == bench.HELD_OUT
    actor = await dataset_actor(config, config.data.eval_split)
    try:
        served = [await actor.sample.call_one() for _ in range(config.eval_samples)]
    finally:
        await DatasetActor.shutdown(actor)
    ours = bench.heldout_problems(tokenizer)
    assert len(ours) == bench.HELD_OUT
    assert [(s["request"], s["target"]) for s in served] == [(p["request"], p["target"]) for p in ours]


@pytest.mark.slow
async def test_trl_trains_on_the_problems_forge_lite_serves_in_its_order(tokenizer, config):
    # 2000 training problems per epoch: read past the first epoch's end.
    count = 2010
    actor = await dataset_actor(config, config.data.train_split)
    try:
        served = [await actor.sample.call_one() for _ in range(count)]
    finally:
        await DatasetActor.shutdown(actor)
    rows = bench.train_rows(tokenizer, count)
    assert [(s["request"], s["target"]) for s in served] == [(r["prompt"], r["target"]) for r in rows]


async def test_trl_reward_function_gives_forge_lite_rewards(config):
    assert config.reward_actor.functions == ["math"]
    prompt = bench.heldout_problems(bench.load_tokenizer(), 1)[0]["request"]
    cases = [(prompt, response, target) for response, target, *_ in MATH_EXAMPLES]
    cases += [
        (prompt, "<think>32 + 8 = 40</think><answer>40</answer>", "40"),
        (prompt, "<think>32 + 8 = 40</think><answer>41</answer>", "40"),
        (prompt, "<think>32 + 8 = 40</think>", "40"),  # partial credit
        (prompt, "", "40"),
    ]
    # As GRPOTrainer calls a reward function: the dataset's columns and its extras as keywords.
    ours = bench.math_reward(
        prompts=[c[0] for c in cases], completions=[c[1] for c in cases],
        completion_ids=[[0]] * len(cases), target=[c[2] for c in cases],
        trainer_state=None, log_extra=lambda *a: None, log_metric=lambda *a: None,
    )
    actor = await RewardActor.options(procs=1).as_actor(reward_functions=[MathReward()])
    try:
        theirs = [
            await actor.evaluate_response.call_one(prompt=p, response=r, target=t) for p, r, t in cases
        ]
    finally:
        await RewardActor.shutdown(actor)
    assert ours == theirs
    assert {0.0, 0.1, 1.0} <= set(ours)  # the cases cover wrong, partial and right


async def test_heldout_scoring_is_forge_lite_s_on_both_sides(tokenizer):
    try:
        from forge_lite.grpo import evaluation
    except ImportError:  # before the loop was split up
        from forge_lite.grpo import loop as evaluation
    assert bench.is_correct is evaluation.is_correct

    # forge_lite's evaluation, given a policy that answers what TRL's side answered,
    # gives the accuracy the benchmark computes for TRL's side.
    problems = bench.heldout_problems(tokenizer, 6)
    answers = ["<answer>{}</answer>".format(p["target"]) if i % 2 else "<answer>-1</answer>"
               for i, p in enumerate(problems)]

    class Completion:
        def __init__(self, text):
            self.text = text

    class Route:
        async def route(self, prompt, **overrides):
            assert overrides["temperature"] == 0.0 and overrides["max_tokens"] == bench.MAX_TOKENS
            return [Completion(answers[[p["request"] for p in problems].index(prompt)])]

    class Policy:
        generate = Route()

    assert await evaluation.evaluate(Policy(), problems, bench.MAX_TOKENS) == bench.accuracy_of(problems, answers)
    assert bench.accuracy_of(problems, answers) == 0.5


@pytest.mark.slow
def test_trl_greedy_answers_are_forge_lite_engine_answers(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from forge_lite.actors.engines.base import SamplingConfig
    from forge_lite.actors.engines.transformers_engine import TransformersEngine

    problems = bench.heldout_problems(tokenizer)
    engine = TransformersEngine(bench.DEFAULT_MODEL, seed=0)
    greedy = SamplingConfig(n=1, max_tokens=bench.MAX_TOKENS, temperature=0.0)
    forge = [c[0].text for c in engine.generate_batch([(p["request"], greedy) for p in problems])]
    model = AutoModelForCausalLM.from_pretrained(bench.DEFAULT_MODEL, dtype=torch.float32)
    model.train()  # as the trainer holds it; greedy_responses evaluates in eval mode and puts it back
    trl = bench.greedy_responses(model, tokenizer, problems)
    assert model.training
    assert trl == forge
    assert bench.accuracy_of(problems, trl) == bench.EXPECTED_BEFORE


@pytest.mark.slow
def test_trl_settings_and_one_step_see_forge_lite_s_prompts(tokenizer, tmp_path):
    import torch

    rows = bench.train_rows(tokenizer, bench.PROMPTS_PER_STEP)
    trainer = bench.trl_trainer(1, 0, str(tmp_path), rows, bench.load_tokenizer())
    args = trainer.args
    assert (args.num_generations, args.generation_batch_size, args.steps_per_generation) == (8, 32, 1)
    assert (args.num_iterations, args.gradient_accumulation_steps, args.max_completion_length) == (1, 1, 32)
    assert (args.loss_type, args.scale_rewards, args.beta, args.mask_truncated_completions) == (
        "grpo", "group", 0.0, False)
    assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type) == (2e-4, 10, "linear")
    assert (args.optim, args.weight_decay, args.max_grad_norm) == ("adamw_torch", 0.0, 1.0)
    assert (args.temperature, args.top_p, args.bf16, args.fp16, args.use_cpu) == (1.0, 1.0, False, False, True)
    assert not args.shuffle_dataset and not args.gradient_checkpointing
    assert trainer.reward_funcs == [bench.math_reward]
    assert next(trainer.model.parameters()).dtype == torch.float32  # forge_lite's trainer dtype

    seen = []

    def spy(prompts, completions, target, **kwargs):
        seen.append((prompts, completions, target))
        return bench.math_reward(prompts, completions, target, **kwargs)

    trainer.reward_funcs[0] = spy
    trainer.train()
    (prompts, completions, targets), = seen
    expected = [r["prompt"] for r in rows for _ in range(bench.GROUP_SIZE)]
    assert prompts == expected
    assert targets == [r["target"] for r in rows for _ in range(bench.GROUP_SIZE)]
    assert len(completions) == 32 and all(isinstance(c, str) for c in completions)
