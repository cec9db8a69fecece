"""forge_lite's GRPO against Hugging Face TRL's ``GRPOTrainer`` on the same job.

    pip install -e ".[bench]"                          # trl==1.16.0 (the kit does not need it)
    python benchmarks/grpo_vs_trl.py                   # 800 steps per side, one run each
    python benchmarks/grpo_vs_trl.py --steps 20 --eval-every 10 --only trl

The job: the shipped model (``forge_lite.assets.DEFAULT_MODEL``), the
shipped math set's training problems as ``DatasetActor`` serves them (the
chat-formatted ``request``, the bare-number ``target``), MathReward, 8
responses per prompt, 4 prompts per step, learning rate 2e-4 with 10 warm-up
steps and a linear decay, beta 0, 32 new tokens at temperature 1.0. forge_lite
runs ``configs/grpo_tiny.yaml`` through ``GRPORun``; TRL runs
``GRPOTrainer`` in this process, on the CPU, without vLLM. One side runs
after the other (``--only`` picks one).

Both sides are judged the same way: every ``--eval-every`` steps, greedy
accuracy (32 new tokens) on the first 200 held-out problems, the same
prompt strings in the same order, scored by the same function
(``is_correct``, MathReward's full score). The shipped model scores 0.645
there before any training, on both sides; the benchmark stops if either
side measures anything else, because then the two are not answering the
same prompts. TRL's evaluations run ``model.generate`` on the trainer's
current model from a ``TrainerCallback``; forge_lite's run on its policy
service, by ``GRPORun`` itself (``evaluate_every``), while no new rollout
starts and the training loop waits.

Evaluation time is left out of every clock on both sides: a side's clock
is the seconds since it began (start-up included) less the time spent in
held-out evaluations. Start-up is, for TRL, building ``GRPOTrainer``
(tokenizer, model, dataset) until its first step begins (importing trl and
formatting the prompts up front are left out, and written to the JSON
file); for forge_lite, ``GRPORun.start()`` (every service started, the
held-out problems read). Each run of each side is a fresh Python process,
so every start-up is a cold one. Reported per side: start-up time; steps per
minute (training only); the clock at the first evaluation whose held-out
accuracy reached 0.70, 0.75, 0.80 (so known to ``--eval-every`` steps); the
final held-out accuracy; the sampled reward of the first 10 steps and the
last 10. The reward against the clock is plotted to
``benchmarks/results/grpo_vs_trl.png``, the numbers written to
``benchmarks/results/grpo_vs_trl.json``.

TRL's settings (``trl_config``): ``num_generations=8``,
``per_device_train_batch_size=32`` with ``gradient_accumulation_steps=1``
and ``steps_per_generation=1`` (32 completions, 4 prompts, one optimizer
step per generation batch), ``num_iterations=1`` (each batch trained on
once, as forge_lite does, so the importance ratio is 1 and clipping never
acts), ``max_completion_length=32``, ``temperature=1.0``, ``top_p=1.0``,
``top_k=0``, ``learning_rate=2e-4``, ``warmup_steps=10``,
``lr_scheduler_type="linear"``, ``optim="adamw_torch"`` (torch's AdamW,
forge_lite's optimizer; TRL's default on this torch is the fused one),
``weight_decay=0``, ``max_grad_norm=1.0``, ``beta=0.0``,
``loss_type="grpo"`` (each sequence's token mean, then the mean over the
batch: forge_lite's ``grpo_loss``), ``scale_rewards="group"`` (advantages
``(r - group mean) / (group sample std + 1e-4)``, forge_lite's
``group_advantages``), ``mask_truncated_completions=False`` (forge_lite
trains on truncated responses too), ``shuffle_dataset=False`` (the dataset
is already in forge_lite's order), ``gradient_checkpointing=False``
(TRL's default is on; forge_lite does not checkpoint), ``bf16=False``,
``fp16=False`` and the model loaded in float32 (forge_lite's trainer dtype),
``use_cpu=True``, ``logging_steps=1``, ``report_to="none"``, ``seed``.

Neither side runs a reference model: with ``beta=0.0`` TRL loads none,
and ``configs/grpo_tiny.yaml`` starts none (``ref_model.kl_samples: 0``).

What cannot be matched, and why, follows (``NOT_MATCHED``; it is printed
with the results too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import forge_lite  # noqa: F401  (before monarch)
from forge_lite.assets import DEFAULT_MODEL
from forge_lite.data.prompts import extract_target, format_request
from forge_lite.data.rewards import MathReward
from forge_lite.grpo.config import load_config
from forge_lite.grpo.dataset import load_math_dataset

try:  # where the held-out scoring lives once the GRPO loop is split up
    from forge_lite.grpo.evaluation import is_correct
except ImportError:
    from forge_lite.grpo.loop import is_correct

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results")

HELD_OUT = 200  # the first 200 held-out problems (the whole shipped test split)
EXPECTED_BEFORE = 0.645  # the shipped model's greedy accuracy on them
LEVELS = (0.70, 0.75, 0.80)
PROMPTS_PER_STEP = 4
GROUP_SIZE = 8
MAX_TOKENS = 32

#: Settings that differ between the two sides, and why; printed with the results.
NOT_MATCHED = [
    ("dynamic sampling (skip_uniform_groups)",
     "forge_lite leaves a group whose 8 rewards are all equal out of the batch and fills the step with "
     "groups that have a spread, so each step trains on 4 informative prompts and samples more than 4; "
     "TRL's GRPOTrainer has no such option: it trains on the 4 prompts it drew, and a "
     "uniform group's advantages are 0, so it adds no gradient but still counts in the mean over 32 "
     "sequences (the step is scaled down by the uniform share)"),
    ("asynchrony and staleness",
     "forge_lite's rollouts run beside training (one rollout loop, 6 prompts at a time, up to 2 "
     "batches ahead of the trainer, max_policy_age 1): a batch may have "
     "been sampled by weights one version old; its loss takes the importance ratio against the "
     "logprobs the sampler returned, clipped at 1 +- 0.2 (loss.type grpo); "
     "TRL generates, then trains, with the same weights: strictly on-policy and sequential"),
    ("learning-rate schedule shape",
     "both warm up over 10 steps and fall linearly to 0 at the last step, but TRL's (transformers' "
     "'linear') gives step s the factor s/10 during the warm-up, so its first step has learning rate 0, "
     "and (T-s)/(T-10) after it; forge_lite's is min(1, (s+1)/11) * (1 - s/T). They differ by at most "
     "0.09 of the rate in the warm-up and 1.3% after it (T = 800). A transformers scheduler cannot "
     "express forge_lite's; GRPOTrainer(optimizers=...) could take a custom one, but then TRL would not "
     "be run as its users run it"),
    ("which prompts each step sees",
     "TRL's dataset is forge_lite's training order (the shipped train split shuffled with seed 0, then "
     "seed 1, ...), read 4 prompts per step; forge_lite reads more per step (skipped groups), so from "
     "the first skipped group on, step k of the two sees different problems"),
    ("sampling random numbers",
     "different generators and engines (forge_lite's TransformersEngine with per-sequence stopping, "
     "transformers' generate on a padded batch): the same seed gives different samples. forge_lite's "
     "config has no seed: its policy replica samples with a generator seeded by the replica index, and "
     "its runs also differ by the timing of its concurrent tasks; TRL's runs take --seeds"),
    ("sampled reward per step",
     "forge_lite's is the mean over every response scored since the previous step (skipped groups "
     "included, some from the previous weights); TRL's is the mean over the step's 32 completions"),
    ("processes and threads",
     "forge_lite runs 4 processes besides this one (the policy, the trainer, the reward service, and one "
     "the dataset, the replay buffer and the advantage computation share), with 1 torch thread each "
     "(threads_per_process: 1); TRL runs in this one process with torch's default thread count (one "
     "per core)"),
    ("the trainer's forward pass",
     "forge_lite runs each of a step's 4 prompts once and the 8 responses of its group on a copy of "
     "its KV cache (forge_lite.rl.logprobs.response_logits), on columns that are not padding in "
     "every row; TRL runs each of the 32 prompt-and-completion rows whole, padded to the batch's "
     "longest. The logprobs and gradients are the same (to float rounding), the compute is not"),
    ("time during evaluations",
     "both clocks leave the evaluations out; forge_lite's training loop waits and no new rollout "
     "starts, but the (at most 6) groups already being generated finish during the evaluation"),
]

if __doc__:
    __doc__ += "\nNot matched:\n\n" + "\n".join(f"- {name}: {why}." for name, why in NOT_MATCHED) + "\n"


# ---------------------------------------------------------------- the shared job


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def _samples(tokenizer, dataset, seed: int, count: int) -> list[dict]:
    """The first ``count`` rows of ``dataset`` shuffled with ``seed``, as
    DatasetActor.sample serves them: chat-formatted request, bare-number target."""
    columns = dataset.shuffle(seed=seed)[:count]
    return [
        {"request": format_request(tokenizer, question), "target": extract_target(answer)}
        for question, answer in zip(columns["question"], columns["answer"])
    ]


def heldout_problems(tokenizer, count: int = HELD_OUT) -> list[dict]:
    """The first ``count`` held-out problems, in the order forge_lite's run
    reads them (``DatasetActor(data_split="test")``: its first epoch, shuffled with seed 0)."""
    return _samples(tokenizer, load_math_dataset(data_split="test"), 0, count)


def train_rows(tokenizer, count: int) -> list[dict]:
    """The first ``count`` training problems in the order ``DatasetActor()``
    serves them (epoch e shuffled with seed e), as TRL dataset rows:
    ``prompt`` (the formatted request) and ``target``."""
    dataset = load_math_dataset(data_split="train")
    rows: list[dict] = []
    epoch = 0
    while len(rows) < count:
        rows += [{"prompt": s["request"], "target": s["target"]}
                 for s in _samples(tokenizer, dataset, epoch, count - len(rows))]
        epoch += 1
    return rows


_MATH = MathReward()


def math_reward(prompts, completions, target, **kwargs) -> list[float]:
    """TRL's reward function: forge_lite's reward service with ``reward_actor.functions: [math]``
    (the mean of one function, MathReward, of prompt, response and target).
    TRL passes the dataset's ``target`` column as a keyword."""
    return [float(_MATH(p, c, t)) for p, c, t in zip(prompts, completions, target)]


def accuracy_of(problems: list[dict], responses: list[str]) -> float:
    """Held-out accuracy of ``responses`` (one per problem), scored by ``is_correct``,
    the function forge_lite's ``GRPORun.evaluate`` scores with."""
    return sum(is_correct(p["request"], r, p["target"]) for p, r in zip(problems, responses)) / len(problems)


def greedy_responses(model, tokenizer, problems: list[dict], max_tokens: int = MAX_TOKENS,
                     batch_size: int = 64) -> list[str]:
    """``model``'s greedy answers to ``problems`` (transformers' generate, left-padded batches)."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, pad_token_id=pad, eos_token_id=eos)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(problems), batch_size):
            chunk = [p["request"] for p in problems[start:start + batch_size]]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                output = model.generate(**encoded, generation_config=config)
            new = output[:, encoded["input_ids"].shape[1]:]
            responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def check_before(side: str, accuracy: float, count: int) -> None:
    """The untrained model's held-out accuracy is the check that a side answers the same prompts."""
    if count == HELD_OUT and abs(accuracy - EXPECTED_BEFORE) > 1e-9:
        raise AssertionError(
            f"{side}: held-out greedy accuracy before training is {accuracy:.3f}, not "
            f"{EXPECTED_BEFORE}: this side is not answering the same prompts (or not scoring "
            "them the same way) as the other"
        )


