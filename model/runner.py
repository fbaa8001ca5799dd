"""The engine's device side: the slot caches, prefill of admitted requests, one decode step, CUDA graphs.

Legend: S decode slots, n active slot prefix, B prefill rows, T tokens, M media tokens, Dv visual width, D width.

The runner does device work only and knows nothing of queues, sampling or text: it takes the requests of a step
(`Seq`, for their prompts, slots, media and last tokens) and returns float32 logits. Slot rows are independent:
positions are per slot and masks are per row, so a row's logits do not depend on what else shares the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_linear
from .cache import KVCache, MediaKV
from .config import EngineConfig
from .infimm import InfiMMHD
from .requests import Seq
from .text import Kernels, SelfAttnContext
from .xattn import CrossAttnInputs

log = logging.getLogger(__name__)


class ModelRunner:
    """Static caches of `max_slots` rows and the forward passes over them. Holds no reference to the engine."""

    def __init__(self, model: InfiMMHD, config: EngineConfig, pad_ids: Callable, device, dtype):
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.pad_ids = pad_ids  # the processor's pad(list of ids, side=...) -> (ids, mask)
        mc = model.config
        S = config.max_slots
        self.max_media_tokens = config.max_views * mc.vision.tokens
        align = max(1, config.media_align)
        capacity = -(-self.max_media_tokens // align) * align  # buffer columns: a kernel-friendly multiple
        self.kv = KVCache(
            mc.text.layers, S, config.max_seq_len, mc.text.kv_heads, mc.text.head_dim, dtype=dtype, device=device
        )
        self.media = MediaKV.empty(
            len(mc.xattn_layers), S, capacity, mc.xattn.heads, mc.xattn.dim_head, dtype=dtype, device=device
        )
        self.media_len = [0] * S
        self.slot_text_time = torch.zeros(S, dtype=torch.long, device=device)  # 1 if the slot has an image
        self.slot_ids = torch.arange(S, device=device)
        self.graphs = DecodeGraphs(S, device) if (config.cuda_graphs and device.type == "cuda") else None
        self.graph_fallback: str | None = None  # why decode went eager after asking for CUDA graphs
        self.graph_oom_steps = 0  # steps run eagerly because a graph of that size did not fit
        self.kernels = Kernels.make(fused_norm=config.fused_norm, compile=config.compile)
        self.gates = None
        with torch.no_grad():
            if config.precompute:
                self.gates = [(b.attn_gate.tanh(), b.ff_gate.tanh()) for b in model.xattn.values()]  # (D,) each
            w = model.decoder.lm_head.weight  # (vocab, D)
            pad = (-w.shape[0]) % config.vocab_pad if config.vocab_pad else 0
            self.lm_weight = torch.cat((w, w.new_zeros(pad, w.shape[1]))) if pad else w  # (vocab + pad, D)
        self.vocab = w.shape[0]
        self.lm_packed = None  # the LM head through oneDNN with its weight packed once (model/cpu_linear.py)
        if config.cpu_packed_linear and cpu_linear.packable(model.decoder.lm_head) and cpu_linear.available():
            self.lm_packed = cpu_linear.pack(self.lm_weight)
        self.late = config.late_copy if config.late_copy is not None else device.type == "cuda"
        if self.late:  # two host buffers: one being filled by the device while the host reads the other
            pin = device.type == "cuda"
            self.host_ids = [torch.zeros(S, dtype=torch.long, pin_memory=pin) for _ in range(2)]
            self.dev_ids = torch.zeros(S, dtype=torch.long, device=device)  # last sampled id per slot
            self.flip = 0

    def close(self) -> None:
        """Drop every device buffer now (caches, graphs), even if something still holds the runner."""
        self.graphs = None
        self.kv = self.media = None
        self.lm_weight = self.lm_packed = self.gates = self.dev_ids = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, D) -> float32 logits (B, vocab); the GEMM runs over the padded vocabulary, sliced back."""
        out = F.linear(h, self.lm_weight) if self.lm_packed is None else cpu_linear.linear(h, self.lm_packed)
        return out[:, : self.vocab].float()

    # ---- prefill ----------------------------------------------------------------------------------------------------
    def prefill(self, seqs: list[Seq]) -> torch.Tensor:
        """Prompts of newly admitted requests -> their KV in their slots, the last image's cross-attention K/V in the
        slots' media buffers, and the logits of each prompt's last token (B, vocab). Frees `seq.media`."""
        model, dev, cfg = self.model, self.device, self.config
        B = len(seqs)
        lengths = [len(s.request.prompt_ids) for s in seqs]
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
        lengths_t = torch.tensor(lengths, device=dev)
        self.kv.valid[slots] = torch.arange(self.kv.max_len, device=dev)[None, :] < lengths_t[:, None]
        rope_dtype = self.dtype if cfg.precompute else None
        if cfg.packed_prefill:  # real tokens only: (1, sum of lengths), each prompt attending within itself
            items = [[m.shape[0] for m in s.media] for s in seqs]
            ids, ctx, xin = model.packed_inputs(
                [s.request.prompt_ids for s in seqs], media_kv, items, dense=cfg.dense_attention, rope_dtype=rope_dtype
            )
            ctx.slots = torch.tensor([s.slot for s in seqs]).repeat_interleave(torch.tensor(lengths)).to(dev)[None]
            ctx.cache = self.kv
            ends = lengths_t.cumsum(0)
        else:  # padded to the longest prompt on the right, masked
            ids, mask = self.pad_ids([s.request.prompt_ids for s in seqs], side="right")
            ids, mask = ids.to(dev), mask.to(dev)
            T = ids.shape[1]
            ctx, xin = model.prefill_inputs(ids, mask, media_kv, dense=cfg.dense_attention, rope_dtype=rope_dtype)
            ctx.cache, ctx.slots, ctx.cols = self.kv, slots, torch.arange(T, device=dev).expand(B, T)
        if xin is not None:
            xin.gates = self.gates
        ctx.kernels = self.kernels
        h = model.decode_layers(ids, ctx, xin)  # (B, T, D), packed: (1, sum of lengths, D)
        last = h[0, ends - 1] if cfg.packed_prefill else h[torch.arange(B, device=dev), lengths_t - 1]  # (B, D)
        logits = self.logits(last)
        for row, s in enumerate(seqs):
            if media_kv is not None and s.media:
                self.media_len[s.slot] = self.media.store_last_image(s.slot, media_kv, row)
                self.slot_text_time[s.slot] = 1
            else:
                self.media_len[s.slot] = 0
                self.media.key_time[s.slot] = 0
                self.slot_text_time[s.slot] = 0
            s.media = []  # features no longer needed by this request
        return logits

    # ---- decode -----------------------------------------------------------------------------------------------------
    def decode(self, active: list[Seq]) -> torch.Tensor:
        """One step for slots [0, n) covering every active slot -> logits (n, vocab); rows of free slots are junk.

        An active request's input token is its last host token, or, with `seq.pending`, the id sampled on the
        device by the previous step (late copy), which the host has not read yet."""
        n = max(s.slot for s in active) + 1
        n = min(self.config.max_slots, 1 << (n - 1).bit_length()) if self.graphs else n  # few graph sizes
        # built as lists, one tensor each (per-element writes into tensors cost a dispatch per slot)
        tokens, positions, on_device = [0] * n, [0] * n, [False] * n  # on_device: the input is the pending id
        for s in active:
            if s.slot < n:
                tokens[s.slot] = s.tokens[-1]
                positions[s.slot] = s.position + s.pending
                on_device[s.slot] = s.pending
        longest = max(positions) + 1
        kv_len = min(self.config.max_seq_len, -(-longest // self.config.kv_bucket) * self.config.kv_bucket)
        m, dense = self.media_extent(active, n)
        ranges = None
        if self.graphs is None and self.config.decode_attention == "own_length":
            ranges = self.row_ranges([p + 1 for p in positions])  # rows of free slots (position 0): one column
        pending = any(on_device)
        tokens, positions = torch.tensor(tokens), torch.tensor(positions)
        tokens, positions = self.to_device(tokens), self.to_device(positions)
        if pending:
            tokens = torch.where(self.to_device(torch.tensor(on_device)), self.dev_ids[:n], tokens)
        if self.graphs is not None:
            try:
                return self.graphs.run(self.decode_forward, (n, kv_len, m, dense), tokens, positions)
            except torch.cuda.OutOfMemoryError:  # this size does not fit right now: one eager step, graphs kept
                log.warning("no memory for a CUDA graph of %d slots x %d keys: this step runs eagerly", n, kv_len)
                self.graph_oom_steps += 1
                torch.cuda.empty_cache()
            except RuntimeError as e:  # capture itself failed (driver, kernel): keep serving, eagerly
                log.exception("CUDA graph capture failed; decoding without CUDA graphs from now on")
                self.graph_fallback = f"{type(e).__name__}: {e}"[:500]
                self.graphs = None
        return self.decode_forward(n, kv_len, m, dense, tokens, positions, ranges=ranges)

    def row_ranges(self, lengths: list[int]) -> list[tuple[int, int, int, bool]]:
        """Rows [0, n) with these key lengths -> contiguous ranges (r0, r1, longest, masked), grouped greedily: a row
        joins the current range while the keys that adds to read cost less than one more attention call."""
        kv = self.kv
        split = self.config.decode_split_bytes / (2 * kv.k.shape[2] * kv.k.shape[4] * kv.k.element_size())  # columns
        ranges = []
        r0, longest, same = 0, lengths[0], True
        for r in range(1, len(lengths)):
            n, L = r - r0, lengths[r]
            merged = (n + 1) * max(longest, L)
            if merged - n * longest - L <= split:
                same &= L == longest
                longest = max(longest, L)
            else:
                ranges.append((r0, r, longest, not same))
                r0, longest, same = r, L, True
        ranges.append((r0, len(lengths), longest, not same))
        return ranges

    def argmax_to_host(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Late copy: greedy ids (n,) kept on the device for the next step and copied to a host buffer without
        waiting; the host buffer is valid once the returned event fires (None: at once, on the CPU)."""
        n = logits.shape[0]
        ids = logits.argmax(-1)  # (n,) on the device
        self.dev_ids[:n].copy_(ids)
        self.flip ^= 1
        host = self.host_ids[self.flip]
        host[:n].copy_(ids, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device without waiting for the work in flight (pinned, asynchronous) when late copy is on."""
        if self.late and self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def media_extent(self, active: list[Seq], n: int) -> tuple[int, bool]:
        """Media columns to attend in this step and whether no mask is needed (every row with media fills them all)."""
        tokens = self.model.config.vision.tokens
        lengths = [self.media_len[s.slot] for s in active if s.slot < n]  # other rows' outputs are dropped
        m = -(-max(lengths) // tokens) * tokens  # whole views: few graph sizes
        if self.config.dense_attention and all(x in (0, m) for x in lengths):
            return m, True
        align = max(1, self.config.media_align)
        return min(self.media.max_tokens, -(-m // align) * align), False

    def decode_forward(
        self,
        n: int,
        kv_len: int,
        m: int,
        dense: bool,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        ranges: list[tuple[int, int, int, bool]] | None = None,
    ) -> torch.Tensor:
        """One token for slots [0, n): device work only, no host syncs, fixed shapes for given (n, kv_len, m, dense).

        ranges (eager only, see `row_ranges`): attend over each row range's own length instead of kv_len."""
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
            kernels=self.kernels,
        )
        if ranges is not None:
            valid = self.kv.valid
            ctx.mask = None
            ctx.ranges = [(r0, r1, L, valid[r0:r1, None, None, :L] if masked else None) for r0, r1, L, masked in ranges]
        xin = None
        if m > 0:
            text_time = self.slot_text_time[:n, None]
            xin = CrossAttnInputs.build(
                self.media.rows(n, m), text_time, flag=text_time[:, 0] > 0, dense=dense, gates=self.gates
            )
        h = model.decode_layers(tokens[:, None], ctx, xin)
        return self.logits(h[:, -1])  # (n, vocab)

    def graph_report(self) -> dict:
        g = self.graphs
        return {
            "requested": self.config.cuda_graphs,
            "used": g is not None and g.replays > 0 and self.graph_fallback is None,
            "captures": len(g.graphs) if g else 0,
            "capture_s": g.capture_s if g else 0.0,
            "replays": g.replays if g else 0,
            "fallback": self.graph_fallback,
            "oom_eager_steps": self.graph_oom_steps,
        }


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
