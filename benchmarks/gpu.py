"""Model and engine benchmark without Ray, for a lent GPU machine (full size, random bf16 weights) and, at tiny
size, as a CPU smoke test inside the test suite.

    # on an H100/H200, in ONE call of at most 10 minutes (writes $OUT/gpu.json after every step):
    python benchmarks/gpu.py --size full --deadline-s 520 --out $OUT/gpu.json
    # a short first call (ceilings, parity, graph check, one short wave at batch 64):
    python benchmarks/gpu.py --size full --quick --deadline-s 240 --out $OUT/gpu.json
    # on the CPU (smoke; tests/test_benchmarks.py):
    python benchmarks/gpu.py --size tiny --device cpu --batches 2 --new-tokens 4 --vit-views 2 --prompt-tokens 12

Order (most important first, so a cut-off run still answers the main questions): device ceilings (bf16 matmul, copy
bandwidth), checks (golden parity in fp32 with TF32 off; CUDA-graph decode == eager with padded rows, mixed lengths,
several KV buckets, ids and logits), model build, ViT
TFLOP/s (and once forced onto the flash kernel), batch-1 decode ms/token against its bandwidth floor (and one step
forced onto the fused kernels), the standard job (1344x1344 page = thumbnail + 3x3 windows, 48-token prompt, 256 new
tokens forced) at the largest batch with a one-step profiler kernel table, the check that every hot-path switch on/off
gives the same ids (tiny size), the other batch sizes, then each quantization mode (`quantized/<mode>`: refused with
its reason where the card cannot run it; else weights built block by block and quantized as the loader does, ViT
TFLOP/s, batch-1 decode, and one standard-job wave on an engine that sized itself with --gpu-memory-utilization 0.9,
its plan line and planned bytes against the measured peak), then each hot-path switch flipped against the default.
Every standard-job summary also holds the memory plan of its settings against the measured peak (`memory_plan`).

Every section and every wave runs in its own `try`: a failure is recorded with its traceback and the run goes on.
The JSON is written atomically after each step; `--deadline-s` skips what no longer fits and, as a last resort, a
watchdog writes the JSON and exits before the call's limit. `--fail SECTION` injects a failure (for the tests).
Compare with benchmarks/gpu_baseline.md (official code, H200: 0.45 pages/s on the standard job).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from model import InfiMMHD, InfiMMHDConfig, Processor  # noqa: E402
from model.engine import EncodedImage, Engine, EngineConfig, EngineObserver, Request  # noqa: E402
from model.memory import GiB, plan_for_engine, weight_bytes  # noqa: E402
from model.quantize import check_supported, load_by_unit, model_bytes  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.tokenizer import load_tokenizer, save_tiny_tokenizer  # noqa: E402
from model.windows import PageViews, normalize_views  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each hot-path switch set against the engine's default (all on, compile off); benchmarks and the tiny check use it.
SWITCHES: dict[str, dict] = {
    "dense_attention_off": dict(dense_attention=False),
    "precompute_off": dict(precompute=False),
    "fused_norm_off": dict(fused_norm=False),
    "vocab_pad_off": dict(vocab_pad=0),
    "late_copy_off": dict(late_copy=False),
    "kv_bucket_128": dict(kv_bucket=128),
    "cuda_graphs_off": dict(cuda_graphs=False),  # eager decode: attention over each slot's own length
    "cuda_graphs_off_bucket": dict(cuda_graphs=False, decode_attention="bucket"),  # eager, one masked bucket
    "packed_prefill_off": dict(packed_prefill=False),  # prefill padded to the longest prompt, masked
    "compile_on": dict(compile=True),
}
SCHEDULER_SWITCHES: dict[str, dict] = {  # need the ViT, so they run the full standard job
    "interleave_vit_off": dict(interleave_vit=False),
    "prefill_batch_8": dict(max_prefill_batch=8),
    "vit_step_views_160": dict(vit_step_views=160),  # 16 pages of ViT per step: admission is no longer capped at 8
}


class Run:
    """The result JSON, the deadline and the failure injection.

    `do(path, fn)` runs one section or wave: its value goes to result[path...], an exception becomes
    {"error", "traceback"} there, a section that no longer fits the deadline becomes {"skipped": ...}. The JSON is
    rewritten (tmp file + os.replace, so a reader never sees half a file) after every call.
    """

    def __init__(self, out: str | None, deadline_s: float | None, fail: set[str], hard_stop: bool):
        self.out, self.fail = out, fail
        self.t0 = time.perf_counter()
        self.deadline = None if deadline_s is None else self.t0 + deadline_s
        self.result: dict = {"benchmark": "gpu", "sections": {}}
        self._lock = threading.Lock()
        if hard_stop and self.deadline is not None:  # last resort: a step that overruns still leaves the JSON
            threading.Thread(target=self._watchdog, daemon=True).start()

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def _watchdog(self) -> None:
        time.sleep(max(0.0, self.remaining()))
        self.result["deadline_hit"] = f"watchdog stopped the run at {time.perf_counter() - self.t0:.0f} s"
        self.write()
        print(self.result["deadline_hit"], file=sys.stderr, flush=True)
        os._exit(3)

    def do(self, path: tuple[str, ...], fn: Callable[[], object], needs_s: float = 0.0):
        """Run fn (if it fits before the deadline); store its value or its failure at `path`; write the JSON."""
        name = "/".join(path)
        t0 = time.perf_counter()
        value = None
        if self.remaining() < needs_s:
            entry = {"skipped": f"deadline: {self.remaining():.0f} s left, needs about {needs_s:.0f} s"}
        else:
            try:
                if name in self.fail or path[0] in self.fail:
                    raise RuntimeError(f"injected failure in {name} (--fail)")
                value = fn()
                entry = value
            except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
                entry = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}
                value = None
        self.result["sections"][name] = {
            "ok": isinstance(entry, dict) and "error" not in entry and "skipped" not in entry,
            "seconds": time.perf_counter() - t0,
        }
        node = self.result
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = entry
        self.write()
        print(
            f"[gpu.py {time.perf_counter() - self.t0:6.0f} s] {name}: {self.result['sections'][name]}", file=sys.stderr
        )
        return value

    def write(self) -> None:
        with self._lock:
            self.result["elapsed_s"] = time.perf_counter() - self.t0
            if not self.out:
                return
            out = Path(self.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
            os.replace(tmp, out)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 3) -> float:
    """Median seconds of `repeat` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ceilings(device, dtype) -> dict:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeat=5)
    nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    tc = timed(lambda: dst.copy_(src), device, repeat=5)
    return {"matmul_n": n, "matmul_tflops": 2 * n**3 / t / 1e12, "copy_gb_per_s": 2 * nbytes / tc / 1e9}


