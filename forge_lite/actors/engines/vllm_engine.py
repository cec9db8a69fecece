"""The vLLM engine: `vllm.LLM` in the Policy's own process, with prefix caching and in-place weight updates.

vLLM does the real work (paged KV cache, continuous batching, prefix caching
in blocks: 16 tokens on GPU, 128 on CPU). This file only adapts it to the
kit's `Engine` interface:

- the engine runs inside the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
  so a Monarch actor owns its engine and nothing else has to be spawned;
- the Policy drives vLLM's own step loop (`LLMEngine.add_request` and
  `step`), so requests that arrive while others generate join them at the
  next token; `generate` is the same loop run until its prompts finish;
- every engine gets its own sampling seed: vLLM's default seed is the same
  everywhere, and replicas would otherwise return identical samples;
- weights are replaced in place through each worker's `reload_weights`, which
  runs the model's own checkpoint loader (HF names in, vLLM's fused layout
  out); the prefix cache is dropped afterwards because its KV is stale.

`vllm` is imported only when an engine is built: the import takes seconds and
sets up its own environment, which must be configured first.
"""

from __future__ import annotations

import itertools
import os

import torch

from forge_lite.actors.engines.base import Completion, Engine, SamplingConfig, check_prompt_fits


def set_vllm_environment() -> None:
    """Environment vLLM reads at import; call before the first `import vllm`.

    A value the user already set wins.
    """
    # Keep the engine core in this process: inside an actor there is no
    # `if __name__ == "__main__":` guard for vLLM's spawned engine process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        # GiB of KV cache on CPU; vLLM's default (4) is a lot for a laptop
        # running several replicas, and 1 holds thousands of tokens of the small model.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class VLLMEngine(Engine):
    """`vllm.LLM` behind the kit's Engine interface."""

    def __init__(self, model: str, *, seed: int, **engine_args):
        set_vllm_environment()
        from vllm import LLM

        if not torch.cuda.is_available():
            # vLLM's "auto" turns a float32 checkpoint into bfloat16. On a CPU that
            # buys nothing for a small model, and it makes the logprobs drift from
            # the trainer's float32 ones; the transformers engine uses float32 too.
            engine_args.setdefault("dtype", "float32")

        self.llm = LLM(model=model, seed=seed, enable_prefix_caching=True, **engine_args)
        self.weight_version = 0
        # Requests in vLLM: id -> (prompt, prompt token ids), for their Completions.
        self._running: dict[int, tuple[str, list[int]]] = {}
        self._request_ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def reset_prefix_cache(self) -> None:
        # vLLM refuses (returns False) while requests run; the Policy loads
        # weights only once the requests in the engine have finished.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache while requests were running")

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        # `reload_weights` is a method of every vLLM worker, named by string so
        # that no Python function has to be serialized to the workers. Calling
        # `model.load_weights` directly does not work on CPU: the CPU backend
        # repacks weights after loading, and reload_weights redoes that step.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.weight_version = version
        self.reset_prefix_cache()

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        # Every prompt is checked before any starts, so a bad one fails the call cleanly.
        prompt_ids = [self._encode(prompt) for prompt in prompts]
        request_ids = [self._add(prompt, ids, sampling) for prompt, ids in zip(prompts, prompt_ids)]
        finished: dict[int, list[Completion]] = {}
        while self._running:
            finished.update(self.step())
        return [finished[request_id] for request_id in request_ids]

    def add_request(self, prompt: str, sampling: SamplingConfig) -> int:
        return self._add(prompt, self._encode(prompt), sampling)

    def step(self) -> dict[int, list[Completion]]:
        try:
            outputs = self.llm.llm_engine.step()
        except BaseException:
            # Leave no request behind in vLLM: its caller gets this error.
            self.llm.llm_engine.abort_request([str(request_id) for request_id in self._running])
            self._running.clear()
            raise
        # FINAL_ONLY (see _add): an output only comes once its request is done,
        # with all `n` samples.
        return {int(output.request_id): self._completions(output) for output in outputs if output.finished}

    def _encode(self, prompt: str) -> list[int]:
        # Tokenized here so a too-long prompt fails with the kit's error, and
        # vLLM does not tokenize a second time.
        ids = self.tokenizer(prompt)["input_ids"]
        check_prompt_fits(ids, self.max_model_len)
        return ids

    def _add(self, prompt: str, prompt_ids: list[int], sampling: SamplingConfig) -> int:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=sampling.stop,
            seed=sampling.seed,
            logprobs=0,  # 0: only the sampled token's logprob (raw logits, temperature 1)
            # One output per request, when it is finished (the default streams every token).
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = next(self._request_ids)
        self.llm.llm_engine.add_request(str(request_id), TokensPrompt(prompt_token_ids=prompt_ids), params)
        self._running[request_id] = (prompt, prompt_ids)
        return request_id

    def _completions(self, output) -> list[Completion]:
        """The kit's Completions for one finished vLLM RequestOutput."""
        prompt, prompt_ids = self._running.pop(int(output.request_id))
        return [
            Completion(
                text=sample.text,
                prompt=prompt,
                prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
                token_ids=torch.tensor(sample.token_ids, dtype=torch.long),
                logprobs=torch.tensor(
                    [position[token].logprob for position, token in zip(sample.logprobs, sample.token_ids)],
                    dtype=torch.float32,
                ),
                stop_reason=sample.finish_reason,
                generator_version=self.weight_version,
                num_cached_tokens=output.num_cached_tokens or 0,
            )
            for sample in output.outputs
        ]
