"""Generation engine: batched window encoding, media cache, continuous batching over static slot caches, streaming.

Legend: S decode slots, n active slot prefix, T tokens, M media tokens, Dv visual width.

One engine serves both front ends:
* `Engine.generate(requests)`: synchronous, for Ray Data actors (runs the loop in the calling thread);
* `Engine.stream(request)`: async iterator of text deltas, for Ray Serve (a background thread runs the loop).

Each loop step: admit waiting requests into free slots -> encode the pages they need (views of all of them through the
ViT together, in chunks of `vit_batch_views`; pages already in the feature cache (by `PageViews.cache_key`) are skipped)
-> prefill them in one batch (prompt KV written to their slots, the last image's cross-attention K/V stored in the
slot's media buffer) -> one decode step for every active slot -> sample, detokenize, stop, free finished slots.
With `interleave_vit` (default) the ViT runs first, on at most `vit_step_views` views of the pages the next requests
need, and only requests whose pages are all encoded are admitted: running slots decode between ViT chunks.
With late copy (CUDA default) greedy ids stay on the device and reach the host one step later (see `_decode`).

Slot rows are independent: positions are per slot, masks are per row, so a request's output does not depend on what
else shares the batch (tests/test_engine.py checks this against `InfiMMHD.generate` and the golden ids).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import KVCache, MediaKV
from .infimm import InfiMMHD
from .memory import size_engine
from .processor import ChatMessage, Processor, PromptFormat
from .quantize import quantize_model
from .sampling import (
    BatchSampler,
    IncrementalDetokenizer,
    SamplingParams,
    SequenceState,
    TokenLogprob,
    byte_token_ids,
)
from .text import Kernels, SelfAttnContext
from .windows import PageViews, WindowConfig, normalize_views
from .xattn import CrossAttnInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # sequences decoded together
    max_seq_len: int = 1024  # prompt + new tokens per slot
    max_views: int | None = None  # views of the image a slot keeps for decoding; None: the processor's max_windows + 1
    vit_batch_views: int = 32  # views per ViT forward (bounds activation memory)
    max_prefill_batch: int = 16  # requests admitted and prefilled together (bounds transient media K/V memory)
    feature_cache_mb: int = 1024  # LRU of encoded pages by `PageViews.cache_key`
    cuda_graphs: bool = True  # capture decode steps on CUDA (ignored on CPU)
    kv_bucket: int = 32  # decode attends to a multiple of this many columns (finer: less read; coarser: fewer graphs)
    # Hot-path switches. Each gives the same tokens on or off (tests/test_engine.py); benchmarks/gpu.py measures each.
    interleave_vit: bool = True  # encode at most `vit_step_views` views per step, decoding the running slots between
    vit_step_views: int = 64  # (whole pages, at least one) so decode never waits for the ViT of a whole admission
    dense_attention: bool = True  # no mask where every query may attend every key (lets SDPA use flash kernels)
    media_align: int = 128  # media buffers, and media lengths decoded with a mask, padded to a multiple of this
    precompute: bool = True  # RoPE cos/sin cast once per step, gate tanh once per engine (not in every layer)
    fused_norm: bool = True  # RMSNorm through F.rms_norm (1 reduction kernel instead of 5 element-wise ones)
    compile: bool = False  # torch.compile RMSNorm and SwiGLU (compile time dominates on the CPU)
    vocab_pad: int = 64  # output GEMM over the vocabulary padded to a multiple of this (logits sliced back); 0: off
    late_copy: bool | None = None  # sampled ids copied to the host one step late (None: on CUDA only); see _decode
    # Memory (model/quantize.py, model/memory.py): weights quantized while loading; with gpu_memory_utilization the
    # engine sizes max_slots, vit_batch_views and max_prefill_batch (then upper bounds) to that fraction of the card.
    quantize: str = "none"  # none | int8 | int4 | fp8
    gpu_memory_utilization: float | None = None
    gpu_memory_bytes: int | None = None  # the card's size to plan for (default: the CUDA device's total)


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


@dataclass
class _Seq:
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
    late_ok: bool | None = None  # may be sampled on the device (Engine._late_ok), decided once
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


@dataclass
class _Pending:
    """Device-sampled ids of one decode step on their way to the host: `host` (S,) is filled when `event` fires."""

    seqs: list[_Seq]
    host: torch.Tensor
    event: torch.cuda.Event | None


class FeatureCache:
    """Encoded pages (ViT features with the window encoding added) by `PageViews.cache_key`, LRU, bounded in bytes.

    Looking (`key in cache`, `get`) counts nothing: the engine counts `hits` and `misses` once per image of an admitted
    request (a miss: the page went through the ViT for that request; a hit: its features were there already, in this
    cache or encoded for another request of the same step). `evictions`: pages dropped to stay within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is not None:
            self.items.move_to_end(key)  # most recently used
        return t

    def counts(self) -> tuple[int, int, int]:
        return self.hits, self.misses, self.evictions

    def put(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if key in self.items or size > self.max_bytes:
            return
        self.items[key] = t
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1


class Engine:
    def __init__(
        self,
        model: InfiMMHD,
        processor: Processor,
        config: EngineConfig = EngineConfig(),
        observer: EngineObserver | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.observer = observer or EngineObserver()
        mc = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if config.max_views is None:
            config = dataclasses.replace(config, max_views=processor.windows.max_windows + 1)
            self.config = config
        quantize_model(model, config.quantize)  # no-op when loaded so (from_pretrained); refuses a mismatch
        config, self.memory_plan = size_engine(model, config, self.device)  # may refuse: nothing fits
        self.config = config
        self.max_media_tokens = config.max_views * mc.vision.tokens
        align = max(1, config.media_align)
        capacity = -(-self.max_media_tokens // align) * align  # buffer columns: a kernel-friendly multiple
        if config.max_seq_len > mc.text.max_positions:
            raise ValueError(f"max_seq_len={config.max_seq_len} is over the model's {mc.text.max_positions} positions")
        S = config.max_slots
        self.kv = KVCache(
            mc.text.layers,
            S,
            config.max_seq_len,
            mc.text.kv_heads,
            mc.text.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.media = MediaKV.empty(
            len(mc.xattn_layers),
            S,
            capacity,
            mc.xattn.heads,
            mc.xattn.dim_head,
            dtype=self.dtype,
            device=self.device,
        )
        self.media_len = [0] * S
        self.slot_text_time = torch.zeros(S, dtype=torch.long, device=self.device)  # 1 if the slot has an image
        self.slot_ids = torch.arange(S, device=self.device)
        self.slots: list[_Seq | None] = [None] * S
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.features = FeatureCache(config.feature_cache_mb * 2**20)
        self._features_reported = self.features.counts()  # what the observer has been told (it gets differences)
        self.default_stop = tuple(processor.stop_token_ids)
        self.byte_ids = byte_token_ids(processor.tokenizer)
        self.sampler = BatchSampler(S, mc.text.vocab_size, self.device, processor.tokenizer, self.default_stop)
        self._lock = threading.Lock()  # guards `waiting` and abort flags between callers and the loop thread
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._running = False
        self._graphs = DecodeGraphs(S, self.device) if (config.cuda_graphs and self.device.type == "cuda") else None
        self.graph_fallback: str | None = None  # why decode went eager after asking for CUDA graphs
        self.graph_oom_steps = 0  # steps run eagerly because a graph of that size did not fit
        self.steps = 0
        self._staged: dict[str, list] = {}  # interleaved ViT: key -> [features (M, Dv), encode seconds, charged]
        self._kernels = Kernels.make(fused_norm=config.fused_norm, compile=config.compile)
        self._gates = None
        with torch.no_grad():
            if config.precompute:
                self._gates = [(b.attn_gate.tanh(), b.ff_gate.tanh()) for b in model.xattn.values()]  # (D,) each
            w = model.decoder.lm_head.weight  # (vocab, D)
            pad = (-w.shape[0]) % config.vocab_pad if config.vocab_pad else 0
            self._lm_weight = torch.cat((w, w.new_zeros(pad, w.shape[1]))) if pad else w  # (vocab + pad, D)
        self.vocab = w.shape[0]
        late = config.late_copy if config.late_copy is not None else self.device.type == "cuda"
        self._late = late
        self._pending: _Pending | None = None
        if late:  # two host buffers: one being filled by the device while the host reads the other
            pin = self.device.type == "cuda"
            self._host_ids = [torch.zeros(S, dtype=torch.long, pin_memory=pin) for _ in range(2)]
            self._dev_ids = torch.zeros(S, dtype=torch.long, device=self.device)  # last sampled id per slot
            self._flip = 0
        log.info(
            "engine: %d slots x %d tokens, KV %.2f GB, media %.2f GB, %s %s",
            S,
            config.max_seq_len,
            self.kv.nbytes() / 1e9,
            self.media.nbytes() / 1e9,
            self.device,
            self.dtype,
        )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        config: EngineConfig = EngineConfig(),
        windows: WindowConfig = WindowConfig(),
        prompt_format: str | PromptFormat = "vicuna",
        observer: EngineObserver | None = None,
    ) -> Engine:
        from .weights import load_pretrained

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        model = load_pretrained(checkpoint, dtype=dtype, device=device, quantize=config.quantize)
        processor = Processor.from_pretrained(checkpoint, windows=windows, prompt=prompt_format)
        return cls(model, processor, config, observer)

    # ---- requests ---------------------------------------------------------------------------------------------------
    def make_request(
        self,
        question: str,
        images: list = (),
        sampling: SamplingParams = SamplingParams(),
        request_id: str | None = None,
    ) -> Request:
        """Question + page images (bytes, PIL images or PageViews) -> Request with the configured prompt form."""
        return self.make_chat_request([ChatMessage("user", list(images) + [question])], sampling, request_id)

    def make_chat_request(
        self, messages: list[ChatMessage], sampling: SamplingParams = SamplingParams(), request_id: str | None = None
    ) -> Request:
        inputs = self.processor.chat(messages)
        req = Request(prompt_ids=inputs.input_ids[0].tolist(), images=inputs.images, sampling=sampling)
        if request_id:
            req.request_id = request_id
        return req

    def fork(self, request: Request, n: int) -> list[Request]:
        """`n` choices of one request (OpenAI's `n`): copies sharing its images, so a page is encoded once (in one
        encode batch, or from the feature cache when they are admitted in different steps). Ids are `{id}-{i}`; when
        sampling, choice i gets seed `seed + i` (choice 0 is the n=1 answer) or, without a seed, its own random seed."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        s = request.sampling
        out = []
        for i in range(n):
            seed = s.seed + i if (s.seed is not None and not s.greedy) else s.seed
            out.append(
                dataclasses.replace(
                    request,
                    images=list(request.images),
                    sampling=dataclasses.replace(s, seed=seed),
                    request_id=f"{request.request_id}-{i}",
                )
            )
        return out

    def validate(self, request: Request) -> None:
        """Raise ValueError for a request this engine can never run (checked before queueing)."""
        L, new = len(request.prompt_ids), request.sampling.max_new_tokens
        if L == 0:
            raise ValueError("empty prompt")
        if L + new > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {L} tokens + max_new_tokens {new} is over the {self.config.max_seq_len}-token "
                "context of this engine; shorten the prompt or lower max_tokens"
            )
        vocab = self.model.config.text.vocab_size
        for token, _ in request.sampling.logit_bias:
            if token >= vocab:
                raise ValueError(f"logit_bias token id {token} is outside this model's vocabulary of {vocab}")
        if request.sampling.json_schema is not None:
            self.sampler.grammar_tokenizer()  # raises ValueError if llguidance cannot read this tokenizer
        n_img = sum(1 for t in request.prompt_ids if t == self.model.config.image_token_id)
        if n_img != len(request.images):
            raise ValueError(f"prompt has {n_img} <image> tokens but {len(request.images)} images were given")
        for page in request.images:
            tokens = (
                page.features.shape[0]
                if isinstance(page, EncodedImage)
                else page.n_views * self.model.config.vision.tokens
            )
            if tokens > self.max_media_tokens:
                raise ValueError(
                    f"image has {tokens} visual tokens, over this engine's {self.max_media_tokens} "
                    f"({self.config.max_views} views); lower max_windows"
                )

    def _new_seq(self, request: Request, sink) -> _Seq:
        self.validate(request)
        s = request.sampling
        stop_ids = frozenset(self.default_stop if s.stop_token_ids is None else s.stop_token_ids)
        return _Seq(
            request=request,
            sink=sink,
            detok=IncrementalDetokenizer(self.processor.tokenizer, tuple(s.stop), self.byte_ids),
            stop_ids=stop_ids,
            state=self.sampler.new_state(s),
        )

    # ---- synchronous API --------------------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Result]:
        """Run requests to completion; results in input order. Invalid requests raise ValueError before any work."""
        results: dict[str, Result] = {}
        done = threading.Event()

        def sink(delta: Delta) -> None:
            if delta.result is not None:
                results[delta.request_id] = delta.result
                if len(results) == len(requests):
                    done.set()

        seqs = [self._new_seq(r, sink) for r in requests]
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique within a call")
        with self._lock:
            self.waiting.extend(seqs)
            self._wake.notify()
        if not requests:
            return []
        if self._running:
            done.wait()
        else:
            try:
                while not done.is_set():
                    self.step()
            except Exception:  # leave the engine usable: finish (as "error") everything this call left in flight
                self._fail_all("error")
                raise
        return [results[r.request_id] for r in requests]

    # ---- async API --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (needed by `stream`)."""
        if self._running:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="infimm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._running = False
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self.waiting and not any(self.slots):
                    self._wake.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception:  # never let one bad step kill the replica: fail the requests in flight
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all("error")

    async def stream(self, request: Request) -> AsyncIterator[Delta]:
        """Yield deltas as tokens are generated; the last one carries the Result. Cancelling aborts the request."""
        if not self._running:
            self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        seq = self._new_seq(request, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
        with self._lock:
            self.waiting.append(seq)
            self._wake.notify()
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.result is not None:
                    return
        finally:
            if seq.finish_reason is None:
                self.abort(request.request_id)

    async def complete(self, request: Request) -> Result:
        async for delta in self.stream(request):
            if delta.result is not None:
                return delta.result
        raise RuntimeError("stream ended without a result")

    def abort(self, request_id: str) -> None:
        with self._lock:
            for seq in itertools.chain(self.waiting, (s for s in self.slots if s)):
                if seq.request.request_id == request_id:
                    seq.aborted = True

    @property
    def alive(self) -> bool:
        """True while the background loop runs (liveness probe for servers; `generate` needs no loop)."""
        return self._running and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {
            "waiting": len(self.waiting),
            "active": sum(1 for s in self.slots if s),
            "slots": self.config.max_slots,
            "feature_cache_items": len(self.features.items),
            "feature_cache_hits": self.features.hits,
            "feature_cache_misses": self.features.misses,
            "feature_cache_evictions": self.features.evictions,
            "feature_cache_bytes": self.features.bytes,
            "steps": self.steps,
        }

    def graph_report(self) -> dict:
        """What really ran, not what was asked for: `used` is False when graphs were refused, fell back or never ran."""
        g = self._graphs
        return {
            "requested": self.config.cuda_graphs,
            "used": g is not None and g.replays > 0 and self.graph_fallback is None,
            "captures": len(g.graphs) if g else 0,
            "capture_s": g.capture_s if g else 0.0,
            "replays": g.replays if g else 0,
            "fallback": self.graph_fallback,
            "oom_eager_steps": self.graph_oom_steps,
        }

    def close(self) -> None:
        """Stop the loop and drop every device buffer now (caches, graphs), even if something still holds the engine."""
        self.shutdown()
        self._fail_all("abort")
        self._graphs = None
        self.kv = self.media = None
        self._lm_weight = self._gates = self._dev_ids = None
        self.features = FeatureCache(0)
        self._features_reported = self.features.counts()
        self._staged.clear()

    # ---- the loop ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        if self.kv is None:
            raise RuntimeError("engine is closed")
        self.steps += 1
        self._drop_aborted()
        if self.config.interleave_vit:
            self._encode_ahead()
        admitted = self._admit()
        if admitted:
            self._encode(admitted)
            self._prefill(admitted)
        if any(self.slots):
            self._decode()
        self.observer.on_queue(len(self.waiting), sum(1 for s in self.slots if s))
        self._report_feature_cache()

    def _report_feature_cache(self) -> None:
        now, before = self.features.counts(), self._features_reported
        if now != before:
            self._features_reported = now
            hits, misses, evictions = (a - b for a, b in zip(now, before, strict=True))
            self.observer.on_feature_cache(hits, misses, evictions, self.features.bytes)

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted = [s for s in self.waiting if s.aborted]
            for s in aborted:
                self.waiting.remove(s)
        for s in aborted:
            self._finish(s, "abort")
        for s in list(self.slots):
            if s is not None and s.aborted:
                self._finish(s, "abort")

    def _ready(self, seq: _Seq) -> bool:
        """Every page of the request is encoded (staged, cached or given as features)."""
        return all(k is None or k in self._staged or k in self.features for k in seq.page_keys())

    def _admit(self) -> list[_Seq]:
        free = [i for i, s in enumerate(self.slots) if s is None]
        admitted = []
        with self._lock:
            while free and self.waiting and len(admitted) < self.config.max_prefill_batch:
                if self.config.interleave_vit and not self._ready(self.waiting[0]):
                    break  # first in, first out: wait for the head's pages (being encoded a chunk per step)
                seq = self.waiting.popleft()
                seq.slot = free.pop(0)  # lowest free slot first: keeps the active prefix short
                self.slots[seq.slot] = seq
                admitted.append(seq)
        now = time.perf_counter()
        for seq in admitted:
            seq.timings.queue_s = now - seq.request.arrival
        return admitted

    def _encode_ahead(self) -> None:
        """Interleaved ViT: encode up to `vit_step_views` views (whole pages, at least one) of the pages that the next
        requests to get a free slot need; the running slots decode after this chunk instead of after all of them."""
        free = sum(1 for s in self.slots if s is None)
        with self._lock:
            upcoming = list(itertools.islice(self.waiting, min(free, self.config.max_prefill_batch)))
        todo: dict[str, PageViews] = {}
        views = 0
        for seq in upcoming:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None or key in todo or key in self._staged or key in self.features:
                    continue
                if todo and views + page.n_views > self.config.vit_step_views:
                    break
                todo[key] = page
                views += page.n_views
        if todo:
            encoded, seconds = self._run_vit(todo)
            for key, feats in encoded.items():
                self._staged[key] = [feats, seconds, False]

    def _run_vit(self, todo: dict[str, PageViews]) -> tuple[dict[str, torch.Tensor], float]:
        """ViT over the views of these pages, all pages together in chunks of `vit_batch_views` -> media per page."""
        t0 = time.perf_counter()
        encoded: dict[str, torch.Tensor] = {}
        pages = iter(todo.items())
        views = torch.cat([p.views for p in todo.values()])  # (sum V, 3, 448, 448) uint8, still on the host
        key, page = next(pages)
        parts: list[torch.Tensor] = []
        for chunk in views.split(self.config.vit_batch_views):
            x = normalize_views(chunk.to(self.device, non_blocking=True), self.dtype)
            feats = self.model.encode_views(x)  # (v, N, Dv)
            while feats.shape[0]:  # hand the chunk's views to their pages; a page may span chunks
                take = page.n_views - sum(t.shape[0] for t in parts)
                parts.append(feats[:take])
                feats = feats[take:]
                if sum(t.shape[0] for t in parts) == page.n_views:  # page complete: its media, then free views
                    encoded[key] = self.model.build_media(torch.cat(parts), page.rows, page.cols)  # (V*N, Dv)
                    self.features.put(key, encoded[key])
                    parts = []
                    key, page = next(pages, (None, None))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.observer.on_encode(views.shape[0], seconds)
        return encoded, seconds

    def _encode(self, seqs: list[_Seq]) -> None:
        """Media of these admitted requests: staged (interleaved ViT), cached, or encoded now, all pages together."""
        todo: dict[str, PageViews] = {}
        cached: dict[str, torch.Tensor] = {}  # held here: encoding `todo` may evict them from the cache
        for seq in seqs:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None or key in self._staged or key in todo or key in cached:
                    continue
                feats = self.features.get(key)
                if feats is None:
                    todo[key] = page
                else:
                    cached[key] = feats
        encoded, seconds = self._run_vit(todo) if todo else ({}, 0.0)
        charged: set[str] = set()
        for seq in seqs:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None:
                    seq.media.append(page.features.to(self.device, self.dtype))
                    continue
                staged = self._staged.get(key)
                if staged is not None and not staged[2]:  # encoded a step or more ago for this request
                    staged[2] = True
                    seq.timings.encode_s = staged[1]
                    self.features.misses += 1
                elif key in encoded and key not in charged:  # the first request asking for a page pays its encode
                    charged.add(key)
                    seq.timings.encode_s = seconds
                    self.features.misses += 1
                else:  # shared: encoded for another request, or a feature-cache hit
                    seq.cached_images += 1
                    self.features.hits += 1
                if staged is not None:
                    seq.media.append(staged[0])
                else:
                    seq.media.append(encoded[key] if key in encoded else cached[key])
        if self._staged:  # keep staged pages only while a waiting request still needs them
            with self._lock:
                needed = {k for s in self.waiting for k in s.page_keys()}
            for key in [k for k in self._staged if k not in needed]:
                del self._staged[key]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, D) -> float32 logits (B, vocab); the GEMM runs over the padded vocabulary, sliced back."""
        return F.linear(h, self._lm_weight)[:, : self.vocab].float()

    def _prefill(self, seqs: list[_Seq]) -> None:
        t0 = time.perf_counter()
        model, dev, cfg = self.model, self.device, self.config
        B = len(seqs)
        ids, mask = self.processor.pad([s.request.prompt_ids for s in seqs], side="right")
        ids, mask = ids.to(dev), mask.to(dev)
        lengths = [len(s.request.prompt_ids) for s in seqs]
        T = ids.shape[1]
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        # media of each row: its images' tokens one after another, item i marked i+1; padding marked 0
        media_kv = None
        if any(s.media for s in seqs):
            M = max(sum(m.shape[0] for m in s.media) for s in seqs)
            flat = torch.zeros(B, M, model.config.vis_dim, dtype=self.dtype, device=dev)
            key_time = torch.zeros(B, M, dtype=torch.long, device=dev)
            for row, s in enumerate(seqs):
                offset = 0
                for item, m in enumerate(s.media, start=1):
                    flat[row, offset : offset + m.shape[0]] = m
                    key_time[row, offset : offset + m.shape[0]] = item
                    offset += m.shape[0]
            media_kv = model.project_media(flat, key_time=key_time)
        ctx, xin = model.prefill_inputs(
            ids, mask, media_kv, dense=cfg.dense_attention, rope_dtype=self.dtype if cfg.precompute else None
        )
        if xin is not None:
            xin.gates = self._gates
        ctx.kernels = self._kernels
        lengths_t = torch.tensor(lengths, device=dev)
        self.kv.valid[slots] = torch.arange(self.kv.max_len, device=dev)[None, :] < lengths_t[:, None]
        ctx.cache, ctx.slots, ctx.cols = self.kv, slots, torch.arange(T, device=dev).expand(B, T)
        h = model.decode_layers(ids, ctx, xin)  # (B, T, D)
        last = h[torch.arange(B, device=dev), lengths_t - 1]  # (B, D)
        logits = self._logits(last)
        for row, s in enumerate(seqs):
            if media_kv is not None and s.media:
                self.media_len[s.slot] = self.media.store_last_image(s.slot, media_kv, row)
                self.slot_text_time[s.slot] = 1
            else:
                self.media_len[s.slot] = 0
                self.media.key_time[s.slot] = 0
                self.slot_text_time[s.slot] = 0
            s.media = []  # features no longer needed by this request
        for s in seqs:
            self.sampler.admit(s.slot, s.state, s.request.prompt_ids)
        tokens = self.sampler.sample(logits, [s.slot for s in seqs], [s.state for s in seqs])
        seconds = time.perf_counter() - t0
        self.observer.on_prefill(B, sum(lengths), seconds)
        now = time.perf_counter()
        for s, tok in zip(seqs, tokens, strict=True):
            s.timings.prefill_s = seconds
            s.first_token_at = now
            s.timings.ttft_s = now - s.request.arrival
            self._emit(s, tok)

    @staticmethod
    def _late_ok(seq: _Seq) -> bool:
        """Greedy with nothing that reads the host's token history: its next id is argmax(logits) on the device.

        Any sampling field not listed here (penalties, logit bias, logprobs, ...) keeps the request on the
        synchronous path, so a new feature is safe by default."""
        if seq.late_ok is None:
            p = seq.request.sampling
            keep = ("max_new_tokens", "min_new_tokens", "stop_token_ids", "stop", "seed")
            seq.late_ok = p.greedy and dataclasses.replace(SamplingParams(), **{k: getattr(p, k) for k in keep}) == p
        return seq.late_ok

    def _decode(self) -> None:
        """One token for every running slot.

        Late copy (`_late`): when every running request is plain greedy, the ids are taken on the device (argmax),
        fed straight into the next step, and copied into pinned host memory without waiting; the host reads them one
        step later, after the next step is queued, so the device never idles while the host detokenizes. A request
        that stopped is then seen one step late: that one extra row is computed and dropped (rows are independent,
        so the tokens are the same).
        """
        t0 = time.perf_counter()
        active = [s for s in self.slots if s is not None and not s.has_last_token]
        if not active:  # only pending last tokens left: read them
            self._resolve_pending()
            return
        n = max(s.slot for s in active) + 1
        n = min(self.config.max_slots, 1 << (n - 1).bit_length()) if self._graphs else n  # few graph sizes
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        on_device = torch.zeros(n, dtype=torch.bool)  # input id is the pending one, still on the device
        for s in active:
            if s.slot < n:
                tokens[s.slot] = s.tokens[-1]
                positions[s.slot] = s.position + s.pending
                on_device[s.slot] = s.pending
        kv_len = min(
            self.config.max_seq_len, -(-(int(positions.max()) + 1) // self.config.kv_bucket) * self.config.kv_bucket
        )
        m, dense = self._media_extent(active, n)
        tokens, positions = self._to_device(tokens), self._to_device(positions)
        if bool(on_device.any()):
            tokens = torch.where(self._to_device(on_device), self._dev_ids[:n], tokens)
        logits = None
        if self._graphs is not None:
            try:
                logits = self._graphs.run(self.decode_forward, (n, kv_len, m, dense), tokens, positions)
            except torch.cuda.OutOfMemoryError:  # this size does not fit right now: one eager step, graphs kept
                log.warning("no memory for a CUDA graph of %d slots x %d keys: this step runs eagerly", n, kv_len)
                self.graph_oom_steps += 1
                torch.cuda.empty_cache()
            except RuntimeError as e:  # capture itself failed (driver, kernel): keep serving, eagerly
                log.exception("CUDA graph capture failed; decoding without CUDA graphs from now on")
                self.graph_fallback = f"{type(e).__name__}: {e}"[:500]
                self._graphs = None
        if logits is None:
            logits = self.decode_forward(n, kv_len, m, dense, tokens, positions)
        if self._late and all(self._late_ok(s) for s in active):
            ids = logits.argmax(-1)  # (n,) on the device
            self._dev_ids[:n].copy_(ids)
            self._flip ^= 1
            host = self._host_ids[self._flip]
            host[:n].copy_(ids, non_blocking=True)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            self._resolve_pending()  # the previous step's ids, while this step runs
            live = [s for s in active if s.finish_reason is None]
            for s in live:
                s.pending = True
            self._pending = _Pending(live, host, event)
        else:
            self._resolve_pending()  # first: the sampler's host state must see the pending ids before this step's
            rows = [s.slot for s in active]
            sampled = self.sampler.sample(logits[rows], rows, [s.state for s in active])
            for s, tok in zip(active, sampled, strict=True):
                if s.finish_reason is None:  # not stopped by its pending token
                    self._emit(s, tok)
        self.observer.on_decode_step(len(active), time.perf_counter() - t0)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device without waiting for the work in flight (pinned, asynchronous) when late copy is on."""
        if self._late and self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _resolve_pending(self) -> None:
        """Emit the ids of the previous late-copy step (waits only for that step's copy, not for the current one)."""
        p, self._pending = self._pending, None
        if p is None:
            return
        if p.event is not None:
            p.event.synchronize()
        for s in p.seqs:
            if s.pending and s.finish_reason is None:
                s.pending = False
                self._emit(s, int(p.host[s.slot]))

    def _media_extent(self, active: list[_Seq], n: int) -> tuple[int, bool]:
        """Media columns to attend in this step and whether no mask is needed (every row with media fills them all)."""
        tokens = self.model.config.vision.tokens
        lengths = [self.media_len[s.slot] for s in active if s.slot < n]  # other rows' outputs are dropped
        m = -(-max(lengths) // tokens) * tokens  # whole views: few graph sizes
        if self.config.dense_attention and all(x in (0, m) for x in lengths):
            return m, True
        align = max(1, self.config.media_align)
        return min(self.media.max_tokens, -(-m // align) * align), False

    def decode_forward(
        self, n: int, kv_len: int, m: int, dense: bool, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One token for slots [0, n): device work only, no host syncs, fixed shapes for given (n, kv_len, m, dense)."""
        model = self.model
        self.kv.valid[self.slot_ids[:n], positions] = True
        cos, sin = model.decoder.rope_at(positions[:, None], self.dtype if self.config.precompute else None)
        ctx = SelfAttnContext(
            cos=cos,
            sin=sin,
            mask=self.kv.valid[:n, None, None, :kv_len],
            fresh=False,
            cache=self.kv,
            slots=self.slot_ids[:n],
            cols=positions[:, None],
            kv_len=kv_len,
            kernels=self._kernels,
        )
        xin = None
        if m > 0:
            text_time = self.slot_text_time[:n, None]
            xin = CrossAttnInputs.build(
                self.media.rows(n, m), text_time, flag=text_time[:, 0] > 0, dense=dense, gates=self._gates
            )
        h = model.decode_layers(tokens[:, None], ctx, xin)
        return self._logits(h[:, -1])  # (n, vocab)

    # ---- per-token bookkeeping ---------------------------------------------------------------------------------------
    def _emit(self, seq: _Seq, token: int) -> None:
        seq.tokens.append(token)
        seq.unsent += 1
        delta = seq.detok.push(token)
        p = seq.request.sampling
        if token in seq.stop_ids and len(seq.tokens) >= p.min_new_tokens:
            reason = "stop"
        elif seq.detok.stopped_at is not None or seq.state.grammar_done:
            reason = "stop"
        elif seq.state.repeating:
            reason = "repetition"
        elif len(seq.tokens) >= p.max_new_tokens:
            reason = "length"
        else:
            reason = None
        if reason is None:
            if delta and seq.sink:
                ids, logprobs = self._unsent(seq)
                seq.sink(Delta(seq.request.request_id, delta, ids, logprobs=logprobs))
            return
        self._finish(seq, reason, pending=delta)

    def _finish(self, seq: _Seq, reason: str, pending: str = "") -> None:
        seq.finish_reason = reason
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        now = time.perf_counter()
        t = seq.timings
        t.total_s = now - seq.request.arrival
        t.decode_s = now - seq.first_token_at if seq.first_token_at else 0.0
        rest = pending + seq.detok.finish()
        result = Result(
            request_id=seq.request.request_id,
            token_ids=list(seq.tokens),
            text=seq.detok.visible,
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.tokens),
            timings=t,
            cached_images=seq.cached_images,
            logprobs=list(seq.state.logprobs) if seq.request.sampling.logprobs else None,
        )
        self.observer.on_finish(result)
        if seq.sink:
            ids, logprobs = self._unsent(seq)
            seq.sink(Delta(seq.request.request_id, rest, ids, result, logprobs))

    @staticmethod
    def _unsent(seq: _Seq) -> tuple[list[int], list[TokenLogprob] | None]:
        """The tokens (and logprobs) not yet in a delta; marks them sent."""
        k, seq.unsent = seq.unsent, 0
        ids = seq.tokens[len(seq.tokens) - k :]
        return ids, (seq.state.logprobs[len(seq.tokens) - k :] if seq.request.sampling.logprobs else None)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            seqs = list(self.waiting) + [s for s in self.slots if s]
            self.waiting.clear()
        self._pending = None
        self._staged.clear()
        for s in seqs:
            self._finish(s, reason)


class DecodeGraphs:
    """CUDA graphs of a decode-step function, one per (n, kv_len, m, dense), captured on first use.

    Inputs are copied into static buffers before each replay; the graph reads the engine's static caches in place.
    Holds no reference to the engine (the step function is passed to `run`), so dropping the engine frees its caches
    at once instead of at the next garbage collection.
    """

    def __init__(self, slots: int, device: torch.device):
        self.device = device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_s = 0.0
        self.replays = 0

    def run(self, forward: Callable, key: tuple, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """forward(*key, tokens, positions) -> logits; key = (n, kv_len, m, dense)."""
        n = key[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        if key not in self.graphs:
            self.graphs[key] = self._capture(forward, key)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, forward: Callable, key: tuple):
        n = key[0]
        t0 = time.perf_counter()

        def fn():
            return forward(*key, self.tokens[:n], self.positions[:n])

        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (same inputs, so the cache writes are idempotent)
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0
        log.info("captured decode graph n=%d kv_len=%d media=%d dense=%s", *key)
        return graph, out