# ---------------------------------------------------------------- one run's record


class Clock:
    """Seconds since a side began, less the time spent in held-out evaluations."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.began - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds


@dataclass
class SideRun:
    """What one run of one side did, on its clock (evaluations left out)."""

    side: str
    seed: int | None
    startup_s: float = 0.0
    step_clock_s: list[float] = field(default_factory=list)  # the clock at the end of each step
    rewards: list[float] = field(default_factory=list)  # sampled reward mean of each step
    evals: list[dict] = field(default_factory=list)  # {"step", "clock_s", "accuracy", "eval_s"}
    notes: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.step_clock_s)

    @property
    def train_s(self) -> float:
        return (self.step_clock_s[-1] if self.step_clock_s else self.startup_s) - self.startup_s

    @property
    def steps_per_min(self) -> float:
        return 60 * self.steps / self.train_s if self.train_s > 0 else float("nan")

    def reached(self, level: float) -> dict | None:
        """The first evaluation at ``level`` or above (its step and clock), or None."""
        return next((e for e in self.evals if e["accuracy"] >= level - 1e-9), None)

    def reward_first_last(self, k: int = 10) -> tuple[float, float]:
        k = max(1, min(k, len(self.rewards) // 2 or 1))
        return sum(self.rewards[:k]) / k, sum(self.rewards[-k:]) / k

    def numbers(self) -> dict:
        first, last = self.reward_first_last()
        return {
            "side": self.side, "seed": self.seed, "steps": self.steps,
            "startup_s": self.startup_s, "train_s": self.train_s, "steps_per_min": self.steps_per_min,
            "wall_s": self.startup_s + self.train_s,
            "eval_s": sum(e["eval_s"] for e in self.evals),
            "heldout_before": self.evals[0]["accuracy"] if self.evals else None,
            "heldout_final": self.evals[-1]["accuracy"] if self.evals else None,
            "time_to": {f"{level:.2f}": self.reached(level) for level in LEVELS},
            "reward_first10": first, "reward_last10": last,
            "evals": self.evals, "step_clock_s": self.step_clock_s, "rewards": self.rewards,
            "notes": self.notes,
        }


# ---------------------------------------------------------------- TRL


def trl_config(steps: int, seed: int, output_dir: str):
    """TRL's GRPOConfig for the job (field names as trl 1.16 spells them)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": "float32"},
        seed=seed,
        max_steps=steps,
        # 4 prompts x 8 responses = 32 completions per step, one optimizer step each.
        num_generations=GROUP_SIZE,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=2e-4,
        warmup_steps=10,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


