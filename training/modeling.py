"""What training needs around the serving model: freeze policies, position-embedding interpolation, an init for
training from scratch, gradient checkpointing, the answer-only loss, and the official-layout checkpoint writer.

Legend: B examples, T text tokens, V views of a page, N tokens per view, M media tokens per row, Dv visual width,
g ViT patch grid side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import InfiMMHDConfig, VisionConfig
from model.infimm import InfiMMHD
from model.weights import official_state_dict, save_sharded
from model.windows import normalize_views, sinusoid_table

from .stages import StageSpec

IGNORE = -100  # label of tokens that are not scored (prompt, padding)
# On the checkpoint's feature path the ViT's final norm and CLIP head are unused (model/vision.py): they never get a
# gradient, so every stage keeps them frozen and the policy test can demand "requires_grad == gets a gradient".
UNUSED = ("vision.norm.", "vision.head.")


# ---- freeze policy ---------------------------------------------------------------------------------------------------
def trainable(name: str, spec: StageSpec) -> bool:
    if spec.objective == "words":  # ViT pretraining: the whole ViT, its norm and CLIP head included, nothing else
        return name.startswith("vision.")
    if name.startswith(UNUSED):
        return False
    if name.startswith("vision."):
        return spec.train_vision
    if name.startswith("xattn."):
        return spec.train_xattn
    if name == "decoder.embed_tokens.weight":
        return spec.train_embeddings or spec.train_llm
    if name.startswith("decoder."):
        return spec.train_llm
    raise AssertionError(f"parameter {name} belongs to no component")


def apply_freeze_policy(model: InfiMMHD, spec: StageSpec) -> list[str]:
    """Set requires_grad per the stage; returns the names of the trained parameters."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name, spec))
        if p.requires_grad:
            names.append(name)
    return names


# ---- ViT position embedding ------------------------------------------------------------------------------------------
def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, Dv) -> (1, 1 + grid*grid, Dv): the patch part resized bicubically as a g x g image, CLS kept
    (the official EVA helper's rule; the paper's CPT stage goes 224 -> 448)."""
    _, n, d = pos_embed.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f"position embedding of {n} tokens is not CLS + a square grid")
    if g == grid:
        return pos_embed.clone()
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, g, g, d).permute(0, 3, 1, 2).float()  # (1, Dv, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat((cls, patches), dim=1)


def resize_vision(model: InfiMMHD, image_size: int) -> InfiMMHD:
    """A copy of `model` whose ViT takes image_size x image_size views (position embedding interpolated); the same
    object when the size already matches."""
    cfg = model.config
    if cfg.vision.image_size == image_size:
        return model
    if image_size % cfg.vision.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {cfg.vision.patch_size}")
    new_cfg = cfg.replace(vision=VisionConfig(**{**cfg.vision.__dict__, "image_size": image_size}))
    state = model.state_dict()
    state["vision.pos_embed"] = interpolate_pos_embed(state["vision.pos_embed"], image_size // cfg.vision.patch_size)
    resized = InfiMMHD(new_cfg).to(state["vision.pos_embed"].dtype)
    resized.load_state_dict(state, strict=True)
    return resized


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """(1, 1 + grid*grid, dim) 2-D sin-cos table, [table(col) | table(row)] per patch, zeros for CLS. A ViT trained
    from scratch on this machine learned where text is only from this start."""
    table = sinusoid_table(grid, dim // 2)  # (grid, dim/2)
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    patches = torch.cat((table[c.flatten()], table[r.flatten()]), dim=-1)  # (grid*grid, dim)
    return torch.cat((torch.zeros(1, dim), patches))[None]


# ---- init for training from scratch ---------------------------------------------------------------------------------
def demo_config(image_size: int = 112) -> InfiMMHDConfig:
    """The demo reader: the tiny preset's decoder and tokenizer, a wider 4-layer ViT, a gated cross-attention block
    before every second decoder layer; 1024 positions so the CLI's default max_seq_len fits."""
    tiny = InfiMMHDConfig.preset("tiny")
    vision = VisionConfig(image_size=image_size, width=96, layers=4, head_width=16, mlp_ratio=2.6875, embed_dim=32)
    return tiny.replace(vision=vision, xattn=tiny.xattn.__class__(every_n_layers=2, heads=4, dim_head=16))


