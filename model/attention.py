"""The one attention function of the model: a plain reference path and PyTorch's fused SDPA kernels behind it.

Legend: B batch, H query heads, Hkv key/value heads, Tq queries, Tk keys, Dh head width.
Scale is Dh**-0.5 everywhere (the official ViT, Llama and cross-attention all use it).
`tests/test_text_decoder.py::test_sdpa_and_reference_attention_agree` checks that both paths agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    impl: str = "sdpa",
) -> torch.Tensor:
    """q (B, H, Tq, Dh), k/v (B, Hkv, Tk, Dh), mask bool broadcastable to (B, H, Tq, Tk) with True = may attend.

    Every query row must be allowed at least one key (callers make fully-masked rows attend somewhere harmless and
    zero their output afterwards); otherwise softmax over nothing is NaN.
    """
    assert not (causal and mask is not None), "pass either causal=True or an explicit mask, not both"
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat key/value heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if impl == "reference":
        return reference_attention(q, k, v, mask, causal=causal)
    raise ValueError(f"unknown attention impl {impl!r} (use 'sdpa' or 'reference')")


def reference_attention(q, k, v, mask=None, *, causal=False):
    """softmax(q k^T / sqrt(Dh) + mask) v, written out; the numerics of the official eager code."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, Tq, Tk)
    if causal:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v
