"""Explicit state objects passed to `forward`: the self-attention KV cache and the cross-attention media K/V; and the
engine's feature cache of encoded pages.

Legend: L layers, S slots (cache rows), Tmax columns, Hkv key/value heads, Dh head width,
Hx cross-attention heads, M media (visual) tokens, dx cross-attention head width.

Both are static and preallocated: decode steps read slices of fixed buffers, so a decode step has fixed shapes and can
be captured in a CUDA graph. The official code keeps this state on the modules and re-projects the media keys/values at
every decode step (spec §4.4); here they are projected once per request.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch


class KVCache:
    """Self-attention keys/values: `k`, `v` (L, S, Hkv, Tmax, Dh) and `valid` (S, Tmax), True where a column holds a
    real token of that row (left padding and unused columns stay False)."""

    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, *, dtype, device):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(slots, max_len, dtype=torch.bool, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, slots: torch.Tensor, cols: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, Hkv, T, Dh) go to rows `slots` (B,) at columns `cols` (B, T); or, for packed prompts (several
        requests' tokens in one row), to rows `slots` (B, T) given per token."""
        rows = slots[:, None] if slots.dim() == 1 else slots
        self.k[layer][rows, :, cols] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, Dh)
        self.v[layer][rows, :, cols] = v.transpose(1, 2)

    def read(self, layer: int, rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [0, rows), columns [0, kv_len): views (rows, Hkv, kv_len, Dh)."""
        return self.k[layer, :rows, :, :kv_len], self.v[layer, :rows, :, :kv_len]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class MediaKV:
    """Cross-attention keys/values of the media of B rows, one tensor per cross-attention layer.

    k[x], v[x]: (B, Hx, M, dx) for cross-attention layer x (kept as a list: views of each layer's projection, never
    stacked into one copy). key_time: (B, M), the 1-based index of the media item (image) each key belongs to, 0 for
    padding keys. A text token whose running `<image>` count is t attends to the keys with key_time == t.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    key_time: torch.Tensor

    @classmethod
    def empty(cls, layers: int, rows: int, max_tokens: int, heads: int, dim_head: int, *, dtype, device) -> MediaKV:
        def zeros():
            return torch.zeros(rows, heads, max_tokens, dim_head, dtype=dtype, device=device)

        return cls(
            k=[zeros() for _ in range(layers)],
            v=[zeros() for _ in range(layers)],
            key_time=torch.zeros(rows, max_tokens, dtype=torch.long, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.key_time.shape[1]

    def rows(self, n: int, tokens: int | None = None) -> MediaKV:
        """View of rows [0, n) and keys [0, tokens)."""
        m = self.max_tokens if tokens is None else tokens
        return MediaKV([t[:n, :, :m] for t in self.k], [t[:n, :, :m] for t in self.v], self.key_time[:n, :m])

    def store_last_image(self, slot: int, source: MediaKV, row: int) -> int:
        """Copy the keys of the LAST image of `source` row `row` into row `slot` as media item 1; returns its length.

        Decode steps only ever attend to the last image of the prompt (spec §4.4), so that is all a slot keeps.
        """
        times = source.key_time[row]
        last = int(times.max())
        idx = (times == last).nonzero().squeeze(1) if last > 0 else times.new_zeros(0)
        n = idx.numel()
        if n > self.max_tokens:
            raise ValueError(f"image has {n} visual tokens, over the media cache's {self.max_tokens} per slot")
        for dst, src in ((self.k, source.k), (self.v, source.v)):
            for x in range(len(dst)):
                dst[x][slot, :, :n] = src[x][row].index_select(1, idx)  # (Hx, n, dx)
        self.key_time[slot] = 0
        self.key_time[slot, :n] = 1 if n else 0
        return n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class FeatureCache:
    """Encoded pages (ViT features with the window encoding added) by `PageViews.cache_key`, LRU, bounded in bytes.

    Looking (`key in cache`, `get`) counts nothing: the engine counts `hits` and `misses` once per image of an admitted
    request (a miss: the page went through the ViT for that request; a hit: its features were there already, in this
    cache or encoded for another request of the same step). `evictions`: pages dropped to stay within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is not None:
            self.items.move_to_end(key)  # most recently used
        return t

    def counts(self) -> tuple[int, int, int]:
        return self.hits, self.misses, self.evictions

    def put(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if key in self.items or size > self.max_bytes:
            return
        self.items[key] = t
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1
