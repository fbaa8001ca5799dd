"""Decoding at scale: the rasterization cap (a poster page's size is bounded) and long documents split into page
ranges, decoded by many tasks, every page exactly once, resumable."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo import samples
from pipelines.decode import TASK_SCHEMA, DecodeConfig, DecodePages, SplitDocuments
from pipelines.rows import OUTPUT_SCHEMA, prompt_key
from pipelines.storage import Storage

from .pipeline_helpers import DECODE, PROMPT, by_page, check_documents, config, decode, read_rows, write_files

pytestmark = pytest.mark.timeout(600)


# ---- the rasterization cap -------------------------------------------------------------------------------------------
def test_a_poster_page_renders_within_the_pixel_cap_and_still_gives_its_row(tmp_path):
    # an A0 poster (2384 x 3370 pt): 4967 x 7021 = 35 MP at 150 dpi; the cap renders it at a lower dpi instead
    (tmp_path / "a0.pdf").write_bytes(samples.pdf_document(1, size=(2384, 3370)))
    for cap in (12_000_000, 2_000_000):
        cfg = replace(DECODE, dpi=150, max_render_pixels=cap)
        (row,) = decode(tmp_path / "a0.pdf", config=cfg)
        assert row["error_type"] is None and row["views"], row["error_message"]
        w, h = row["width"], row["height"]
        assert w * h <= cap, f"{w}x{h} rendered over the {cap} px cap"
        assert w * h > 0.98 * cap, f"{w}x{h}: scaled down more than the cap needs"
        assert math.isclose(w / h, 2384 / 3370, rel_tol=0.01), f"{w}x{h} lost the page's aspect ratio"
    # a page under the cap keeps its dpi exactly
    (row,) = decode(tmp_path / "a0.pdf", config=replace(DECODE, dpi=72, max_render_pixels=12_000_000))
    assert (row["width"], row["height"]) == (2384, 3370)


def test_the_raster_cap_and_task_size_are_checked():
    with pytest.raises(ValueError, match="max_render_pixels"):
        DecodeConfig(max_render_pixels=10)
    with pytest.raises(ValueError, match="max_render_pixels"):  # over the decoded-size limit it could never render
        DecodeConfig(max_render_pixels=DecodeConfig().windows.max_pixels + 1)
    with pytest.raises(ValueError, match="pages_per_task"):
        DecodeConfig(pages_per_task=0)


# ---- splitting long documents ----------------------------------------------------------------------------------------
def split(uri, cfg: DecodeConfig, prompts=(PROMPT,), done=()) -> list[dict]:
    src = {"uri": str(uri), "doc": "d", "prompts": list(prompts), "done": list(done)}
    tasks = list(SplitDocuments(Storage(), cfg).tasks(src))
    pa.Table.from_pylist(tasks, schema=TASK_SCHEMA)  # every task fits the schema between the stages
    return tasks


def test_a_long_pdf_becomes_page_ranges_that_cover_every_page_once(tmp_path):
    path = tmp_path / "long.pdf"
    path.write_bytes(samples.pdf_document(10, size=(100, 130)))
    cfg = replace(DECODE, pages_per_task=4, max_pages=9)
    tasks = split(path, cfg)
    assert [(t["first"], t["last"], t["n_pages"]) for t in tasks] == [(1, 4, 10), (5, 8, 10), (9, 9, 10), (10, 10, 10)]
    assert all(t["data"] is None for t in tasks), "ranges of a long document read it themselves, not carry it"
    path.unlink()  # the page_limit range needs neither the object nor a render
    assert [(r["page"], r["error_type"]) for r in DecodePages(Storage(), cfg).pages(tasks[-1])] == [(10, "page_limit")]
    # a range whose object vanished after the split: one row per page of the range, not a page-0 row per range
    gone = [(r["page"], r["error_type"]) for r in DecodePages(Storage(), cfg).pages(tasks[1])]
    assert gone == [(p, "not_found") for p in (5, 6, 7, 8)]

    path.write_bytes(samples.pdf_document(10, size=(100, 130)))
    pages = [r["page"] for t in tasks for r in DecodePages(Storage(), cfg).pages(t)]
    assert pages == list(range(1, 11)), "every page in exactly one range"


def test_short_documents_stay_one_task_with_their_bytes_and_images_are_not_read(tmp_path):
    (tmp_path / "short.pdf").write_bytes(samples.pdf_document(3, size=(100, 130)))
    (tmp_path / "scan.tiff").write_bytes(samples.tiff_document(2, size=(100, 130)))
    (tmp_path / "page.png").write_bytes(samples.png_page(0, (100, 130)))
    cfg = replace(DECODE, pages_per_task=4)
    (pdf,) = split(tmp_path / "short.pdf", cfg)
    (tiff,) = split(tmp_path / "scan.tiff", cfg)
    (png,) = split(tmp_path / "page.png", cfg)
    assert (pdf["first"], pdf["last"], pdf["data"]) == (1, 3, (tmp_path / "short.pdf").read_bytes())
    assert (tiff["first"], tiff["last"]) == (1, 2) and tiff["data"]
    assert (png["first"], png["data"]) == (None, None), "an image by its name is one page: passed on unread"
    for name in ("short.pdf", "scan.tiff"):
        (tmp_path / name).unlink()  # read once, by the split: the decode task uses the bytes it was given
    assert [r["page"] for r in DecodePages(Storage(), cfg).pages(pdf)] == [1, 2, 3]
    assert [r["page"] for r in DecodePages(Storage(), cfg).pages(tiff)] == [1, 2]
    # a document that cannot be opened is passed on whole: the decode task writes its one page-0 row
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (broken,) = split(tmp_path / "broken.pdf", cfg)
    assert broken["first"] is None
    assert [(r["page"], r["error_type"]) for r in DecodePages(Storage(), cfg).pages(broken)] == [(0, "pdf_error")]


def test_the_split_leaves_out_pages_already_written(tmp_path):
    path = tmp_path / "long.pdf"
    path.write_bytes(samples.pdf_document(9, size=(100, 130)))
    cfg = replace(DECODE, pages_per_task=4)
    q, q2 = prompt_key(PROMPT), prompt_key("Title?")
    done = [f"{p}:{q}" for p in (1, 2, 3, 4, 6)]  # range 1-4 finished, page 6 finished
    tasks = split(path, cfg, done=done)
    assert [(t["first"], t["last"], t["done"]) for t in tasks] == [(5, 8, [f"6:{q}"]), (9, 9, [])]
    assert [r["page"] for t in tasks for r in DecodePages(Storage(), cfg).pages(t)] == [5, 7, 8, 9]
    # with a second prompt the finished range is back, for that prompt only
    tasks = split(path, cfg, prompts=(PROMPT, "Title?"), done=done + [f"1:{q2}"])
    rows = [r for t in tasks for r in DecodePages(Storage(), cfg).pages(t)]
    assert [(r["page"], r["prompts"]) for r in rows[:2]] == [(2, ["Title?"]), (3, ["Title?"])]
    assert not split(path, cfg, done=[f"{p}:{q}" for p in range(1, 10)]), "a finished document is no task at all"


# ---- through Ray ----------------------------------------------------------------------------------------------------
LONG_PAGES = 40


@pytest.fixture(scope="module")
def long_pdf(tmp_path_factory):
    docs = tmp_path_factory.mktemp("long")
    write_files(docs, {"long.pdf": samples.pdf_document(LONG_PAGES, size=(120, 150)), "one.png": samples.png_page(1)})
    return docs


def test_a_long_pdf_is_decoded_by_many_tasks_in_many_blocks(tiny_checkpoint, ray_session, long_pdf, tmp_path):
    from pipelines.job import decoded_pages
    from pipelines.plan import plan_sources
    from pipelines.storage import list_sources

    cfg = config(tiny_checkpoint, [long_pdf / "long.pdf"], tmp_path / "out", pages_per_task=8).with_checkpoint_windows()
    records, _ = plan_sources(list_sources(list(cfg.inputs), Storage()), cfg.prompts, set())
    blocks = [
        b.column("page").to_pylist()
        for b in decoded_pages(records, cfg, Storage()).iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    pages = sorted(p for b in blocks for p in b)
    assert pages == list(range(1, LONG_PAGES + 1)), "every page exactly once"
    ranges = {tuple(sorted({(p - 1) // 8 for p in b})) for b in blocks if b}
    assert all(len(r) == 1 for r in ranges), f"a block mixes the pages of two decode tasks: {blocks}"
    assert len([b for b in blocks if b]) >= LONG_PAGES // 8, "fewer blocks than decode tasks"
    assert max(len(b) for b in blocks) <= 8, "a block holds more than one task's pages"


def test_a_long_pdf_job_gives_every_page_once_and_resumes_only_the_missing(
    tiny_checkpoint, ray_session, long_pdf, tmp_path
):
    from pipelines.job import run_job

    out, dest = tmp_path / "out", tmp_path / "documents"
    cfg = config(tiny_checkpoint, [long_pdf], out, pages_per_task=8, documents_out=str(dest))

    first = run_job(cfg, progress=False)
    (long_doc,) = [r for r in check_documents(dest, read_rows(str(out))) if r["source"].endswith("long.pdf")]
    assert [p["page"] for p in long_doc["pages"]] == list(range(1, LONG_PAGES + 1)), "the long document's text"
    rows = by_page(read_rows(str(out)))
    expected = {("long.pdf", p, PROMPT) for p in range(1, LONG_PAGES + 1)} | {("one.png", 1, PROMPT)}
    assert set(rows) == expected and all(r["error_type"] is None for r in rows.values())
    assert first["run"]["rows"] == LONG_PAGES + 1

    # keep a part with some pages only, as if the job had been stopped: the rerun does exactly the others
    missing = {3, 9, 10, 11, 12, 13, 14, 15, 16, 17, 40}
    kept = [r for r in read_rows(str(out)) if not (r["source_uri"].endswith("long.pdf") and r["page"] in missing)]
    for part in out.glob("part-*.parquet"):
        part.unlink()
    pq.write_table(pa.Table.from_pylist(kept, schema=OUTPUT_SCHEMA), out / "part-earlier-00000.parquet")
    second = run_job(cfg, progress=False)
    assert second["run"]["rows"] == len(missing) and second["run"]["duplicates_dropped"] == 0
    ids = [r["id"] for r in read_rows(str(out))]
    assert not [i for i, n in Counter(ids).items() if n > 1], "an id written twice"
    assert set(by_page(read_rows(str(out)))) == expected
    (long_doc,) = [r for r in check_documents(dest, read_rows(str(out))) if r["source"].endswith("long.pdf")]
    assert [p["page"] for p in long_doc["pages"]] == list(range(1, LONG_PAGES + 1)), "complete after the resume"


def test_the_decode_reservation_covers_the_bad_input_corpus(tiny_checkpoint, ray_session, tmp_path):
    """Ray Data compares each decode worker's peak with `memory=`: at the default it stays quiet for the corpus; with
    a reservation below a worker's baseline it warns (so the check can fail)."""
    import logging
    import time

    from pipelines.config import JobConfig
    from pipelines.job import decoded_pages
    from pipelines.plan import plan_sources
    from pipelines.storage import list_sources

    from .corpus import bad_corpus

    docs = write_files(tmp_path / "corpus", {c.name: c.data for c in bad_corpus()})
    warned: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "used up to" in " ".join(record.getMessage().split()):
                warned.append(record.getMessage())

    # (the reporting module itself: Ray Data re-configures the handlers of "ray.data" when a dataset first runs)
    reporter = logging.getLogger("ray.data._internal.issue_detection.issue_detector_manager")
    handler = Catch()
    reporter.addHandler(handler)
    try:
        outcome = {}
        for memory in (JobConfig.decode_memory, 64 * 2**20):
            cfg = config(tiny_checkpoint, [docs], tmp_path / "out", decode_memory=memory).with_checkpoint_windows()
            records, _ = plan_sources(list_sources(list(cfg.inputs), Storage()), cfg.prompts, set())
            warned.clear()
            rows = sum(b.num_rows for b in decoded_pages(records, cfg, Storage()).iter_batches(batch_format="pyarrow"))
            time.sleep(2.0)  # the executor's final check logs from its own thread
            assert rows >= len(records) > 10, f"{rows} decoded rows for {len(records)} documents"
            outcome[memory] = bool(warned)
    finally:
        reporter.removeHandler(handler)
    assert not outcome[JobConfig.decode_memory], f"a decode worker used more than the default reservation: {outcome}"
    assert outcome[64 * 2**20], "Ray Data did not warn about a 64 MiB reservation: the check above proves nothing"
