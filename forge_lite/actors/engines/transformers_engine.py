"""A plain PyTorch generation engine with a prefix KV cache: what vLLM does, small enough to read.

Generating a token needs the keys and values (the "KV") of every token before
it. A multi-turn conversation sends the same beginning again and again, so an
engine that remembers the KV of the sequences it recently served can skip
recomputing the shared beginning: that is a prefix cache. vLLM does it with
fixed-size blocks of 128 (CPU) or 16 (GPU) tokens in one paged memory pool;
this engine does it with whole sequences:

1. `PrefixKVCache` keeps the KV of recently finished sequences, keyed by their
   token ids, evicting the least recently used when it holds too many tokens.
2. For a new prompt, the longest cached token prefix is reused and only the
   remaining tokens go through the model ("prefill"). The number reused is
   `Completion.num_cached_tokens`.
3. All samples of all prompts then decode together, one token per step, as one
   left-padded batch; a sequence that finishes leaves the batch and its KV goes
   into the cache for the next turn.

Prefill runs per prompt because each prompt reuses a different amount of
cache; decoding, where the time goes, is batched. Each sequence carries its own
sampling settings, so requests with different settings share one batch.

Random numbers: a batch draws every row's next token at once. With one
generator for all rows, the numbers a row gets depend on how many rows the
batch holds and where the row sits in it, so a seed would not make a request
reproducible. Each sample of a seeded request therefore has its own
`torch.Generator` (seeded by `sample_seed(seed, index)`) and draws only from it:
its tokens are the same whatever else is in the batch. Unseeded samples, the
common case, share the engine's generator and draw in one call.

Log probabilities: `Completion.logprobs` holds the log-softmax of the raw
logits (temperature 1, no top-p) at each sampled token, the same quantity the
trainer and the reference model compute, and what vLLM reports by default
(`logprobs_mode="raw_logprobs"`). Temperature and top-p only shape the
distribution that tokens are drawn from.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from forge_lite.actors.engines.base import BatchEngine, Completion, SamplingConfig, check_prompt_fits


@dataclass
class CachedSequence:
    """The KV of one served sequence: per layer, keys and values of shape
    [1, kv_heads, len(token_ids), head_dim]."""

    token_ids: torch.Tensor  # 1-D long, on the CPU for cheap prefix comparison
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.token_ids)


class PrefixKVCache:
    """Recently served sequences and their KV, least recently used evicted first.

    Bounded by the total number of tokens held, because memory grows with
    tokens (for Qwen3-1.7B in bf16, about 114 KB per token), not with entries.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], CachedSequence] = OrderedDict()
        self._num_tokens = 0

    def longest_prefix(self, token_ids: torch.Tensor) -> tuple[int, CachedSequence | None]:
        """How many leading tokens of `token_ids` some cached sequence shares, and which."""
        best_length, best = 0, None
        for entry in self._entries.values():
            length = _common_prefix_length(entry.token_ids, token_ids)
            if length > best_length:
                best_length, best = length, entry
        if best is not None:
            self._entries.move_to_end(tuple(best.token_ids.tolist()))
        return best_length, best

    def store(self, entry: CachedSequence) -> None:
        if len(entry) > self.max_tokens:
            return
        key = tuple(entry.token_ids.tolist())
        # A cached sequence that the new one extends is redundant: the new one
        # serves every prompt the old one could.
        for old_key in [k for k in self._entries if k == key[: len(k)]]:
            self._num_tokens -= len(self._entries.pop(old_key))
        self._entries[key] = entry
        self._num_tokens += len(entry)
        while self._num_tokens > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self._num_tokens -= len(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def __len__(self) -> int:
        return len(self._entries)


def _common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    length = min(len(a), len(b))
    mismatches = (a[:length] != b[:length]).nonzero()
    return int(mismatches[0]) if len(mismatches) else length


@dataclass
class _Sample:
    """One sequence being decoded: a request's i-th sample."""

    request_index: int
    prompt_ids: torch.Tensor
    num_cached_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None  # its own random stream if seeded; None: the engine's
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    stop_reason: str | None = None


class TransformersEngine(BatchEngine):
    """Generation with a Hugging Face causal LM, batched, with a prefix KV cache.

    Serving through `add_request`/`step` runs a whole batch per step (see
    `BatchEngine`); vLLM lets new requests join between tokens instead."""

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

        super().__init__()
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

    @torch.inference_mode()
    def generate_batch(self, requests: list[tuple[str, SamplingConfig]]) -> list[list[Completion]]:
        # Every prompt is checked before any runs, so a bad one fails the call cleanly.
        prompt_ids = [self._encode(prompt) for prompt, _ in requests]

        samples: list[_Sample] = []
        kv_per_sample: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        first_logits = []
        for index, (ids, (_, sampling)) in enumerate(zip(prompt_ids, requests)):
            keys, values, logits, num_cached = self._prefill(ids)
            for sample_index in range(sampling.n):
                generator = None
                if sampling.seed is not None:
                    seed = sample_seed(sampling.seed, sample_index)
                    generator = torch.Generator(self.device).manual_seed(seed)
                samples.append(_Sample(index, ids, num_cached, sampling, generator))
                kv_per_sample.append((keys, values))
                first_logits.append(logits)

        if samples:
            self._decode(samples, kv_per_sample, torch.stack(first_logits))

        completions: list[list[Completion]] = [[] for _ in requests]
        for sample in samples:
            completions[sample.request_index].append(
                Completion(
                    text=sample.text,
                    prompt=requests[sample.request_index][0],
                    prompt_ids=sample.prompt_ids.clone(),
                    token_ids=torch.tensor(sample.token_ids, dtype=torch.long),
                    logprobs=torch.tensor(sample.logprobs, dtype=torch.float32),
                    stop_reason=sample.stop_reason,
                    generator_version=self.weight_version,
                    num_cached_tokens=sample.num_cached_tokens,
                )
            )
        return completions

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

    def _decode(self, samples: list[_Sample], kv_per_sample, logits: torch.Tensor) -> None:
        """Sample all sequences one token per step until each one stops.

        `logits` [len(samples), vocab] predict each sample's first token."""
        from transformers import DynamicCache

        # Left-pad every sequence's KV to the longest prompt, so new tokens are
        # appended at the same column for all rows; the attention mask hides the
        # padding and position ids keep each row's own token positions.
        lengths = [len(sample.prompt_ids) for sample in samples]
        width = max(lengths)
        padding = torch.tensor([width - length for length in lengths], device=self.device)
        num_layers = len(kv_per_sample[0][0])
        layers = []
        for layer in range(num_layers):
            keys = [kv[0][layer] for kv in kv_per_sample]
            values = [kv[1][layer] for kv in kv_per_sample]
            layers.append((_left_pad(keys, width), _left_pad(values, width)))
        past = DynamicCache(layers)
        attention_mask = (torch.arange(width, device=self.device)[None] >= padding[:, None]).long()
        positions = torch.tensor(lengths, device=self.device)
        active = list(range(len(samples)))  # samples[active[row]] is decoded in batch row `row`

        while True:
            rows = [samples[index] for index in active]
            tokens, logprobs = sample_tokens(
                logits, [s.sampling for s in rows], [s.generator for s in rows], self.generator
            )
            finished_rows = []
            for row, sample in enumerate(rows):
                sample.token_ids.append(int(tokens[row]))
                sample.logprobs.append(float(logprobs[row]))
                if self._finish(sample):
                    finished_rows.append(row)
                    self._remember(sample, past, row, int(padding[row]))
            if finished_rows:
                keep = [row for row in range(len(active)) if row not in finished_rows]
                if not keep:
                    return
                keep_index = torch.tensor(keep, device=self.device)
                past.batch_select_indices(keep_index)
                active = [active[row] for row in keep]
                tokens, padding = tokens[keep_index], padding[keep_index]
                attention_mask, positions = attention_mask[keep_index], positions[keep_index]

            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
            output = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=positions[:, None],
                past_key_values=past,
                use_cache=True,
            )
            logits = output.logits[:, -1].float()
            positions = positions + 1

    def _remember(self, sample: _Sample, past, row: int, padding: int) -> None:
        """Put a finished sequence's KV into the prefix cache, for its next turn."""
        # The last sampled token has no KV: it was never fed to the model.
        generated = torch.tensor(sample.token_ids[:-1], dtype=torch.long)
        # clone(): a slice would keep the whole batch's tensor alive.
        self.prefix_cache.store(
            CachedSequence(
                token_ids=torch.cat([sample.prompt_ids, generated]),
                keys=[layer.keys[row : row + 1, :, padding:].clone() for layer in past.layers],
                values=[layer.values[row : row + 1, :, padding:].clone() for layer in past.layers],
            )
        )

    def _finish(self, sample: _Sample) -> bool:
        """Update the sample's text and decide whether it is done (sets stop_reason)."""
        sampling = sample.sampling
        sample.text = self._tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        if sample.token_ids[-1] in self.eos_token_ids:
            sample.stop_reason = "stop"
        elif sampling.stop and (found := [sample.text.find(s) for s in sampling.stop if s in sample.text]):
            # Like vLLM: the text ends before the stop string, the tokens keep it.
            sample.text = sample.text[: min(found)]
            sample.stop_reason = "stop"
        elif len(sample.token_ids) >= sampling.max_tokens:
            sample.stop_reason = "length"
        elif len(sample.prompt_ids) + len(sample.token_ids) >= self._max_model_len:
            sample.stop_reason = "length"
        return sample.stop_reason is not None


def sample_tokens(
    logits: torch.Tensor,
    samplings: list[SamplingConfig],
    generators: list[torch.Generator | None],
    shared_generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row, each row with its own temperature and top-p.

    `logits` [rows, vocab]; `samplings` and `generators` have one entry per row.
    A row with a generator draws from it alone, so its token does not depend on
    the other rows; rows without one draw together from `shared_generator`.
    Returns the tokens [rows] (long) and their raw (temperature 1) logprobs [rows].
    """
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)  # what greedy rows (temperature 0) keep
    sampled = [row for row, sampling in enumerate(samplings) if sampling.temperature > 0]
    if sampled:
        probs = _sampling_probs(logits, samplings)
        shared = [row for row in sampled if generators[row] is None]
        if shared:
            tokens[shared] = torch.multinomial(probs[shared], 1, generator=shared_generator).squeeze(-1)
        # torch.multinomial takes one generator per call, so seeded rows draw
        # one call each: 0.7 ms more per step for 64 seeded rows than for 64
        # unseeded ones (measured, 2-core CPU; a step of the shipped model is ~6 ms).
        for row in sampled:
            if generators[row] is not None:
                tokens[row] = torch.multinomial(probs[row], 1, generator=generators[row])[0]
    return tokens, raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _sampling_probs(logits: torch.Tensor, samplings: list[SamplingConfig]) -> torch.Tensor:
    """The distribution [rows, vocab] each row's token is drawn from: softmax at
    the row's temperature, cut to its top-p. Greedy rows (temperature 0) get
    temperature 1 here, to avoid dividing by 0; their row is not used."""
    temperature = torch.tensor([s.temperature or 1.0 for s in samplings], device=logits.device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if any(s.top_p < 1.0 for s in samplings):
        top_p = torch.tensor([s.top_p for s in samplings], device=logits.device)
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        # Rows with top_p 1 are left alone: their summed mass can round to 1
        # before the last tokens, which would cut those tokens.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
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


def _left_pad(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack [1, heads, len, dim] tensors into [batch, heads, width, dim], padded on the left."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for row, tensor in enumerate(tensors):
        out[row, :, width - tensor.shape[2] :] = tensor[0]
    return out


def _eos_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
