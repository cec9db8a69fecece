"""A plain PyTorch generation engine with a prefix KV cache: what vLLM does, small enough to read.

Generating a token needs the keys and values (the "KV") of every token before
it. A multi-turn conversation sends the same beginning again and again, so an
engine that remembers the KV of the sequences it recently served can skip
recomputing the shared beginning: that is a prefix cache. vLLM does it with
fixed-size blocks of 128 (CPU) or 16 (GPU) tokens in one paged memory pool;
this engine does it with whole sequences:

1. `PrefixKVCache` (prefix_cache.py) keeps the KV of recently finished
   sequences, keyed by their token ids, evicting the least recently used when
   it holds too many tokens.
2. For a new prompt, the longest cached token prefix is reused and only the
   remaining tokens go through the model ("prefill"). The number reused is
   `Completion.num_cached_tokens`.
3. All samples of all prompts then decode together, one token per step
   (`step()`), as one left-padded batch ("continuous batching", as vLLM
   does): a request added while others decode is prefilled and joins the
   batch at the next step, and a sequence that finishes leaves it, its KV
   going into the cache for the next turn. So the groups of different GRPO
   rollouts share decode steps instead of waiting for each other's batch.
   The batch's KV lives in preallocated buffers (`kv_batch.DecodeBatch`),
   written in place, one column per step.

Prefill runs per prompt because each prompt reuses a different amount of
cache; decoding, where the time goes, is batched. Each sequence carries its own
sampling settings, so requests with different settings share one batch; they
are turned into tensors (`RowSettings`) only when rows join or leave, so a
token step is one forward pass, one batched draw and one `tolist()`.

Random numbers: a batch draws every row's next token at once. With one
generator for all rows, the numbers a row gets depend on how many rows the
batch holds and where the row sits in it, so a seed would not make a request
reproducible. Each sample of a seeded request therefore has its own
`torch.Generator` (seeded by `sample_seed(seed, index)`) and draws only from it:
its tokens are the same whatever else is in the batch. Unseeded samples, the
common case, share the engine's generator and draw in one call.

Log probabilities: `Completion.logprobs` holds the log-softmax of the raw
logits (temperature 1, no top-p) at each sampled token, computed as the
trainer and the reference model compute theirs (`forge_lite.rl.logprobs`),
and what vLLM reports by default
(`logprobs_mode="raw_logprobs"`). Temperature and top-p only shape the
distribution that tokens are drawn from.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import torch

from forge_lite.actors.engines.base import Completion, Engine, SamplingConfig, check_prompt_fits
from forge_lite.actors.engines.prefix_cache import CachedSequence, PrefixKVCache
from forge_lite.rl.logprobs import token_logprobs


@dataclass
class _Request:
    """One added request: its prompt and, once admitted, its `n` samples."""

    prompt: str
    prompt_ids: torch.Tensor
    sampling: SamplingConfig
    samples: list[_Sample] = field(default_factory=list)
    unfinished: int = 0  # samples still decoding


@dataclass
class _Sample:
    """One sequence being decoded: a request's i-th sample."""

    request_id: int
    prompt_ids: torch.Tensor
    num_cached_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None  # its own random stream if seeded; None: the engine's
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # set once a stop string cut it; else decoded when it finishes
    stop_reason: str | None = None