def vit_flops_per_view(cfg: InfiMMHDConfig) -> float:
    v = cfg.vision
    N, W, H = v.tokens, v.width, v.mlp_hidden
    per_layer = 2 * N * (4 * W * W + 2 * W * H) + 4 * N * N * W  # projections + MLP, then q@k and attn@v
    return v.layers * per_layer + 2 * 3 * v.patch_size**2 * W * (N - 1)  # + patch embedding


def build_model(cfg: InfiMMHDConfig, device, dtype) -> InfiMMHD:
    """Random weights made directly on the device in the target dtype (18 B parameters: no CPU round trip)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InfiMMHD(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for block in model.xattn.values():  # non-zero gates, so the cross-attention path is really exercised
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
        model.decoder.embed_tokens.weight.normal_(0, 0.02)
    model.decoder.reset_rope(device)
    return model.eval()


class StepTimes(EngineObserver):
    def __init__(self):
        self.encode = self.prefill = self.decode = 0.0
        self.decode_steps = 0

    def on_encode(self, views, seconds):
        self.encode += seconds

    def on_prefill(self, requests, tokens, seconds):
        self.prefill += seconds

    def on_decode_step(self, batch, seconds):
        self.decode += seconds
        self.decode_steps += 1


_PROCESSORS: dict = {}


def bench_processor(cfg: InfiMMHDConfig) -> Processor:
    """A Llama-style tokenizer with the config's vocabulary (built on the spot: nothing can be downloaded)."""
    if cfg.eoc_token_id not in _PROCESSORS:
        folder = tempfile.mkdtemp(prefix="bench-tok-")
        save_tiny_tokenizer(folder, base_vocab=cfg.eoc_token_id)
        _PROCESSORS[cfg.eoc_token_id] = Processor(load_tokenizer(folder), cfg)
    return _PROCESSORS[cfg.eoc_token_id]


def random_page(cfg: InfiMMHDConfig, rows: int, cols: int, seed: int) -> PageViews:
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    views = torch.randint(0, 256, (1 + rows * cols, 3, s, s), dtype=torch.uint8, generator=g)
    # a key, so the engine never hashes ~6 MB of views per page inside the timed region
    return PageViews(views=views, rows=rows, cols=cols, width=cols * s, height=rows * s, key=f"random-{seed}")


