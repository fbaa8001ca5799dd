"""Llama decoder pieces (Vicuna-13B-v1.5 shape): RMSNorm, rotary embeddings, attention with a KV cache, SwiGLU MLP.

Legend: B batch rows, T new tokens, Tk keys, D hidden, H heads, Hkv key/value heads, Dh head width.

Numerics follow transformers' `LlamaForCausalLM` (RMSNorm in float32, rotate-half RoPE with float32 tables), which
`tests/test_text_decoder.py` checks. The q/k/v and gate/up projections are fused into one matmul each
(`wqkv`, `w_gate_up`); `weights.py` concatenates the official per-projection tensors at load time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .cache import KVCache
from .config import TextConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> RMS-normalised in float32, cast back, times weight: transformers' numerics (8 kernels)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same function through `F.rms_norm` (one reduction kernel instead of pow/mean/add/rsqrt/mul)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Kernels:
    """Implementations of the small element-wise pieces one forward pass uses; all compute the same function.

    The model's own `forward` / `generate` use the reference pieces; the engine picks faster ones from its config.
    """

    norm: Callable = rms_norm
    swiglu: Callable = swiglu

    @classmethod
    @functools.cache  # one compiled wrapper per choice, shared by every engine of the process
    def make(cls, fused_norm: bool = False, compile: bool = False) -> Kernels:
        norm = rms_norm_fused if fused_norm else rms_norm
        if not compile:
            return cls(norm=norm)
        # dynamic=True: one compiled kernel for every batch and prompt length (no recompiles per decode size)
        return cls(norm=torch.compile(norm, dynamic=True), swiglu=torch.compile(swiglu, dynamic=True))


REFERENCE_KERNELS = Kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, impl: Callable = rms_norm) -> torch.Tensor:
        return impl(x, self.weight, self.eps)


def rope_table(cfg: TextConfig, device=None) -> torch.Tensor:
    """(max_positions, Dh) table [cos | sin], each half (max_positions, Dh/2), in float32 as in transformers."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.arange(cfg.max_positions, device=device).float()[:, None] * inv_freq[None, :]  # (P, Dh/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (B, 1, T, Dh/2). Rotate-half convention of the HF Llama port.

    The casts are no-ops when the caller already cast the tables to x's dtype once per step (`rope_at(..., dtype)`).
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class SelfAttnContext:
    """How the T new tokens of every row attend, shared by all layers of one forward pass.

    * `fresh` (full forward and prefill): the keys are the new tokens themselves; `mask` (B, 1, T, T).
      If `cache` is set the new keys/values are also written to `cache` rows `slots` at columns `cols` (B, T).
    * cached (decode): the new keys/values are written at `cols` of rows `slots`, then each row b attends over
      `cache` row b, columns [0, kv_len), masked by `mask` (B, 1, T, kv_len).
    * `mask` None with `causal` (fresh, every row a full prompt): the kernel's own causal path, no mask tensor.
    * `segments` (fresh, packed): B = 1 row holding several prompts back to back, prompt i at tokens [a_i, b_i);
      each attends causally within its own segment (no padding, no mask); `slots` and `cols` are then (1, T).
    * `ranges` (cached, T = 1): rows [r0, r1) attend over cache columns [0, L) of their own rows with `mask` (r1 - r0,
      1, 1, L) or None; a range of one row reads exactly its own keys, unmasked. Used instead of `kv_len` and `mask`.
    """

    cos: torch.Tensor  # (B, 1, T, Dh/2)
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool, True = may attend
    fresh: bool
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # (B,) cache rows written
    cols: torch.Tensor | None = None  # (B, T) cache columns written
    kv_len: int = 0
    causal: bool = False  # only with mask None
    segments: list[tuple[int, int]] | None = None  # packed prompts: (start, end) of each in the row
    ranges: list[tuple[int, int, int, torch.Tensor | None]] | None = None  # decode: (r0, r1, L, mask) per row range
    kernels: Kernels = field(default=REFERENCE_KERNELS)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, layer: int, ctx: SelfAttnContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = apply_rope(q.view(B, T, self.heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)  # (B, H, T, Dh)
        k = apply_rope(k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)  # (B, Hkv, T, Dh)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is not None:
            ctx.cache.write(layer, ctx.slots, ctx.cols, k, v)
        if ctx.ranges is not None:  # decode over each row range's own length (see SelfAttnContext)
            parts = []
            for r0, r1, L, mask in ctx.ranges:
                kr, vr = ctx.cache.k[layer, r0:r1, :, :L], ctx.cache.v[layer, r0:r1, :, :L]  # (r, Hkv, L, Dh)
                parts.append(attention(q[r0:r1], kr, vr, mask))
            out = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif ctx.segments is not None:  # packed prompts: causal attention within each, over its own tokens only
            out = torch.cat(
                [attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True) for a, b in ctx.segments], 2
            )
        else:
            if not ctx.fresh:
                k, v = ctx.cache.read(layer, B, ctx.kv_len)  # (B, Hkv, kv_len, Dh)
            out = attention(q, k, v, ctx.mask, causal=ctx.causal and ctx.mask is None)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)
        self.w_down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, act: Callable = swiglu) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # each (B, T, intermediate)
        return self.w_down(act(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, layer: int, ctx: SelfAttnContext) -> torch.Tensor:
        k = ctx.kernels
        x = x + self.attn(self.attn_norm(x, k.norm), layer, ctx)
        return x + self.mlp(self.mlp_norm(x, k.norm), k.swiglu)


class TextDecoder(nn.Module):
    """Embedding, decoder layers, final norm and LM head. The layer loop (with cross-attention) lives in `InfiMMHD`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        # Not a parameter, not in the checkpoint: rebuilt from the config wherever the model is materialised.
        self.register_buffer("rope", rope_table(cfg), persistent=False)

    def reset_rope(self, device=None) -> None:
        self.rope = rope_table(self.cfg, device=device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Keep the RoPE table in float32 whatever dtype the weights move to (transformers keeps inv_freq in float32).
        if self.rope.dtype != torch.float32 and self.rope.device.type != "meta":
            self.reset_rope(self.rope.device)
        return self

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, Dh/2), float32 or cast once to `dtype` (then every layer's
        `apply_rope` skips its own casts: same values, 4 kernels fewer per layer). Callers check lengths against
        max_positions up front."""
        table = self.rope[positions] if dtype is None else self.rope[positions].to(dtype)  # (B, T, Dh)
        cos, sin = table.unsqueeze(1).chunk(2, dim=-1)
        return cos, sin