class TransformersEngine(Engine):
    """Generation with a Hugging Face causal LM, with continuous batching and a prefix KV cache.

    Each `step()` is one token for every running sequence: requests added
    since the last step are prefilled and join the batch first, and sequences
    that finish leave it (see the module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        seed: int,
        device: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        prefix_cache_max_tokens: int = 32768,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            # float32 on CPU: bf16 matmuls are slow on most CPUs and gain nothing here.
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use 'auto', 'float32', 'bfloat16' or 'float16'")
        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()

        context = self.model.config.max_position_embeddings
        if max_model_len is not None and max_model_len > context:
            raise ValueError(
                f"max_model_len={max_model_len} is more than the model's context "
                f"(max_position_embeddings={context}) for {model}"
            )
        self._max_model_len = max_model_len or context
        self.eos_token_ids = _eos_token_ids(self.model, self._tokenizer)
        # For unseeded requests: one generator per engine, seeded per replica, so
        # replicas sample differently. Seeded requests never touch it.
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.prefix_cache = PrefixKVCache(prefix_cache_max_tokens)
        self.weight_version = 0
        # A 4D mask saves Hugging Face building one every step, but is only
        # right when no layer uses a sliding window (see DecodeBatch.attention_mask).
        layer_types = getattr(self.model.config, "layer_types", None) or ["full_attention"]
        self._four_d_mask = all(kind == "full_attention" for kind in layer_types)
        self._request_ids = itertools.count()
        self._waiting: dict[int, _Request] = {}  # added, not yet in the batch
        self._requests: dict[int, _Request] = {}  # in the batch, some sample still decoding
        self._drop_running()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self):
        return self._tokenizer

    def reset_prefix_cache(self) -> None:
        self.prefix_cache.clear()

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        # Check the names before copying anything, so a mismatch leaves the
        # engine as it was. A tied lm_head may be left out: it is the embedding.
        expected = set(self.model.state_dict())
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        unknown = sorted(set(state_dict) - expected)
        missing = sorted(expected - set(state_dict) - tied)
        if unknown or missing:
            raise ValueError(
                f"state dict does not match the model: unknown keys {unknown[:5]}, missing keys {missing[:5]} "
                "(keys must be HF parameter names, as model.state_dict() gives them)"
            )
        # Shapes too: load_state_dict copies tensor by tensor and reports a
        # wrong shape only after copying the others, which would half-load.
        current = self.model.state_dict()
        wrong = [(name, tuple(t.shape), tuple(current[name].shape))
                 for name, t in state_dict.items() if t.shape != current[name].shape]
        if wrong:
            raise ValueError(f"state dict shapes do not match the model (name, given, expected): {wrong[:5]}")
        self.model.load_state_dict(state_dict, strict=False)
        self.weight_version = version
        self.reset_prefix_cache()

    def add_request(self, prompt: str, sampling: SamplingConfig) -> int:
        request_id = next(self._request_ids)
        self._waiting[request_id] = _Request(prompt, self._encode(prompt), sampling)
        return request_id

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        return self.generate_batch([(prompt, sampling) for prompt in prompts])

    def generate_batch(self, requests: list[tuple[str, SamplingConfig]]) -> list[list[Completion]]:
        """Sample each (prompt, sampling) request's `sampling.n` completions, all in one batch.

        Returns one list per request, in request order. Raises ValueError,
        before generating anything, if a prompt cannot run (see
        `check_prompt_fits`), and RuntimeError if requests added with
        `add_request` are still unfinished (their completions would be lost)."""
        if self._waiting or self._requests:
            raise RuntimeError(
                f"generate needs an idle engine, but {len(self._waiting) + len(self._requests)} request(s) "
                "added with add_request are unfinished: call step() until they finish"
            )
        prompt_ids = [self._encode(prompt) for prompt, _ in requests]  # all checked before any runs
        request_ids = []
        for (prompt, sampling), ids in zip(requests, prompt_ids):
            request_ids.append(next(self._request_ids))
            self._waiting[request_ids[-1]] = _Request(prompt, ids, sampling)
        finished: dict[int, list[Completion]] = {}
        while len(finished) < len(request_ids):
            finished.update(self.step())
        return [finished[request_id] for request_id in request_ids]

    @torch.inference_mode()
    def step(self) -> dict[int, list[Completion]]:
        """One token for every running sequence (after prefilling the requests
        added since the last step, which join the batch); returns the requests
        whose samples have all finished."""
        try:
            return self._step()
        except BaseException:
            # Their callers get this error; nothing stays behind half-decoded.
            self._waiting.clear()
            self._requests.clear()
            self._drop_running()
            raise

    def _step(self) -> dict[int, list[Completion]]:
        if self._waiting:
            self._admit()
        if not self._rows:
            return {}
        tokens, logprobs = sample_tokens(self._logits, self._row_settings, self.generator)
        # One conversion per step, not one per row.
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()
        finished: dict[int, list[Completion]] = {}
        keep = []
        for row, sample in enumerate(self._rows):
            sample.token_ids.append(token_list[row])
            sample.logprobs.append(logprob_list[row])
            if not self._finish(sample):
                keep.append(row)
                continue
            self._remember(sample, row)
            request = self._requests[sample.request_id]
            request.unfinished -= 1
            if request.unfinished == 0:
                finished[sample.request_id] = self._completions(self._requests.pop(sample.request_id))
        if not keep:
            self._drop_running()
            return finished
        if len(keep) < len(self._rows):
            self._batch.keep(keep)
            self._rows = [self._rows[row] for row in keep]
            self._row_settings = RowSettings.of(self._rows, self.device)
            tokens = tokens[torch.tensor(keep, device=self.device)]
        self._logits = self._forward(tokens)
        return finished

    def _admit(self) -> None:
        """Prefill the waiting requests and add their samples to the batch."""
        from forge_lite.actors.engines.kv_batch import DecodeBatch

        waiting, self._waiting = self._waiting, {}
        groups, logits = [], []
        for request_id, request in waiting.items():
            self._requests[request_id] = request
            keys, values, prompt_logits, num_cached = self._prefill(request.prompt_ids)
            sampling = request.sampling
            for index in range(sampling.n):
                generator = None
                if sampling.seed is not None:
                    generator = torch.Generator(self.device).manual_seed(sample_seed(sampling.seed, index))
                request.samples.append(_Sample(request_id, request.prompt_ids, num_cached, sampling, generator))
            request.unfinished = sampling.n
            self._rows += request.samples
            groups.append((keys, values, sampling.n))
            logits.append(prompt_logits.expand(sampling.n, -1))
        if self._batch is None:
            self._batch = DecodeBatch(len(groups[0][0]))
        self._batch.join(groups)
        self._logits = torch.cat([self._logits, *logits]) if self._logits is not None else torch.cat(logits)
        self._row_settings = RowSettings.of(self._rows, self.device)

    def _drop_running(self) -> None:
        self._rows: list[_Sample] = []  # the samples being decoded; _rows[r] is batch row r
        self._batch = None  # their KV (a DecodeBatch)
        self._logits: torch.Tensor | None = None  # [rows, vocab]: what predicts each row's next token
        self._row_settings: RowSettings | None = None

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its newest token; returns the logits [rows, vocab] for the next."""
        self._batch.reserve(1)
        output = self.model(
            input_ids=tokens[:, None],
            attention_mask=self._batch.attention_mask(1, four_d=self._four_d_mask),
            position_ids=self._batch.positions()[:, None],
            past_key_values=self._batch.cache,
            use_cache=True,
        )
        return output.logits[:, -1].float()

    def _completions(self, request: _Request) -> list[Completion]:
        return [
            Completion(
                text=sample.text,
                prompt=request.prompt,
                prompt_ids=request.prompt_ids.clone(),
                token_ids=torch.tensor(sample.token_ids, dtype=torch.long),
                logprobs=torch.tensor(sample.logprobs, dtype=torch.float32),
                stop_reason=sample.stop_reason,
                generator_version=self.weight_version,
                num_cached_tokens=sample.num_cached_tokens,
            )
            for sample in request.samples
        ]

    def _encode(self, prompt: str) -> torch.Tensor:
        ids = self._tokenizer(prompt)["input_ids"]
        check_prompt_fits(ids, self._max_model_len)
        return torch.tensor(ids, dtype=torch.long)

    def _prefill(self, prompt_ids: torch.Tensor):
        """Run the prompt through the model, reusing the longest cached prefix.

        Returns per-layer keys and values for the whole prompt, the logits that
        predict the first generated token, and how many tokens came from the cache.
        """
        from transformers import DynamicCache

        cached_length, entry = self.prefix_cache.longest_prefix(prompt_ids)
        # The last prompt token always runs: its logits pick the first new token.
        num_cached = min(cached_length, len(prompt_ids) - 1)
        if num_cached > 0:
            # Slicing makes views; DynamicCache.update concatenates into new
            # tensors, so the cached entry itself is never modified.
            reused = [(k[:, :, :num_cached], v[:, :, :num_cached]) for k, v in zip(entry.keys, entry.values)]
            past = DynamicCache(reused)
        else:
            past = DynamicCache()
        new_tokens = prompt_ids[num_cached:].to(self.device)
        output = self.model(
            input_ids=new_tokens[None],
            position_ids=torch.arange(num_cached, len(prompt_ids), device=self.device)[None],
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        keys = [layer.keys for layer in past.layers]
        values = [layer.values for layer in past.layers]
        return keys, values, output.logits[0, -1].float(), num_cached

    def _remember(self, sample: _Sample, row: int) -> None:
        """Put a finished sequence's KV into the prefix cache, for its next turn."""
        # The last sampled token has no KV: it was never fed to the model.
        generated = torch.tensor(sample.token_ids[:-1], dtype=torch.long)
        keys, values = self._batch.row_kv(row)
        self.prefix_cache.store(CachedSequence(torch.cat([sample.prompt_ids, generated]), keys, values))

    def _finish(self, sample: _Sample) -> bool:
        """Decide whether the sample is done (sets stop_reason, and its text when done).

        The text is decoded only when it is needed: every step for a request
        with stop strings, else once at the end. (Decoding every row's text at
        every step was 6% of the engine's time in a cProfile of
        benchmarks/grpo_step_bound.py's generation.)"""
        sampling = sample.sampling
        if sample.token_ids[-1] in self.eos_token_ids:
            sample.stop_reason = "stop"
        elif sampling.stop:
            text = self._tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            found = [text.find(stop) for stop in sampling.stop if stop in text]
            if found:
                # Like vLLM: the text ends before the stop string, the tokens keep it.
                sample.text = text[: min(found)]
                sample.stop_reason = "stop"
        if sample.stop_reason is None:
            if len(sample.token_ids) >= sampling.max_tokens:
                sample.stop_reason = "length"
            elif len(sample.prompt_ids) + len(sample.token_ids) >= self._max_model_len:
                sample.stop_reason = "length"
        if sample.stop_reason is not None and sample.text is None:
            sample.text = self._tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        return sample.stop_reason is not None


@dataclass
class RowSettings:
    """Each batch row's sampling settings as tensors, built when rows join or
    leave rather than at every token step."""

    temperature: torch.Tensor  # [rows, 1]; greedy rows get 1, to avoid dividing by 0
    top_p: torch.Tensor | None  # [rows, 1]; None when no row cuts (all top_p 1)
    any_sampled: bool  # some row has temperature > 0
    shared: torch.Tensor | None  # rows that draw from the engine's generator; None: all rows do
    seeded: list[tuple[int, torch.Generator]]  # (row, its generator) for seeded sampled rows

    @classmethod
    def of(cls, rows: list[_Sample], device: torch.device) -> RowSettings:
        sampled = [row for row, sample in enumerate(rows) if sample.sampling.temperature > 0]
        shared = [row for row in sampled if rows[row].generator is None]
        top_p = [sample.sampling.top_p for sample in rows]
        return cls(
            temperature=torch.tensor([[s.sampling.temperature or 1.0] for s in rows], device=device),
            top_p=torch.tensor(top_p, device=device)[:, None] if min(top_p) < 1.0 else None,
            any_sampled=bool(sampled),
            shared=None if len(shared) == len(rows) else torch.tensor(shared, dtype=torch.long, device=device),
            seeded=[(row, rows[row].generator) for row in sampled if rows[row].generator is not None],
        )


def sample_tokens(
    logits: torch.Tensor, rows: RowSettings, shared_generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row, each row with its own temperature and top-p.

    `logits` [rows, vocab]. A row with its own generator draws from it alone,
    so its token does not depend on the other rows; the other sampled rows
    draw together, in one call, from `shared_generator`.
    Returns the tokens [rows] (long) and their raw (temperature 1) logprobs [rows].
    """
    if rows.shared is None:  # the usual case: every row samples, from the shared generator
        tokens = draw(_sampling_probs(logits, rows), shared_generator)
        return tokens, raw_logprobs(logits, tokens)
    tokens = logits.argmax(dim=-1)  # what greedy rows (temperature 0) keep
    if rows.any_sampled:
        probs = _sampling_probs(logits, rows)
        if len(rows.shared):
            tokens[rows.shared] = draw(probs[rows.shared], shared_generator)
        # A generator serves one call, so seeded rows draw one call each (a
        # small cost next to the step's forward pass).
        for row, generator in rows.seeded:
            tokens[row] = draw(probs[row : row + 1], generator)[0]
    return tokens, raw_logprobs(logits, tokens)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row [rows] (long) from the distributions `probs` [rows, vocab].

    Inverse-CDF sampling: one uniform number per row, found in the row's
    cumulative sum. The distribution is torch.multinomial's, but multinomial
    draws a random number for every vocabulary entry of every row, and that
    was the largest part of the policy's sampling time on a CPU
    (benchmarks/loop_cpu.py shows the policy's CPU per step). A token of
    probability 0 (cut by top-p) is never drawn: its cumulative sum does not
    rise. Raises ValueError when a row's probabilities are not finite (the
    model's logits were NaN or inf), where multinomial would raise too.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]  # about 1; float rounding leaves it a little off, so the draw is scaled by it
    if not torch.isfinite(total).all():
        raise ValueError("the model's next-token probabilities are not finite (NaN or inf logits): "
                         "are the weights finite?")
    uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, uniform * total, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's logprob [rows] of its token [rows] under its logits [rows,
    vocab] at temperature 1: the trainer's and the reference model's function
    (`forge_lite.rl.logprobs.token_logprobs`), one position per row."""
    return token_logprobs(logits[:, None], tokens[:, None])[:, 0]


def _sampling_probs(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """The distribution [rows, vocab] each row's token is drawn from: softmax at
    the row's temperature, cut to its top-p. Greedy rows' probabilities are
    computed at temperature 1 and not used."""
    probs = torch.softmax(logits / rows.temperature, dim=-1)
    if rows.top_p is not None:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        # Rows with top_p 1 are left alone: their summed mass can round to 1
        # before the last tokens, which would cut those tokens.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut = (mass_before >= rows.top_p) & (rows.top_p < 1.0)
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`.

    Sample 0 uses the request's seed itself, the others a hash of (seed, index),
    so sample i is the same whatever the request's `n`. A hash rather than
    `seed + index` (vLLM's choice): with that, the samples 1, 2, ... of seed 42
    would be the samples 0, 1, ... of seed 43.
    """
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")  # < 2**64, which torch.Generator takes


def _eos_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
