"""Check the Policy on a GPU node that has PyTorch and transformers but no vLLM and no hub access.

    python scripts/gpu_check.py                        # CUDA: a Qwen3-0.6B-shaped model
    python scripts/gpu_check.py --device cpu --small   # anywhere, in about a minute
    python scripts/gpu_check.py --one-gpu              # a learner's policy, reference, trainer on one GPU

What it does:
1. Builds a randomly initialised model with Qwen3-0.6B's layer sizes and the
   shipped model's tokenizer (nothing is downloaded), saved to a temp dir. The
   vocabulary is the tokenizer's (a few hundred tokens) instead of Qwen3's
   151,936, so every sampled id decodes; the embedding, tied to the output
   layer, is therefore about 155 M parameters smaller than the real 0.6B.
2. Serves it with the transformers engine through a 1-replica Policy service,
   `with_gpus=True` for CUDA. The engine has no device setting: it uses
   `cuda` when its process sees a GPU (the service gives each GPU replica one
   and hides the GPUs from every other process) and then bfloat16; otherwise
   CPU and float32 (`dtype` in engine_config overrides).
3. Measures tokens/s for concurrent requests, prefix KV-cache reuse on a
   multi-turn conversation in a sticky session (`num_cached_tokens`), and the
   replica process's memory: a small probe actor spawned into the replica's
   own process reads `torch.cuda.max_memory_allocated()` there (peak RSS on CPU).

Prints a table. A random model rarely samples its end-of-sequence token, so
every request runs to `max_tokens`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time

import forge_lite  # noqa: F401  (before monarch)
import torch
from monarch.actor import Actor, endpoint

from forge_lite.actors.policy import Policy
from forge_lite.assets import DEFAULT_MODEL, MATH_DATA_DIR
from forge_lite.data.prompts import format_request

# Qwen3-0.6B's config.json, less the vocabulary (see the module docstring).
QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# --small: the same architecture, small enough for a quick CPU run.
SMALL = dict(QWEN3_0_6B, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)


class ReplicaProbe(Actor):
    """Spawned into the replica's process, beside the Policy: reads that process's memory."""

    @endpoint
    def memory(self) -> dict:
        report = {
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        }
        if torch.cuda.is_available():
            report.update(
                gpu=torch.cuda.get_device_name(),
                max_allocated_bytes=torch.cuda.max_memory_allocated(),
                reserved_bytes=torch.cuda.memory_reserved(),
            )
        return report


def build_model(directory: str, small: bool, device: str) -> tuple[str, int]:
    """Save a random Qwen3-shaped model with the shipped tokenizer; return its path and size."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    config = Qwen3Config(
        **(SMALL if small else QWEN3_0_6B),
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    # Initialising 0.4 B parameters is much faster on the GPU than on the CPU.
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    # bfloat16 is what the engine serves on CUDA, and half the file to write and read.
    model.to(device="cpu", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda":
        torch.cuda.empty_cache()  # the replica will share this GPU: give back what the init took
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


def follow_up(tokenizer, prompt: str, reply: str, question: str) -> str:
    """The tutorial's next turn: previous prompt + reply + a new user question."""
    user_turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return prompt + reply + tokenizer.eos_token + "\n" + user_turn


async def measure_throughput(policy, prompts: list[str], max_tokens: int) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(policy.generate.route(p, max_tokens=max_tokens) for p in prompts))
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for completions in results for c in completions)
    return {"prompts": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def reusable_tokens(previous, current) -> int:
    """Prompt tokens of `current` that the previous turn put through the model.

    Less than the previous prompt + reply when the reply's text does not
    tokenize back to the sampled ids, which is common for a random model.
    """
    served = previous.prompt_ids.tolist() + previous.token_ids.tolist()[:-1]  # the last token was never fed
    prompt = current.prompt_ids.tolist()
    common = 0
    while common < min(len(served), len(prompt)) and served[common] == prompt[common]:
        common += 1
    return min(common, len(prompt) - 1)  # the last prompt token always runs


async def measure_conversation(policy, tokenizer, questions: list[str], max_tokens: int) -> list[dict]:
    turns = []
    prompt = format_request(tokenizer, questions[0])
    previous = None
    async with policy.session():
        for next_question in questions[1:] + [None]:
            start = time.perf_counter()
            completion = (await policy.generate.route(prompt, max_tokens=max_tokens))[0]
            turns.append({
                "prompt_tokens": len(completion.prompt_ids),
                "cached_tokens": completion.num_cached_tokens,
                "reusable_tokens": None if previous is None else reusable_tokens(previous, completion),
                "generated_tokens": len(completion.token_ids),
                "seconds": time.perf_counter() - start,
            })
            previous = completion
            if next_question is not None:
                prompt = follow_up(tokenizer, prompt, completion.text, next_question)
    return turns


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def print_report(report: dict) -> None:
    print(f"\nPolicy on {report['device']} ({report['dtype']}), transformers engine, 1 replica")
    print(f"  model              Qwen3 {report['layers']} layers, hidden {report['hidden']}, "
          f"{report['parameters'] / 1e6:.0f} M parameters (random weights)")
    print(f"  replica start      {report['start_s']:.1f} s")
    t = report["throughput"]
    print(f"  throughput         {t['tokens_per_s']:.0f} tokens/s  "
          f"({t['prompts']} concurrent prompts x {report['max_tokens']} tokens: {t['tokens']} tokens in {t['seconds']:.1f} s)")
    single = report["single"]
    print(f"  one prompt alone   {single['tokens_per_s']:.0f} tokens/s")
    memory = report["memory"]
    if "max_allocated_bytes" in memory:
        print(f"  GPU memory         {gib(memory['max_allocated_bytes'])} peak allocated, "
              f"{gib(memory['reserved_bytes'])} reserved ({memory['gpu']})")
    else:
        print(f"  GPU memory         none used (CUDA_VISIBLE_DEVICES={memory['cuda_visible_devices']!r})")
    print(f"  replica peak RSS   {gib(memory['peak_rss_bytes'])}")
    print("\n  multi-turn conversation in one session (turn n+1 = prompt + reply + question)")
    print(f"  {'turn':>6}{'prompt':>8}{'cached':>8}{'reusable':>10}{'cached %':>10}{'generated':>11}{'ms':>8}")
    for number, turn in enumerate(report["conversation"], start=1):
        share = 100 * turn["cached_tokens"] / turn["prompt_tokens"]
        reusable = "-" if turn["reusable_tokens"] is None else turn["reusable_tokens"]
        print(f"  {number:>6}{turn['prompt_tokens']:>8}{turn['cached_tokens']:>8}{reusable:>10}{share:>9.0f}%"
              f"{turn['generated_tokens']:>11}{turn['seconds'] * 1e3:>8.0f}")
    later = report["conversation"][1:]
    prompt_tokens = sum(t["prompt_tokens"] for t in later)
    print(f"  turns 2+: {100 * sum(t['cached_tokens'] for t in later) / prompt_tokens:.0f}% of prompt tokens "
          f"from the KV cache, of {100 * sum(t['reusable_tokens'] for t in later) / prompt_tokens:.0f}% reusable")
    print("  reusable: the prompt's common prefix with the previous turn's tokens (a random model's reply")
    print("  text often tokenizes back to other ids, which ends the match); turn 1 may hit the system prompt")


async def main(args) -> None:
    from transformers import AutoTokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but PyTorch sees no GPU here; run with --device cpu (and --small)")
    prompts_count = args.prompts or (4 if args.small else 32)
    max_tokens = args.max_tokens or (16 if args.small else 128)

    with open(os.path.join(MATH_DATA_DIR, "train.jsonl")) as file:
        questions = [json.loads(line)["question"] for line in file][: prompts_count + args.turns]

    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as directory:
        started = time.perf_counter()
        path, parameters = build_model(directory, args.small, args.device)
        print(f"built and saved the model in {time.perf_counter() - started:.1f} s: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine_config = {"backend": "transformers", "model": path, "dtype": args.dtype}

        started = time.perf_counter()
        policy = await Policy.options(
            procs=1, num_replicas=1, with_gpus=args.device == "cuda", max_concurrent_requests=prompts_count
        ).as_service(engine_config=engine_config, sampling_config={"temperature": 1.0})
        start_s = time.perf_counter() - started
        try:
            prompts = [format_request(tokenizer, q) for q in questions[:prompts_count]]
            await measure_throughput(policy, prompts, 4)  # warm up: first kernels, allocator, batched decode
            throughput = await measure_throughput(policy, prompts, max_tokens)
            single = await measure_throughput(policy, prompts[:1], max_tokens)
            conversation = await measure_conversation(policy, tokenizer, questions[prompts_count:], max_tokens)
            # The replica's ProcMesh (the kit's own bookkeeping): a probe there
            # runs in the same process as the Policy and its engine.
            probe = policy.replicas[0].processes.mesh.spawn("gpu_check_probe", ReplicaProbe)
            memory = await probe.memory.call_one()
        finally:
            await policy.shutdown()

    print_report({
        "device": memory.get("gpu", "cpu"),
        "dtype": args.dtype if args.dtype != "auto" else ("bfloat16" if "gpu" in memory else "float32"),
        "layers": (SMALL if args.small else QWEN3_0_6B)["num_hidden_layers"],
        "hidden": (SMALL if args.small else QWEN3_0_6B)["hidden_size"],
        "parameters": parameters,
        "start_s": start_s,
        "max_tokens": max_tokens,
        "throughput": throughput,
        "single": single,
        "memory": memory,
        "conversation": conversation,
    })
    if args.device == "cuda" and "gpu" not in memory:
        raise SystemExit("the replica did not see a GPU: the service should have given it one")


async def one_gpu(args) -> None:
    """--one-gpu: a workshop learner's GRPO parts on the one GPU their server
    sees, with the shares of configs/grpo_qwen3_0_6b_one_gpu.yaml (the
    transformers engine here, since this node has no vLLM): the policy, the
    reference model and the trainer start with ``gpu_share``, each process
    reports the GPU it got and its peak memory, and one training step's
    weights reach the policy."""
    from forge_lite.actors.reference_model import ReferenceModel
    from forge_lite.actors.trainer import RLTrainer
    from forge_lite.grpo.config import load_config

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "grpo_qwen3_0_6b_one_gpu.yaml"))
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as directory:
        path, parameters = build_model(directory, args.small, args.device)
        started = time.perf_counter()
        policy, reference, trainer = await asyncio.gather(
            Policy.options(with_gpus=cuda, gpu_share=config.policy.gpu_share).as_service(
                engine_config={"backend": "transformers", "model": path},
                sampling_config={"n": 2, "max_tokens": 8, "temperature": 1.0}),
            ReferenceModel.options(with_gpus=cuda, gpu_share=config.ref_model.gpu_share).as_actor(model=path),
            RLTrainer.options(with_gpus=cuda, gpu_share=config.trainer.gpu_share).as_actor(
                model=path, optimizer={"name": "AdamW", "lr": 1e-3}, training={"seq_len": 64}),
        )
        print(f"policy, reference and trainer started on one GPU in {time.perf_counter() - started:.1f} s "
              f"({parameters / 1e6:.0f} M parameters each)")
        try:
            await trainer.push_weights.call_one(1)
            await policy.update_weights.fanout(1)
            version = await policy.get_version.route()
            probes = {"policy": policy.replicas[0].processes.mesh}
            for name, handle in (("reference", reference), ("trainer", trainer)):
                probes[name] = handle._proc_mesh
            for name, mesh in probes.items():
                memory = await mesh.spawn(f"gpu_check_probe_{name}", ReplicaProbe).memory.call_one()
                print(f"{name:10s} {memory}")
            print(f"policy serves version {version} (the trainer's)")
            if version != 1:
                raise SystemExit("the trainer's weights did not reach the policy")
        finally:
            await asyncio.gather(policy.shutdown(), ReferenceModel.shutdown(reference), RLTrainer.shutdown(trainer))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="a 4-layer model, few short requests: a quick CPU run")
    parser.add_argument("--dtype", default="auto", help="engine dtype; auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompts", type=int, help="concurrent prompts (default 32, --small 4)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 128, --small 16)")
    parser.add_argument("--turns", type=int, default=4, help="conversation turns")
    parser.add_argument("--one-gpu", action="store_true",
                        help="a learner's policy, reference and trainer sharing one GPU (gpu_share)")
    parsed = parser.parse_args()
    asyncio.run(one_gpu(parsed) if parsed.one_gpu else main(parsed))