def job_requests(cfg, pages: list[PageViews], prompt_tokens: int, new_tokens: int, wave: int) -> list[Request]:
    """One request per page (a fresh key per wave: never a feature-cache hit), forced to `new_tokens` new ids."""
    g = torch.Generator().manual_seed(wave)
    reqs = []
    for i, page in enumerate(pages):
        body = torch.randint(3, cfg.eoc_token_id, (prompt_tokens - 2,), generator=g).tolist()
        ids = [cfg.text.bos_token_id, cfg.image_token_id] + body
        sampling = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_token_ids=())
        reqs.append(Request(ids, [dataclasses.replace(page, key=f"{page.key}-w{wave}-{i}")], sampling))
    return reqs


def encoded_requests(cfg, n: int, features: torch.Tensor, prompt_tokens: int, new_tokens: int) -> list[Request]:
    """Requests whose page is already encoded (no ViT): for measuring decode-side switches cheaply."""
    reqs = job_requests(cfg, [PageViews(torch.zeros(0), 1, 1, 1, 1, key="x")] * n, prompt_tokens, new_tokens, 7)
    for r in reqs:
        r.images = [EncodedImage(features)]
    return reqs


def engine_config(B: int, max_seq: int, views: int, **overrides) -> EngineConfig:
    base = dict(max_slots=B, max_seq_len=max_seq, max_views=views, vit_batch_views=40, vit_step_views=80)
    base["feature_cache_mb"] = 0  # every page new: the ViT always runs
    return EngineConfig(**{**base, **overrides})


# ---- checks ------------------------------------------------------------------------------------------------------
def check_golden(device) -> dict:
    """The golden vectors in fp32 with TF32 off (cuBLAS and cuDNN both default to TF32 for fp32 on Ampere+)."""
    import numpy as np
    from safetensors.torch import load_file

    from model import load_pretrained

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        golden = os.path.join(ROOT, "tests", "data", "golden")
        out: dict = {"tf32": False}
        m = load_pretrained(golden, dtype=torch.float32, device=device)
        g = load_file(os.path.join(golden, "cases.safetensors"))
        rs = np.random.RandomState(1002)
        px = torch.from_numpy(rs.standard_normal((7, 3, 448, 448)).astype(np.float32)).to(device)
        with torch.no_grad():
            media = m.build_media(m.encode_views(px), 2, 3)
            logits = m(g["b.input_ids"].to(device), g["b.attention_mask"].to(device), media[None, None])
        out["golden_b_logits_max_abs_diff"] = float((logits.cpu() - g["b.logits"]).abs().max())
        ids = m.generate(g["d.input_ids"].to(device), g["d.attention_mask"].to(device), media[None, None], 24)
        out["golden_d_ids_equal"] = ids.cpu().tolist() == g["d.new_tokens_eoc"].tolist()
        ids = m.generate(
            g["d_batch.input_ids"].to(device),
            g["d_batch.attention_mask"].to(device),
            g["c.media"].float().to(device),
            24,
            [292],
        )
        out["golden_d_batch_ids_equal"] = ids.cpu().tolist() == g["d_batch.new_tokens_stopy"].tolist()
        out["ok"] = out["golden_d_ids_equal"] and out["golden_d_batch_ids_equal"]
        out["ok"] = out["ok"] and out["golden_b_logits_max_abs_diff"] < 1e-4
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def mixed_tiny_requests(cfg, seed: int, repeat: int = 2, scale: float = 1.0) -> list[Request]:
    """Pages of three grids (different media lengths), different prompt lengths, a text-only row, forced lengths."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    kinds = [((3, 3), 16, 40), ((1, 1), 31, 24), ((2, 2), 23, 40), (None, 9, 33)] * repeat
    for i, (grid, prompt, new) in enumerate(kinds):
        new = max(2, int(new * scale))
        body = torch.randint(3, cfg.eoc_token_id, (prompt,), generator=g).tolist()
        sampling = SamplingParams(max_new_tokens=new, min_new_tokens=new, stop_token_ids=())
        if grid is None:
            reqs.append(Request([cfg.text.bos_token_id] + body, [], sampling))
        else:
            page = random_page(cfg, *grid, seed=seed * 100 + i)
            reqs.append(Request([cfg.text.bos_token_id, cfg.image_token_id] + body, [page], sampling))
    return reqs


def same_page_requests(cfg, n: int, seed: int, new: int = 36) -> list[Request]:
    page = random_page(cfg, 2, 2, seed=seed)  # every row the same media length: the mask-free decode path
    g = torch.Generator().manual_seed(seed)
    return [
        Request(
            [cfg.text.bos_token_id, cfg.image_token_id]
            + torch.randint(3, cfg.eoc_token_id, (12,), generator=g).tolist(),
            [page],
            SamplingParams(max_new_tokens=new, min_new_tokens=new, stop_token_ids=()),
        )
        for _ in range(n)
    ]


def fresh(reqs: list[Request]) -> list[Request]:
    return [Request(r.prompt_ids, r.images, r.sampling) for r in reqs]  # new ids and arrival times


def check_graphs(device) -> dict:
    """CUDA-graph decode against eager decode at tiny size, bf16: padded rows (6 slots, graph sizes 1/2/4/6), mixed
    prompt and media lengths (masked steps), one page for all (mask-free steps), KV lengths over several 16-column
    buckets. Compares ids of whole runs and, at every replayed step, the graph's logits with an eager step on the same
    inputs. ok is False if graphs were not really used (capture failed, fell back, never replayed)."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    cfg = InfiMMHDConfig.preset("tiny")
    model = build_model(cfg, device, torch.bfloat16)
    proc = bench_processor(cfg)
    config = EngineConfig(max_slots=6, max_seq_len=96, max_views=10, kv_bucket=16)
    sets = {"mixed": mixed_tiny_requests(cfg, 5), "same_page": same_page_requests(cfg, 5, 6)}
    eager = Engine(model, proc, dataclasses.replace(config, cuda_graphs=False))
    want = {k: [r.token_ids for r in eager.generate(fresh(v))] for k, v in sets.items()}
    graphed = Engine(model, proc, config)
    steps = {"compared": 0, "argmax_equal": 0, "max_abs_diff": 0.0}
    if graphed._graphs is not None:
        run = graphed._graphs.run

        def run_and_compare(forward, key, tokens, positions):
            out = run(forward, key, tokens, positions).clone()
            ref = forward(*key, tokens, positions)  # same inputs: the cache writes are idempotent
            steps["compared"] += 1
            steps["argmax_equal"] += int(torch.equal(out.argmax(-1), ref.argmax(-1)))
            steps["max_abs_diff"] = max(steps["max_abs_diff"], float((out - ref).abs().max()))
            return out

        graphed._graphs.run = run_and_compare
    got = {k: [r.token_ids for r in graphed.generate(fresh(v))] for k, v in sets.items()}
    report = graphed.graph_report()
    graphs = graphed._graphs
    keys = sorted(graphs.graphs) if graphs else []
    out = {
        "graphs": report,
        "graph_keys": [list(k) for k in keys],
        "kv_buckets": sorted({k[1] for k in keys}),
        "padded_sizes": sorted({k[0] for k in keys}),
        "dense_and_masked": sorted({k[3] for k in keys}),
        "ids_equal": got == want,
        "steps": steps,
    }
    out["ok"] = bool(
        report["used"]
        and out["ids_equal"]
        and steps["compared"] > 0
        and steps["argmax_equal"] == steps["compared"]
        and steps["max_abs_diff"] < 0.05
        and len(out["kv_buckets"]) > 1
        and out["dense_and_masked"] == [False, True]
    )
    eager.close()
    graphed.close()
    return out


