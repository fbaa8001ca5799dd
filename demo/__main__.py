"""`make demo` / `python -m demo`: the batch job from a bucket of documents to Parquet, on this machine.

Starts SeaweedFS (a local S3) on 127.0.0.1, writes generated pages into a bucket (PNG and JPEG pages, a 3-page PDF,
a 2-page TIFF and one corrupt file), runs `infimm-hd batch run` on them with a tiny RANDOM-weight checkpoint, prints
the results table and the summary, and stops the server. The text is noise (random weights); everything else is
the real pipeline: listing, decoding, windows, the engine on a Ray actor pool, Parquet on S3, the summary.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

BUCKET = "documents"
PROMPT = "Transcribe the text of this page."


def upload_documents(s3) -> list[str]:
    from . import samples

    files = {
        "scans/invoice-001.png": samples.png_page(1),
        "scans/invoice-002.png": samples.png_page(2, (1240, 1754)),  # A4 at 150 dpi: a 4x3 window grid
        "scans/letter.jpg": samples.jpeg_page(3, (850, 1100)),
        "scans/report.pdf": samples.pdf_document(3, start=10),
        "scans/fax.tiff": samples.tiff_document(2, start=20),
        "scans/broken.png": samples.png_page(4)[:2000],  # cut short: must become an error row, not a failed job
    }
    client = s3.client()
    s3.create_bucket(BUCKET)
    for key, data in files.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return list(files)


def results_table(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (r["source_uri"], r["page"]))
    w = max([len("source")] + [len(r["source_uri"]) for r in rows])
    head = f"{'source':<{w}} {'page':>4} {'grid':>5} {'tokens':>6}  {'text / error'}"
    lines = [head, "-" * len(head)]
    for r in rows:
        grid = f"{r['grid_rows']}x{r['grid_cols']}" if r["grid_rows"] else "-"
        what = f"[{r['error_type']}] {r['error_message']}" if r["error_type"] else repr(r["text"])
        lines.append(f"{r['source_uri']:<{w}} {r['page']:>4} {grid:>5} {r['completion_tokens'] or 0:>6}  {what[:70]}")
    return "\n".join(lines)


def main() -> int:
    import logging

    from runtime.local_ray import prepare_local_env

    prepare_local_env()  # the demo starts its own Ray: keep it on loopback (before anything imports Ray)

    from cli.main import main as cli
    from runtime.checkpoints import RANDOM_BANNER, default_tiny_checkpoint

    from .seaweed import SeaweedFS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(RANDOM_BANNER, file=sys.stderr, flush=True)
    t0 = time.monotonic()
    checkpoint = default_tiny_checkpoint()
    with tempfile.TemporaryDirectory(prefix="infimm-demo-") as tmp, SeaweedFS(os.path.join(tmp, "s3")) as s3:
        os.environ.update(s3.env())  # the standard AWS variables: everything below finds the bucket through them
        keys = upload_documents(s3)
        print(f"\nSeaweedFS S3 on {s3.endpoint}; uploaded {len(keys)} documents to s3://{BUCKET}/scans/\n", flush=True)
        argv = [
            "batch",
            "run",
            "--input",
            f"s3://{BUCKET}/scans/",
            "--output",
            f"s3://{BUCKET}/results/",
            "--prompt",
            PROMPT,
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "12",
            "--batch-size",
            "4",
        ]
        print("$ infimm-hd " + " ".join(a if " " not in a else repr(a) for a in argv) + "\n", flush=True)
        rc = cli(argv)
        if rc:
            return rc
        print("\n" + results_table(_read(f"s3://{BUCKET}/results/")))
        import ray

        ray.shutdown()
    print(
        f"\ndemo finished in {time.monotonic() - t0:.0f}s; the text is noise because the weights are random",
        file=sys.stderr,
    )
    return 0


def _read(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    from pipelines.output import output_parts
    from pipelines.storage import S3Settings, Storage

    fs, path = Storage(S3Settings.from_env()).resolve(uri)
    return [r for part in output_parts(fs, path.rstrip("/")) for r in pq.read_table(part, filesystem=fs).to_pylist()]


if __name__ == "__main__":
    sys.exit(main())
