"""InfiMM-HD's four training stages as presets: what is trained, at which resolution, with which optimizer settings.

Paper §3.2 and Table 8 (the training recipe of InfiMM-HD, arXiv 2403.01487):

| stage | ViT    | x-attn | LLM                         | views                           | LR peak -> min | batch |
|-------|--------|--------|-----------------------------|---------------------------------|----------------|-------|
| 1 PT  | frozen | train  | frozen, input embeddings on | one 224 px view                 | 1e-4 -> 1e-4   | 768   |
| 2 CPT | train  | train  | frozen                      | one 448 px view (PE 224 -> 448) | 1e-5 -> 1e-6   | 256   |
| 3 DRA | train  | train  | frozen                      | 448 windows + thumbnail         | 1e-5 -> 1e-6   | 256   |
| 4 IFT | frozen | train  | trained                     | 448 windows + thumbnail         | 5e-6 -> 5e-7   | 64    |

All stages: AdamW, linear warm-up then cosine decay to the minimum, weight decay 0.1, gradient clipping 1.0; PT uses
betas (0.9, 0.95) eps 1e-8, the others (0.9, 0.999) eps 1e-5 (the likeliest reading of Table 8). Gradient
checkpointing in DRA only. The `full` presets are those numbers; the `tiny` presets keep every policy and the
resolution step (x2 from stage 1 to 2) but halve the sizes (112 -> 224 px) and use step counts, batches and learning
rates that train a ~1 M-parameter model on two CPU cores.

The paper's stage 1 starts from EVA-CLIP (a ViT pretrained contrastively at stage 1's resolution) and Vicuna (a
pretrained language model). A demo that starts from random weights needs both first, so the `tiny` preset has two
pretraining stages that stand in for them, each training one component and leaving the rest untouched:

* `vit` trains the ViT (its norm and CLIP head included) to say which words are on the page: the mean of its feature
  tokens (what a cross-attention query that attends evenly reads), through its own norm and CLIP head, scored against
  a learned embedding per word (CLIP's contrast, with a one-word text tower); position-invariant by construction.
* `lm` trains the decoder on the corpus's prompts and answers as plain text (next token on every token, no page).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    stage: int | str  # 0-4, or "vit" / "lm" for the pretraining stand-ins
    name: str
    train_vision: bool
    train_xattn: bool
    train_llm: bool  # decoder layers, final norm and LM head
    train_embeddings: bool  # input embeddings (PT unfreezes them, as the official pretrain config)
    image_size: int  # the ViT input size of this stage; a checkpoint at another size gets its PE interpolated
    dynamic: bool  # windows + thumbnail (DRA, IFT); False: the whole page as one view
    max_windows: int
    steps: int
    warmup: int
    batch: int  # global batch (split over the workers)
    lr: float
    min_lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float = 0.1
    clip: float = 1.0
    grad_accum: int = 1
    grad_checkpointing: bool = False
    max_text_len: int = 128  # prompt + answer tokens per example (longer ones are cut from the left of the prompt)
    # "answer": next-token loss on the answer given page and prompt (stages 0-4); "words": the ViT pretraining
    # objective; "text": language-model pretraining on prompt + answer without the page (see the table above)
    objective: str = "answer"
    patch_lr_mult: float = 1.0  # learning-rate multiplier of the ViT patch embedding (see VIT_PRE)

    def __post_init__(self):
        if self.objective not in ("answer", "words", "text"):
            raise ValueError(f"objective must be answer, words or text, got {self.objective!r}")

    def replace(self, **changes) -> StageSpec:
        return dataclasses.replace(self, **changes)

    @property
    def policy(self) -> str:
        if self.objective == "words":
            return f"ViT pretraining (which words are on the page); one {self.image_size} px view"
        if self.objective == "text":
            return "language-model pretraining on the corpus text (no page)"
        parts = [
            f"ViT {'trained' if self.train_vision else 'frozen'}",
            f"x-attn {'trained' if self.train_xattn else 'frozen'}",
            "LLM trained"
            if self.train_llm
            else ("LLM frozen (input embeddings trained)" if self.train_embeddings else "LLM frozen"),
        ]
        views = f"{self.image_size} px windows + thumbnail" if self.dynamic else f"one {self.image_size} px view"
        return ", ".join(parts) + f"; {views}"


_PT, _REST = ((0.9, 0.95), 1e-8), ((0.9, 0.999), 1e-5)

FULL = {
    1: StageSpec(1, "PT", False, True, False, True, 224, False, 1, 120_000, 6_000, 768, 1e-4, 1e-4, *_PT, grad_accum=2),
    2: StageSpec(2, "CPT", True, True, False, False, 448, False, 1, 8_000, 400, 256, 1e-5, 1e-6, *_REST),
    3: StageSpec(
        3, "DRA", True, True, False, False, 448, True, 9, 8_000, 400, 256, 1e-5, 1e-6, *_REST, grad_checkpointing=True
    ),
    4: StageSpec(4, "IFT", False, True, True, False, 448, True, 9, 11_000, 550, 64, 5e-6, 5e-7, *_REST, grad_accum=2),
}
FULL[4] = FULL[4].replace(max_text_len=1024)

# Tiny: same policies at 112 px, CPU-sized schedules, higher learning rates than the paper's (3e-3 with warm-up and
# cosine for what starts untrained, 10x less for the pretrained ViT). No resolution step at CPT: a ViT pretrained at
# 112 px did not carry over to 224 px in a CPU-sized CPT (held-out exact match 0.66 after PT at 112 px, 0.09 after 300
# CPT steps at 224 px; ViT pretraining continued at 224 px learned no faster than from scratch: 34 % held-out word
# accuracy after 800 steps, where the 112 px run had 31 % after 800 and 94 % after 1,500, at a quarter of the cost per
# step). So the demo model is a 112 px model: a 224 px page is its thumbnail plus a 2x2 grid of 112 px windows.
TINY = {
    1: StageSpec(1, "PT", False, True, False, True, 112, False, 1, 600, 30, 8, 3e-3, 3e-4, *_PT),
    2: StageSpec(2, "CPT", True, True, False, False, 112, False, 1, 300, 15, 8, 3e-4, 3e-5, *_REST, patch_lr_mult=0.1),
    3: StageSpec(
        3,
        "DRA",
        True,
        True,
        False,
        False,
        112,
        True,
        4,
        300,
        15,
        8,
        3e-4,
        3e-5,
        *_REST,
        grad_checkpointing=True,
        patch_lr_mult=0.1,
    ),
    4: StageSpec(4, "IFT", False, True, True, False, 112, True, 4, 1000, 50, 8, 1e-3, 1e-4, *_REST),
}
# Stand-ins for EVA-CLIP and Vicuna (see the module docstring), run before stage 1 of the tiny preset. The ViT trains at
# stage 1's resolution, as EVA-CLIP did at the paper's stage 1 resolution. Patch-embedding LR x0.1: at full LR it
# learns a large response to the white page that swamps the features (reader diagnosis: rms 1 -> 21).
_VIT_ONLY = dict(train_vision=True, train_xattn=False, train_llm=False, train_embeddings=False)
VIT_PRE = StageSpec(
    "vit",
    "VIT-PRE",
    **_VIT_ONLY,
    image_size=112,
    dynamic=False,
    max_windows=1,
    steps=3000,
    warmup=100,
    batch=32,
    lr=1e-3,
    min_lr=1e-4,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.05,
    objective="words",
    patch_lr_mult=0.1,
)
LM_PRE = StageSpec(
    "lm", "LM-PRE", False, False, True, True, 112, False, 1, 600, 30, 32, 3e-3, 3e-4, *_REST, objective="text"
)
PRETRAIN = {"vit": VIT_PRE, "lm": LM_PRE}
# Tiny from scratch: NOT in the paper, and superseded by the pretraining stand-ins above. Stage 0 JOINT trains ViT +
# cross-attention + LLM together from random weights on 224 px pages (1x1 window grid + thumbnail). Kept to compare
# with: 4,500 steps on this machine stayed near chance (held-out CER 0.86, exact 0.035) as the ViT features blew up and
# the cross-attention collapsed onto one or two image tokens. Stages 1-4 of this preset are the tiny ones.
JOINT = StageSpec(0, "JOINT", True, True, True, False, 224, True, 4, 4500, 150, 8, 3e-3, 1e-4, *_REST)
TINY_FROM_SCRATCH = {0: JOINT, **TINY}
PRESETS = {"full": FULL, "tiny": {**PRETRAIN, **TINY}, "tiny-from-scratch": TINY_FROM_SCRATCH}


def stage_spec(stage: int | str, preset: str = "tiny", **overrides) -> StageSpec:
    """stage: 1-4, 0 (tiny-from-scratch only), "vit" or "lm" (tiny only; the full recipe starts from EVA-CLIP and
    Vicuna); digits as strings are accepted (the CLI's form)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown stage preset {preset!r}; choose one of {sorted(PRESETS)}")
    if isinstance(stage, str) and stage.isdigit():
        stage = int(stage)
    if stage not in PRESETS[preset]:
        zero = " (0 JOINT only in the tiny-from-scratch preset)" if stage == 0 else ""
        pre = " (vit and lm only in the tiny preset: the full recipe starts from EVA-CLIP and Vicuna)"
        raise ValueError(
            f"stage must be 1 (PT), 2 (CPT), 3 (DRA), 4 (IFT), vit or lm{zero}{pre if stage in PRETRAIN else ''}, "
            f"got {stage!r}"
        )
    spec = PRESETS[preset][stage]
    return spec.replace(**{k: v for k, v in overrides.items() if v is not None})
