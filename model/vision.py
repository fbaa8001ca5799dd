"""EVA-CLIP vision transformer as InfiMM-HD uses it (official `eva_vit.py`, spec §3.1).

Legend: V views (thumbnail + windows), P patches per side, N = P*P + 1 tokens, D width, H heads, Dh head width.

What makes this EVA variant different from a textbook ViT:
* post-norm blocks: `x = x + norm1(attn(x))`, the LayerNorm is applied to the branch output, not its input;
* the qkv projection has no bias of its own; q and v get separate biases, k gets none;
* exact (erf) GELU; no layer scale, no rope, no relative position bias;
* the features are the LAST block's output with CLS, without the final `norm` and `head` (they exist in the checkpoint
  and are loaded, but are unused on the feature path).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"views must be {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (V, 3, S, S) -> (V, P*P, D)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V, N, D = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # k has no bias (official)
        qkv = F.linear(x, self.qkv.weight, bias).view(V, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (V, H, N, Dh)
        out = attention(q, k, v)  # scale Dh**-0.5 as in the official code; no mask
        return self.proj(out.transpose(1, 2).reshape(V, N, D))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU (nn.GELU() default)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))  # post-norm: norm on the branch output
        return x + self.norm2(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # Present in the official checkpoint, unused on the feature path (spec §3.1); loaded so the load stays strict.
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) normalised pixels -> (V, N, D) features of the last block, CLS first."""
        x = self.patch_embed(views)  # (V, P*P, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed  # (V, N, D)
        for block in self.blocks:
            x = block(x)
        return x
