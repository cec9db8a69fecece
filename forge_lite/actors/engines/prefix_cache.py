"""The transformers engine's prefix cache: the KV of recently served sequences.

A multi-turn conversation sends the same beginning again and again; the
keys and values ("KV") of those tokens were computed when the engine served
the previous turn. ``PrefixKVCache`` keeps them, one entry per finished
sequence keyed by its token ids, and answers "which cached sequence shares
the longest beginning with this prompt, and how long is it"
(``longest_prefix``). The engine then runs only the rest of the prompt
through the model (``TransformersEngine._prefill``). vLLM caches fixed-size
blocks of tokens in one paged memory pool; whole sequences are simpler and
enough here.

    cache = PrefixKVCache(max_tokens=32768)
    cache.store(CachedSequence(token_ids, keys, values))   # a finished sequence
    length, entry = cache.longest_prefix(prompt_ids)        # 0, None: nothing shared
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


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
        # Compared as tuples, in plain Python: a GRPO run's cache holds a few
        # hundred sequences, and three tensor operations per entry cost about
        # 0.4 ms each (cProfile of benchmarks/grpo_step_bound.py's generation
        # on a busy 2-core machine: 37 ms per prompt).
        ids = tuple(token_ids.tolist())
        best_length, best_key = 0, None
        for key in self._entries:
            length = _common_prefix_length(key, ids)
            if length > best_length:
                best_length, best_key = length, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best_length, self._entries[best_key]

    def store(self, entry: CachedSequence) -> None:
        """Keep ``entry`` (not if it alone is over ``max_tokens``), replacing the
        cached sequences it extends and evicting the least recently used past
        ``max_tokens``."""
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


def _common_prefix_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    length = min(len(a), len(b))
    if a[:length] == b[:length]:  # one comparison in C for the common case of a full match
        return length
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
