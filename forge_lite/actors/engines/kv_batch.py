"""The KV cache of the transformers engine's decoding batch: sequences join and leave between token steps.

The engine decodes every running sequence together, one token per step, as
one left-padded batch (see transformers_engine.py). Here is that batch's KV:

- per layer, keys and values sit in buffers [rows, kv_heads, capacity,
  head_dim] with room to grow; columns [0, width) are in use, and row r's
  tokens fill columns [padding[r], width) (the left padding is zeros, hidden
  by the attention mask). A token step writes one new column in place.
  Hugging Face's DynamicCache instead concatenates, copying every layer's
  whole cache, at every step;
- `join` adds rows (new sequences, their prompt's KV right-aligned to the
  batch's width, widening the batch if a prompt is longer than it);
- `keep` drops the rows that finished, and the leading columns that only
  padding uses now.

This module imports transformers (its Cache classes), so import it only when
an engine is built.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Columns allocated past the current width when a buffer is (re)built, so
# that most steps write into room that is already there.
HEADROOM = 64


class BufferLayer(CacheLayerMixin):
    """One layer's keys and values [rows, kv_heads, capacity, head_dim]; columns [0, width) in use."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        self.keys, self.values, self.width = keys, values, width
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers exist from the start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's new columns in place; returns views of every column in use."""
        end = self.width + key_states.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV buffer holds {self.keys.shape[2]} columns, a step needs {end}: call reserve() first")
        self.keys[:, :, self.width : end] = key_states
        self.values[:, :, self.width : end] = value_states
        self.width = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.width

    def get_max_length(self) -> int:
        return -1


class DecodeBatch:
    """The KV of the sequences being decoded, as one left-padded batch (see the module docstring).

    `cache` is what the model's forward takes as `past_key_values`;
    `positions()` and `attention_mask()` go with it.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.cache: Cache | None = None  # built by the first join
        self.padding = torch.zeros(0, dtype=torch.long)  # [rows]: pad columns at each row's left
        self._mask = torch.zeros(0, 0, dtype=torch.bool)  # [rows, capacity]: True where a row has a token

    @property
    def rows(self) -> int:
        return len(self.padding)

    @property
    def width(self) -> int:
        return self.cache.layers[0].width if self.cache is not None else 0

    @property
    def capacity(self) -> int:
        return self.cache.layers[0].keys.shape[2] if self.cache is not None else 0

    def join(self, groups: list[tuple[list[torch.Tensor], list[torch.Tensor], int]]) -> None:
        """Append rows: each group is (keys, values, count), `count` rows that
        start from the same prompt KV (per layer [1, kv_heads, length, head_dim]).
        New rows come after the current ones, in the order given."""
        lengths = [keys[0].shape[2] for keys, _, _ in groups]
        old_rows, old_width = self.rows, self.width
        width = max([old_width, *lengths])
        shift = width - old_width  # the old rows gain this much left padding
        rows = old_rows + sum(count for _, _, count in groups)
        capacity = max(self.capacity, width + HEADROOM)
        layers = []
        for layer in range(self.num_layers):
            sample = groups[0][0][layer]
            shape = (rows, sample.shape[1], capacity, sample.shape[3])
            # Zeros, not empty: the masked columns still meet a 0 attention
            # weight, and 0 * NaN from uninitialised memory would be NaN.
            keys, values = sample.new_zeros(shape), sample.new_zeros(shape)
            if old_rows:
                old = self.cache.layers[layer]
                keys[:old_rows, :, shift:width] = old.keys[:, :, :old_width]
                values[:old_rows, :, shift:width] = old.values[:, :, :old_width]
            row = old_rows
            for (group_keys, group_values, count), length in zip(groups, lengths):
                # One prompt's KV broadcast into all `count` rows of its samples.
                keys[row : row + count, :, width - length : width] = group_keys[layer][0]
                values[row : row + count, :, width - length : width] = group_values[layer][0]
                row += count
            layers.append(BufferLayer(keys, values, width))
        self.cache = Cache(layers=layers)
        new_padding = [width - length for length, (_, _, count) in zip(lengths, groups) for _ in range(count)]
        self.padding = torch.cat([self.padding.to(keys.device) + shift, torch.tensor(new_padding, device=keys.device)])
        self._update_mask()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and drop the leading columns no kept row uses."""
        index = torch.tensor(rows, device=self.padding.device)
        padding = self.padding[index]
        start = int(padding.min())
        width = self.width - start
        for layer in self.cache.layers:
            # Indexing copies the kept rows; the slice then skips the columns
            # before `start` (views of that copy, with the spare capacity kept).
            layer.keys = layer.keys[index][:, :, start:]
            layer.values = layer.values[index][:, :, start:]
            layer.width = width
        self.padding = padding - start
        self._update_mask()

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns (call before a forward pass)."""
        if self.width + columns <= self.capacity:
            return
        capacity = max(2 * self.capacity, self.width + columns)
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : layer.width] = old[:, :, : layer.width]
                setattr(layer, name, new)
        self._update_mask()

    def row_kv(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row `row`'s keys and values, per layer [1, kv_heads, its tokens, head_dim], as copies."""
        start = int(self.padding[row])
        keys = [layer.keys[row : row + 1, :, start : layer.width].clone() for layer in self.cache.layers]
        values = [layer.values[row : row + 1, :, start : layer.width].clone() for layer in self.cache.layers]
        return keys, values

    def positions(self) -> torch.Tensor:
        """[rows] long: the position of each row's next token (its tokens so far)."""
        return self.width - self.padding

    def attention_mask(self, query_length: int, four_d: bool) -> torch.Tensor:
        """Which columns each row attends to, for a forward of `query_length`
        new tokens per row (1 when decoding): [rows, 1, 1, width + 1] bool
        (True: attend) if `four_d`, else the 2D [rows, width + 1] long mask
        from which Hugging Face builds its own. A 4D mask is used as given,
        which saves building one every step; it is right for a single query
        token on full-attention layers only (no causal or sliding-window part)."""
        if four_d:
            if query_length != 1:
                raise ValueError("the 4D decode mask is for one new token per row")
            return self._mask[:, None, None, : self.width + 1]
        return self._mask[:, : self.width + query_length].long()

    def _update_mask(self) -> None:
        columns = torch.arange(self.capacity, device=self.padding.device)
        self._mask = columns[None] >= self.padding[:, None]
