"""Batch pipeline on the tiny model: pages/s through the Ray job vs the same pages through the engine in a bare loop.

    python benchmarks/pipeline.py [--pages 192] [--size 896] [--new-tokens 16] [--batch-size 8] [--out result.json]

Both sides do the same work on the same PNG files: read, decode, cut windows, engine.generate on batches of
`batch_size` pages with `slots` decode slots and the same torch thread count. The bare loop does it in this process,
one batch after another, with the engine already loaded. The Ray job is `pipelines.job.run_job` (local folder in,
local Parquet out) on a local Ray started before timing: decode tasks, one engine actor, the driver writing parts.

Reported: pages/s of each; the job end to end (actor start and model load included) and in steady state (from the
first result batch to the last, i.e. without the one-time actor start); the ratios. Prints JSON, never asserts.
Random tiny weights: the numbers measure the machinery, not a real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.local_ray import prepare_local_env  # noqa: E402

prepare_local_env()  # a script that starts its own local Ray; before Ray is imported

import torch  # noqa: E402

from benchmarks.common import document_page, emit, environment  # noqa: E402

PROMPT = "Transcribe the text of this document page exactly."


def bare_loop(checkpoint: str, files: list[Path], args) -> dict:
    from model.engine import Engine, EngineConfig
    from model.sampling import SamplingParams
    from model.windows import WindowConfig, prepare_image

    t0 = time.perf_counter()
    windows = WindowConfig(max_windows=args.max_windows)
    engine = Engine.from_pretrained(
        checkpoint,
        device="cpu",
        windows=windows,
        config=EngineConfig(max_slots=args.slots, max_views=args.max_windows + 1),
    )
    load_s = time.perf_counter() - t0
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(files), args.batch_size):
        pages = [prepare_image(f.read_bytes(), windows) for f in files[i : i + args.batch_size]]
        results = engine.generate([engine.make_request(PROMPT, [p], sampling) for p in pages])
        tokens += sum(r.completion_tokens for r in results)
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 3),
        "load_s": round(load_s, 3),
        "pages_per_s": round(len(files) / seconds, 4),
        "tokens": tokens,
    }


def ray_job(checkpoint: str, folder: Path, out: Path, args) -> dict:
    from model.windows import WindowConfig
    from pipelines.config import JobConfig
    from pipelines.decode import DecodeConfig
    from pipelines.generate import GenerateConfig
    from pipelines.job import run_job

    arrivals: list[tuple[float, int]] = []
    config = JobConfig(
        inputs=(str(folder),),
        output=str(out),
        prompts=(PROMPT,),
        generate=GenerateConfig(
            checkpoint=checkpoint, max_new_tokens=args.new_tokens, max_slots=args.slots, torch_threads=args.threads
        ),
        decode=DecodeConfig(windows=WindowConfig(max_windows=args.max_windows)),
        batch_size=args.batch_size,
        actors=(1, 1),
        gpus_per_actor=0.0,
        cpus_per_actor=args.threads,
        flush_seconds=1e9,
    )
    t0 = time.perf_counter()
    summary = run_job(config, progress=False, on_batch=lambda t: arrivals.append((time.perf_counter(), t.num_rows)))
    t_end = time.perf_counter()
    seconds = t_end - t0
    first_t, first_n = arrivals[0]
    run = summary["run"]
    return {
        "seconds": round(seconds, 3),
        "pages": run["pages"],
        "errors": run["errors"],
        "pages_per_s": round(run["pages"] / seconds, 4),
        "first_result_after_s": round(first_t - t0, 3),  # listing, actor start, model load, first batch
        "steady_pages_per_s": round((run["pages"] - first_n) / max(t_end - first_t, 1e-9), 4),
        "result_batches": len(arrivals),
        "tokens": run["completion_tokens"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the tiny random checkpoint")
    p.add_argument("--pages", type=int, default=192, help="enough for the ~15 s actor start to matter less")
    p.add_argument("--size", type=int, default=896, help="page side in pixels (896 = 2x2 windows + thumbnail)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="pages per engine call, both sides")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=max(4, (os.cpu_count() or 2) * 2),
        help="logical CPUs of the local Ray (the engine actor takes --threads, decode tasks the rest)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import ray

    from runtime.checkpoints import default_tiny_checkpoint

    torch.set_num_threads(args.threads)
    checkpoint = str(args.checkpoint or default_tiny_checkpoint())
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        folder = Path(tmp) / "pages"
        folder.mkdir()
        files = []
        for i in range(args.pages):
            files.append(folder / f"page-{i:04d}.png")
            files[-1].write_bytes(document_page(args.size, args.size, seed=i))
        bare = bare_loop(checkpoint, files, args)
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        job = ray_job(checkpoint, folder, Path(tmp) / "out", args)
        ray.shutdown()
    result = {
        "benchmark": "pipeline",
        "checkpoint": "tiny random weights" if args.checkpoint is None else checkpoint,
        "pages": args.pages,
        "page_px": args.size,
        "new_tokens": args.new_tokens,
        "max_windows": args.max_windows,
        "batch_size": args.batch_size,
        "slots": args.slots,
        "torch_threads": args.threads,
        "bare_loop": bare,
        "ray_job": job,
        "ray_steady_over_bare": round(job["steady_pages_per_s"] / bare["pages_per_s"], 3),
        "ray_end_to_end_over_bare": round(job["pages_per_s"] / bare["pages_per_s"], 3),
        "ray_end_to_end_over_bare_with_load": round(
            job["pages_per_s"] / (args.pages / (bare["seconds"] + bare["load_s"])), 3
        ),
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
