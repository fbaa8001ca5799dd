"""What the training log reports every few steps, so a model that will not read is seen in minutes.

On a fixed set of held-out examples (never trained on), per objective:
* answer (stages 0-4): held-out answer loss with each page's own image and with the images rolled by one (a model
  that uses the page does worse on the wrong one: the gap), greedy exact match, the rms of the media features the
  cross-attention reads, how many image tokens the query that predicts the first answer token attends to
  (exp of the attention entropy, averaged over heads and pages: ~all tokens at init, 1-2 when attention has
  collapsed onto a token), and the tanh gates of every cross-attention block;
* words (ViT pretraining): held-out word accuracy (top-1 word is one printed on the page) and feature rms;
* text (LM pretraining): held-out text loss.

Legend: B examples, T text tokens, M media tokens, Hx cross-attention heads, dx head width.
"""

from __future__ import annotations

import math

import torch

from model.infimm import InfiMMHD

from .modeling import IGNORE, Example, batch_loss, media_batch, text_loss, word_logits


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@torch.no_grad()
def attended_tokens(model: InfiMMHD, examples: list[Example]) -> list[float]:
    """Per cross-attention block: exp(entropy) of the attention of the query that predicts the first answer token
    over its page's media tokens, averaged over heads and examples."""
    media, key_time = media_batch(model, examples, vision_grad=False)  # (B, M, Dv), (B, M)
    kv = model.project_media(media, key_time)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for j, block in enumerate(model.xattn.values()):

        def grab(_module, args, _j=j):
            captured[_j] = args[0].detach()  # (B, T, D) the block's input

        hooks.append(block.register_forward_pre_hook(grab))
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), model.config.text.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    ids, mask = ids.to(media.device), mask.to(media.device)
    try:
        ctx, xin = model.prefill_inputs(ids, mask, kv)
        model.decode_layers(ids, ctx, xin)
    finally:
        for h in hooks:
            h.remove()
    # the query at the last prompt token predicts the first answer token
    pos = torch.tensor([next(i for i, y in enumerate(e.labels) if y != IGNORE) - 1 for e in examples])
    rows = torch.arange(len(examples))
    out = []
    for j, block in enumerate(model.xattn.values()):
        attn = block.attn
        x = captured[j][rows, pos]  # (B, D)
        q = attn.to_q(attn.norm(x)).view(len(examples), attn.heads, 1, attn.dim_head)  # (B, Hx, 1, dx)
        logits = (q @ kv.k[j].transpose(-1, -2)).squeeze(2) / math.sqrt(attn.dim_head)  # (B, Hx, M)
        logits = logits.masked_fill(key_time[:, None, :] == 0, float("-inf"))
        p = logits.float().softmax(-1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, Hx)
        out.append(float(entropy.exp().mean()))
    return out


@torch.no_grad()
def diagnose(model: InfiMMHD, examples: list[Example], objective: str, head=None, processor=None) -> dict:
    """The diagnostics of one objective on held-out `examples` (model in eval mode while measured)."""
    was_training = model.training
    model.eval()
    try:
        if objective == "text":
            return {"heldout_text_loss": float(text_loss(model, examples)[0])}
        if objective == "words":
            logits = word_logits(model, head, examples)
            targets = head.targets(examples)
            hit = targets.gather(1, logits.argmax(-1, keepdim=True).cpu()).squeeze(1) > 0
            views = torch.cat([e.views for e in examples])
            from model.windows import normalize_views

            feats = model.encode_views(normalize_views(views.to(model.vision.pos_embed.device)))
            return {"heldout_word_accuracy": float(hit.float().mean()), "media_rms": _rms(feats)}
        own = float(batch_loss(model, examples, False)[0])
        other = examples[1:] + examples[:1]  # each question with the next example's page (views and grid)
        rolled = [
            Example(e.input_ids, e.labels, o.views, o.rows, o.cols, e.answer)
            for e, o in zip(examples, other, strict=True)
        ]
        shuffled = float(batch_loss(model, rolled, False)[0])
        media, _ = media_batch(model, examples, vision_grad=False)
        out = {
            "heldout_loss": own,
            "heldout_loss_shuffled": shuffled,
            "image_gap": shuffled - own,
            "media_rms": _rms(media),
            "attended_tokens": attended_tokens(model, examples),
            "attn_gates": [float(b.attn_gate.tanh().mean()) for b in model.xattn.values()],
            "ff_gates": [float(b.ff_gate.tanh().mean()) for b in model.xattn.values()],
        }
        if processor is not None:
            from .modeling import greedy_answer

            got = [greedy_answer(model, processor, e, max_new_tokens=12).strip() for e in examples]
            out["heldout_exact"] = sum(g == e.answer for g, e in zip(got, examples, strict=True)) / len(examples)
        return out
    finally:
        model.train(was_training)
