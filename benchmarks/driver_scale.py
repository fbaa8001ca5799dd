"""Driver memory and planning time of a batch job over a large manifest with most of it already done.

    python benchmarks/driver_scale.py [--documents 100000] [--done 0.9] [--pdf-share 0.2] [--out result.json]

Writes a Parquet manifest of `--documents` uris (single-page PNGs and 3-page PDFs; the files need not exist: planning
never reads a document) and fake output parts holding every row of the first `--done` share of them, then runs the
driver's planning (`pipelines.plan.plan_job`: list the manifest, read the done ids, decide what is left) in a fresh
subprocess and reports its time, the peak of Python allocations (tracemalloc) and the growth of peak RSS. The
per-million figure scales the 100k measurement linearly (planning is linear in documents). Prints JSON, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Transcribe the text of this page."


def make_inputs(folder: str, documents: int, done_share: float, pdf_share: float, rows_per_part: int = 50_000) -> dict:
    """The manifest and the done parts (ids exactly as the job writes them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.rows import OUTPUT_SCHEMA, doc_key, row_id

    every = max(1, round(1 / pdf_share)) if pdf_share > 0 else 0
    uris = [
        f"/data/scans/box-{i // 1000:04d}/doc-{i:07d}." + ("pdf" if every and i % every == 0 else "png")
        for i in range(documents)
    ]
    manifest = os.path.join(folder, "manifest.parquet")
    pq.write_table(pa.table({"uri": uris}), manifest)
    out = os.path.join(folder, "out")
    os.makedirs(out)
    n_done = int(documents * done_share)
    ids, src, page = [], [], []
    part = 0

    def flush():
        nonlocal ids, src, page, part
        if ids:
            n = len(ids)
            cols = {"id": ids, "source_uri": src, "page": page, "prompt": [PROMPT] * n, "text": ["x"] * n}
            table = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in OUTPUT_SCHEMA}, OUTPUT_SCHEMA)
            pq.write_table(table, os.path.join(out, f"part-bench-{part:05d}.parquet"))
            ids, src, page, part = [], [], [], part + 1

    rows = 0
    for u in uris[:n_done]:
        for p in range(1, (3 if u.endswith(".pdf") else 1) + 1):
            ids.append(row_id(doc_key(u), p, PROMPT))
            src.append(u)
            page.append(p)
            rows += 1
        if len(ids) >= rows_per_part:
            flush()
    flush()
    return {"manifest": manifest, "output": out, "documents": documents, "documents_done": n_done, "rows_done": rows}


def peak_rss_kib() -> int:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    (the parent held the generated inputs), hiding the child's own growth."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(manifest: str, output: str) -> dict:
    """Planning alone, in this (fresh) process, after a warm-up on 10 documents (libraries loaded, Arrow's thread
    pools started: one-time costs reported apart)."""
    import pyarrow as pa

    from pipelines.config import JobConfig
    from pipelines.plan import plan_job

    rss_start = peak_rss_kib()
    with tempfile.TemporaryDirectory() as small:
        tiny = make_inputs(small, 10, 0.9, 0.2)
        plan_job(JobConfig(inputs=(tiny["manifest"],), output=tiny["output"], prompts=(PROMPT,)))
    config = JobConfig(inputs=(manifest,), output=output, prompts=(PROMPT,))  # planning needs no checkpoint
    rss0 = peak_rss_kib()
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = plan_job(config)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = peak_rss_kib()
    t0 = time.perf_counter()
    plan_job(config)  # again without tracemalloc (it slows allocation-heavy code): the time to quote
    return {
        "plan_seconds": round(time.perf_counter() - t0, 3),
        "plan_seconds_under_tracemalloc": round(seconds, 3),
        "tracemalloc_peak_mb": round(peak / 2**20, 1),
        "rss_peak_growth_mb": round((rss1 - rss0) / 1024, 1),
        "arrow_pool_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20, 1),
        "rss_warmup_mb": round((rss0 - rss_start) / 1024, 1),  # one-time: pyarrow.compute/acero, thread pools
        "documents_listed": plan.documents,
        "documents_to_process": len(plan.records),
        "documents_skipped_complete": plan.skipped,
        "rows_already_done": plan.rows_done,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=100_000)
    ap.add_argument("--done", type=float, default=0.9, help="share of the documents already in the output")
    ap.add_argument("--pdf-share", type=float, default=0.2, help="share of 3-page PDFs (the rest: one-page PNGs)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--child", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = child(*args.child)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as folder:
        t0 = time.perf_counter()
        inputs = make_inputs(folder, args.documents, args.done, args.pdf_share)
        setup_s = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", inputs["manifest"], inputs["output"]],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        measured = json.loads(p.stdout.strip().splitlines()[-1])
    per_million = 1e6 / args.documents
    result = {
        "benchmark": "driver_scale",
        "documents": args.documents,
        "documents_done": inputs["documents_done"],
        "rows_done": inputs["rows_done"],
        "setup_seconds": round(setup_s, 1),
        **measured,
        "per_million_documents": {
            "plan_seconds": round(measured["plan_seconds"] * per_million, 1),
            "rss_peak_growth_mb": round(measured["rss_peak_growth_mb"] * per_million),
            "tracemalloc_peak_mb": round(measured["tracemalloc_peak_mb"] * per_million),
            "arrow_pool_peak_mb": round(measured["arrow_pool_peak_mb"] * per_million),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
