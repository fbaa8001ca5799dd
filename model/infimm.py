"""InfiMM-HD: EVA-CLIP ViT over a thumbnail and 448x448 windows, a Llama decoder reading them through gated
cross-attention blocks placed before decoder layers (3, 7, ..., 39).

Legend: B batch rows, T text tokens, V views of one image, N tokens per view, I media items (images) per row,
M media tokens per row, D decoder width, Dv visual width.

`forward` and `generate` reproduce the official `Flamingo.forward` / `Flamingo.generate` numbers
(tests/test_golden.py); the engine (`engine.py`) drives the same pieces with slot caches for continuous batching.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import KVCache, MediaKV
from .config import InfiMMHDConfig
from .text import SelfAttnContext, TextDecoder
from .vision import VisionTransformer
from .windows import window_position_encoding
from .xattn import CrossAttnInputs, GatedCrossAttentionBlock


class InfiMMHD(nn.Module):
    def __init__(self, config: InfiMMHDConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.decoder = TextDecoder(config.text)
        self.xattn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(config.text.hidden, config.vis_dim, config.xattn)
                for i in config.xattn_layers
            }
        )

    # ---- vision -------------------------------------------------------------------------------------------------
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, 448, 448) normalised pixels -> (V, N, Dv) ViT features (last block, CLS included)."""
        return self.vision(views.to(self.vision.pos_embed.dtype))

    def build_media(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(V, N, Dv) features of [thumbnail, windows row-major] -> (V*N, Dv), one media item.

        The 2-D window encoding is added in float32 to every token of each window, not to the thumbnail (spec §3.4).
        V is 1 + rows*cols, or rows*cols when the processor made no thumbnail (a 1x1 grid with
        `single_window_thumbnail=False`).
        """
        V, N, D = features.shape
        if V not in (rows * cols, rows * cols + 1):
            raise ValueError(f"expected 1 + {rows}x{cols} = {1 + rows * cols} views, got {V}")
        pe = window_position_encoding(rows, cols, D, max_pos=self.config.pe_max_pos).to(features.device)  # (R*C, Dv)
        thumb, windows = features[: V - rows * cols], features[V - rows * cols :]
        windows = windows.float() + pe[:, None, :]  # same vector on all N tokens of a window
        return torch.cat((thumb.float(), windows)).to(features.dtype).reshape(V * N, D)

    def project_media(self, media: torch.Tensor, key_time: torch.Tensor | None = None) -> MediaKV:
        """Keys/values of every cross-attention layer, projected once per request (never per decode step).

        media is (B, I, N, Dv), I items of N tokens each, or (B, M, Dv) with key_time (B, M) giving each token's
        1-based item index (0 for padding) when items differ in size.
        """
        if key_time is None:
            B, I, N, _ = media.shape
            media = media.reshape(B, I * N, -1)
            key_time = torch.arange(1, I + 1, device=media.device).repeat_interleave(N).expand(B, -1)
        flat = media.to(self.decoder.embed_tokens.weight.dtype)  # (B, M, Dv)
        ks, vs = zip(*(block.attn.project_media(flat) for block in self.xattn.values()), strict=True)
        return MediaKV(k=list(ks), v=list(vs), key_time=key_time)

    # ---- decoder ------------------------------------------------------------------------------------------------
    def decode_layers(self, input_ids: torch.Tensor, ctx: SelfAttnContext, xin: CrossAttnInputs | None) -> torch.Tensor:
        """Embeddings -> every decoder layer (a gated cross-attention block first where there is one) -> final norm."""
        h = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.decoder.layers):
            block = self.xattn[str(i)] if str(i) in self.xattn else None
            if block is not None and xin is not None:
                h = block(h, self.config.xattn_layers.index(i), xin)
            h = layer(h, i, ctx)
        return self.decoder.norm(h, ctx.kernels.norm)

    def text_time(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) running count of <image> tokens, the `<image>` itself included."""
        return (input_ids == self.config.image_token_id).long().cumsum(dim=1)

    def prefill_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media_kv: MediaKV | None,
        position_ids=None,
        *,
        dense: bool = False,
        rope_dtype: torch.dtype | None = None,
    ) -> tuple[SelfAttnContext, CrossAttnInputs | None]:
        """Attention inputs for running whole prompts at once (no earlier context).

        dense: drop the masks that let everything through (no padding: the kernel's causal path; one full media item
        per row: no cross-attention mask). Same function, faster kernels; costs a host sync, so prefill only.
        """
        B, T = input_ids.shape
        valid = attention_mask.bool()
        if position_ids is None:  # as HF generate: left padding is transparent; equals arange for right padding
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = self.decoder.rope_at(position_ids, rope_dtype)
        if dense and bool(valid.all()):
            ctx = SelfAttnContext(cos=cos, sin=sin, mask=None, fresh=True, causal=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = (causal & valid[:, None, None, :]) | eye  # pad queries attend to themselves only (never NaN)
            ctx = SelfAttnContext(cos=cos, sin=sin, mask=mask, fresh=True)
        xin = None
        if media_kv is not None:
            text_time = self.text_time(input_ids)
            n_items = int(media_kv.key_time.max()) if media_kv.key_time.numel() else 0
            if int(text_time[:, -1].max()) > n_items:
                raise ValueError(
                    f"prompt has {int(text_time[:, -1].max())} <image> tokens but only {n_items} media items"
                )
            xin = CrossAttnInputs.build(media_kv, text_time, flag=text_time[:, -1] > 0)
            if dense:
                xin = xin.without_full_mask()
        return ctx, xin

    def packed_inputs(
        self,
        prompts: list[list[int]],
        media_kv: MediaKV | None,
        media_items: list[list[int]],
        *,
        dense: bool = True,
        rope_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, SelfAttnContext, CrossAttnInputs | None]:
        """Whole prompts packed back to back into one row of T = sum of their lengths (no padding): ids (1, T) and
        the attention inputs. Prompt i is tokens [a_i, b_i), at positions 0..b_i - a_i - 1, attending causally within
        itself; its cross-attention reads media row i of `media_kv`, whose items (images) have `media_items[i]` tokens
        each, one after another (an empty list: no media).

        Built on the host from the prompt lists (no device sync). dense: drop cross-attention masks that let every
        query through (then SDPA may take a mask-free kernel).
        """
        dev = self.decoder.embed_tokens.weight.device
        lengths = [len(p) for p in prompts]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        segments = list(zip([0] + ends[:-1], ends, strict=True))
        ids = torch.tensor([t for p in prompts for t in p])  # (T,) on the host
        positions = torch.cat([torch.arange(n) for n in lengths]).to(dev)  # (T,)
        cos, sin = self.decoder.rope_at(positions[None], rope_dtype)  # (1, 1, T, Dh/2)
        ctx = SelfAttnContext(cos=cos, sin=sin, mask=None, fresh=True, segments=segments)
        ctx.cols = positions[None]  # (1, T) cache columns: each prompt from column 0 of its slot
        xin = None
        if media_kv is not None:
            is_image = (ids == self.config.image_token_id).long()
            text_time = torch.cat([is_image[a:b].cumsum(0) for a, b in segments])  # (T,) per prompt
            row_masks: list[torch.Tensor | None] = []
            flag = torch.zeros(ids.shape[0], dtype=torch.bool)
            for r, (a, b) in enumerate(segments):
                tt, sizes = text_time[a:b], media_items[r]
                if int(tt[-1]) > len(sizes):
                    raise ValueError(f"prompt has {int(tt[-1])} <image> tokens but only {len(sizes)} media items")
                flag[a:b] = tt[-1] > 0
                key_time = torch.arange(1, len(sizes) + 1).repeat_interleave(torch.tensor(sizes, dtype=torch.long))
                mask = (key_time[None, :] == tt[:, None]) | (tt == 0)[:, None]  # (b - a, m); text_time 0: anywhere
                row_masks.append(None if (dense and bool(mask.all())) else mask.to(dev)[None, None])
            xin = CrossAttnInputs(
                media=media_kv,
                mask=None,
                attends=(text_time > 0).to(dev)[None, None, :, None],
                flag=flag.to(dev)[None, :, None],
                segments=[(a, b, sum(m)) for (a, b), m in zip(segments, media_items, strict=True)],
                row_masks=row_masks,
            )
        return ids.to(dev)[None], ctx, xin

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T), media (B, I, N, Dv) visual features (PE already added) -> logits
        (B, T, vocab). Rows without `<image>` ignore the media."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        media_kv = self.project_media(media) if media is not None else None
        ctx, xin = self.prefill_inputs(input_ids, attention_mask, media_kv, position_ids)
        return self.decoder.lm_head(self.decode_layers(input_ids, ctx, xin)).float()

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        max_new_tokens: int = 24,
        stop_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding of a (left-padded) batch -> (B, <= max_new_tokens) new ids.

        As the official `Flamingo.generate` (HF greedy search): stop tokens are kept, a finished row continues with the
        pad id, generation ends when every row has stopped. stop_token_ids defaults to `<|endofchunk|>` (official
        default).
        Every decode step attends to the last image of the prompt.
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stop = torch.tensor(
            [cfg.eoc_token_id] if stop_token_ids is None else list(stop_token_ids), device=input_ids.device
        )
        pad = cfg.text.pad_token_id if pad_token_id is None else pad_token_id
        B, L = input_ids.shape
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left padding: the last column of every row must be a real token")
        if L + max_new_tokens > cfg.text.max_positions:
            raise ValueError(f"{L} prompt + {max_new_tokens} new tokens is over max_positions={cfg.text.max_positions}")
        dtype = self.decoder.embed_tokens.weight.dtype
        cache = KVCache(
            cfg.text.layers,
            B,
            L + max_new_tokens,
            cfg.text.kv_heads,
            cfg.text.head_dim,
            dtype=dtype,
            device=input_ids.device,
        )
        rows = torch.arange(B, device=input_ids.device)
        cache.valid[:, :L] = attention_mask.bool()
        media_kv = self.project_media(media) if media is not None else None

        # Prefill: the whole prompt, written to cache columns [0, L).
        ctx, xin = self.prefill_inputs(input_ids, attention_mask, media_kv)
        ctx.cache, ctx.slots, ctx.cols = cache, rows, torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.decode_layers(input_ids, ctx, xin)
        token = self.decoder.lm_head(h[:, -1]).argmax(-1)  # (B,) left padding: the last column is real

        # Decode: one token per step; every step attends to the last image of the prompt (text_time = image count).
        positions = attention_mask.long().sum(1)  # (B,) next position of each row
        text_time = self.text_time(input_ids)[:, -1:]  # (B, 1)
        dec_xin = CrossAttnInputs.build(media_kv, text_time, flag=text_time[:, 0] > 0) if media_kv is not None else None
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            done = done | torch.isin(token, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            col = L + step
            cache.valid[:, col] = True
            cos, sin = self.decoder.rope_at(positions[:, None])
            ctx = SelfAttnContext(
                cos=cos,
                sin=sin,
                mask=cache.valid[:, None, None, : col + 1],
                fresh=False,
                cache=cache,
                slots=rows,
                cols=torch.full((B, 1), col, device=input_ids.device),
                kv_len=col + 1,
            )
            h = self.decode_layers(token[:, None], ctx, dec_xin)
            token = self.decoder.lm_head(h[:, -1]).argmax(-1)
            positions = positions + 1
        return torch.stack(out, dim=1)
