"""What every inference engine gives the Policy: Completions, a sampling config, one interface.

The Policy actor does not care whether tokens come from vLLM or from a plain
PyTorch loop; it talks to an `Engine`. Both engines return the same
`Completion`, so the rest of the GRPO loop (rewards, reference model, trainer)
never learns which one ran.

An engine is used in one of two ways:
- `generate(prompts, sampling)`: one batch, back when every prompt is done
  (notebooks, tests, benchmarks);
- `add_request(...)` then `step()` again and again: how the Policy serves
  requests that arrive at any time. On both engines a step is one token for
  every running sequence, so a request added between two steps joins the
  sequences already generating ("continuous batching").

A request with a `seed` is reproducible on both engines: its tokens depend on
its prompt, seed and other sampling settings and on the weights, never on the
requests that share its batch or on the engine's own seed (see `SamplingConfig`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only __setstate__ builds tensors, and imports torch there: the dataset
    # actor resolves a model name through this package in the light actors'
    # process, which never loads torch (see forge_lite.rl.episode).
    import torch


@dataclass
class Completion:
    """One sampled response to one prompt.

    `token_ids` and `logprobs` line up one to one: `logprobs[i]` is the log
    probability of `token_ids[i]` under the model's raw distribution
    (log-softmax of the logits at temperature 1, before top-p), which is what
    the trainer and the reference model compute for the same tokens.

    `stop_reason` uses vLLM's finish reasons: "stop" (an end-of-sequence token
    or a stop string) or "length" (`max_tokens` or the context ran out).
    """

    text: str
    prompt: str
    prompt_ids: torch.Tensor  # 1-D torch.long
    token_ids: torch.Tensor  # 1-D torch.long, the generated tokens only
    logprobs: torch.Tensor  # 1-D float, one per generated token
    stop_reason: str | None
    generator_version: int  # the weight version that produced these tokens
    num_cached_tokens: int  # prompt tokens served from the prefix KV cache
    replica: int | None = None  # set by the Policy: which replica answered

    # Every Policy reply carries Completions to another process, and Monarch
    # pickles each tensor through torch.save, several times slower than
    # sending the same values as plain lists.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in _TENSOR_FIELDS:
            state[name] = (state[name].tolist(), state[name].dtype)
        return state

    def __setstate__(self, state: dict) -> None:
        import torch

        for name in _TENSOR_FIELDS:
            values, dtype = state[name]
            state[name] = torch.tensor(values, dtype=dtype)
        self.__dict__.update(state)


_TENSOR_FIELDS = ("prompt_ids", "token_ids", "logprobs")


@dataclass
class SamplingConfig:
    """How to sample. The log probability of each sampled token is always
    returned (RL needs it), so there is no switch for it.

    `seed`: each of the request's `n` samples draws its tokens from its own
    random stream, derived from (seed, sample index). So a seeded request gives
    the same tokens alone or batched with any other requests, on any replica,
    and sample i does not depend on `n`: the samples of a request with n=2 are
    the first two of the same request with n=4. Two requests with the same
    seed and settings draw the same random numbers, even for different prompts.
    Without a seed, samples draw from the engine's generator (seeded per replica).
    """

    n: int = 1  # samples per prompt (GRPO's group size)
    max_tokens: int = 16
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    stop: list[str] | None = None  # generation ends when one of these appears
    seed: int | None = None  # makes this request reproducible (see above); None: the engine's generator

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> SamplingConfig:
        """Build from a config dict such as the tutorial's `sampling_config`."""
        config = dict(config or {})
        _check_keys(config)
        return cls(**config)

    def with_overrides(self, **overrides: Any) -> SamplingConfig:
        """A copy with some fields changed, e.g. `generate(prompt, max_tokens=64)`."""
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)


def _check_keys(config: dict[str, Any]) -> None:
    known = [field.name for field in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}; known options: {known}")


class Engine(ABC):
    """The interface the Policy needs from an inference engine."""

    #: Version of the weights being served; stamped on every Completion.
    weight_version: int = 0

    @abstractmethod
    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        """Sample `sampling.n` completions for each prompt, all prompts as one batch.

        Returns one list per prompt, in prompt order. Not for use while
        requests added with `add_request` are unfinished."""

    @abstractmethod
    def add_request(self, prompt: str, sampling: SamplingConfig) -> int:
        """Take one prompt into the engine; the coming `step()` calls generate it.

        Returns the request's id. A prompt the engine cannot run (empty, or
        too long) raises ValueError here, so only its own caller fails."""

    @abstractmethod
    def step(self) -> dict[int, list[Completion]]:
        """Generate for a while; returns the requests that finished in this
        step (id -> their `n` completions).

        If it raises, the engine has dropped every unfinished request: the
        error is theirs, and the engine is ready for new ones."""

    @abstractmethod
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the model's weights in place (HF parameter names) and drop the
        prefix cache: KV computed by the old weights is wrong for the new ones."""

    @abstractmethod
    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, so the next prompt is computed from scratch."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer the engine encodes prompts with."""


def check_prompt_fits(prompt_ids: list[int], max_model_len: int) -> None:
    """A prompt must have a token and leave room for at least one generated token."""
    if not prompt_ids:
        raise ValueError("prompt is empty (0 tokens); the model needs at least one token to continue from")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens but the model's context (max_model_len) "
            f"is {max_model_len} tokens, which must also hold at least one generated token; "
            "shorten the prompt or raise max_model_len in engine_config"
        )
