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

The parts, one file each: `scheduler.py` (queue, slots, admission), `encoder.py` (ViT batches, feature cache,
staged pages), `runner.py` (slot caches, prefill, decode step, CUDA graphs), `sampling.py` (logits -> ids),
`detokenize.py` (ids -> text deltas), `requests.py` (what goes in and comes out). This file is the public API and the
loop that ties them: a step, and per token the stop checks, streaming and results.

Slot rows are independent: positions are per slot, masks are per row, so a request's output does not depend on what
else shares the batch (tests/test_engine.py checks this against `InfiMMHD.generate` and the golden ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpu_linear
from .cache import FeatureCache as FeatureCache  # re-exported: it lived here before
from .config import EngineConfig as EngineConfig  # re-exported: `from model.engine import EngineConfig`
from .encoder import PageEncoder
from .infimm import InfiMMHD
from .memory import size_engine
from .processor import ChatMessage, Processor, PromptFormat
from .quantize import quantize_model
from .requests import Delta as Delta
from .requests import EncodedImage as EncodedImage
from .requests import EngineObserver as EngineObserver
from .requests import Request as Request
from .requests import Result as Result
from .requests import Seq
from .requests import Timings as Timings
from .runner import DecodeGraphs as DecodeGraphs
from .runner import ModelRunner
from .sampling import BatchSampler, IncrementalDetokenizer, SamplingParams, TokenLogprob, byte_token_ids
from .scheduler import Scheduler
from .windows import WindowConfig

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """Device-sampled ids of one decode step on their way to the host: `host` (S,) is filled when `event` fires."""

    seqs: list[Seq]
    host: torch.Tensor
    event: torch.cuda.Event | None


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
        self.observer = observer or EngineObserver()
        mc = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if config.max_views is None:
            config = dataclasses.replace(config, max_views=processor.windows.max_windows + 1)
        quantize_model(model, config.quantize)  # no-op when loaded so (from_pretrained); refuses a mismatch
        config, self.memory_plan = size_engine(model, config, self.device)  # may refuse: nothing fits
        self.config = config
        if config.decode_attention not in ("own_length", "bucket"):
            raise ValueError(f"decode_attention={config.decode_attention!r}: use 'own_length' or 'bucket'")
        if config.max_seq_len > mc.text.max_positions:
            raise ValueError(f"max_seq_len={config.max_seq_len} is over the model's {mc.text.max_positions} positions")
        if config.cpu_packed_linear and self.device.type == "cpu" and cpu_linear.available():
            cpu_linear.pack_linears(model)  # in place, like quantize_model: the engine owns the model from here
        self.runner = ModelRunner(model, config, processor.pad, self.device, self.dtype)
        self.max_media_tokens = self.runner.max_media_tokens
        self.scheduler = Scheduler(config.max_slots, config.max_prefill_batch)
        self.encoder = PageEncoder(model, config, self.observer, self.device, self.dtype)
        self._features_reported = self.features.counts()  # what the observer has been told (it gets differences)
        self.default_stop = tuple(processor.stop_token_ids)
        self.byte_ids = byte_token_ids(processor.tokenizer)
        self.sampler = BatchSampler(
            config.max_slots, mc.text.vocab_size, self.device, processor.tokenizer, self.default_stop
        )
        self._thread: threading.Thread | None = None
        self._running = False
        self._pending: _Pending | None = None
        self._stamp_token = object()  # this engine, in `Request.validated`
        self.steps = 0
        log.info(
            "engine: %d slots x %d tokens, KV %.2f GB, media %.2f GB, %s %s",
            config.max_slots,
            config.max_seq_len,
            self.kv.nbytes() / 1e9,
            self.media.nbytes() / 1e9,
            self.device,
            self.dtype,
        )

    # the parts' state, under the names it had when it all lived here (benchmarks/gpu.py reads these)
    @property
    def kv(self):
        return self.runner.kv

    @property
    def media(self):
        return self.runner.media

    @property
    def media_len(self) -> list[int]:
        return self.runner.media_len

    @property
    def features(self) -> FeatureCache:
        return self.encoder.features

    @property
    def slots(self) -> list[Seq | None]:
        return self.scheduler.slots

    @property
    def waiting(self):
        return self.scheduler.waiting

    def decode_forward(self, n, kv_len, m, dense, tokens, positions) -> torch.Tensor:
        """One decode step of slots [0, n) on the device (see `ModelRunner.decode_forward`)."""
        return self.runner.decode_forward(n, kv_len, m, dense, tokens, positions)

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
        checked = request.validated is not None and request.validated == self._stamp(request)
        out = []
        for i in range(n):
            seed = s.seed + i if (s.seed is not None and not s.greedy) else s.seed
            choice = dataclasses.replace(
                request,
                images=list(request.images),
                sampling=dataclasses.replace(s, seed=seed),
                request_id=f"{request.request_id}-{i}",
            )
            if checked:  # the same prompt and pages; a seed changes nothing that `validate` checks
                choice.validated = self._stamp(choice)
            out.append(choice)
        return out

    def _stamp(self, request: Request) -> tuple:
        """What `validate` looked at: this engine, the prompt and image list (by identity and length), the sampling."""
        images = tuple(id(p) for p in request.images)
        return (self._stamp_token, id(request.prompt_ids), len(request.prompt_ids), images, request.sampling)

    def validate(self, request: Request) -> None:
        """Raise ValueError for a request this engine can never run (checked before queueing).

        A request that passed is stamped (`Request.validated`), so queueing it (`generate`, `stream`) or forking it
        does not check it again: a front end that validates up front to answer 400 pays for one check per request."""
        if request.validated is not None and request.validated == self._stamp(request):
            return
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
        request.validated = self._stamp(request)

    def _new_seq(self, request: Request, sink) -> Seq:
        self.validate(request)  # once: a request validated before is stamped
        s = request.sampling
        stop_ids = frozenset(self.default_stop if s.stop_token_ids is None else s.stop_token_ids)
        return Seq(
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
        self.scheduler.add(seqs)
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
        with self.scheduler.lock:
            self._running = False
            self.scheduler.wake.notify()
        if self._thread:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.scheduler.lock:
                while self._running and not self.scheduler.busy():
                    self.scheduler.wake.wait()
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
        self.scheduler.add([seq])
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
        self.scheduler.abort(request_id)

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
        return self.runner.graph_report()

    def close(self) -> None:
        """Stop the loop and drop every device buffer now (caches, graphs), even if something still holds the engine."""
        self.shutdown()
        self._fail_all("abort")
        self.runner.close()
        self.encoder.close()
        self._features_reported = self.features.counts()

    # ---- the loop ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        if self.kv is None:
            raise RuntimeError("engine is closed")
        self.steps += 1
        for s in self.scheduler.take_aborted():
            self._finish(s, "abort")
        if self.config.interleave_vit:
            self.encoder.encode_ahead(self.scheduler.upcoming())
        admitted = self.scheduler.admit(self.encoder.ready if self.config.interleave_vit else None)
        if admitted:
            self.encoder.encode(admitted, self.scheduler.waiting_now)
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

    def _prefill(self, seqs: list[Seq]) -> None:
        t0 = time.perf_counter()
        logits = self.runner.prefill(seqs)
        for s in seqs:
            self.sampler.admit(s.slot, s.state, s.request.prompt_ids)
        tokens = self.sampler.sample(logits, [s.slot for s in seqs], [s.state for s in seqs])
        seconds = time.perf_counter() - t0
        self.observer.on_prefill(len(seqs), sum(len(s.request.prompt_ids) for s in seqs), seconds)
        now = time.perf_counter()
        for s, tok in zip(seqs, tokens, strict=True):
            s.timings.prefill_s = seconds
            s.first_token_at = now
            s.timings.ttft_s = now - s.request.arrival
            self._emit(s, tok)

    def _decode(self) -> None:
        """One token for every running slot.

        Late copy (`runner.late`): when every running request is plain greedy, the ids are taken on the device
        (argmax), fed straight into the next step, and copied into pinned host memory without waiting; the host reads
        them one step later, after the next step is queued, so the device never idles while the host detokenizes. A
        request that stopped is then seen one step late: that one extra row is computed and dropped (rows are
        independent, so the tokens are the same).
        """
        t0 = time.perf_counter()
        active = [s for s in self.slots if s is not None and not s.has_last_token]
        if not active:  # only pending last tokens left: read them
            self._resolve_pending()
            return
        logits = self.runner.decode(active)  # (n, vocab)
        if self.runner.late and all(s.device_greedy for s in active):
            host, event = self.runner.argmax_to_host(logits)
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

    # ---- per-token bookkeeping ---------------------------------------------------------------------------------------
    def _emit(self, seq: Seq, token: int) -> None:
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

    def _finish(self, seq: Seq, reason: str, pending: str = "") -> None:
        seq.finish_reason = reason
        self.scheduler.release(seq)
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
    def _unsent(seq: Seq) -> tuple[list[int], list[TokenLogprob] | None]:
        """The tokens (and logprobs) not yet in a delta; marks them sent."""
        k, seq.unsent = seq.unsent, 0
        ids = seq.tokens[len(seq.tokens) - k :]
        return ids, (seq.state.logprobs[len(seq.tokens) - k :] if seq.request.sampling.logprobs else None)

    def _fail_all(self, reason: str) -> None:
        seqs = self.scheduler.drain()
        self._pending = None
        self.encoder.staged.clear()
        for s in seqs:
            self._finish(s, reason)
