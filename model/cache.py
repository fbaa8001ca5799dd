"""Explicit state objects passed to `forward`: the self-attention KV cache and the cross-attention media K/V.

Legend: L layers, S slots (cache rows), Tmax columns, Hkv key/value heads, Dh head width,
Hx cross-attention heads, M media (visual) tokens, dx cross-attention head width.

Both are static and preallocated: decode steps read slices of fixed buffers, so a decode step has fixed shapes and can
be captured in a CUDA graph. The official code keeps this state on the modules and re-projects the media keys/values at
every decode step (spec §4.4); here they are projected once per request.
"""

from __future__ import annotations

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
        """k, v (B, Hkv, T, Dh) go to rows `slots` (B,) at columns `cols` (B, T)."""
        self.k[layer][slots[:, None], :, cols] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, Dh)
        self.v[layer][slots[:, None], :, cols] = v.transpose(1, 2)

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
