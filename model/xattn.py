"""Gated cross-attention: how the decoder reads the visual tokens (official `helpers.py`, spec §4.3).

Legend: B batch rows, T text tokens, M media tokens, D decoder width, Dv visual width, Hx heads, dx head width.

Semantics pinned by the golden vectors (tests/data/golden/README.md §7):
* text_time of a token = number of `<image>` tokens at or before it; it attends to all keys of media item text_time
  only;
* tokens with text_time 0 (before any `<image>`) get exactly zero attention output, but still go through the FF branch;
* a row with no `<image>` at all skips both branches (the block is an exact identity for it);
* queries are layer-normed, media keys/values are not; tanh element-wise gates on both branches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import attention
from .cache import MediaKV
from .config import CrossAttnConfig


@dataclass
class CrossAttnInputs:
    """Everything the cross-attention blocks of one forward pass share."""

    media: MediaKV  # per cross-attention layer: k, v (B, Hx, M, dx)
    mask: torch.Tensor | None  # (B, 1, T, M) bool, True = may attend; None: every query may attend every key
    attends: torch.Tensor  # (B, 1, T, 1) bool, False where text_time == 0 (output forced to 0)
    flag: torch.Tensor  # (B, 1, 1) bool, rows with at least one <image>
    gates: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per block (tanh attn_gate, tanh ff_gate), (D,)
    # Packed prompts (one row of T tokens from several requests): media row r belongs to tokens [a, b) and has m real
    # keys; `mask` is then None and `row_masks[r]` (1, 1, b - a, m) or None (all True); attends (1, 1, T, 1) and
    # flag (1, T, 1) are per token.
    segments: list[tuple[int, int, int]] | None = None
    row_masks: list[torch.Tensor | None] | None = None

    @classmethod
    def build(
        cls,
        media: MediaKV,
        text_time: torch.Tensor,
        flag: torch.Tensor,
        dense: bool = False,
        gates: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> CrossAttnInputs:
        """text_time (B, T) running image count; flag (B,) rows that have media.

        dense: the caller knows the mask would be all True (one media item per row filling all M keys; text_time 0
        rows attend everywhere anyway), so no mask is built and SDPA may pick its flash kernel.
        """
        attends = text_time > 0  # (B, T)
        mask = None
        if not dense:
            mask = media.key_time[:, None, None, :] == text_time[:, None, :, None]  # (B, 1, T, M)
            # Rows with text_time 0 must still attend somewhere (softmax over nothing is NaN); their output is zeroed.
            mask = mask | ~attends[:, None, :, None]
        return cls(media=media, mask=mask, attends=attends[:, None, :, None], flag=flag[:, None, None], gates=gates)

    def without_full_mask(self) -> CrossAttnInputs:
        """The same inputs with the mask dropped if it lets everything through (host sync: prefill only)."""
        if self.mask is not None and bool(self.mask.all()):
            return dataclasses.replace(self, mask=None)
        return self


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttnConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.norm = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.to_q = nn.Linear(dim, cfg.inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * cfg.inner, bias=False)
        self.to_out = nn.Linear(cfg.inner, dim, bias=False)

    def project_media(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media (B, M, Dv) -> k, v (B, Hx, M, dx). Done once per request, never per decode step."""
        B, M, _ = media.shape
        k, v = self.to_kv(media).chunk(2, dim=-1)
        return (
            k.view(B, M, self.heads, self.dim_head).transpose(1, 2),
            v.view(B, M, self.heads, self.dim_head).transpose(1, 2),
        )

    def forward(self, x, k, v, mask: torch.Tensor | None, attends: torch.Tensor, segments=None, row_masks=None):
        B, T, _ = x.shape
        q = self.to_q(self.norm(x)).view(B, T, self.heads, self.dim_head).transpose(1, 2)  # (B, Hx, T, dx)
        if segments is None:
            out = attention(q, k, v, mask)
        else:  # packed: each request's tokens attend to its own media row, its m real keys only
            out = torch.cat(
                [
                    attention(q[:, :, a:b], k[r : r + 1, :, :m], v[r : r + 1, :, :m], row_masks[r])
                    if m
                    else q.new_zeros(1, self.heads, b - a, self.dim_head)  # no media: the block is skipped anyway
                    for r, (a, b, m) in enumerate(segments)
                ],
                dim=2,
            )
        out = out * attends  # (B, Hx, T, dx); exact zeros before the first <image>
        return self.to_out(out.transpose(1, 2).reshape(B, T, self.heads * self.dim_head))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, cfg: CrossAttnConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, cfg)
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        # Keys ff.0 / ff.1 / ff.3 as in the official checkpoint (ff.2 is the GELU).
        self.ff = nn.Sequential(
            nn.LayerNorm(dim, eps=cfg.ln_eps),
            nn.Linear(dim, dim * cfg.ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * cfg.ff_mult, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, layer: int, inputs: CrossAttnInputs) -> torch.Tensor:
        """x (B, T, D); `layer` indexes the cross-attention layer in `inputs.media`."""
        k, v = inputs.media.k[layer], inputs.media.v[layer]
        # tanh of the gates: computed once per engine when it passes them in, else here (2 kernels per block)
        g_attn, g_ff = inputs.gates[layer] if inputs.gates is not None else (self.attn_gate.tanh(), self.ff_gate.tanh())
        y = x + self.attn(x, k, v, inputs.mask, inputs.attends, inputs.segments, inputs.row_masks) * g_attn
        y = y + self.ff(y) * g_ff
        return torch.where(inputs.flag, y, x)  # rows without media: exact identity
