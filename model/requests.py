"""What goes into the engine and what comes out: requests, results, streamed deltas, timings, the observer hooks,
and `Seq`, the engine's record of one request in flight (shared by the scheduler, the encoder and the runner).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .detokenize import IncrementalDetokenizer
from .sampling import SamplingParams, SequenceState, TokenLogprob
from .windows import PageViews


@dataclass
class EncodedImage:
    """An image already encoded elsewhere: (M, Dv) media tokens with the window encoding added (`build_media`)."""

    features: torch.Tensor


@dataclass
class Request:
    prompt_ids: list[int]
    images: list[PageViews | EncodedImage] = field(default_factory=list)  # in prompt order
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.perf_counter)
    # set by `Engine.validate`: what was checked, so the engine does not check the same request again when it is queued
    validated: tuple | None = field(default=None, init=False, repr=False, compare=False)


@dataclass
class Timings:
    queue_s: float = 0.0  # arrival -> admitted to a slot
    encode_s: float = 0.0  # ViT time of the encode batch that included this request's pages (0 on a cache hit)
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # arrival -> first token
    decode_s: float = 0.0  # first token -> last token
    total_s: float = 0.0


@dataclass
class Result:
    request_id: str
    token_ids: list[int]
    text: str
    # "stop" | "length" | "repetition" (the repetition guard saw a loop) | "abort" (cancelled) | "error" (step failed)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    cached_images: int = 0  # images whose features came from the feature cache
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams.logprobs: one per token of token_ids

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Delta:
    """One streamed piece: new text (possibly empty), the tokens generated since the previous delta (their
    concatenation over a stream is Result.token_ids), their logprobs if asked, and, on the last one, the full result."""

    request_id: str
    text: str
    token_ids: list[int]
    result: Result | None = None
    logprobs: list[TokenLogprob] | None = None


class EngineObserver:
    """Hooks for metrics; the default records nothing. See runtime/metrics.py for the Prometheus one."""

    def on_encode(self, views: int, seconds: float) -> None: ...
    def on_prefill(self, requests: int, tokens: int, seconds: float) -> None: ...
    def on_decode_step(self, batch: int, seconds: float) -> None: ...
    def on_finish(self, result: Result) -> None: ...
    def on_queue(self, waiting: int, active: int) -> None: ...
    def on_feature_cache(self, hits: int, misses: int, evictions: int, cached_bytes: int) -> None: ...


@dataclass(eq=False)  # compared by identity: equal requests (same page, same prompt) are still different sequences
class Seq:
    """One request inside the engine: its sampling and detokenizer state, slot, tokens so far and timings."""

    request: Request
    sink: Callable[[Delta], None] | None
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    state: SequenceState  # sampling state: generator, n-gram table, guard, grammar, logprobs
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    unsent: int = 0  # tokens[-unsent:] are not in a streamed delta yet (their text is held back)
    media: list[torch.Tensor] = field(default_factory=list)  # (M_i, Dv) per image, held while waiting for prefill
    timings: Timings = field(default_factory=Timings)
    first_token_at: float = 0.0
    cached_images: int = 0
    finish_reason: str | None = None
    aborted: bool = False
    pending: bool = False  # a token sampled on the device that the host has not read yet (late copy)
    late_ok: bool | None = None  # may be sampled on the device (see device_greedy), decided once
    keys: list[str | None] | None = None  # see page_keys

    def page_keys(self) -> list[str | None]:
        """Feature-cache key of each image (None: given as features), hashed once per request, not once per step."""
        if self.keys is None:
            self.keys = [None if isinstance(p, EncodedImage) else p.cache_key for p in self.request.images]
        return self.keys

    @property
    def position(self) -> int:  # position (= cache column) of the last token the host knows
        return len(self.request.prompt_ids) + len(self.tokens) - 1

    @property
    def has_last_token(self) -> bool:  # the pending token is the last one this request can get
        return self.pending and len(self.tokens) + 1 >= self.request.sampling.max_new_tokens

    @property
    def device_greedy(self) -> bool:
        """Greedy with nothing that reads the host's token history: its next id is argmax(logits) on the device.

        Any sampling field not listed here (penalties, logit bias, logprobs, ...) keeps the request on the
        synchronous path, so a new feature is safe by default."""
        if self.late_ok is None:
            p = self.request.sampling
            keep = ("max_new_tokens", "min_new_tokens", "stop_token_ids", "stop", "seed")
            self.late_ok = p.greedy and dataclasses.replace(SamplingParams(), **{k: getattr(p, k) for k in keep}) == p
        return self.late_ok
