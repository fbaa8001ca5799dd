"""A long PDF through the batch job against the same pages as separate PNGs: memory and pages/s.

    python benchmarks/long_pdf.py [--pages 300] [--pages-per-task 16] [--new-tokens 2] [--out result.json]

Both runs are `pipelines.job.run_job` on a local Ray with the tiny RANDOM checkpoint: one PDF of `--pages` small
pages (an embedded page image each, 200x260 pt, rendered at 72 dpi: one window), then a folder of the same pages as
PNG files. Reported per run: pages/s (end to end, actor start included), the driver's peak memory growth during the
job (RSS sampled every 50 ms), every decode worker's peak (RSS minus shared, as Ray Data measures it; sampled every
10 ms inside each decode call, see benchmarks/decode_memory.py), and how many decode calls (tasks) did the work: the
PDF's pages are spread over ceil(pages / pages_per_task) of them. Prints JSON, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.local_ray import prepare_local_env  # noqa: E402

prepare_local_env()  # a script that starts its own local Ray; before Ray is imported

from benchmarks.common import emit, environment  # noqa: E402
from benchmarks.decode_memory import MB, MeasuredDecode  # noqa: E402

PROMPT = "Transcribe the text of this page."
PAGE_SIZE = (200, 260)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(name: str, inputs: Path, checkpoint: str, args, work: Path) -> dict:
    import pipelines.job as job
    from model.windows import WindowConfig
    from pipelines.config import JobConfig
    from pipelines.decode import DecodeConfig
    from pipelines.generate import GenerateConfig

    report = work / f"decode-{name}"
    report.mkdir()
    config = JobConfig(
        inputs=(str(inputs),),
        output=str(work / f"out-{name}"),
        prompts=(PROMPT,),
        generate=GenerateConfig(checkpoint=checkpoint, max_new_tokens=args.new_tokens, max_slots=8),
        decode=DecodeConfig(windows=WindowConfig(max_windows=4), dpi=72, pages_per_task=args.pages_per_task),
        batch_size=8,
        gpus_per_actor=0.0,
        flush_seconds=5.0,
    )
    before = rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    original = job.DecodePages
    job.DecodePages = lambda storage, cfg: MeasuredDecode(original(storage, cfg), str(report))
    t0 = time.monotonic()
    try:
        summary = job.run_job(config, progress=False)
    finally:
        job.DecodePages = original
        stop.set()
        sampler.join()
    seconds = time.monotonic() - t0
    workers = [json.loads(p.read_text()) for p in report.glob("*.json")]
    r = summary["run"]
    return {
        "rows": r["rows"],
        "pages": r["pages"],
        "errors": r["errors"],
        "seconds": round(seconds, 2),
        "pages_per_s": round(r["pages"] / seconds, 3),
        "driver_rss_before_mb": round(before / MB, 1),
        "driver_peak_growth_mb": round((peak[0] - before) / MB, 1),
        "decode_calls": sum(w["calls"] for w in workers),
        "decode_workers": len(workers),
        "decode_worker_peak_mb": round(max(w["peak"] for w in workers) / MB, 1),
        "decode_worker_baseline_mb": round(min(w["baseline"] for w in workers) / MB, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=300)
    p.add_argument("--pages-per-task", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--runs", default="long_pdf,same_pages_as_png", help="which runs, comma-separated")
    p.add_argument("--out")
    args = p.parse_args(argv)

    import ray

    from demo import samples
    from model.weights import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = str(make_tiny_checkpoint(work / "tiny", seed=0))
        pdf_dir, png_dir = work / "pdf", work / "png"
        pdf_dir.mkdir()
        png_dir.mkdir()
        (pdf_dir / "long.pdf").write_bytes(samples.pdf_document(args.pages, size=PAGE_SIZE))
        for i in range(args.pages):
            (png_dir / f"page-{i:04d}.png").write_bytes(samples.png_page(i, PAGE_SIZE))
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            results = {}
            for name, folder in (("long_pdf", pdf_dir), ("same_pages_as_png", png_dir)):
                if name not in args.runs.split(","):
                    continue
                results[name] = run(name, folder, checkpoint, args, work)
                print(name, results[name], file=sys.stderr)
        finally:
            ray.shutdown()
        pdf_size = (pdf_dir / "long.pdf").stat().st_size
    emit(
        {
            "benchmark": "long_pdf",
            "settings": {
                "pages": args.pages,
                "pages_per_task": args.pages_per_task,
                "new_tokens": args.new_tokens,
                "page_pt": PAGE_SIZE,
                "dpi": 72,
                "pdf_mb": round(pdf_size / MB, 2),
                "ray_cpus": args.cpus,
            },
            "runs": results,
            "pdf_vs_png_pages_per_s": (
                round(results["long_pdf"]["pages_per_s"] / results["same_pages_as_png"]["pages_per_s"], 3)
                if len(results) == 2
                else None
            ),
            "note": "tiny RANDOM weights: the numbers measure the machinery, not a real model",
            "environment": environment(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
