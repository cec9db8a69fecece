"""What dropping padding columns saves the trainer, measured side by side.

    python benchmarks/train_step.py              # about half a minute
    python benchmarks/train_step.py --rounds 1   # the smoke test's short run

Builds the batch the tiny GRPO config trains on: 32 of the shipped math
problems, each request left-padded to ``request_len`` 96 and each response
(a correct worked answer) right-padded to ``max_tokens`` 32. Then times the
trainer's forward and backward on it as collated, and after
``drop_padding_columns`` (what ``RLTrainer.train_step`` does), alternating the
two so machine noise hits both alike. One thread, as in a GRPO run.

Prints the two shapes, the median times and their ratio; writes
``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from forge_lite.actors.hf_model import load_causal_lm, load_tokenizer
from forge_lite.assets import DEFAULT_MODEL, MATH_DATA_DIR
from forge_lite.data.prompts import format_request
from forge_lite.grpo import Episode
from forge_lite.rl.collate import drop_padding_columns, grpo_collate
from forge_lite.rl.logprobs import causal_lm_logits, response_logprobs
from forge_lite.rl.loss import grpo_loss

BATCH, REQUEST_LEN, RESPONSE_LEN = 32, 96, 32
# FORGE_LITE_BENCH_RESULTS names another folder (the smoke tests' temporary one).
RESULTS = Path(os.environ.get("FORGE_LITE_BENCH_RESULTS") or Path(__file__).parent / "results") / "train_step.json"


def realistic_batch(tokenizer) -> tuple[dict, dict]:
    with open(f"{MATH_DATA_DIR}/train.jsonl") as file:
        rows = [json.loads(line) for line in file][:BATCH]
    episodes = []
    for number, row in enumerate(rows):
        working, answer = row["answer"].split("\n#### ")
        episode = Episode(str(number), "", 0, tokenizer.pad_token_id, REQUEST_LEN, RESPONSE_LEN, answer)
        episode.request_tokens = tokenizer.encode(format_request(tokenizer, row["question"]))
        episode.response_tokens = tokenizer.encode(
            f"<think>{working}</think><answer>{answer}</answer>"
        ) + [tokenizer.eos_token_id]
        episode.ref_logprobs = torch.zeros(len(episode.response_tokens))
        episode.reward, episode.advantage = 1.0, 0.5
        episodes.append(episode)
    (batch,), (target,) = grpo_collate(episodes)
    return batch, target


def forward_backward(model, batch: dict, target: dict) -> float:
    started = time.perf_counter()
    request_len = batch["tokens"].shape[1] - target["response"].shape[1]
    logits = causal_lm_logits(model, batch["tokens"], batch["attention_mask"])
    logprobs = response_logprobs(logits, batch["tokens"], request_len)
    loss = grpo_loss(logprobs, target["ref_logprobs"], target["advantages"], target["padding_mask"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, "float32", torch.device("cpu"))
    padded = realistic_batch(tokenizer)
    dropped = drop_padding_columns(*padded)
    forward_backward(model, *padded)  # warm-up
    times = {"padded": [], "dropped": []}
    for _ in range(rounds):
        times["padded"].append(forward_backward(model, *padded))
        times["dropped"].append(forward_backward(model, *dropped))
    padded_s, dropped_s = (statistics.median(times[k]) for k in ("padded", "dropped"))
    print(f"batch as collated:      {tuple(padded[0]['tokens'].shape)}  {padded_s * 1e3:6.0f} ms")
    print(f"padding columns gone:   {tuple(dropped[0]['tokens'].shape)}  {dropped_s * 1e3:6.0f} ms")
    print(f"ratio (dropped/padded): {dropped_s / padded_s:.2f}  (median of {rounds}, forward + backward)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "rounds": rounds, "padded_shape": list(padded[0]["tokens"].shape),
        "dropped_shape": list(dropped[0]["tokens"].shape), "padded_s": padded_s, "dropped_s": dropped_s,
        "ratio": dropped_s / padded_s,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each shape (median taken)")
    main(parser.parse_args().rounds)
