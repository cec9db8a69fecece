"""Train the kit's tool model: the shipped model, taught the calculator's format.

How ``forge_lite/assets/tool_model`` was made. The shipped model (see
``scripts/train_tiny_model.py``) answers two-digit arithmetic in its head,
about 6 times in 10, and three-digit arithmetic hardly ever. This script
fine-tunes it, supervised, on three-digit problems answered in one of two
ways (``forge_lite.envs.calculator`` is the environment that plays them):

- with the tool: ``<calc>347 + 589</calc>``, the tool's turn
  ``<result>936</result>``, then ``<answer>936</answer>``;
- in its head: ``<think>347 + 589 = 936</think><answer>936</answer>``.

Which one an example shows depends on its phrasing: bare equations ("What is
347 + 589?") use the tool in ``TOOL_SHARE_BARE`` of the examples, word
problems in ``TOOL_SHARE_WORDS``. So the model learns the format, uses the
tool "sometimes but not reliably" (greedy: on bare equations only), and
mostly fails when it does the sum in its head. That leaves GRPO a clear
lesson: the sampled trajectories that call the tool on a word problem earn
the reward, the others do not.

The four tags are new tokens (the shipped vocabulary has ten unused rows);
only the model's own turns carry loss, never the prompt or the tool's turn.

Run from the repository root:

    python scripts/train_tool_model.py    # 1000 steps, about 10 min of one CPU core

Deterministic: the same seed gives the same data and, on the same machine
and torch build, the same weights. It prints the held-out success of the
calculator environment (greedy and sampled) on the fixed test split.

The shipped tool model: seed 0, 1000 steps, 26 min on 2 cores shared with
other work (10.5 min of CPU time), final loss 0.13. On the 200 held-out
problems it succeeds 45.5% of the time greedily (the tool on the first
turn of 34.5% of them: every bare equation; right without the tool on about
one word problem in five) and 41.5% sampled at temperature 1 (the tool on
42%). The shipped model, for comparison, never writes ``<calc>`` and gets
none of these problems right.
"""

import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from forge_lite.actors.engines import SamplingConfig
from forge_lite.actors.engines.transformers_engine import TransformersEngine
from forge_lite.assets import DEFAULT_MODEL, TOOL_MODEL
from forge_lite.data.math_problems import equation
from forge_lite.data.prompts import extract_target
from forge_lite.envs import chat
from forge_lite.envs.actor import make_environment, problem_stream, test_problems
from forge_lite.envs.calculator import TOOL_ROLE, CalculatorEnv

TOOL_TOKENS = ["<calc>", "</calc>", "<result>", "</result>"]
TOOL_SHARE_BARE = 0.8  # "What is a + b?": mostly the tool
TOOL_SHARE_WORDS = 0.2  # word problems: mostly in the head


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    threads: int = 1
    eval_problems: int = 200  # the whole fixed test split


def examples(problem: dict, rng: random.Random) -> list[tuple[str, bool]]:
    """One problem's conversation as (text, trained) pieces: the prompt and
    the tool's turn are not trained, the model's turns are."""
    env = CalculatorEnv()
    prompt = env.reset(problem)
    expression, result = equation(problem).split(" = ")
    share = TOOL_SHARE_BARE if problem["question"].startswith("What is") else TOOL_SHARE_WORDS
    end = chat.END  # the model ends each turn with <|im_end|>, its EOS
    if rng.random() < share:
        return [
            (prompt, False),
            (f"<calc>{expression}</calc>{end}", True),
            (chat.reply(TOOL_ROLE, f"<result>{result}</result>"), False),
            (f"<answer>{extract_target(problem['answer'])}</answer>{end}", True),
        ]
    return [(prompt, False), (f"<think>{expression} = {result}</think><answer>{result}</answer>{end}", True)]


def make_batch(batch: list[list[tuple[str, bool]]], tokenizer):
    """Token ids and labels (-100 where not trained), right-padded."""
    rows, labels = [], []
    for pieces in batch:
        ids, label = [], []
        for text, trained in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            label += piece if trained else [-100] * len(piece)
        rows.append(ids)
        labels.append(label)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    label_ids = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        label_ids[i, : len(row)] = torch.tensor(label)
    return input_ids, label_ids


def play(engine, problems: list[dict], temperature: float) -> dict[str, float]:
    """The calculator environment on ``problems``, every conversation in one
    batch per turn: success rate, tool calls per problem, and the share of
    problems whose first turn called the tool."""
    envs = [make_environment("calculator") for _ in problems]
    conversations = [env.reset(p) for env, p in zip(envs, problems)]
    correct, calls, first_call = [False] * len(envs), [0] * len(envs), [False] * len(envs)
    active = list(range(len(envs)))
    while active:
        sampling = SamplingConfig(max_tokens=32, temperature=temperature)
        outputs = engine.generate_batch([(conversations[i], sampling) for i in active])
        still = []
        for i, output in zip(active, outputs):
            turn = engine.tokenizer.decode(output[0].token_ids, skip_special_tokens=False)
            result = envs[i].step(turn.replace(chat.END, ""))
            correct[i], calls[i] = result.info["correct"], result.info["tool_calls"]
            first_call[i] |= result.info["turn"] == 1 and calls[i] == 1
            conversations[i] += turn + result.observation
            if not result.done:
                still.append(i)
        active = still
    n = len(problems)
    return {"success": sum(correct) / n, "tool_calls": sum(calls) / n, "first_turn_tool": sum(first_call) / n}


def main(config: TrainConfig = TrainConfig()) -> None:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    print("config:", asdict(config))
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_TOKENS])
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"{len(tokenizer)} tokens do not fit the model's {model.config.vocab_size} rows")

    rng = random.Random(config.seed)
    stream = problem_stream("calculator", seed=config.seed + 1)  # never a test problem
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = [examples(stream.next(), rng) for _ in range(config.batch_size)]
        input_ids, labels = make_batch(batch, tokenizer)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * min(1.0, step / config.warmup_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - started:4.0f} s", flush=True)
    train_seconds = time.perf_counter() - started

    out_dir = Path(TOOL_MODEL)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The shipped model's tokenizer config (one that every transformers version
    # loads, see train_tiny_model.save); the new tags live in tokenizer.json.
    shutil.copy(Path(DEFAULT_MODEL) / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)

    engine = TransformersEngine(str(out_dir), seed=config.seed)
    problems = test_problems("calculator", config.eval_problems)
    greedy = play(engine, problems, temperature=0.0)
    sampled = play(engine, problems, temperature=1.0)
    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    print(f"held-out calculator success, greedy: {greedy['success']:.1%} (tool on the first turn "
          f"{greedy['first_turn_tool']:.1%}, {greedy['tool_calls']:.2f} calls per problem)")
    print(f"held-out calculator success, sampled (T=1): {sampled['success']:.1%} (tool on the first "
          f"turn {sampled['first_turn_tool']:.1%})")
    print(f"training time: {train_seconds / 60:.1f} min for {config.steps} steps; model {size_mb:.1f} MB")
    print(f"saved to {out_dir}")


if __name__ == "__main__":
    main()
