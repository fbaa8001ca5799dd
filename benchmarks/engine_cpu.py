"""Tiny model on the CPU: pages/s in a bare loop (one page at a time through `InfiMMHD.generate`) vs through the engine
(continuous batching, batched window encoding). The baseline the batch pipeline is compared with.

    python benchmarks/engine_cpu.py [--pages 16] [--new-tokens 32] [--slots 8] [--out result.json]
    python benchmarks/engine_cpu.py --sections text [--text-prompts 64] [--dtype bfloat16]

`text` (text-only prompts, the decoder alone): a batch of prompts of 64-200 tokens through the engine (wall,
tokens/s), batch-1 decode ms/token, prefill of 128 tokens + first token, and per decode step the split between the
model's forward (`decode_forward`) and the host's work around it (inputs, sampling, detokenizing, stop checks).

Prints JSON. Random tiny weights: the numbers measure the machinery, not a real model.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import document_page, emit, environment  # noqa: E402
from model.engine import Engine, EngineConfig, EngineObserver, Request  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.windows import normalize_views, prepare_image  # noqa: E402
from runtime.checkpoints import default_tiny_checkpoint  # noqa: E402

PROMPT = "Transcribe the text of this document page exactly, keeping the reading order."


def bare_loop(engine: Engine, pages: list[bytes], new_tokens: int) -> float:
    """Everything per page, one at a time: decode + cut windows, ViT, prefill + greedy decode."""
    model, proc = engine.model, engine.processor
    t0 = time.perf_counter()
    for data in pages:
        page = prepare_image(data, proc.windows)
        inputs = proc(page, PROMPT)
        with torch.inference_mode():
            media = model.build_media(model.encode_views(normalize_views(page.views)), page.rows, page.cols)
            model.generate(inputs.input_ids, inputs.attention_mask, media[None, None], new_tokens, stop_token_ids=[])
    return time.perf_counter() - t0


def through_engine(engine: Engine, pages: list[bytes], new_tokens: int) -> float:
    t0 = time.perf_counter()
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())
    requests = [engine.make_request(PROMPT, [data], sampling) for data in pages]  # decode + cut windows included
    results = engine.generate(requests)
    assert all(r.completion_tokens == new_tokens for r in results), "every request must run to max_new_tokens"
    return time.perf_counter() - t0


class StepTimes(EngineObserver):
    def __init__(self):
        self.decode: list[float] = []
        self.prefill: list[float] = []

    def on_decode_step(self, batch: int, seconds: float) -> None:
        self.decode.append(seconds)

    def on_prefill(self, requests: int, tokens: int, seconds: float) -> None:
        self.prefill.append(seconds)


def time_forward(engine: Engine) -> list[float]:
    """Wall time of every decode forward (the model's part of a step); the rest of a step is host work."""
    owner = getattr(engine, "runner", engine)  # the device runner (older engines: the engine itself)
    real, times = owner.decode_forward, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    owner.decode_forward = timed
    return times


def text_prompts(n: int, vocab: int, seed: int = 0, lo: int = 64, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(259, vocab - 2) for _ in range(rng.randint(lo, hi))] for _ in range(n)]  # no specials


def text_section(engine: Engine, obs: StepTimes, prompts: int, new_tokens: int) -> dict:
    vocab = engine.model.config.text.vocab_size
    forward = time_forward(engine)
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())

    cpu = [0.0]

    def run(ids: list[list[int]]) -> tuple[float, list]:
        obs.__init__()
        forward.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        results = engine.generate([Request(p, sampling=sampling) for p in ids])
        cpu[0] = time.process_time() - c0
        return time.perf_counter() - t0, results

    run(text_prompts(2, vocab, seed=99))  # warm-up
    wall, results = run(text_prompts(prompts, vocab))
    steps, fwd = len(obs.decode), sum(forward)
    batch = {
        "prompts": prompts,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "new_tokens": sum(r.completion_tokens for r in results),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu[0], 3),  # CPU time of this process: steadier than wall time on a shared machine
        "tokens_per_s": round(sum(r.completion_tokens for r in results) / wall, 2),
        "prefill_s": round(sum(obs.prefill), 3),
        "decode_steps": steps,
        "decode_ms_per_step": round(1e3 * sum(obs.decode) / max(1, steps), 3),
        "forward_ms_per_step": round(1e3 * fwd / max(1, steps), 3),
        "host_ms_per_step": round(1e3 * (sum(obs.decode) - fwd) / max(1, steps), 3),
    }
    one_ms, ttft = [], []
    for seed in range(3):
        _, (r,) = run(text_prompts(1, vocab, seed=seed, lo=128, hi=128))
        one_ms.append(1e3 * r.timings.decode_s / max(1, r.completion_tokens - 1))
        ttft.append(r.timings.ttft_s)
    steps = len(obs.decode)
    batch1 = {
        "ms_per_token_median": round(statistics.median(one_ms), 3),
        "ms_per_token_best": round(min(one_ms), 3),
        "forward_ms_per_step": round(1e3 * sum(forward) / max(1, steps), 3),
        "host_ms_per_step": round(1e3 * (sum(obs.decode) - sum(forward)) / max(1, steps), 3),
        "prefill_128_plus_first_token_s": round(statistics.median(ttft), 4),
    }
    return {"batch": batch, "batch_1": batch1}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="default: the tiny random checkpoint")
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--size", type=int, default=1344, help="page side in pixels (1344 = 3x3 windows)")
    p.add_argument("--sections", default="pages", help="comma-separated: pages, text")
    p.add_argument("--text-prompts", type=int, default=64)
    p.add_argument("--text-new-tokens", type=int, default=64)
    p.add_argument("--text-slots", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = args.checkpoint or default_tiny_checkpoint()
    result = {
        "benchmark": "engine_cpu",
        "checkpoint": "tiny random weights" if args.checkpoint is None else str(args.checkpoint),
        "dtype": args.dtype,
        "loadavg_1m_before": os.getloadavg()[0],
    }
    dtype = getattr(torch, args.dtype)
    if "pages" in sections:
        engine = Engine.from_pretrained(
            ckpt,
            device="cpu",
            dtype=dtype,
            config=EngineConfig(max_slots=args.slots, max_seq_len=512, feature_cache_mb=0),
        )
        pages = [document_page(args.size, args.size, seed=i) for i in range(args.pages)]
        bare_loop(engine, pages[:1], 2)  # warm-up (allocator, kernels)
        t_bare = bare_loop(engine, pages, args.new_tokens)
        t_engine = through_engine(engine, pages, args.new_tokens)
        result.update(
            pages=args.pages,
            page_px=args.size,
            new_tokens=args.new_tokens,
            slots=args.slots,
            bare_loop_pages_per_s=round(args.pages / t_bare, 3),
            engine_pages_per_s=round(args.pages / t_engine, 3),
            engine_over_bare=round(t_bare / t_engine, 3),
        )
    if "text" in sections:
        obs = StepTimes()
        config = EngineConfig(max_slots=args.text_slots, max_seq_len=512, feature_cache_mb=0)
        engine = Engine.from_pretrained(ckpt, device="cpu", dtype=dtype, config=config, observer=obs)
        result["text"] = {
            "slots": args.text_slots,
            **text_section(engine, obs, args.text_prompts, args.text_new_tokens),
        }
    result["loadavg_1m_after"] = os.getloadavg()[0]
    result["environment"] = environment()
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
