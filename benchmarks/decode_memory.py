"""What one decode task really uses: per page kind, the peak memory of a decode worker through the real pipeline.

    python benchmarks/decode_memory.py [--dpi 150] [--max-render-mp 12] [--decode-memory-mb 512] [--out result.json]

Each case is a folder of one kind of document, run through `pipelines.job.decoded_pages` (split -> one block per
task -> decode) on a local Ray with the job's default settings. Inside every decode call a thread samples the worker's
memory every 10 ms the way Ray Data does (RSS minus shared pages, its "USS" estimate; Ray samples once a second), so
the peak here is at least what Ray Data compares with the `memory=` reservation. Reported per case: the worker's
baseline (imports, before the first page), its peak, the peak minus the baseline (the page's own cost), and whether
Ray Data printed its "used up to X ... configured Y" warning. The decode reservation is set from the largest peak plus
Ray Data's own 25 % headroom. Prints JSON, never asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.local_ray import prepare_local_env  # noqa: E402

prepare_local_env()  # a script that starts its own local Ray; before Ray is imported

from benchmarks.common import document_page, emit, environment  # noqa: E402
from pipelines.decode import DecodePages  # noqa: E402

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def uss_bytes() -> int:
    """Ray Data's estimate (ray.data._internal.util.MemoryProfiler): resident minus shared, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        _, resident, shared, *_ = (int(x) for x in f.read().split())
    return (resident - shared) * PAGE


class MeasuredDecode(DecodePages):
    """The decode stage, with a 10 ms memory sampler around each call; peaks go to `<dir>/<pid>.json`."""

    def __init__(self, base: DecodePages, report_dir: str):
        super().__init__(base.storage, base.config)
        self.report_dir = report_dir

    def __call__(self, batch):
        before = uss_bytes()
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], uss_bytes())
                stop.wait(0.01)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield from super().__call__(batch)
        finally:
            stop.set()
            t.join()
            path = Path(self.report_dir) / f"{os.getpid()}.json"
            old = json.loads(path.read_text()) if path.exists() else {"baseline": before, "peak": 0, "calls": 0}
            old["peak"] = max(old["peak"], peak[0], uss_bytes())
            old["calls"] += 1
            path.write_text(json.dumps(old))


def pdf_bytes(pages: int, size_pt: tuple[int, int], image_px: tuple[int, int]) -> bytes:
    """A scanned-style PDF: each page one embedded page image of `image_px`, drawn on a `size_pt` page."""
    import io

    from PIL import Image

    imgs = [Image.open(io.BytesIO(document_page(*image_px, seed=i))).convert("RGB") for i in range(pages)]
    buf = io.BytesIO()
    dpi = 72 * image_px[0] / size_pt[0]
    imgs[0].save(buf, "PDF", save_all=True, append_images=imgs[1:], resolution=dpi)
    return buf.getvalue()


CASES = {
    # name: (file name, bytes factory)
    "a4_pdf_page_150dpi": ("a4.pdf", lambda: pdf_bytes(1, (595, 842), (1240, 1754))),
    "a4_pdf_16_pages_150dpi": ("a4x16.pdf", lambda: pdf_bytes(16, (595, 842), (1240, 1754))),
    "poster_pdf_page_a0": ("a0.pdf", lambda: pdf_bytes(1, (2384, 3370), (2384, 3370))),  # 35 MP at 150 dpi
    "png_48mp_scan": ("big.png", lambda: document_page(6000, 8000)),
    "png_30000x10": ("strip.png", lambda: document_page(30000, 10)),
    "png_100mp_at_the_limit": ("huge.png", lambda: document_page(10000, 10000)),  # WindowConfig.max_pixels
}


WARNED: set[str] = set()  # cases for which Ray Data logged "used up to X of memory per worker"
CURRENT = [""]


class CatchMemoryWarning(logging.Handler):
    def emit(self, record):
        if "used up to" in " ".join(record.getMessage().split()):
            WARNED.add(CURRENT[0])


def run_case(name: str, folder: Path, args) -> dict:
    import ray

    import pipelines.job as job
    from pipelines.config import JobConfig
    from pipelines.decode import DecodeConfig
    from pipelines.plan import plan_sources
    from pipelines.storage import Storage, list_sources

    CURRENT[0] = name
    report = Path(tempfile.mkdtemp(prefix=f"decode-mem-{name}-"))
    config = JobConfig(  # no checkpoint: the decode stage alone, at the default 448 windows
        inputs=(str(folder),),
        output=str(folder / "out"),
        prompts=("Transcribe.",),
        decode=DecodeConfig(dpi=args.dpi, max_render_pixels=int(args.max_render_mp * 1e6)),
        decode_memory=args.decode_memory_mb * MB,
    )
    storage = Storage()
    records, _ = plan_sources(list_sources(list(config.inputs), storage), config.prompts, set())

    original = job.DecodePages
    job.DecodePages = lambda storage, cfg: MeasuredDecode(original(storage, cfg), str(report))
    t0 = time.monotonic()
    try:
        pages = sum(
            b.num_rows
            for b in job.decoded_pages(records, config, storage).iter_batches(batch_size=None, batch_format="pyarrow")
        )
    finally:
        job.DecodePages = original
    seconds = time.monotonic() - t0
    time.sleep(1.0)  # the executor's final checks log from its own thread
    workers = [json.loads(p.read_text()) for p in report.glob("*.json")]
    assert ray.is_initialized(), "ray must be up"
    peak = max(w["peak"] for w in workers)
    baseline = min(w["baseline"] for w in workers)
    return {
        "pages": pages,
        "seconds": round(seconds, 2),
        "decode_workers": len(workers),
        "decode_calls": sum(w["calls"] for w in workers),
        "worker_baseline_mb": round(baseline / MB, 1),
        "worker_peak_mb": round(peak / MB, 1),
        "peak_over_baseline_mb": round((peak - baseline) / MB, 1),
        "ray_data_memory_warning": name in WARNED,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--max-render-mp", type=float, default=12.0)
    p.add_argument("--decode-memory-mb", type=int, default=512)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--out")
    args = p.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # (on the reporting module itself: Ray Data re-configures the handlers of "ray.data" when a dataset first runs)
    logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager").addHandler(CatchMemoryWarning())
    try:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.cases:
                filename, make = CASES[name]
                folder = Path(tmp) / name
                folder.mkdir()
                (folder / filename).write_bytes(make())
                results[name] = run_case(name, folder, args)
                print(name, results[name], file=sys.stderr)
    finally:
        ray.shutdown()
    worst = max(r["worker_peak_mb"] for r in results.values())
    emit(
        {
            "benchmark": "decode_memory",
            "settings": {
                "dpi": args.dpi,
                "max_render_mp": args.max_render_mp,
                "decode_memory_mb": args.decode_memory_mb,
            },
            "cases": results,
            "worst_worker_peak_mb": worst,
            "reservation_needed_mb": round(worst * 1.25),  # Ray Data warns above peak * 1.25
            "environment": environment(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
