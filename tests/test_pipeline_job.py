"""The batch job end to end on a real local Ray and a real SeaweedFS on 127.0.0.1: S3 and local in and out,
manifests, PDF and TIFF pages, the bad-input corpus, resume, a killed engine actor, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch

from demo import samples
from model.windows import PageViews
from pipelines.job import run_job
from pipelines.storage import S3Settings, Storage, list_sources

from .corpus import bad_corpus
from .pipeline_helpers import PROMPT, SMALL_JOB_FLAGS, Reference, by_page, config, decode, read_rows, write_files

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Reference(tiny_checkpoint)


def page_views(row: dict) -> PageViews:
    w = row["window"]
    views = torch.frombuffer(bytearray(row["views"]), dtype=torch.uint8).view(row["n_views"], 3, w, w)
    return PageViews(views, row["grid_rows"], row["grid_cols"], row["width"], row["height"])


def test_local_folder_in_local_out_one_row_per_page_then_resume(tiny_checkpoint, ray_session, reference, tmp_path):
    pngs = {f"page-{i}.png": samples.png_page(i, (360 + 200 * i, 480)) for i in range(3)}
    docs = write_files(
        tmp_path / "docs",
        {
            **pngs,
            "report.pdf": samples.pdf_document(3, size=(300, 400)),
            "scan.tiff": samples.tiff_document(2, size=(300, 400)),
        },
    )
    out = tmp_path / "out"
    cfg = config(tiny_checkpoint, [docs], out)

    s = run_job(cfg, progress=False)
    rows = by_page(read_rows(str(out)))
    expected = (
        {(n, 1, PROMPT) for n in pngs}
        | {("report.pdf", p, PROMPT) for p in (1, 2, 3)}
        | {("scan.tiff", p, PROMPT) for p in (1, 2)}
    )
    assert set(rows) == expected
    assert s["rows"] == s["unique_ids"] == s["pages"] == 8 and s["error_rows"] == 0 and s["run"]["rows"] == 8
    for name, data in pngs.items():  # the job's answer is the engine's answer for that page alone
        assert rows[(name, 1, PROMPT)]["text"] == reference.text(data)
    for row in decode(docs / "report.pdf"):
        assert rows[("report.pdf", row["page"], PROMPT)]["text"] == reference.text(page_views(row))
    assert rows[("page-2.png", 1, PROMPT)]["grid_cols"] == 2  # 760 px wide: 760/448 rounds to two window columns
    assert all(r["finish_reason"] in ("stop", "length") and r["encode_ms"] >= 0 for r in rows.values())
    assert json.loads((out / "_summary.json").read_text())["pages"] == 8
    assert (out / "_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_job(cfg, progress=False)  # same command: nothing new, single-page files not even read
    assert again["run"]["rows"] == 0 and again["run"]["documents_skipped_complete"] == 3
    assert again["rows"] == 8

    write_files(docs, {"late.png": samples.png_page(9, (300, 400))})
    more = run_job(replace(cfg, prompts=(PROMPT, "What is the title?")), progress=False)
    assert more["run"]["rows"] == 8 + 2  # the new prompt on every old page, both prompts on the new page
    rows = by_page(read_rows(str(out)))  # (asserts no duplicates)
    assert len(rows) == 18 and more["rows"] == more["unique_ids"] == 18


def test_s3_in_s3_out_with_a_manifest_and_the_bad_input_corpus(tiny_checkpoint, ray_session, s3_server, reference):
    s3_server.create_bucket("batch-corpus")
    client = s3_server.client()
    cases = bad_corpus()
    for case in cases:
        # SeaweedFS leaves a keep-alive connection hanging after a 0-byte PUT (the next request on it waits for
        # boto3's 60 s read timeout): the empty object gets a client of its own.
        (s3_server.client() if not case.data else client).put_object(
            Bucket="batch-corpus", Key=f"in/{case.name}", Body=case.data
        )
    client.put_object(Bucket="batch-corpus", Key="in/deleted-after-listing.png", Body=samples.png_page(5, (300, 400)))
    client.put_object(Bucket="batch-corpus", Key="other/invoice.png", Body=samples.png_page(6, (300, 400)))
    manifest = [
        {"uri": "s3://batch-corpus/other/invoice.png", "id": "invoice-6", "prompt": "Total amount?"},
        {"uri": "s3://batch-corpus/other/never-uploaded.pdf", "id": "ghost"},
    ]
    client.put_object(
        Bucket="batch-corpus", Key="manifests/m.jsonl", Body="\n".join(json.dumps(m) for m in manifest).encode()
    )
    cfg = config(
        tiny_checkpoint, ["s3://batch-corpus/in/", "s3://batch-corpus/manifests/m.jsonl"], "s3://batch-corpus/out/"
    )

    sources = list_sources(list(cfg.inputs), Storage(S3Settings.from_env()))
    client.delete_object(Bucket="batch-corpus", Key="in/deleted-after-listing.png")
    summary = run_job(cfg, progress=False, sources=sources)

    rows = by_page(read_rows(cfg.output))
    expected_rows = sum(c.pages for c in cases) + 1 + 2  # corpus pages, the deleted object, two manifest documents
    assert len(rows) == expected_rows == summary["rows"] == summary["unique_ids"]
    for case in cases:
        if case.error:
            r = rows[(case.name, case.page, PROMPT)]
            assert r["error_type"] == case.error and r["error_message"] and r["text"] is None, case.name
        else:
            for p in range(1, case.pages + 1):
                r = rows[(case.name, p, PROMPT)]
                assert r["error_type"] is None and r["text"] is not None and r["completion_tokens"] >= 1, case.name
            if case.size:  # single-page files (CMYK, 16-bit, palette+alpha, EXIF-rotated, GIF): as the engine sees them
                r = rows[(case.name, 1, PROMPT)]
                assert (r["width"], r["height"]) == case.size and r["text"] == reference.text(case.data), case.name
    assert rows[("deleted-after-listing.png", 0, PROMPT)]["error_type"] == "not_found"
    invoice = rows[("invoice.png", 1, "Total amount?")]  # the manifest's prompt and id
    assert invoice["id"].startswith("invoice-6:1:") and invoice["error_type"] is None
    assert rows[("never-uploaded.pdf", 0, PROMPT)]["error_type"] == "not_found"
    want = Counter(c.error for c in cases if c.error) + Counter({"not_found": 2})
    assert summary["errors_by_type"] == dict(want)

    listed = client.list_objects_v2(Bucket="batch-corpus", Prefix="out/")["Contents"]
    names = {o["Key"].rsplit("/", 1)[-1] for o in listed}
    assert {"_summary.json", "_summary.png"} <= names and any(n.endswith(".parquet") for n in names)


def _engine_actors() -> dict[str, dict]:
    """Live engine actors of this Ray (actor id -> GCS actor table entry, which has the worker's Pid)."""
    from ray._private.state import actors

    return {aid: a for aid, a in actors().items() if "GenerateStage" in a["ActorClassName"] and a["State"] == "ALIVE"}


def test_killing_the_engine_actor_mid_job_yields_every_page_once(tiny_checkpoint, ray_session, tmp_path):
    from ray._private.state import actors

    # 24 pages in batches of TEST_SETTINGS' size: when the first batch reaches the driver the actor still has most of
    # the work ahead (with 8 pages a fast engine could be done before the kill, and the test would prove nothing)
    docs = write_files(tmp_path / "docs", {f"p{i}.png": samples.png_page(i, (300, 400)) for i in range(24)})
    killed: list[str] = []

    def kill_after_first_batch(table):
        if not killed:
            (aid, actor), *_ = _engine_actors().items()
            os.kill(actor["Pid"], signal.SIGKILL)
            killed.append(aid)

    cfg = config(tiny_checkpoint, [docs], tmp_path / "out")
    summary = run_job(cfg, progress=False, on_batch=kill_after_first_batch)
    rows = by_page(read_rows(str(tmp_path / "out")))
    assert set(rows) == {(f"p{i}.png", 1, PROMPT) for i in range(24)}
    assert all(r["error_type"] is None for r in rows.values())
    assert summary["run"]["rows"] == 24 and summary["run"]["duplicates_dropped"] == 0
    info = actors(actor_id=killed[0])
    assert info["NumRestarts"] >= 1, "the killed actor was never restarted: the kill did not land mid-job"


def test_a_killed_driver_resumes_with_every_page_exactly_once(tiny_checkpoint, ray_session, tmp_path):
    docs = write_files(tmp_path / "docs", {f"p{i:02d}.png": samples.png_page(i, (300, 400)) for i in range(10)})
    (docs / "long.pdf").write_bytes(samples.pdf_document(4, size=(300, 400)))
    out = tmp_path / "out"
    gcs = ray_session.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "batch",
        "run",
        "--input",
        str(docs),
        "--output",
        str(out),
        "--prompt",
        PROMPT,
        "--checkpoint",
        str(tiny_checkpoint),
        *SMALL_JOB_FLAGS,
        "--ray-address",
        gcs,
        "--no-progress",
    ]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no part written within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole CLI process group, mid-job
        proc.wait(timeout=30)
    first = len(read_rows(str(out)))
    assert 0 < first < 14, f"the driver was not killed mid-job ({first} rows written)"

    summary = run_job(config(tiny_checkpoint, [docs], out), progress=False)
    rows = by_page(read_rows(str(out)))
    pages = {(f"p{i:02d}.png", 1, PROMPT) for i in range(10)} | {("long.pdf", p, PROMPT) for p in range(1, 5)}
    assert set(rows) == pages
    assert summary["run"]["rows_already_done"] == first and summary["run"]["rows"] == 14 - first
    assert run_job(config(tiny_checkpoint, [docs], out), progress=False)["run"]["rows"] == 0
