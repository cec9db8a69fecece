"""The ideal GRPO step on this machine: its compute alone, without messaging.

    python benchmarks/grpo_step_bound.py              # about a minute
    python benchmarks/grpo_step_bound.py --rounds 1   # the smoke test's short run

One step of the tiny config (configs/grpo_tiny.yaml) is two pieces of work:
generate 4 prompts x 8 responses of up to 32 tokens, and train on a batch of
32 episodes. Here both run in this one process, with the kit's own engine
(the transformers engine the config uses) and the kit's loss, on real prompts
from the shipped math set, and are timed with 1 thread and with 2:

- serial: generation then training, each with every core (2 threads): what
  a single-process trainer such as TRL's GRPOTrainer can reach at best;
- pipelined bound: generation and training at the same time, each on one
  core (1 thread): the slower of the two per step, what a perfect overlap of
  the rollout and training loops would reach.

The GRPO loop (``python -m forge_lite.grpo``) reports its seconds per step;
divide by these to see how far it is from each. Also printed: the engine's
own generation rate (tokens/s, 1 thread). Writes
``benchmarks/results/grpo_step_bound.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from forge_lite.actors.engines import SamplingConfig, make_engine
from forge_lite.actors.hf_model import load_causal_lm, load_tokenizer
from forge_lite.actors.trainer import build_optimizer
from forge_lite.assets import DEFAULT_MODEL, MATH_DATA_DIR
from forge_lite.data.prompts import format_request
from forge_lite.rl.collate import drop_padding_columns, grpo_collate
from forge_lite.rl.episode import Group
from forge_lite.rl.logprobs import response_logits, token_logprobs
from forge_lite.rl.loss import grpo_loss

PROMPTS, GROUP, MAX_TOKENS, REQUEST_LEN = 4, 8, 32, 96
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "grpo_step_bound.json"


def problems(tokenizer, start: int) -> list[str]:
    with open(f"{MATH_DATA_DIR}/train.jsonl") as file:
        rows = [json.loads(line) for line in file][start:start + PROMPTS]
    return [format_request(tokenizer, row["question"]) for row in rows]


def generate(engine, prompts: list[str]) -> list:
    """One step's generations: every prompt's group, as one batch."""
    sampling = SamplingConfig(n=GROUP, max_tokens=MAX_TOKENS, temperature=1.0)
    for prompt in prompts:
        engine.add_request(prompt, sampling)
    done = {}
    while len(done) < len(prompts):
        done.update(engine.step())
    return [c for completions in done.values() for c in completions]


def train_step(model, optimizer, completions: list, pad_id: int) -> None:
    groups = [completions[i:i + GROUP] for i in range(0, len(completions), GROUP)]
    episodes = []
    for completions_of_one in groups:
        group = Group.from_completions(completions_of_one, "", "0", pad_id, REQUEST_LEN, MAX_TOKENS)
        for i, episode in enumerate(group.episodes):
            episode.reward, episode.advantage = float(i % 2), (1.0 if i % 2 else -1.0)
        episodes += group.episodes
    (batch,), (target,) = grpo_collate(episodes)
    batch, target = drop_padding_columns(batch, target)
    request_len = batch["tokens"].shape[1] - target["response"].shape[1]
    # As the trainer does: each of the step's 4 requests runs once, not 8 times.
    logits = response_logits(model, batch["tokens"], batch["attention_mask"], request_len)
    logprobs = token_logprobs(logits, batch["tokens"][:, request_len:])
    loss = grpo_loss(logprobs, None, target["advantages"], target["padding_mask"], beta=0.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def measure(threads: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds of one step's generation and one step's training, and
    the generation's tokens per second (all rounds)."""
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    engine = make_engine({"backend": "transformers"}, seed=0)
    model = load_causal_lm(DEFAULT_MODEL, "float32", torch.device("cpu"))
    model.train()
    optimizer = build_optimizer(model.parameters(), {"name": "AdamW", "lr": 2e-4})
    completions = generate(engine, problems(tokenizer, 0))  # warm-up
    train_step(model, optimizer, completions, tokenizer.pad_token_id)
    gen_s, train_s, tokens = [], [], 0
    for round_ in range(rounds):
        started = time.perf_counter()
        completions = generate(engine, problems(tokenizer, (round_ + 1) * PROMPTS))
        gen_s.append(time.perf_counter() - started)
        tokens += sum(len(c.token_ids) for c in completions)
        started = time.perf_counter()
        train_step(model, optimizer, completions, tokenizer.pad_token_id)
        train_s.append(time.perf_counter() - started)
    return statistics.median(gen_s), statistics.median(train_s), tokens / sum(gen_s)


def main(rounds: int) -> None:
    one_gen, one_train, one_rate = measure(1, rounds)
    two_gen, two_train, _ = measure(2, rounds)
    serial = two_gen + two_train
    pipelined = max(one_gen, one_train)
    print(f"{'':28}{'generate':>10}{'train':>10}   (median of {rounds}, seconds per step)")
    print(f"{'1 thread':28}{one_gen:10.3f}{one_train:10.3f}")
    print(f"{'2 threads':28}{two_gen:10.3f}{two_train:10.3f}")
    print(f"generation, 1 thread:       {one_rate:.0f} tokens/s")
    print(f"serial, 2 threads:          {serial:.3f} s/step = {60 / serial:.0f} steps/min")
    print(f"pipelined bound, 1 core each: {pipelined:.3f} s/step = {60 / pipelined:.0f} steps/min")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "rounds": rounds, "load_average_1min": os.getloadavg()[0],
        "seconds_per_step": {"1_thread": {"generate": one_gen, "train": one_train},
                             "2_threads": {"generate": two_gen, "train": two_train}},
        "generate_tokens_per_s_1_thread": one_rate,
        "serial_steps_per_min": 60 / serial, "pipelined_bound_steps_per_min": 60 / pipelined,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per thread count (median taken)")
    main(parser.parse_args().rounds)