def init_model(cfg: InfiMMHDConfig, seed: int, gate: float = 0.5) -> InfiMMHD:
    """PyTorch default init, the ViT position embedding from a 2-D sin-cos grid and the tanh gates at `gate`.

    The official init has zero gates; a randomly initialised ViT then gets no gradient until the gates move, which
    at this size never happened in useful time on this machine, so the demo starts them at 0.5."""
    torch.manual_seed(seed)
    model = InfiMMHD(cfg)
    with torch.no_grad():
        model.vision.pos_embed.copy_(sincos_pos_embed(cfg.vision.grid, cfg.vision.width))
        for block in model.xattn.values():
            block.attn_gate.fill_(gate)
            block.ff_gate.fill_(gate)
    return model


# ---- gradient checkpointing ------------------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: InfiMMHD) -> None:
    """Recompute each ViT block and decoder layer in the backward pass instead of storing its activations (DRA).
    Only `forward` of the block instances is wrapped: parameter names, and so checkpoints, are unchanged."""
    for block in [*model.vision.blocks, *model.decoder.layers, *model.xattn.values()]:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward

        def wrapped(*args, _inner=inner, **kw):
            if not torch.is_grad_enabled():
                return _inner(*args, **kw)
            return checkpoint(_inner, *args, use_reentrant=False, **kw)

        block.forward = wrapped
        block._checkpointed = True


# ---- examples and loss ----------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One training row: token ids with answer-only labels, and the page's uint8 views."""

    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token ids on the answer and its end-of-chunk
    views: torch.Tensor  # (V, 3, S, S) uint8; V = 0 for the text objective (no page decoded)
    rows: int
    cols: int
    answer: str = ""  # the answer text (the words objective scores the page against its words)


def encode_example(processor, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Prompt in the serving prompt form (so the engine asks exactly what training taught) + answer + <|endofchunk|>.
    Only the answer and the end-of-chunk are scored."""
    from model.processor import ChatMessage
    from model.windows import PageViews

    placeholder = PageViews(views=torch.zeros(1, 3, 1, 1, dtype=torch.uint8), rows=1, cols=1, width=1, height=1)
    text, spans = processor._render([ChatMessage("user", [placeholder, prompt])])
    prompt_ids = processor.encode_prompt(text, spans)
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [processor.config.eoc_token_id]
    if len(answer_ids) >= max_len:
        raise ValueError(f"answer of {len(answer_ids)} tokens does not fit max_text_len={max_len}")
    keep = max_len - len(answer_ids)
    if len(prompt_ids) > keep:  # keep BOS and the end (the <image> and the question are near the end)
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - keep + 1 :]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def media_batch(model: InfiMMHD, examples: list[Example], vision_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every view of the batch through the ViT at once -> media (B, M, Dv) padded, key_time (B, M) (1 = real)."""
    device = model.vision.pos_embed.device
    views = torch.cat([e.views for e in examples]).to(device)  # (sum V, 3, S, S)
    with torch.set_grad_enabled(vision_grad and torch.is_grad_enabled()):
        feats = model.encode_views(normalize_views(views, model.vision.pos_embed.dtype))  # (sum V, N, Dv)
    items, start = [], 0
    for e in examples:
        v = e.views.shape[0]
        items.append(model.build_media(feats[start : start + v], e.rows, e.cols))  # (V*N, Dv)
        start += v
    M = max(x.shape[0] for x in items)
    media = feats.new_zeros(len(items), M, feats.shape[-1])
    key_time = torch.zeros(len(items), M, dtype=torch.long, device=device)
    for i, x in enumerate(items):
        media[i, : x.shape[0]] = x
        key_time[i, : x.shape[0]] = 1
    return media, key_time


def batch_loss(model: InfiMMHD, examples: list[Example], vision_grad: bool) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the answer tokens of the batch -> (loss, answer tokens scored)."""
    device = model.vision.pos_embed.device
    media, key_time = media_batch(model, examples, vision_grad)
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), model.config.text.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):  # right padding: positions are arange, as the official training
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    media_kv = model.project_media(media, key_time)
    ctx, xin = model.prefill_inputs(ids, mask, media_kv)
    logits = model.decoder.lm_head(model.decode_layers(ids, ctx, xin)).float()  # (B, T, vocab)
    target = labels[:, 1:]  # token t+1 is predicted at t
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    return loss, n


def text_loss(model: InfiMMHD, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """Language-model pretraining: next-token cross-entropy over every token of prompt + answer, without the page
    (no cross-attention) -> (loss, tokens scored)."""
    device = model.decoder.embed_tokens.weight.device
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), model.config.text.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    ids, mask = ids.to(device), mask.to(device)
    ctx, _ = model.prefill_inputs(ids, mask, None)
    logits = model.decoder.lm_head(model.decode_layers(ids, ctx, None)).float()
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    return loss, n


def corpus_words(answers) -> list[str]:
    """The word list of the words objective: every whitespace-separated word of the answers, sorted."""
    return sorted({w for a in answers for w in a.split()})


class WordHead(torch.nn.Module):
    """The ViT pretraining's text side: one learned embedding per word of the corpus (CLIP's text tower for one-word
    texts) and CLIP's learned temperature. Not part of the checkpoint: only the ViT it trains is kept."""

    def __init__(self, words: list[str], dim: int):
        super().__init__()
        self.index = {w: i for i, w in enumerate(words)}
        self.table = torch.nn.Parameter(torch.randn(len(words), dim) * 0.02)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def targets(self, examples: list[Example]) -> torch.Tensor:
        """(B, W): each page's words, uniform; a page with no known word gets an all-zero row (not scored)."""
        t = torch.zeros(len(examples), len(self.index))
        for i, e in enumerate(examples):
            known = [self.index[w] for w in e.answer.split() if w in self.index]
            for j in known:
                t[i, j] += 1.0 / len(known)
        return t


