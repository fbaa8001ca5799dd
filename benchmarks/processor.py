"""The Dataset processor against the batch job and a bare engine loop, on the same pages (tiny model, CPU).

    python benchmarks/processor.py [--pages 48] [--size 896] [--new-tokens 8] [--batch-size 8] [--replicas]
                                   [--out result.json]

All three read the same PNG files, decode them, cut windows and run engine.generate on batches of `batch_size` pages
with `slots` decode slots and the same torch thread count:
* bare loop: this process, one batch after another, engine already loaded (benchmarks/pipeline.py's);
* batch job: `pipelines.job.run_job` on the folder (benchmarks/pipeline.py's);
* processor: `pipelines.processor.build_processor` over `ray.data.from_items` of the paths (the preprocess builds the
  messages), consumed with `iter_batches` in the driver, nothing written;
* with `--replicas`, the processor again with `server=`: our Serve app (one model replica with `slots` slots, one
  ingress) started on 127.0.0.1 before timing, the pages sent to it as data: URLs (pipelines/replicas.py).
The two Ray runs share one local Ray started before timing (each starts its own engine actor). Reported: pages/s end to
end (actor start and model load included) and steady (first result batch to the last), and the ratios to the bare
loop. Prints JSON, never asserts. Random tiny weights: the numbers measure the machinery, not a real model.
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
from benchmarks.pipeline import PROMPT, bare_loop, ray_job  # noqa: E402


def start_replicas(checkpoint: str, args) -> str:
    """Our Serve app on 127.0.0.1 (one model replica on the CPU, one ingress); returns the OpenAI base URL."""
    import socket

    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import compose
    from deployments.config import ServeArgs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = _get_global_client().http_config.port
    serve_args = ServeArgs(
        checkpoint=checkpoint, device="cpu", max_slots=args.slots, max_windows_per_image=args.max_windows, metrics=False
    )
    options = {
        "InfimmModel": {"num_replicas": 1, "ray_actor_options": {"num_gpus": 0, "num_cpus": args.threads}},
        "OpenAIIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    }
    serve.run(compose(serve_args, options), name="bench-replicas", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def processor_run(checkpoint: str, files: list[Path], args, server: str | None = None) -> dict:
    import ray

    from pipelines.processor import InfimmProcessorConfig, build_processor
    from pipelines.replicas import ServerSettings

    config = InfimmProcessorConfig(
        checkpoint=checkpoint,
        batch_size=args.batch_size,
        concurrency=1,
        gpus_per_replica=0.0,
        cpus_per_replica=args.threads,
        torch_threads=args.threads,
        max_windows=args.max_windows,
        engine_kwargs=dict(max_slots=args.slots),
        server=ServerSettings(server, requests_in_flight=args.slots) if server else None,
    )
    new_tokens = args.new_tokens

    def preprocess(row: dict) -> dict:
        content = [{"type": "image", "image": row["path"]}, {"type": "text", "text": PROMPT}]
        return dict(messages=[{"role": "user", "content": content}], sampling_params=dict(max_tokens=new_tokens))

    processor = build_processor(config, preprocess=preprocess, postprocess=lambda row: row)
    arrivals: list[tuple[float, int]] = []
    pages = errors = tokens = 0
    t0 = time.perf_counter()
    ds = processor(ray.data.from_items([{"path": str(f)} for f in files]))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        arrivals.append((time.perf_counter(), batch.num_rows))
        pages += batch.num_rows
        errors += batch.num_rows - batch["error_type"].null_count
        tokens += sum(n or 0 for n in batch["num_generated_tokens"].to_pylist())
    t_end = time.perf_counter()
    first_t, first_n = arrivals[0]
    return {
        "seconds": round(t_end - t0, 3),
        "pages": pages,
        "errors": errors,
        "pages_per_s": round(pages / (t_end - t0), 4),
        "first_result_after_s": round(first_t - t0, 3),
        "steady_pages_per_s": round((pages - first_n) / max(t_end - first_t, 1e-9), 4),
        "result_batches": len(arrivals),
        "tokens": tokens,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the tiny random checkpoint")
    p.add_argument("--pages", type=int, default=48)
    p.add_argument("--size", type=int, default=896, help="page side in pixels (896 = 2x2 windows + thumbnail)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="pages per engine call, all three")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, all three")
    p.add_argument("--ray-cpus", type=int, default=max(4, (os.cpu_count() or 2) * 2))
    p.add_argument("--replicas", action="store_true", help="also the processor through our running Serve app")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import ray

    from runtime.checkpoints import default_tiny_checkpoint

    torch.set_num_threads(args.threads)
    checkpoint = str(args.checkpoint or default_tiny_checkpoint())
    with tempfile.TemporaryDirectory(prefix="bench-processor-") as tmp:
        folder = Path(tmp) / "pages"
        folder.mkdir()
        files = []
        for i in range(args.pages):
            files.append(folder / f"page-{i:04d}.png")
            files[-1].write_bytes(document_page(args.size, args.size, seed=i))
        bare = bare_loop(checkpoint, files, args)
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        ray.data.DataContext.get_current().enable_progress_bars = False
        proc = processor_run(checkpoint, files, args)
        job = ray_job(checkpoint, folder, Path(tmp) / "out", args)
        through = None
        if args.replicas:
            t0 = time.perf_counter()
            url = start_replicas(checkpoint, args)
            start_s = time.perf_counter() - t0
            through = {**processor_run(checkpoint, files, args, server=url), "app_start_s": round(start_s, 3)}
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "processor",
        "checkpoint": "tiny random weights" if args.checkpoint is None else checkpoint,
        "pages": args.pages,
        "page_px": args.size,
        "new_tokens": args.new_tokens,
        "max_windows": args.max_windows,
        "batch_size": args.batch_size,
        "slots": args.slots,
        "torch_threads": args.threads,
        "bare_loop": bare,
        "processor": proc,
        "batch_job": job,
        "processor_steady_over_bare": round(proc["steady_pages_per_s"] / bare["pages_per_s"], 3),
        "batch_job_steady_over_bare": round(job["steady_pages_per_s"] / bare["pages_per_s"], 3),
        "processor_end_to_end_over_bare": round(proc["pages_per_s"] / bare["pages_per_s"], 3),
        "batch_job_end_to_end_over_bare": round(job["pages_per_s"] / bare["pages_per_s"], 3),
        "processor_through_replicas": through,
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
