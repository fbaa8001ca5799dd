"""Llama decoder pieces (Vicuna-13B-v1.5 shape): RMSNorm, rotary embeddings, attention with a KV cache, SwiGLU MLP.

Legend: B batch rows, T new tokens, Tk keys, D hidden, H heads, Hkv key/value heads, Dh head width.

Numerics follow transformers' `LlamaForCausalLM` (RMSNorm in float32, rotate-half RoPE with float32 tables), which
`tests/test_text_decoder.py` checks. The q/k/v and gate/up projections are fused into one matmul each
(`wqkv`, `w_gate_up`); `weights.py` concatenates the official per-projection tensors at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .cache import KVCache
from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_table(cfg: TextConfig, device=None) -> torch.Tensor:
    """(max_positions, Dh) table [cos | sin], each half (max_positions, Dh/2), in float32 as in transformers."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.arange(cfg.max_positions, device=device).float()[:, None] * inv_freq[None, :]  # (P, Dh/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin (B, 1, T, Dh/2). Rotate-half convention of the HF Llama port."""
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
    """

    cos: torch.Tensor  # (B, 1, T, Dh/2)
    sin: torch.Tensor
    mask: torch.Tensor  # bool, True = may attend
    fresh: bool
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # (B,) cache rows written
    cols: torch.Tensor | None = None  # (B, T) cache columns written
    kv_len: int = 0


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
        if not ctx.fresh:
            k, v = ctx.cache.read(layer, B, ctx.kv_len)  # (B, Hkv, kv_len, Dh)
        out = attention(q, k, v, ctx.mask)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)
        self.w_down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, layer: int, ctx: SelfAttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layer, ctx)
        return x + self.mlp(self.mlp_norm(x))


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

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, Dh/2). Callers check lengths against max_positions up front."""
        cos, sin = self.rope[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin
