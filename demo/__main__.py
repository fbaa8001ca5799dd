"""`make demo` / `python -m demo [--random]`: the batch job from a bucket of documents to Parquet, on this machine.

Starts SeaweedFS (a local S3) on 127.0.0.1, writes generated pages into a bucket (PNG and JPEG pages, a 3-page PDF,
a 2-page TIFF, one corrupt file, and three synthetic one-word pages of the demo reader's task) plus a manifest giving
each document its question, runs `infimm-hd batch run` on the manifest, prints the results table and the summary, and
stops the server. The model is the default checkpoint (runtime/checkpoints.py): the demo reader
(checkpoints/demo-reader/, a tiny model trained by this repository's recipe on synthetic pages, NOT InfiMM-HD's
weights) once it measurably reads, else a tiny RANDOM-weight checkpoint (noise); `--random` forces the latter. The word
pages table shows what is printed on each word page and what the model read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

BUCKET = "documents"
PROMPT = "Transcribe the text of this page."
WORD_PAGES = 3  # synthetic pages of the demo reader's task (seed 777: in neither its training nor held-out set)


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
    manifest = [{"uri": f"s3://{BUCKET}/{key}", "prompt": PROMPT} for key in files]
    for row in word_pages():
        files[f"scans/words/{row['id']}.png"] = row.pop("data")
        manifest.append({"uri": f"s3://{BUCKET}/scans/words/{row['id']}.png", **row})
    files["manifest.jsonl"] = "".join(json.dumps(r) + "\n" for r in manifest).encode()
    client = s3.client()
    s3.create_bucket(BUCKET)
    for key, data in files.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return list(files)


def word_pages() -> list[dict]:
    """The demo reader's task: one printed word per 224 px page, with the question it was trained on."""
    from training.corpus import CorpusConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate(tmp, CorpusConfig(n=WORD_PAGES, seed=777, kinds=("word",), layout="fixed"))
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        return [
            {
                "id": f"word-{i + 1}",
                "prompt": r["prompt"],
                "answer": r["answer"],
                "data": (manifest.parent / r["uri"]).read_bytes(),
            }
            for i, r in enumerate(rows)
        ]


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
    from runtime.checkpoints import default_banner, default_checkpoint, is_random_checkpoint

    from .seaweed import SeaweedFS

    random = "--random" in sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(default_banner(random), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    checkpoint = default_checkpoint(random)
    with tempfile.TemporaryDirectory(prefix="infimm-demo-") as tmp, SeaweedFS(os.path.join(tmp, "s3")) as s3:
        os.environ.update(s3.env())  # the standard AWS variables: everything below finds the bucket through them
        keys = upload_documents(s3)
        print(f"\nSeaweedFS S3 on {s3.endpoint}; uploaded {len(keys)} documents to s3://{BUCKET}/scans/\n", flush=True)
        argv = [
            "batch",
            "run",
            "--input",
            f"s3://{BUCKET}/manifest.jsonl",
            "--output",
            f"s3://{BUCKET}/results/",
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
        rows = _read(f"s3://{BUCKET}/results/")
        print("\n" + results_table(rows))
        print("\n" + words_table(rows))
        import ray

        ray.shutdown()
    why = (
        "the text is noise because the weights are random"
        if is_random_checkpoint(checkpoint)
        else "the demo reader reads one-word pages; other documents get guesses"
    )
    print(f"\ndemo finished in {time.monotonic() - t0:.0f}s; {why}", file=sys.stderr)
    return 0


def words_table(rows: list[dict]) -> str:
    """The synthetic word pages: what is printed on each (the manifest's answer) and what the model read."""
    answers = {}
    for r in map(json.loads, _read_manifest().splitlines()):
        if "answer" in r:
            answers[r["uri"]] = r["answer"]
    lines = ["word page            printed      read"]
    for r in sorted((r for r in rows if r["source_uri"] in answers), key=lambda r: r["source_uri"]):
        mark = "ok" if (r["text"] or "").strip() == answers[r["source_uri"]] else "WRONG"
        lines.append(f"{r['source_uri'].rsplit('/', 1)[-1]:<20} {answers[r['source_uri']]:<12} {r['text']!r} {mark}")
    return "\n".join(lines)


def _read_manifest() -> str:
    from pipelines.storage import S3Settings, Storage

    return Storage(S3Settings.from_env()).read(f"s3://{BUCKET}/manifest.jsonl").decode()


def _read(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    from pipelines.output import Output
    from pipelines.storage import S3Settings, Storage

    out = Output(uri, Storage(S3Settings.from_env()))
    return [r for part in out.parts() for r in pq.read_table(part, filesystem=out.fs).to_pylist()]


if __name__ == "__main__":
    sys.exit(main())