def check_switches(device) -> dict:
    """At tiny size in fp32 on this device: every hot-path switch against the default gives the same ids."""
    cfg = InfiMMHDConfig.preset("tiny")
    model = build_model(cfg, device, torch.float32)
    proc = bench_processor(cfg)
    # vocab_pad=96: the tiny vocabulary (512) is a multiple of 64, so the default would pad nothing
    base = EngineConfig(max_slots=4, max_seq_len=96, max_views=10, kv_bucket=16, vit_step_views=12, vocab_pad=96)
    # short (a dozen ids each): a handful of steps already crosses KV buckets of 16 and mixes masked and dense steps
    reqs = mixed_tiny_requests(cfg, 9, repeat=1, scale=0.3) + same_page_requests(cfg, 2, 10, new=8)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eng = Engine(model, proc, base)
        want = [r.token_ids for r in eng.generate(fresh(reqs))]
        eng.close()
        out: dict = {}
        for name, change in {**SWITCHES, **SCHEDULER_SWITCHES, "late_copy_on": dict(late_copy=True)}.items():
            t0 = time.perf_counter()
            try:
                eng = Engine(model, proc, dataclasses.replace(base, **change))
                same = [r.token_ids for r in eng.generate(fresh(reqs))] == want
                out[name] = {"same_ids": same, "seconds": time.perf_counter() - t0}
                eng.close()
            except Exception as e:  # noqa: BLE001 - one broken switch must not hide the others
                out[name] = {"same_ids": False, "error": f"{type(e).__name__}: {e}"[:1000]}
        out["ok"] = all(v["same_ids"] for v in out.values())
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---- measurements ------------------------------------------------------------------------------------------------
def vit_section(model, cfg, n_views: int, ceil: dict | None, device, dtype) -> dict:
    views = torch.randn(n_views, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)
    out: dict = {"views": n_views}
    with torch.inference_mode():
        try:  # once on the flash kernel only: a backend problem shows here, by name, not as a slow number
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                model.encode_views(views[:2])
            out["flash_forced"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded; the timing below still runs on whatever SDPA picks
            out["flash_forced"] = f"{type(e).__name__}: {e}"[:1000]
        t = timed(lambda: model.encode_views(views), device, repeat=3)
    flops = n_views * vit_flops_per_view(cfg)
    out.update(seconds=t, tflop_per_view=vit_flops_per_view(cfg) / 1e12, tflops=flops / t / 1e12)
    if ceil and ceil.get("matmul_tflops"):
        out["fraction_of_matmul_ceiling"] = flops / t / 1e12 / ceil["matmul_tflops"]
    return out


def force_decode_backend(eng: Engine, device) -> dict:
    """One eager decode step of slot 0 with SDPA's math fallback excluded, mask-free and masked."""
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if device.type != "cuda":
        backends = [SDPBackend.FLASH_ATTENTION]  # the CPU's fused kernel (takes masks)
    m = eng.media_len[0]
    pos = min(40, eng.kv.max_len - 1)
    kv_len = min(eng.kv.max_len, -(-(pos + 1) // eng.config.kv_bucket) * eng.config.kv_bucket)
    tokens = torch.zeros(1, dtype=torch.long, device=device)
    positions = torch.full((1,), pos, dtype=torch.long, device=device)
    out = {}
    for dense in (True, False):
        mm = m if dense else min(eng.media.max_tokens, -(-m // eng.config.media_align) * eng.config.media_align)
        try:
            with torch.inference_mode(), sdpa_kernel(backends):
                eng.decode_forward(1, kv_len, mm, dense, tokens, positions)
            out["dense" if dense else "masked"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded by name
            out["dense" if dense else "masked"] = f"{type(e).__name__}: {e}"[:1000]
    out["backends"] = [b.name for b in backends]
    return out


def decode_batch1(model, cfg, proc, args, ceil, pages, device) -> dict:
    rows, cols = args.rows, args.cols
    max_seq = args.prompt_tokens + args.new_tokens + 16
    eng = Engine(model, proc, engine_config(1, max_seq, 1 + rows * cols))
    try:
        new = min(args.new_tokens, 64)
        eng.generate(job_requests(cfg, pages[:1], args.prompt_tokens, new, wave=1))  # warm-up and captures
        res = eng.generate(job_requests(cfg, pages[1:2], args.prompt_tokens, new, wave=2))[0]
        per_token = res.timings.decode_s / max(1, res.completion_tokens - 1)
        elt = next(model.parameters()).element_size()
        lm_bytes = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision.")) * elt
        media_bytes = 2 * len(cfg.xattn_layers) * (1 + rows * cols) * cfg.vision.tokens * cfg.xattn.inner * elt
        kv_bytes = 2 * cfg.text.layers * cfg.text.kv_heads * cfg.text.head_dim * elt * (args.prompt_tokens + 32)
        out = {
            "ms_per_token": per_token * 1e3,
            "bytes_per_step": lm_bytes + media_bytes + kv_bytes,
            "graphs": eng.graph_report(),
            "forced_backend": force_decode_backend(eng, device),
        }
        if ceil and ceil.get("copy_gb_per_s"):
            floor = (lm_bytes + media_bytes + kv_bytes) / (ceil["copy_gb_per_s"] * 1e9)
            out.update(bandwidth_floor_ms=floor * 1e3, ratio_to_floor=per_token / floor)
        return out
    finally:
        eng.close()
        free_memory(device)


def wave(eng: Engine, obs: StepTimes, reqs: list[Request], new_tokens: int) -> dict:
    obs.__init__()
    captures0 = eng.graph_report()["capture_s"]
    t0 = time.perf_counter()
    out = eng.generate(reqs)
    dt = time.perf_counter() - t0
    short = [r.completion_tokens for r in out if r.completion_tokens != new_tokens]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate {new_tokens} tokens: {short[:5]}")
    capture = eng.graph_report()["capture_s"] - captures0
    return {
        "seconds": dt,
        "pages_per_s": len(reqs) / dt,
        "graph_capture_s": capture,
        "pages_per_s_without_capture": len(reqs) / max(1e-9, dt - capture),
        "encode_s": obs.encode,
        "prefill_s": obs.prefill,
        "decode_s": obs.decode,
        "decode_steps": obs.decode_steps,
        "decode_ms_per_step": 1e3 * obs.decode / max(1, obs.decode_steps),
    }


def profile_step(eng: Engine, B: int, positions: int, device) -> dict:
    """One eager decode step at batch B under torch.profiler: the kernel table and the kernel count."""
    from torch.profiler import ProfilerActivity, profile

    m = eng.config.max_views * eng.model.config.vision.tokens  # the standard page's media, every row full
    tokens = torch.zeros(B, dtype=torch.long, device=device)
    pos = torch.full((B,), positions, dtype=torch.long, device=device)
    kv_len = -(-(positions + 1) // eng.config.kv_bucket) * eng.config.kv_bucket
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        eng.decode_forward(B, kv_len, m, True, tokens, pos)  # warm-up
        sync(device)
        with profile(activities=acts) as prof:
            eng.decode_forward(B, kv_len, m, True, tokens, pos)
            sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return {
        "batch": B,
        "kv_len": kv_len,
        "media_tokens": m,
        "kernels_per_step": len(kernels),
        "table": prof.key_averages().table(sort_by=sort, row_limit=30),
    }


def standard_job(run: Run, model, cfg, proc, args, pages, B: int, device, waves: int, new_tokens: int, key: str):
    """Waves of the standard job at batch B on one engine, each wave in its own try; the engine freed at the end."""
    max_seq = args.prompt_tokens + args.new_tokens + 16
    views = 1 + args.rows * args.cols
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    obs = StepTimes()
    holder: dict = {}

    def build():
        holder["eng"] = Engine(model, proc, engine_config(B, max_seq, views), observer=obs)
        return {"batch": B, "new_tokens": new_tokens, "grid": f"{args.rows}x{args.cols}"}

    run.do(("standard_job", key, "setup"), build)
    eng = holder.get("eng")
    if eng is None:
        return None
    try:
        last = None
        for w in range(waves):
            need = 1.3 * last["seconds"] if last else 0.0

            def one_wave(w=w):
                reqs = job_requests(cfg, pages[:B], args.prompt_tokens, new_tokens, wave=100 + w)
                return wave(eng, obs, reqs, new_tokens)

            last = run.do(("standard_job", key, f"wave_{w}"), one_wave, need) or last
        summary: dict = {"graphs": eng.graph_report()}
        if last:
            summary["pages_per_s"] = last["pages_per_s"]
        if device.type == "cuda":
            summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        summary["memory_plan"] = plan_check(eng, device)
        run.do(("standard_job", key, "summary"), lambda: summary)
        return eng
    except Exception:
        eng.close()
        raise


QUANT_MODES = ("int8", "int4", "fp8")
CPU_CARD = 4 * GiB  # the card the CPU smoke run pretends to have when an engine sizes itself


def plan_check(eng: Engine, device) -> dict:
    """The plan of this engine's settings (as given, on the whole card) against the peak the allocator saw."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else CPU_CARD
    p = eng.model.decoder.embed_tokens.weight
    plan = eng.memory_plan or plan_for_engine(
        eng.model.config,
        eng.config,
        total,
        model_bytes(eng.model),
        getattr(eng.model, "quantization", "none"),
        p.element_size(),
    )
    out = {"line": plan.line(), "planned_bytes": plan.need, "card_bytes": total}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(measured_peak_bytes=peak, peak_over_plan=peak / plan.need)
    return out


def build_quantized(cfg: InfiMMHDConfig, device, dtype, mode: str) -> InfiMMHD:
    """Random weights made block by block on the device and quantized as each block is made: the loader's path
    (weights.load_pretrained -> quantize.load_by_unit), so the bf16 model never exists next to the quantized one."""
    with torch.device("meta"):
        model = InfiMMHD(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def read(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name], device=device, dtype=dtype)
        if name.endswith(("attn_gate", "ff_gate")):
            return t.fill_(0.5)  # as build_model: the cross-attention path really runs
        if name.endswith(".weight") and len(shapes[name]) == 1:  # norms
            return t.fill_(1.0)
        return t.normal_(0, 0.02)

    load_by_unit(model, list(shapes), read, mode)
    model.decoder.reset_rope(device)
    return model.eval()


def quantized_mode(run: Run, model_cfg, proc, args, pages, device, dtype, ceil, mode: str) -> None:
    """One mode: refused (and why) or built, measured and run through an engine that sizes itself to the card."""
    try:
        check_supported(mode, device, dtype)
    except ValueError as e:
        refused = {"refused": str(e)}
        run.do(("quantized", mode), lambda: refused)
        return
    free_memory(device)
    built = run.do(("quantized", mode, "build"), lambda: _public(_timed_build(model_cfg, device, dtype, mode)))
    held = {"model": _BUILT.pop("model", None)}  # dropped in `finally`, whatever the closures below still hold
    model = held["model"]
    if model is None:
        return
    e = next(model.parameters()).element_size()
    built.update(weights_bytes=model_bytes(model), planned_weights_bytes=weight_bytes(model_cfg, mode, e))
    try:
        run.do(("quantized", mode, "vit"), lambda: vit_section(model, model_cfg, args.vit_views, ceil, device, dtype))
        run.do(
            ("quantized", mode, "decode_batch1"),
            lambda: decode_batch1(model, model_cfg, proc, args, ceil, pages, device),
        )

        def sized_wave():
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            max_seq = args.prompt_tokens + args.new_tokens + 16
            card = None if device.type == "cuda" else CPU_CARD
            cfg = engine_config(
                len(pages) - 2, max_seq, 1 + args.rows * args.cols, gpu_memory_utilization=0.9, gpu_memory_bytes=card
            )
            obs = StepTimes()
            eng = Engine(model, proc, cfg, observer=obs)
            try:
                B = eng.config.max_slots
                reqs = job_requests(
                    model_cfg, (pages * (1 + B // len(pages)))[:B], args.prompt_tokens, args.new_tokens, 400
                )
                out = wave(eng, obs, reqs, args.new_tokens)
                out.update(batch=B, memory_plan=plan_check(eng, device), plan=eng.memory_plan.to_dict())
                return out
            finally:
                eng.close()

        steady = run.result.get("standard_job", {})
        need = max((b.get("wave_1", {}).get("seconds", 0.0) for b in steady.values()), default=0.0)
        run.do(("quantized", mode, "standard_job_sized"), sized_wave, needs_s=1.3 * need)
    finally:
        held.clear()
        model = None  # noqa: F841 - the last reference: the quantized weights are freed before the next mode
        free_memory(device)


def _timed_build(cfg, device, dtype, mode) -> dict:
    t0 = time.perf_counter()
    model = build_quantized(cfg, device, dtype, mode)
    return {"model": model, "seconds": time.perf_counter() - t0}


def switch_waves(run: Run, model, cfg, proc, args, B: int, device, features) -> None:
    """Decode-side switches at batch B on pages already encoded (no ViT): the default, then each switch flipped."""
    max_seq = args.prompt_tokens + args.new_tokens + 16
    views = 1 + args.rows * args.cols
    new = args.switch_tokens
    reference: dict = {}
    for name, change in {"default": {}, **SWITCHES}.items():

        def measure(change=change, name=name):
            free_memory(device)
            obs = StepTimes()
            eng = Engine(model, proc, engine_config(B, max_seq, views, **change), observer=obs)
            try:
                wave(eng, obs, encoded_requests(cfg, B, features, args.prompt_tokens, new), new)  # captures, compile
                reqs = encoded_requests(cfg, B, features, args.prompt_tokens, new)
                out = wave(eng, obs, reqs, new)
                ids = [r.token_ids for r in eng.generate(fresh(reqs[:4]))]
                if name == "default":
                    reference["ids"] = ids
                out["same_ids_as_default"] = ids == reference.get("ids")
                out["graphs"] = eng.graph_report()
                return out
            finally:
                eng.close()

        last = run.result.get("switches", {}).get(f"batch_{B}", {}).get("default", {})
        run.do(("switches", f"batch_{B}", name), measure, needs_s=2.5 * last.get("seconds", 0.0))


def main(argv=None, hard_stop: bool = False) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default="8,32,64", help="standard-job batch sizes; the largest runs first")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--vit-views", type=int, default=40)
    p.add_argument("--grid", default="3x3", help="windows of the standard page (3x3 = 1344x1344)")
    p.add_argument("--switch-tokens", type=int, default=64, help="new tokens per wave when measuring switches")
    p.add_argument("--quick", action="store_true", help="ceilings, checks, build, one short wave at the largest batch")
    p.add_argument("--deadline-s", type=float, default=None, help="stop and write the JSON before this many seconds")
    p.add_argument("--fail", default="", help="comma-separated sections to fail on purpose (tests)")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.rows, args.cols = (int(x) for x in args.grid.split("x"))
    fail = set(filter(None, args.fail.split(","))) | set(filter(None, os.environ.get("GPU_BENCH_FAIL", "").split(",")))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = InfiMMHDConfig.preset("infimm-hd-13b" if args.size == "full" else "tiny")
    batches = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
    run = Run(args.out, args.deadline_s, fail, hard_stop)
    run.result.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        size=args.size,
        dtype=str(dtype).removeprefix("torch."),
        weights="random",
        quick=args.quick,
        args=vars(args),
        environment=environment(),
        engine_defaults=dataclasses.asdict(EngineConfig()),
    )
    run.write()

    try:
        sections(run, args, device, dtype, cfg, batches)
    except Exception as e:  # noqa: BLE001 - whatever escaped the sections is recorded; the JSON so far is kept
        run.result["fatal"] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}
    run.write()
    return run.result


def sections(run: Run, args, device, dtype, cfg: InfiMMHDConfig, batches: list[int]) -> None:
    ceil = run.do(("ceilings",), lambda: ceilings(device, dtype))
    if not args.skip_checks:
        run.do(("checks", "golden"), lambda: check_golden(device))
        run.do(("checks", "cuda_graphs"), lambda: check_graphs(device))
        free_memory(device)

    def build():
        t0 = time.perf_counter()
        model = build_model(cfg, device, dtype)
        return {"model": model, "seconds": time.perf_counter() - t0}

    built = run.do(("build",), lambda: _public(build()))
    model = _BUILT.pop("model", None)
    if model is None:
        return
    run.result["parameters"] = sum(p.numel() for p in model.parameters())
    proc = bench_processor(cfg)
    pages = [random_page(cfg, args.rows, args.cols, seed=i) for i in range(max(batches) + 2)]
    del built

    if args.quick:
        standard = standard_job(
            run, model, cfg, proc, args, pages, batches[0], device, 1, min(32, args.new_tokens), f"batch_{batches[0]}"
        )
        if standard is not None:
            standard.close()
        return

    run.do(("vit",), lambda: vit_section(model, cfg, args.vit_views, ceil, device, dtype))
    free_memory(device)
    run.do(("decode_batch1",), lambda: decode_batch1(model, cfg, proc, args, ceil, pages, device))
    for i, B in enumerate(batches):  # largest first: the headline number before the rest
        eng = standard_job(run, model, cfg, proc, args, pages, B, device, 2, args.new_tokens, f"batch_{B}")
        if eng is None:
            continue
        if i == 0:
            positions = args.prompt_tokens + args.new_tokens // 2
            run.do(("profile", f"batch_{B}"), lambda e=eng, b=B, pos=positions: profile_step(e, b, pos, device))
        eng.close()
        del eng
        free_memory(device)
        if i == 0 and not args.skip_checks:  # after the headline: at tiny size, but compiles on the GPU
            run.do(("checks", "switches"), lambda: check_switches(device))
            free_memory(device)
    for mode in QUANT_MODES:  # next to the bf16 model: each is built block by block, quantized, then freed
        quantized_mode(run, cfg, proc, args, pages, device, dtype, ceil, mode)
    B = batches[0]
    features = run.do(("switches", "features"), lambda: _page_features(model, pages[0]))
    if features is not None:
        feats = _BUILT.pop("features")
        switch_waves(run, model, cfg, proc, args, B, device, feats)
        del feats
    max_seq = args.prompt_tokens + args.new_tokens + 16
    for name, change in SCHEDULER_SWITCHES.items():  # need the ViT: one full standard-job wave each

        def scheduler(change=change):
            free_memory(device)
            obs = StepTimes()
            eng = Engine(model, proc, engine_config(B, max_seq, 1 + args.rows * args.cols, **change), observer=obs)
            try:
                return wave(
                    eng, obs, job_requests(cfg, pages[:B], args.prompt_tokens, args.new_tokens, 300), args.new_tokens
                )
            finally:
                eng.close()

        steady = run.result.get("standard_job", {}).get(f"batch_{B}", {}).get("wave_1", {})
        run.do(("switches", f"batch_{B}", name), scheduler, needs_s=1.3 * steady.get("seconds", 0.0))
    free_memory(device)


_BUILT: dict = {}  # tensors handed from a section to main without going into the JSON


def _public(value: dict) -> dict:
    """Keep tensors and modules out of the JSON: they go to _BUILT."""
    out = {}
    for k, v in value.items():
        if isinstance(v, torch.nn.Module | torch.Tensor):
            _BUILT[k] = v
        else:
            out[k] = v
    return out


def _page_features(model: InfiMMHD, page: PageViews) -> dict:
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    with torch.inference_mode():
        x = normalize_views(page.views.to(dev), dt)
        feats = model.build_media(model.encode_views(x), page.rows, page.cols)  # (V*N, Dv)
    return _public({"features": feats, "tokens": feats.shape[0]})


if __name__ == "__main__":
    result = main(hard_stop=True)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2, default=str))