def trl_trainer(steps: int, seed: int, output_dir: str, rows: list[dict], tokenizer, callbacks=()):
    """A GRPOTrainer on the shipped model, ``rows`` (prompt, target) and ``math_reward``."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    trainer = GRPOTrainer(
        model=DEFAULT_MODEL,
        reward_funcs=math_reward,
        args=trl_config(steps, seed, output_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    # One line of logs per step otherwise; the benchmark prints its own.
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


def run_trl(steps: int, eval_every: int, seed: int, problems: list[dict]) -> SideRun:
    began = time.perf_counter()
    import torch
    from transformers import TrainerCallback

    try:
        import trl
    except ImportError as error:
        raise SystemExit(
            f"TRL is not installed ({error}): pip install -e '.[bench]', or run --only forge_lite"
        ) from error

    import_s = time.perf_counter() - began
    # Formatting every prompt up front (about 2 s for 3200 on 2 cores) is left
    # out of the start-up: forge_lite formats one prompt at a time as it runs.
    began = time.perf_counter()
    rows = train_rows(load_tokenizer(), steps * PROMPTS_PER_STEP)
    result = SideRun("trl", seed, notes={
        "trl": trl.__version__, "torch_threads": torch.get_num_threads(),
        "import_s (not in start-up)": import_s,
        "prompt_formatting_s (not in start-up)": time.perf_counter() - began,
    })
    clock = Clock()
    tokenizer = load_tokenizer()
    eval_tokenizer = load_tokenizer()

    def evaluate(model, step: int) -> None:
        at, started = clock.now(), time.perf_counter()
        accuracy = accuracy_of(problems, greedy_responses(model, eval_tokenizer, problems))
        seconds = time.perf_counter() - started
        clock.pause(seconds)
        result.evals.append({"step": step, "clock_s": at, "accuracy": accuracy, "eval_s": seconds})
        print(f"TRL: step {step:4d}  clock {at:7.1f} s  held-out greedy accuracy {accuracy:.3f}", flush=True)
        if step == 0:
            check_before("TRL", accuracy, len(problems))

    class Recorder(TrainerCallback):
        """Clock and sampled reward per step, held-out accuracy every ``eval_every`` steps."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            result.startup_s = clock.now()
            evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            result.step_clock_s.append(clock.now())
            if state.global_step % eval_every == 0 or state.global_step == steps:
                evaluate(model, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                result.rewards.append(float(logs["reward"]))
                uniform.append(float(logs.get("frac_reward_zero_std", float("nan"))))
                rates.append(float(logs.get("learning_rate", float("nan"))))

    uniform: list[float] = []  # share of the step's groups whose rewards were all equal
    rates: list[float] = []  # learning rate logged after each step
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as output_dir:
        trainer = trl_trainer(steps, seed, output_dir, rows, tokenizer, callbacks=[Recorder()])
        trainer.train()
    result.notes["uniform_group_share_mean"] = mean(uniform)
    result.notes["learning_rate_first_12"] = rates[:12]
    return result


# ---------------------------------------------------------------- forge_lite


def forge_lite_config(steps: int, output_dir: Path):
    return load_config(CONFIG, [
        f"steps={steps}", f"eval_samples={HELD_OUT}", f"output_dir={output_dir}", "progress=false",
    ])


async def run_forge_lite(steps: int, eval_every: int, seed: int, problems: list[dict]) -> SideRun:
    """``configs/grpo_tiny.yaml`` through ``GRPORun``, evaluated every ``eval_every`` steps.

    ``GRPORun(evaluate_every=...)`` evaluates on the policy service, which
    then serves the weights of that step, while no new rollout starts and
    the training loop waits; its ``on_evaluation`` callback, called as each
    evaluation ends, takes the evaluation's seconds off this side's clock.
    """
    from forge_lite.grpo import GRPORun, MetricsRecorder
    from forge_lite.grpo.recorder import StepRecord

    config = forge_lite_config(steps, RESULTS / "grpo_vs_trl" / f"forge_lite-{seed}")
    assert config.reward_actor.functions == ["math"], "TRL's reward function is MathReward alone"
    assert (config.group_size, config.batch_size, config.policy.max_tokens) == (
        GROUP_SIZE, GROUP_SIZE * PROMPTS_PER_STEP, MAX_TOKENS)
    result = SideRun("forge_lite", seed, notes={
        "config": str(CONFIG.relative_to(ROOT)), "threads_per_process": config.threads_per_process,
        "seed": "none (forge_lite's config has no seed)",
    })
    clock = Clock()

    def on_evaluation(evaluation) -> None:
        # Called as the evaluation ends: it began evaluation.seconds ago.
        at = clock.now() - evaluation.seconds
        clock.pause(evaluation.seconds)
        result.evals.append({"step": evaluation.step, "clock_s": at, "accuracy": evaluation.accuracy,
                             "eval_s": evaluation.seconds})
        print(f"forge_lite: step {evaluation.step:4d}  clock {at:7.1f} s  held-out greedy accuracy "
              f"{evaluation.accuracy:.3f}", flush=True)
        if evaluation.step == 0:
            check_before("forge_lite", evaluation.accuracy, len(problems))

    def on_record(record) -> None:
        if isinstance(record, StepRecord):
            result.step_clock_s.append(clock.now())
            result.rewards.append(record.reward_mean)

    recorder = MetricsRecorder()
    run = GRPORun(config, recorder, evaluate_every=eval_every, on_evaluation=on_evaluation)
    try:
        await run.start()
        result.startup_s = clock.now()
        result.notes["services_startup_s"] = run.startup_s
        served = [{"request": p["request"], "target": p["target"]} for p in run.eval_problems]
        if served != problems:
            raise AssertionError("forge_lite's held-out problems are not the benchmark's (TRL's)")
        recorder.subscribe(on_record, replay=False)
        await run.train()
        skipped = sum(r.skipped_groups for r in recorder.steps)
        ages = [a for r in recorder.steps for a in r.episode_ages]
        result.notes["skipped_groups"] = skipped
        result.notes["uniform_group_share_mean"] = skipped / (skipped + PROMPTS_PER_STEP * len(recorder.steps))
        result.notes["episode_age_mean"] = sum(ages) / len(ages) if ages else None
    finally:
        await run.shutdown()
    return result


# ---------------------------------------------------------------- report


def mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def report(runs: list[SideRun], steps: int, eval_every: int) -> str:
    sides = [s for s in ("trl", "forge_lite") if any(r.side == s for r in runs)]
    by_side = {s: [r for r in runs if r.side == s] for s in sides}
    label = {"trl": "TRL GRPOTrainer", "forge_lite": "forge_lite"}

    def cell(side, fn, digits=1):
        values = [fn(r) for r in by_side[side]]
        shown = ["-" if v is None else f"{v:.{digits}f}" for v in values]
        return " / ".join(shown)

    rows = [
        ("start-up (s)", lambda r: r.startup_s, 1),
        ("steps/min (training only)", lambda r: r.steps_per_min, 1),
        ("training time (s, no evals)", lambda r: r.train_s, 0),
        ("held-out evaluations (s, left out)", lambda r: sum(e["eval_s"] for e in r.evals), 1),
    ]
    for level in LEVELS:
        rows.append((f"wall s to held-out >= {level:.2f}",
                     lambda r, level=level: (r.reached(level) or {}).get("clock_s"), 0))
        rows.append(("  (at step)", lambda r, level=level: (r.reached(level) or {}).get("step"), 0))
    rows += [
        ("held-out accuracy before", lambda r: r.evals[0]["accuracy"] if r.evals else None, 3),
        ("held-out accuracy final", lambda r: r.evals[-1]["accuracy"] if r.evals else None, 3),
        ("sampled reward first 10", lambda r: r.reward_first_last()[0], 3),
        ("sampled reward last 10", lambda r: r.reward_first_last()[1], 3),
        ("wall time, start-up + training (s)", lambda r: r.startup_s + r.train_s, 0),
        ("share of groups with equal rewards", lambda r: r.notes.get("uniform_group_share_mean"), 2),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    columns = {s: max(len(label[s]), *(len(cell(s, fn, d)) for _, fn, d in rows)) + 2 for s in sides}
    runs_note = ", ".join(f"{label[s]} seeds {[r.seed for r in by_side[s]]}" for s in sides)
    lines = [
        "",
        f"GRPO, forge_lite vs TRL: {steps} steps, held-out greedy accuracy every {eval_every} steps on "
        f"{HELD_OUT} problems ({platform.machine()}, {os.cpu_count()} CPUs); one value per run ({runs_note})",
        f"{'':{width}}" + "".join(f"{label[s]:>{columns[s]}}" for s in sides),
    ]
    for name, fn, digits in rows:
        lines.append(f"{name:{width}}" + "".join(f"{cell(s, fn, digits):>{columns[s]}}" for s in sides))
    befores = {label[s]: by_side[s][0].evals[0]["accuracy"] for s in sides if by_side[s][0].evals}
    lines.append(
        "held-out accuracy of the untrained model: "
        + ", ".join(f"{name} {value:.3f}" for name, value in befores.items())
        + f" (must be {EXPECTED_BEFORE}: the check that both sides answer the same prompts)"
    )
    lines.append("Clocks: seconds since the side began, start-up included, held-out evaluations left out; "
                 "a level's time is that of the first evaluation at or above it.")
    lines.append("TRL loss_type 'grpo' (sequence mean, then batch mean), forge_lite's grpo_loss.")
    lines.append("Not matched:")
    lines += [f"  - {name}: {why}." for name, why in NOT_MATCHED]
    return "\n".join(lines)


def trailing_mean(values: list[float], width: int = 10) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / min(width, i + 1) for i in range(len(values))]


def plot(runs: list[SideRun], path: Path) -> None:
    """Sampled reward (10-step mean) and held-out accuracy against each side's clock."""
    from matplotlib.figure import Figure

    colours = {"trl": "#c62828", "forge_lite": "#1565c0"}
    names = {"trl": "TRL", "forge_lite": "forge_lite"}
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for index, run in enumerate(runs):
        colour = colours[run.side]
        number = sum(r.side == run.side for r in runs[:index]) + 1
        tag = f"{names[run.side]} (seed {run.seed})" if run.side == "trl" else f"{names[run.side]} (run {number})"
        minutes = [t / 60 for t in run.step_clock_s[:len(run.rewards)]]
        ax.plot(minutes, run.rewards[:len(minutes)], color=colour, alpha=0.15, linewidth=1)
        ax.plot(minutes, trailing_mean(run.rewards[:len(minutes)]), color=colour, linewidth=2,
                label=f"{tag}: sampled reward (10-step mean)")
        ax.plot([e["clock_s"] / 60 for e in run.evals], [e["accuracy"] for e in run.evals],
                color=colour, linestyle="--", marker="o", markersize=4,
                label=f"{tag}: held-out greedy accuracy")
    for level in LEVELS:
        ax.axhline(level, color="#9e9e9e", linewidth=0.8, linestyle=":")
    ax.set_xlabel("wall-clock minutes (start-up included, held-out evaluations left out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO on the shipped model: forge_lite vs TRL GRPOTrainer")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write(runs: list[SideRun], args, text: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    numbers = {
        "steps": args.steps, "eval_every": args.eval_every, "held_out": HELD_OUT,
        "expected_heldout_before": EXPECTED_BEFORE, "levels": list(LEVELS),
        "not_matched": [{"setting": n, "why": w} for n, w in NOT_MATCHED],
        "trl_loss_type": "grpo",
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count()},
        "runs": [r.numbers() for r in runs],
        "report": text,
    }
    (RESULTS / "grpo_vs_trl.json").write_text(json.dumps(numbers, indent=2) + "\n")
    plot(runs, RESULTS / "grpo_vs_trl.png")


async def one_side(args) -> None:
    """``--one-side SIDE SEED FILE``: one run of one side in this (fresh)
    process, its numbers written to FILE as JSON for the parent to read."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    side, seed, path = args.one_side[0], int(args.one_side[1]), args.one_side[2]
    problems = heldout_problems(load_tokenizer())
    if side == "trl":
        run = run_trl(args.steps, args.eval_every, seed, problems)
    else:
        run = await run_forge_lite(args.steps, args.eval_every, seed, problems)
    Path(path).write_text(json.dumps(dataclasses.asdict(run)))


def run_side_in_new_process(side: str, seed: int, args) -> SideRun:
    """One run of one side, in a process of its own: a second run in the same
    process would find torch, transformers and TRL's lazy imports already
    loaded, and TRL's start-up measured 0.4 s instead of 3-4 s that way."""
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as folder:
        path = Path(folder) / "side.json"
        command = [sys.executable, __file__, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--one-side", side, str(seed), str(path)]
        subprocess.run(command, check=True)
        return SideRun(**json.loads(path.read_text()))


async def main(args) -> None:
    seeds = args.seeds if args.seeds else list(range(args.runs))
    sides = [args.only] if args.only else ["trl", "forge_lite"]
    runs: list[SideRun] = []
    for index, seed in enumerate(seeds):
        # Alternate which side goes first, so neither always gets the quieter machine.
        for side in (sides if index % 2 == 0 else sides[::-1]):
            print(f"\n=== {side}, run {index + 1} of {len(seeds)} (seed {seed}), {args.steps} steps ===", flush=True)
            runs.append(run_side_in_new_process(side, seed, args))
            write(runs, args, report(runs, args.steps, args.eval_every))
    text = report(runs, args.steps, args.eval_every)
    print(text)
    write(runs, args, text)
    print(f"\nwrote {RESULTS / 'grpo_vs_trl.json'} and {RESULTS / 'grpo_vs_trl.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps per side (default 800)")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="held-out evaluation every N steps (default 25), and at the start and end")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seeds", type=int, nargs="+", help="one run per side per seed (TRL's seed)")
    group.add_argument("--runs", type=int, default=1, help="runs per side, seeds 0..N-1 (default 1)")
    parser.add_argument("--only", choices=["trl", "forge_lite"], help="run one side only")
    parser.add_argument("--one-side", nargs=3, metavar=("SIDE", "SEED", "FILE"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.steps < 1 or arguments.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    asyncio.run(one_side(arguments) if arguments.one_side else main(arguments))
