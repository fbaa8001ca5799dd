"""Sampling parameters, token sampling, stop conditions and incremental detokenization for the engine.

Per-request reproducibility: every sampled request owns a `torch.Generator` seeded from its `seed` and draws exactly one
sample per generated token, so its output does not depend on what else shares the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's defaults (<|endofchunk|>, </s>)
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    min_new_tokens: int = 0  # stop tokens are ignored until this many tokens exist (to force a length)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) float32 logits -> temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits (B, V) float32 -> one token per row (greedy rows batched, sampled rows with their own generator)."""
    tokens = logits.argmax(-1)
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs = filter_logits(logits[row], p).softmax(-1)
            tokens[row] = torch.multinomial(probs, 1, generator=g)[0]
    return tokens.tolist()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the byte-fallback pieces `<0x00>`..`<0xFF>` (Llama's sentencepiece convention); empty if none."""
    names = [f"<0x{b:02X}>" for b in range(256)]
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = getattr(tokenizer, "unk_token_id", None)
    return frozenset(i for i, name in zip(ids, names, strict=True) if i is not None and i != unk)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation equals `decode(all ids)`.

    Decodes a short window [prefix, end) and emits what the newest tokens add to the window [prefix, read): this keeps
    sentencepiece's leading-space rule correct. Byte-fallback tokens (`<0xE4>`...) are held back until a normal token
    follows, because the tokenizer decodes a run of them as one unit (a run that is not valid UTF-8 becomes U+FFFD per
    token, even for bytes that would be valid alone). Stop strings are held back until they can no longer start in the
    pending text, so streamed deltas never contain text that is later cut.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    byte_ids: frozenset[int] = frozenset()  # see byte_token_ids()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (may include a stop string; see `visible`)
    emitted: int = 0  # characters of `text` already handed out as deltas
    prefix: int = 0
    read: int = 0
    stopped_at: int | None = None  # index in `text` where a stop string begins

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (may be empty)."""
        self.ids.append(token_id)
        if token_id in self.byte_ids:
            return ""  # the byte run is decided when it ends
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        self._find_stop()
        return self._take(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation: bytes that never completed a character (they decode to
        U+FFFD, as in a full decode) and the tail held back for stop strings."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before):
            self.text += after[len(before) :]
            self.prefix = self.read = len(self.ids)
            self._find_stop()
        return self._take(final=True)

    def _find_stop(self) -> None:
        if self.stop and self.stopped_at is None:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)

    @property
    def visible(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]

    def _take(self, final: bool) -> str:
        end = len(self.visible)
        if not final and self.stop and self.stopped_at is None:
            end = max(self.emitted, end - (max(len(s) for s in self.stop) - 1))  # a stop string may still start here
        delta = self.visible[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta
