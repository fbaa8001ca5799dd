"""Model and engine benchmark without Ray, for the lent GPU machine (full size, random bf16 weights) and, at tiny
size, as a CPU smoke test inside the test suite.

    # on the GPU machine (one call; writes JSON to $OUT):
    python benchmarks/gpu.py --size full --out $OUT/gpu.json
    # on the CPU (smoke):
    python benchmarks/gpu.py --size tiny --device cpu --batches 2 --new-tokens 4 --vit-views 3 --prompt-tokens 16

Measures, in one run on one device: the card name, the bf16 matmul ceiling and the copy bandwidth (the yardsticks),
ViT TFLOP/s on 40 views, decode ms/token at batch 1 against its bandwidth floor, and the standard transcription job
(1344x1344 page = thumbnail + 3x3 windows, 48-token prompt, 256 new tokens forced) in pages/s at batch 8, 32 and 64.
Correctness checks run on the same device first: golden parity in fp32 and CUDA-graph decode == eager decode.
Compare with benchmarks/gpu_baseline.md (official code, H200: 0.45 pages/s on the standard job).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import emit, environment  # noqa: E402
from model import InfiMMHD, InfiMMHDConfig, Processor  # noqa: E402
from model.engine import Engine, EngineConfig, EngineObserver, Request  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.tokenizer import load_tokenizer, save_tiny_tokenizer  # noqa: E402
from model.windows import PageViews  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def random_page(cfg: InfiMMHDConfig, rows: int, cols: int, seed: int) -> PageViews:
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    views = torch.randint(0, 256, (1 + rows * cols, 3, s, s), dtype=torch.uint8, generator=g)
    return PageViews(views=views, rows=rows, cols=cols, width=cols * s, height=rows * s)


def job_requests(cfg, n: int, prompt_tokens: int, new_tokens: int, rows: int, cols: int, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        body = torch.randint(3, cfg.eoc_token_id, (prompt_tokens - 2,), generator=g).tolist()
        ids = [cfg.text.bos_token_id, cfg.image_token_id] + body
        sampling = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_token_ids=())
        reqs.append(Request(ids, [random_page(cfg, rows, cols, seed * 1000 + i)], sampling))
    return reqs


def checks(device) -> dict:
    """Correctness on this device: the golden vectors in fp32, and CUDA-graph decode against eager decode."""
    from safetensors.torch import load_file

    from model import load_pretrained

    golden = os.path.join(ROOT, "tests", "data", "golden")
    out = {}
    m = load_pretrained(golden, dtype=torch.float32, device=device)
    g = load_file(os.path.join(golden, "cases.safetensors"))
    import numpy as np

    px = torch.from_numpy(np.random.RandomState(1002).standard_normal((7, 3, 448, 448)).astype(np.float32)).to(device)
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
    if device.type == "cuda":
        cfg = InfiMMHDConfig.preset("tiny")
        model = build_model(cfg, device, torch.bfloat16)
        proc = bench_processor(cfg)
        outs = {}
        for graphs in (False, True):
            eng = Engine(model, proc, EngineConfig(max_slots=4, max_seq_len=160, cuda_graphs=graphs, max_views=10))
            outs[graphs] = [r.token_ids for r in eng.generate(job_requests(cfg, 6, 16, 40, 3, 3, seed=5))]
        out["cuda_graph_decode_equals_eager"] = outs[True] == outs[False]
    return out


_PROCESSORS: dict = {}


def bench_processor(cfg: InfiMMHDConfig) -> Processor:
    """A Llama-style tokenizer with the config's vocabulary (built on the spot: nothing can be downloaded)."""
    if cfg.eoc_token_id not in _PROCESSORS:
        folder = tempfile.mkdtemp(prefix="bench-tok-")
        save_tiny_tokenizer(folder, base_vocab=cfg.eoc_token_id)
        _PROCESSORS[cfg.eoc_token_id] = Processor(load_tokenizer(folder), cfg)
    return _PROCESSORS[cfg.eoc_token_id]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--vit-views", type=int, default=40)
    p.add_argument("--grid", default="3x3", help="windows of the standard page (3x3 = 1344x1344)")
    p.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = InfiMMHDConfig.preset("infimm-hd-13b" if args.size == "full" else "tiny")
    rows, cols = (int(x) for x in args.grid.split("x"))
    result: dict = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": "random",
        "environment": environment(),
    }
    if not args.skip_checks:
        result["checks"] = checks(device)
        emit(result, args.out)  # partial result early: survives a later crash or time-out
    result["ceilings"] = ceil = ceilings(device, dtype)

    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    result["model_build_s"] = time.perf_counter() - t0
    result["parameters"] = sum(p.numel() for p in model.parameters())

    # ViT on N views, as the engine runs it
    views = torch.randn(args.vit_views, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        t = timed(lambda: model.encode_views(views), device, repeat=3)
    flops = args.vit_views * vit_flops_per_view(cfg)
    result["vit"] = {
        "views": args.vit_views,
        "seconds": t,
        "tflop_per_view": vit_flops_per_view(cfg) / 1e12,
        "tflops": flops / t / 1e12,
        "fraction_of_matmul_ceiling": flops / t / 1e12 / ceil["matmul_tflops"],
    }
    views = None  # free the GPU memory before the engine runs
    emit(result, args.out)

    proc = bench_processor(cfg)
    max_seq = args.prompt_tokens + args.new_tokens + 16
    graphs = not args.no_graphs

    # decode at batch 1 against its bandwidth floor
    eng = Engine(
        model, proc, EngineConfig(max_slots=1, max_seq_len=max_seq, cuda_graphs=graphs, max_views=1 + rows * cols)
    )
    warm = job_requests(cfg, 1, args.prompt_tokens, min(args.new_tokens, 64), rows, cols, seed=1)
    eng.generate(warm)
    res = eng.generate(job_requests(cfg, 1, args.prompt_tokens, min(args.new_tokens, 64), rows, cols, seed=2))[0]
    per_token = res.timings.decode_s / max(1, res.completion_tokens - 1)
    elt = next(model.parameters()).element_size()
    lm_bytes = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision.")) * elt
    media_bytes = 2 * len(cfg.xattn_layers) * (1 + rows * cols) * cfg.vision.tokens * cfg.xattn.inner * elt
    kv_bytes = 2 * cfg.text.layers * cfg.text.kv_heads * cfg.text.head_dim * elt * (args.prompt_tokens + 32)
    floor = (lm_bytes + media_bytes + kv_bytes) / (ceil["copy_gb_per_s"] * 1e9)
    result["decode_batch1"] = {
        "ms_per_token": per_token * 1e3,
        "bandwidth_floor_ms": floor * 1e3,
        "ratio_to_floor": per_token / floor,
        "bytes_per_step": lm_bytes + media_bytes + kv_bytes,
    }
    del eng
    emit(result, args.out)

    # the standard job at several batch sizes: two waves each, the second is the steady state
    result["standard_job"] = {
        "grid": f"{rows}x{cols}",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "cuda_graphs": graphs and device.type == "cuda",
    }
    for B in (int(b) for b in args.batches.split(",")):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        obs = StepTimes()
        try:
            eng = Engine(
                model,
                proc,
                EngineConfig(
                    max_slots=B,
                    max_seq_len=max_seq,
                    cuda_graphs=graphs,
                    max_views=1 + rows * cols,
                    vit_batch_views=40,
                    max_prefill_batch=8,
                    feature_cache_mb=0,
                ),
                observer=obs,
            )
            waves = []
            for wave in range(2):
                reqs = job_requests(cfg, B, args.prompt_tokens, args.new_tokens, rows, cols, seed=100 + wave)
                obs.__init__()
                t0 = time.perf_counter()
                out = eng.generate(reqs)
                dt = time.perf_counter() - t0
                assert all(r.completion_tokens == args.new_tokens for r in out), "forced length not reached"
                waves.append(
                    {
                        "seconds": dt,
                        "pages_per_s": B / dt,
                        "encode_s": obs.encode,
                        "prefill_s": obs.prefill,
                        "decode_s": obs.decode,
                        "decode_ms_per_step": 1e3 * obs.decode / max(1, obs.decode_steps),
                    }
                )
            entry = {"pages_per_s": waves[-1]["pages_per_s"], "cold": waves[0], "steady": waves[-1]}
            if device.type == "cuda":
                entry["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            del eng
        except torch.OutOfMemoryError as e:
            entry = {"error": f"out of memory: {str(e)[:200]}"}
        result["standard_job"][f"batch_{B}"] = entry
        emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
