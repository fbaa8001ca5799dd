"""Shared by the batch-pipeline tests: small job settings (as a JobConfig and as `batch run` flags), the batch CLI in a
subprocess, decoding a file without Ray, reading an output folder back, reference answers."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pyarrow.parquet as pq

from model.windows import WindowConfig
from pipelines.config import JobConfig
from pipelines.decode import DecodeConfig, DecodePages
from pipelines.generate import GenerateConfig
from pipelines.output import Output
from pipelines.rows import split_row_id
from pipelines.storage import S3Settings, Storage

# Small everywhere: 4 new tokens, at most 4 windows, PDFs at 72 dpi; several engine calls per job (batch of 2 pages).
# Flat, as the flags name them: `with_settings` puts each where the job's config holds it.
TEST_SETTINGS = dict(
    max_new_tokens=4,
    max_windows=4,
    dpi=72,
    batch_size=2,
    max_slots=4,
    actors=(1, 1),
    flush_seconds=0.0,
    gpus_per_actor=0.0,
)
PROMPT = "Transcribe the text of this page."


def config(checkpoint, inputs, output, **kw) -> JobConfig:
    """The small job on these inputs; `kw` as for `with_settings`."""
    base = JobConfig(
        inputs=tuple(str(i) for i in inputs), output=str(output), prompts=(PROMPT,), s3=S3Settings.from_env()
    )
    return with_settings(base, checkpoint=str(checkpoint), **{**TEST_SETTINGS, **kw})


_GENERATE = {f.name for f in fields(GenerateConfig)}
_DECODE = {f.name for f in fields(DecodeConfig)}


def with_settings(cfg: JobConfig, **kw) -> JobConfig:
    """`cfg` with each setting of `kw` where the config holds it: a field of JobConfig, of its generate or decode
    config, or `max_windows` (of the decode windows)."""
    generate = {k: kw.pop(k) for k in list(kw) if k in _GENERATE}
    decode = {k: kw.pop(k) for k in list(kw) if k in _DECODE}
    if "max_windows" in kw:
        decode["windows"] = replace(decode.get("windows", cfg.decode.windows), max_windows=kw.pop("max_windows"))
    return replace(cfg, generate=replace(cfg.generate, **generate), decode=replace(cfg.decode, **decode), **kw)


# The same small job on the command line (`--actors 1,1` is the default, so a test may still pass its own pool)
SMALL_JOB_FLAGS = [
    *("--max-new-tokens", str(TEST_SETTINGS["max_new_tokens"]), "--max-windows", str(TEST_SETTINGS["max_windows"])),
    *("--dpi", str(TEST_SETTINGS["dpi"]), "--batch-size", str(TEST_SETTINGS["batch_size"])),
    *("--max-slots", str(TEST_SETTINGS["max_slots"]), "--flush-seconds", str(TEST_SETTINGS["flush_seconds"])),
    *("--gpus-per-actor", str(TEST_SETTINGS["gpus_per_actor"])),
]

# Decoding as the job's decode tasks do it, at the small job's window cap and dpi
DECODE = DecodeConfig(windows=WindowConfig(max_windows=TEST_SETTINGS["max_windows"]), dpi=TEST_SETTINGS["dpi"])


def decode(uri, prompts=(PROMPT,), done=(), config=DECODE, doc="d") -> list[dict]:
    """The decoded-page rows of one file, without Ray."""
    return list(
        DecodePages(Storage(), config).pages(
            {"uri": str(uri), "doc": doc, "prompts": list(prompts), "done": list(done)}
        )
    )


def batch_cli(*args: str, timeout: float = 500, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m cli batch ARGS` in a subprocess (the console script's code path), with this environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "batch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def batch_parser() -> argparse.ArgumentParser:
    """A parser holding only the `batch` commands (pipelines/cli.py), for flag tests without a subprocess."""
    from pipelines.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser


def read_rows(output: str, storage: Storage | None = None) -> list[dict]:
    out = Output(output, storage or Storage(S3Settings.from_env()))
    rows = []
    for part in out.parts():
        rows += pq.read_table(part, filesystem=out.fs).to_pylist()
    return rows


def by_page(rows: list[dict]) -> dict[tuple[str, int, str], dict]:
    """(basename of source, page, prompt) -> row; asserts there is exactly one row per key."""
    out = {}
    for r in rows:
        key = (os.path.basename(r["source_uri"]), r["page"], r["prompt"])
        assert key not in out, f"duplicate row for {key}"
        out[key] = r
    return out


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


class Reference:
    """The engine alone, on one page at a time: what the job's text for that page must be (greedy, deterministic)."""

    def __init__(self, checkpoint):
        from model.engine import Engine, EngineConfig
        from model.windows import WindowConfig

        windows = WindowConfig(max_windows=TEST_SETTINGS["max_windows"])
        self.engine = Engine.from_pretrained(
            checkpoint, device="cpu", config=EngineConfig(max_slots=1, max_views=5), windows=windows
        )

    def text(self, page, prompt: str = PROMPT) -> str:
        """`page`: image bytes or PageViews."""
        from model.sampling import SamplingParams

        req = self.engine.make_request(prompt, [page], SamplingParams(max_new_tokens=TEST_SETTINGS["max_new_tokens"]))
        return self.engine.generate([req])[0].text


def check_documents(dest, rows: list[dict], prompt: str = PROMPT) -> list[dict]:
    """Every document's JSONL text is its rows' texts joined in page order; spans point at them; the Markdown has each
    page's marker exactly once, in order, with a marked gap for each error row."""
    by_doc: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["prompt"] == prompt:
            pages = by_doc.setdefault(split_row_id(r["id"])[0], {})
            assert r["page"] not in pages, f"two rows for page {r['page']} of {r['source_uri']}"
            pages[r["page"]] = r
    records = [json.loads(line) for line in (dest / "documents.jsonl").read_text().splitlines()]
    assert sorted(rec["id"] for rec in records) == sorted(by_doc)
    for rec in records:
        pages = by_doc[rec["id"]]
        assert [p["page"] for p in rec["pages"]] == sorted(pages), rec["id"]
        assert rec["text"] == "\n\n".join(pages[n]["text"] for n in sorted(pages) if not pages[n]["error_type"])
        for start, end, n in rec["attributes"]["pdf_page_numbers"]:
            assert rec["text"][start:end] == pages[n]["text"]
        md = (dest / rec["metadata"]["text_path"]).read_text()
        markers = re.findall(r"<!-- page (\d+)(: error [a-z_]+)?", md)
        want = [(str(n), f": error {pages[n]['error_type']}" if pages[n]["error_type"] else "") for n in sorted(pages)]
        assert markers == want, rec["id"]
    return records