def page_embedding(model: InfiMMHD, examples: list[Example]) -> torch.Tensor:
    """(B, embed_dim) unit vectors: the mean of every feature token of each page's views, through the ViT's final norm
    and CLIP head. A mean is what a cross-attention query that attends evenly reads."""
    device = model.vision.pos_embed.device
    views = torch.cat([e.views for e in examples]).to(device)
    feats = model.encode_views(normalize_views(views, model.vision.pos_embed.dtype))  # (sum V, N, Dv)
    pooled, start = [], 0
    for e in examples:
        v = e.views.shape[0]
        pooled.append(feats[start : start + v].mean(dim=(0, 1)))
        start += v
    vit = model.vision
    return F.normalize(vit.head(vit.norm(torch.stack(pooled))).float(), dim=-1)


def word_logits(model: InfiMMHD, head: WordHead, examples: list[Example]) -> torch.Tensor:
    """(B, W) page-to-word similarities scaled by the learned temperature (capped at 100, as CLIP)."""
    table = F.normalize(head.table, dim=-1)
    return page_embedding(model, examples) @ table.T * head.logit_scale.exp().clamp(max=100.0)


def words_loss(model: InfiMMHD, head: WordHead, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """ViT pretraining: cross-entropy of each page's embedding against the words printed on it -> (loss, pages)."""
    target = head.targets(examples).to(head.table.device)
    scored = target.sum(-1) > 0
    logp = F.log_softmax(word_logits(model, head, examples), dim=-1)
    loss = -(target * logp).sum(-1)[scored].sum() / scored.sum().clamp(min=1)
    return loss, int(scored.sum())


@torch.inference_mode()
def greedy_answer(model: InfiMMHD, processor, example: Example, max_new_tokens: int = 16) -> str:
    """The training loop's own greedy answer for one example (prompt = its ids before the first scored label)."""
    n_prompt = next(i for i, y in enumerate(example.labels) if y != IGNORE)
    media, _ = media_batch(model, [example], vision_grad=False)
    ids = torch.tensor([example.input_ids[:n_prompt]], device=media.device)
    out = model.generate(
        ids, media=media[:, None], max_new_tokens=max_new_tokens, stop_token_ids=processor.stop_token_ids
    )
    return processor.decode(out[0].tolist())


# ---- official-layout checkpoint -------------------------------------------------------------------------------------
def save_checkpoint(model: InfiMMHD, folder: str | Path, tokenizer_src: str | Path, extra: dict | None = None) -> Path:
    """config.json + model.safetensors (official keys, float32) + tokenizer/, loadable by `load_pretrained` strictly
    and so by the engine, the batch job and the service unchanged. `extra` lands in training.json."""
    from model.tokenizer import tokenizer_dir
    from model.weights import TOKENIZER_FILES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in official_state_dict(model).items()}
    save_sharded(state, folder, 2 << 30, None)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2))
    src = tokenizer_dir(tokenizer_src)
    (folder / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists() and src.resolve() != (folder / "tokenizer").resolve():
            (folder / "tokenizer" / name).write_bytes((src / name).read_bytes())
    if extra is not None:
        (folder / "training.json").write_text(json.dumps(extra, indent=2))
    return folder
