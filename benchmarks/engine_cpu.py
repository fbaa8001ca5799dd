"""Tiny model on the CPU: pages/s in a bare loop (one page at a time through `InfiMMHD.generate`) vs through the engine
(continuous batching, batched window encoding). The baseline the batch pipeline is compared with.

    python benchmarks/engine_cpu.py [--pages 16] [--new-tokens 32] [--slots 8] [--out result.json]

Prints JSON. Random tiny weights: the numbers measure the machinery, not a real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import document_page, emit, environment  # noqa: E402
from model.engine import Engine, EngineConfig  # noqa: E402
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="default: the tiny random checkpoint")
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--size", type=int, default=1344, help="page side in pixels (1344 = 3x3 windows)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    ckpt = args.checkpoint or default_tiny_checkpoint()
    engine = Engine.from_pretrained(
        ckpt, device="cpu", config=EngineConfig(max_slots=args.slots, max_seq_len=512, feature_cache_mb=0)
    )
    pages = [document_page(args.size, args.size, seed=i) for i in range(args.pages)]
    bare_loop(engine, pages[:1], 2)  # warm-up (allocator, kernels)
    t_bare = bare_loop(engine, pages, args.new_tokens)
    t_engine = through_engine(engine, pages, args.new_tokens)
    result = {
        "benchmark": "engine_cpu",
        "checkpoint": "tiny random weights" if args.checkpoint is None else str(args.checkpoint),
        "pages": args.pages,
        "page_px": args.size,
        "new_tokens": args.new_tokens,
        "slots": args.slots,
        "bare_loop_pages_per_s": round(args.pages / t_bare, 3),
        "engine_pages_per_s": round(args.pages / t_engine, 3),
        "engine_over_bare": round(t_bare / t_engine, 3),
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
