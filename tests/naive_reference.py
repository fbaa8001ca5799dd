"""A deliberately naive InfiMM-HD forward written from the spec, reading the OFFICIAL checkpoint keys directly.

It shares no code with model/ (no modules, no fused weights, no masks, one row at a time, explicit loops), so agreement
with it on configs the golden vectors do not cover shows nothing in model/ is hard-wired to the golden shapes and that
the key mapping in weights.py is right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

V = "model.vision_encoder."
LM = "model.lang_encoder."


def vit(sd: dict, cfg, views: torch.Tensor) -> torch.Tensor:
    """(V, 3, S, S) -> (V, N, D): last block output with CLS, post-norm blocks, q/v biases only."""
    c = cfg.vision
    x = F.conv2d(views, sd[V + "patch_embed.proj.weight"], sd[V + "patch_embed.proj.bias"], stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "cls_token"].expand(x.shape[0], 1, -1), x], dim=1) + sd[V + "pos_embed"]
    heads, hd = c.width // c.head_width, c.head_width
    for i in range(c.layers):
        b = f"{V}blocks.{i}."
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros_like(sd[b + "attn.q_bias"]), sd[b + "attn.v_bias"]])
        qkv = x @ sd[b + "attn.qkv.weight"].T + bias
        q, k, v = (t.reshape(x.shape[0], -1, heads, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = torch.softmax((q * hd**-0.5) @ k.transpose(-1, -2), dim=-1) @ v
        a = a.transpose(1, 2).reshape(x.shape) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        x = x + F.layer_norm(a, (c.width,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        m = (
            F.gelu(x @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]) @ sd[b + "mlp.fc2.weight"].T
            + sd[b + "mlp.fc2.bias"]
        )
        x = x + F.layer_norm(m, (c.width,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
    return x


def window_pe(rows: int, cols: int, dim: int) -> torch.Tensor:
    half = dim // 2
    out = torch.zeros(rows * cols, dim, dtype=torch.float64)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        for j in range(half):
            denom = 10000 ** (2 * (j // 2) / half)
            f = math.sin if j % 2 == 0 else math.cos
            out[k, j] = f(c / denom)
            out[k, half + j] = f(r / denom)
    return out.float()


def media_item(sd: dict, cfg, views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[thumbnail, windows row-major] -> (V*N, D) with the window encoding added to windows only."""
    feats = vit(sd, cfg, views)
    pe = window_pe(rows, cols, feats.shape[-1])
    feats = torch.cat([feats[:1], feats[1:] + pe[:, None, :]])
    return feats.reshape(-1, feats.shape[-1])


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    d = x.shape[-1]
    freqs = torch.tensor([pos / base ** (2 * j / d) for j in range(d // 2)], dtype=torch.float32)
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def forward_row(sd: dict, cfg, ids: list[int], media: list[torch.Tensor]) -> torch.Tensor:
    """One unpadded row -> (T, vocab) logits. media[i] is the (M_i, D) item of the i-th <image>."""
    t, xc = cfg.text, cfg.xattn
    T = len(ids)
    h = sd[LM + "model.embed_tokens.weight"][torch.tensor(ids)]
    text_time = [sum(1 for j in range(i + 1) if ids[j] == cfg.image_token_id) for i in range(T)]
    has_media = text_time[-1] > 0
    ks, vs = [[None] * T for _ in range(2)]
    for layer in range(t.layers):
        if (layer + 1) % xc.every_n_layers == 0 and has_media:
            g = f"{LM}model.layers.{layer}.gated_cross_attn_layer."
            out = torch.zeros_like(h)
            for i in range(T):
                if text_time[i] == 0:
                    continue
                m = media[text_time[i] - 1]
                q = F.layer_norm(h[i], (t.hidden,), sd[g + "attn.norm.weight"], sd[g + "attn.norm.bias"], 1e-5)
                q = (q @ sd[g + "attn.to_q.weight"].T).view(xc.heads, xc.dim_head)
                k, v = (m @ sd[g + "attn.to_kv.weight"].T).chunk(2, dim=-1)
                k, v = k.view(-1, xc.heads, xc.dim_head), v.view(-1, xc.heads, xc.dim_head)
                att = torch.softmax(torch.einsum("hd,mhd->hm", q * xc.dim_head**-0.5, k), dim=-1)
                out[i] = torch.einsum("hm,mhd->hd", att, v).reshape(-1) @ sd[g + "attn.to_out.weight"].T
            h = h + out * sd[g + "attn_gate"].tanh()
            ff = F.layer_norm(h, (t.hidden,), sd[g + "ff.0.weight"], sd[g + "ff.0.bias"], 1e-5)
            ff = F.gelu(ff @ sd[g + "ff.1.weight"].T) @ sd[g + "ff.3.weight"].T
            h = h + ff * sd[g + "ff_gate"].tanh()
        p = f"{LM}model.layers.{layer}.decoder_layer."
        x = rms(h, sd[p + "input_layernorm.weight"], t.rms_eps)
        new = torch.zeros_like(h)
        group = t.heads // t.kv_heads
        for i in range(T):
            q = (x[i] @ sd[p + "self_attn.q_proj.weight"].T).view(t.heads, t.head_dim)
            k = (x[i] @ sd[p + "self_attn.k_proj.weight"].T).view(t.kv_heads, t.head_dim)
            v = (x[i] @ sd[p + "self_attn.v_proj.weight"].T).view(t.kv_heads, t.head_dim)
            ks[i], vs[i] = rope(k, i, t.rope_theta), v
            q = rope(q, i, t.rope_theta)
            K = torch.stack(ks[: i + 1])  # (i+1, Hkv, Dh)
            Vv = torch.stack(vs[: i + 1])
            heads_out = []
            for hh in range(t.heads):
                kv = hh // group
                att = torch.softmax(K[:, kv] @ q[hh] * t.head_dim**-0.5, dim=0)
                heads_out.append(att @ Vv[:, kv])
            new[i] = torch.cat(heads_out) @ sd[p + "self_attn.o_proj.weight"].T
        h = h + new
        x = rms(h, sd[p + "post_attention_layernorm.weight"], t.rms_eps)
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = rms(h, sd[LM + "model.norm.weight"], t.rms_eps)
    return h @ sd[LM + "lm_head.weight"].T
