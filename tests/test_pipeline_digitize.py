"""Digitization features of the batch job: the PDF text layer and skipping generation with it, the
repetition guard's temperature ladder, and the per-document output (Markdown + Dolma-style JSONL), on a real local Ray.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pyarrow as pa
import pytest

from demo import samples
from model.engine import Result, Timings
from pipelines.decode import DecodeConfig, usable_pdf_text
from pipelines.documents_out import file_name, write_documents
from pipelines.generate import GenerateConfig, GenerateStage
from pipelines.job import run_job
from pipelines.output import Output, PartWriter
from pipelines.plan import document_prompts
from pipelines.rows import DECODED_SCHEMA, OUTPUT_SCHEMA, row_id
from pipelines.storage import S3Settings, Source, Storage

from .corpus import _pdf
from .pipeline_helpers import (
    DECODE,
    PROMPT,
    TEST_SETTINGS,
    batch_parser,
    check_documents,
    config,
    decode,
    read_rows,
    with_settings,
    write_files,
)

pytestmark = pytest.mark.timeout(600)

PAGES = [
    "Annual report 2024. Revenue grew by twelve percent over the previous year, driven by exports.",
    "Chapter two: the northern plant opened in March and employs 140 people on three shifts.",
    "Page 3",  # too little text to be usable: rendered for the model under "auto"
]


def text_pdf(pages: list[str]) -> bytes:
    """A born-digital PDF: each page one line of real text (Helvetica text objects), no images."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for line in pages:
        content = f"BT /F1 11 Tf 40 700 Td ({line}) Tj ET"
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content}\nendstream")
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {len(objects)} 0 R >>"
        )
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    return _pdf(objects)


# ---- PDF text layer --------------------------------------------------------------------------------------------------
def test_usable_text_rule():
    assert usable_pdf_text(PAGES[0])
    assert not usable_pdf_text(PAGES[2])  # a page number alone
    assert not usable_pdf_text("") and not usable_pdf_text(" \n\t ") and not usable_pdf_text(None)
    assert not usable_pdf_text("\ue000\ue001\ue002 " * 40)  # glyph codes of a font without a Unicode map
    assert not usable_pdf_text(PAGES[0] + "\ufffd" * 5)  # more than 1 % undecodable glyphs
    assert not usable_pdf_text("-- ** .. " * 30 + "abc")  # mostly punctuation: rules, dot leaders
    assert usable_pdf_text("Выручка выросла на двенадцать процентов по сравнению с прошлым годом.")  # any script
    assert not usable_pdf_text(PAGES[1], min_chars=500)


def test_pdf_text_column_and_auto_mode_skip_rendering(tmp_path):
    (tmp_path / "digital.pdf").write_bytes(text_pdf(PAGES))
    (tmp_path / "scan.pdf").write_bytes(samples.pdf_document(1, size=(300, 400)))
    (tmp_path / "p.png").write_bytes(samples.png_page(0, (300, 400)))
    rows = decode(tmp_path / "digital.pdf")
    assert [r["pdf_text"] for r in rows] == PAGES  # pypdfium2's text of each page
    assert all(r["views"] and r["text_source"] is None for r in rows)  # "never": every page rendered
    (scan,) = decode(tmp_path / "scan.pdf")
    assert scan["pdf_text"] == "" and scan["views"]  # an image-only PDF has an empty text layer
    assert decode(tmp_path / "p.png")[0]["pdf_text"] is None  # images have none

    auto = decode(tmp_path / "digital.pdf", config=replace(DECODE, use_pdf_text="auto"))
    assert [r["text_source"] for r in auto] == ["pdf_text", "pdf_text", None]
    assert auto[0]["views"] is None and auto[2]["views"]  # usable pages are not rendered; "Page 3" is
    assert decode(tmp_path / "scan.pdf", config=replace(DECODE, use_pdf_text="auto"))[0]["views"]
    always = decode(tmp_path / "scan.pdf", config=replace(DECODE, use_pdf_text="always"))
    assert always[0]["text_source"] == "pdf_text" and always[0]["pdf_text"] == ""
    with pytest.raises(ValueError, match="use_pdf_text"):
        DecodeConfig(use_pdf_text="sometimes")


def test_hyphen_joined_by_pdfium_is_put_back():
    import pypdfium2 as pdfium

    from model.windows import WindowConfig
    from pipelines.decode import PdfDocument

    content = "BT /F1 11 Tf 14 TL 40 700 Td (A well-) Tj T* (known fact.) Tj ET"
    pdf = _pdf(
        [
            "<< /Type /Catalog /Pages 2 0 R >>",
            "<< /Type /Pages /Kids [5 0 R] /Count 1 >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            "/Contents 4 0 R >>",
        ]
    )
    raw = pdfium.PdfDocument(pdf)[0].get_textpage().get_text_range()
    doc = PdfDocument(pdf, WindowConfig(), 72)
    assert raw != doc.text(0) == "A well-\nknown fact."


# ---- the repetition ladder on a rigged engine (no Ray) ---------------------------------------------------------------
class RiggedEngine:
    """Stands in for the engine: its answer loops (finish_reason "repetition") below `loops_below` temperature,
    else it answers "clean text at T"; counts calls. Records the sampling parameters it was asked with."""

    def __init__(self, loops_below: float):
        self.loops_below, self.calls, self.asked = loops_below, 0, []

    def make_request(self, prompt, images, sampling):
        return SimpleNamespace(prompt=prompt, sampling=sampling)

    def validate(self, request):
        pass

    def generate(self, requests):
        self.calls += 1
        out = []
        for r in requests:
            t = r.sampling.temperature
            self.asked.append(r.sampling)
            loops = t < self.loops_below
            out.append(
                Result(
                    request_id="r",
                    token_ids=[1, 2] * 40 if loops else [3],
                    text="ab " * 40 if loops else f"clean text at {t}",
                    finish_reason="repetition" if loops else "stop",
                    prompt_tokens=5,
                    completion_tokens=80 if loops else 1,
                    timings=Timings(prefill_s=0.001, decode_s=0.002),
                )
            )
        return out


@pytest.fixture(scope="module")
def no_weights(tiny_checkpoint, tmp_path_factory):
    """A checkpoint folder with the tiny config.json and no weights: window settings read, any engine load fails."""
    folder = tmp_path_factory.mktemp("no-weights") / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    return folder


def rigged_stage(engine, checkpoint, **kw) -> GenerateStage:
    stage = GenerateStage(
        GenerateConfig(checkpoint=str(checkpoint), device="cpu", metrics="none", **kw), DECODE.windows
    )
    stage._engine = engine
    return stage


def test_ladder_retries_looping_pages_until_an_answer_does_not_loop(no_weights, tmp_path):
    (tmp_path / "a.png").write_bytes(samples.png_page(0, (300, 400)))
    (tmp_path / "b.png").write_bytes(samples.png_page(1, (300, 400)))
    pages = decode(tmp_path / "a.png", doc="a") + decode(tmp_path / "b.png", doc="b")
    engine = RiggedEngine(loops_below=0.5)
    out = rigged_stage(engine, no_weights, temperature_ladder=(0.1, 0.3, 0.5, 0.7))(
        pa.Table.from_pylist(pages, DECODED_SCHEMA)
    )
    assert out.schema == OUTPUT_SCHEMA
    for r in out.to_pylist():
        assert r["attempts"] == 4 and r["attempt_temperatures"] == [0.0, 0.1, 0.3, 0.5]
        assert r["attempt_finish_reasons"] == ["repetition"] * 3 + ["stop"]
        assert r["finish_reason"] == "stop" and r["text"] == "clean text at 0.5" and r["error_type"] is None
        assert r["text_source"] == "model" and r["generate_ms"] == pytest.approx(4 * 3.0)  # every attempt's time
    assert engine.calls == 4  # both pages retried together, one engine call per rung
    seeds = [s.seed for s in engine.asked]
    assert seeds[:2] == [None, None] and len(set(seeds[2:])) == 6  # greedy first; each row and rung its own seed
    again = RiggedEngine(loops_below=0.5)
    rigged_stage(again, no_weights, temperature_ladder=(0.1, 0.3, 0.5, 0.7))(
        pa.Table.from_pylist(pages[::-1], DECODED_SCHEMA)
    )
    assert sorted(map(str, [s.seed for s in again.asked])) == sorted(map(str, seeds))  # batch order changes nothing


def test_a_page_that_loops_at_every_temperature_is_a_repetition_error_row(no_weights, tmp_path):
    (tmp_path / "a.png").write_bytes(samples.png_page(0, (300, 400)))
    engine = RiggedEngine(loops_below=9.0)
    stage = rigged_stage(engine, no_weights, temperature_ladder=(0.2, 0.6), max_attempts=4)
    (r,) = stage(pa.Table.from_pylist(decode(tmp_path / "a.png"), DECODED_SCHEMA)).to_pylist()
    assert r["error_type"] == "repetition" and r["text"] is None and "all 4 attempts looped" in r["error_message"]
    assert r["attempts"] == 4 and r["attempt_temperatures"] == [0.0, 0.2, 0.6, 0.6]  # the last rung repeats
    assert r["attempt_finish_reasons"] == ["repetition"] * 4 and r["finish_reason"] == "repetition"
    once = rigged_stage(RiggedEngine(loops_below=9.0), no_weights, max_attempts=1)
    (r,) = once(pa.Table.from_pylist(decode(tmp_path / "a.png"), DECODED_SCHEMA)).to_pylist()
    assert r["attempts"] == 1 and r["error_type"] == "repetition"


def test_pdf_text_pages_never_reach_the_engine(no_weights, tmp_path):
    (tmp_path / "digital.pdf").write_bytes(text_pdf(PAGES[:2]))
    pages = decode(tmp_path / "digital.pdf", prompts=(PROMPT, "Title?"), config=replace(DECODE, use_pdf_text="auto"))
    stage = GenerateStage(GenerateConfig(checkpoint=str(no_weights), device="cpu", metrics="none"), DECODE.windows)
    rows = stage(pa.Table.from_pylist(pages, DECODED_SCHEMA)).to_pylist()
    assert stage._engine is None  # never loaded: loading a checkpoint without weights would have raised
    assert [(r["page"], r["text"]) for r in rows] == [(1, PAGES[0]), (1, PAGES[0]), (2, PAGES[1]), (2, PAGES[1])]
    assert all(r["text_source"] == "pdf_text" and r["attempts"] == 0 and r["error_type"] is None for r in rows)


def test_cli_flags_reach_the_job_and_survive_submit(tmp_path):
    from pipelines.cli import job_config, run_argv

    parser = batch_parser()
    flags = ["--input", "in/", "--output", "out/", "--prompt", PROMPT, "--checkpoint", str(tmp_path)]
    flags += ["--documents-out", "docs/", "--use-pdf-text", "auto", "--pdf-text-min-chars", "20"]
    flags += ["--repetition-penalty", "1.2", "--no-repeat-ngram-size", "6", "--no-repetition-guard"]
    flags += ["--temperature-ladder", "0.2,0.8", "--max-attempts", "3"]
    args = parser.parse_args(["batch", "run", *flags])
    again = parser.parse_args(["batch", "run", *run_argv(args)])
    for a in (args, again):
        cfg = job_config(a)
        d, g = cfg.decode, cfg.generate
        assert (cfg.documents_out, d.use_pdf_text, d.pdf_text_min_chars) == ("docs/", "auto", 20)
        assert (g.repetition_penalty, g.no_repeat_ngram_size, g.repetition_guard) == (1.2, 6, False)
        assert (g.temperature_ladder, g.max_attempts) == ((0.2, 0.8), 3)
    with pytest.raises(ValueError, match="max-attempts"):
        job_config(parser.parse_args(["batch", "run", *flags[:8], "--max-attempts", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "run", *flags[:8], "--temperature-ladder", "hot"])


# ---- documents out from hand-made parts (no Ray) ---------------------------------------------------------------------
def _row(doc, page, text, prompt=PROMPT, error=None):
    return {
        "id": row_id(doc, page, prompt),
        "source_uri": f"/in/{doc}.pdf",
        "page": page,
        "prompt": prompt,
        "text": None if error else text,
        "error_type": error,
        "error_message": f"page {page} broke --> badly\nhere" if error else None,
        "text_source": None if error else "model",
        "model": "m",
    }


def test_documents_are_their_rows_in_page_order_whatever_the_parts_order(tmp_path):
    out = Output(str(tmp_path / "out"), Storage())
    out.create()
    w = PartWriter(out, set(), rows_per_file=3, flush_seconds=1e9)
    rows = [
        _row("d1", 3, "third"),
        _row("odd/id:7", 1, "x"),
        _row("d1", 1, "first"),
        _row("d1", 1, "a title", prompt="Title?"),  # another prompt: not the document text
        _row("d1", 2, None, error="pdf_error"),
        _row("d1", 5, "fifth"),  # page 4 never written: a missing page
    ]
    for r in rows:  # one row at a time: parts hold the document's pages out of order
        w.add(pa.Table.from_pylist([r], schema=OUTPUT_SCHEMA))
    w.flush()
    sources = [Source("/in/d1.pdf", doc_id="d1"), Source("/in/odd.pdf", doc_id="odd/id:7")]
    dest = tmp_path / "docs"
    for budget in (1 << 30, 1):  # one pass, and one document per pass: the same files
        totals = write_documents(out, str(dest), document_prompts(sources, (PROMPT, "Title?")), budget_bytes=budget)
        lines = (dest / "documents.jsonl").read_text().splitlines()
        assert totals["documents"] == 2 and totals["passes"] == (1 if budget > 1 else 2)
        d1, odd = (json.loads(line) for line in lines)
        assert d1["id"] == "d1" and d1["text"] == "first\n\nthird\n\nfifth" and d1["source"] == "/in/d1.pdf"
        assert [(p["page"], p["status"]) for p in d1["pages"]] == [
            (1, "ok"),
            (2, "pdf_error"),
            (3, "ok"),
            (4, "missing"),
            (5, "ok"),
        ]
        for start, end, page in d1["attributes"]["pdf_page_numbers"]:
            assert d1["text"][start:end] == {1: "first", 3: "third", 5: "fifth"}[page]
        md = (dest / d1["metadata"]["text_path"]).read_text()
        assert re.findall(r"<!-- page (\d+)(?::(.*?))? -->", md) == [
            ("1", ""),
            ("2", " error pdf_error (page 2 broke - -> badly here)"),
            ("3", ""),
            ("4", " missing (no row in the output)"),
            ("5", ""),
        ]
        assert "first" in md and "a title" not in md
        assert odd["metadata"]["text_path"] == f"text/{file_name('odd/id:7')}.md" and "/" not in file_name("odd/id:7")
    (dest / "text" / "stale.md").write_text("from an earlier listing")
    write_documents(out, str(dest), document_prompts(sources[:1], (PROMPT,)))
    assert sorted(p.name for p in (dest / "text").iterdir()) == ["d1.md"]  # odd's and the stale file are gone
    assert [json.loads(line)["id"] for line in (dest / "documents.jsonl").read_text().splitlines()] == ["d1"]


def test_documents_out_on_s3(s3_server):
    s3_server.create_bucket("docs-out")
    out = Output("s3://docs-out/rows/", Storage(S3Settings.from_env()))
    w = PartWriter(out, set(), rows_per_file=2, flush_seconds=1e9)
    w.add(pa.Table.from_pylist([_row("d", 2, "two"), _row("d", 1, "one"), _row("d", 3, "three")], OUTPUT_SCHEMA))
    w.flush()
    totals = write_documents(out, "s3://docs-out/documents/", document_prompts([Source("/in/d.pdf", "d")], (PROMPT,)))
    assert totals["documents"] == 1 and totals["pages"] == 3
    client = s3_server.client()
    (line,) = client.get_object(Bucket="docs-out", Key="documents/documents.jsonl")["Body"].read().splitlines()
    assert json.loads(line)["text"] == "one\n\ntwo\n\nthree"
    md = client.get_object(Bucket="docs-out", Key="documents/text/d.md")["Body"].read().decode()
    assert md == "<!-- page 1 -->\none\n\n<!-- page 2 -->\ntwo\n\n<!-- page 3 -->\nthree\n\n"


# ---- end to end on Ray -----------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_documents_out_after_a_killed_run_and_a_rerun(tiny_checkpoint, ray_session, tmp_path):
    docs = write_files(
        tmp_path / "docs",
        {
            "report.pdf": samples.pdf_document(4, size=(300, 400)),  # page 4 is over --max-pages: an error page
            "broken.pdf": b"%PDF-1.4 torn",
            **{f"p{i}.png": samples.png_page(i, (300, 400)) for i in range(3)},
        },
    )
    out, dest = tmp_path / "out", tmp_path / "documents"
    cfg = config(tiny_checkpoint, [docs], out, max_pages=3, documents_out=str(dest), prompts=(PROMPT, "Title?"))

    def stop(table):
        raise Killed("stopped after the first batch")

    with pytest.raises(Killed):
        run_job(cfg, progress=False, on_batch=stop)
    first = read_rows(str(out))
    assert 0 < len(first) < 16 and not (dest / "documents.jsonl").exists()  # killed: no documents yet

    summary = run_job(cfg, progress=False)
    rows = read_rows(str(out))
    assert len(rows) == len({r["id"] for r in rows}) == 16  # (4 + 1 + 3 pages) x 2 prompts
    records = {rec["source"].rsplit("/", 1)[1]: rec for rec in check_documents(dest, rows)}
    assert summary["run"]["documents_out"]["documents"] == 5
    report = records["report.pdf"]
    assert [p["status"] for p in report["pages"]] == ["ok", "ok", "ok", "page_limit"]
    assert records["broken.pdf"]["pages"][0]["status"] == "pdf_error" and records["broken.pdf"]["text"] == ""
    assert "<!-- page 4: error page_limit" in (dest / report["metadata"]["text_path"]).read_text()


def test_born_digital_pdfs_are_answered_from_their_text_layer_without_the_engine(ray_session, no_weights, tmp_path):
    docs = write_files(tmp_path / "docs", {"a.pdf": text_pdf(PAGES[:2]), "b.pdf": text_pdf(PAGES[1:2])})
    out, dest = tmp_path / "out", tmp_path / "documents"
    # a checkpoint without weights: one engine load (hence any engine call) would fail the job
    cfg = config(no_weights, [docs], out, use_pdf_text="always", documents_out=str(dest))
    summary = run_job(cfg, progress=False)
    rows = read_rows(str(out))
    assert summary["error_rows"] == 0 and sorted((r["source_uri"][-5:], r["page"]) for r in rows) == [
        ("a.pdf", 1),
        ("a.pdf", 2),
        ("b.pdf", 1),
    ]
    assert all(r["text"] == r["pdf_text"] and r["text_source"] == "pdf_text" for r in rows)
    assert all(r["attempts"] == 0 and r["completion_tokens"] is None for r in rows)
    (rec,) = [rec for rec in check_documents(dest, rows) if rec["source"].endswith("a.pdf")]
    assert rec["text"] == PAGES[0] + "\n\n" + PAGES[1] and rec["metadata"]["pdf_text_pages"] == 2


def test_auto_mode_mixes_text_layer_and_model_pages(tiny_checkpoint, ray_session, tmp_path):
    docs = write_files(
        tmp_path / "docs",
        {
            "digital.pdf": text_pdf(PAGES),
            "scan.pdf": samples.pdf_document(1, size=(300, 400)),
            "p.png": samples.png_page(1, (300, 400)),
        },
    )
    out = tmp_path / "out"
    run_job(config(tiny_checkpoint, [docs], out, use_pdf_text="auto"), progress=False)
    rows = {(r["source_uri"].rsplit("/", 1)[1], r["page"]): r for r in read_rows(str(out))}
    assert set(rows) == {("digital.pdf", 1), ("digital.pdf", 2), ("digital.pdf", 3), ("scan.pdf", 1), ("p.png", 1)}
    for key in (("digital.pdf", 1), ("digital.pdf", 2)):
        assert rows[key]["text_source"] == "pdf_text" and rows[key]["text"] == rows[key]["pdf_text"]
    for key in (("digital.pdf", 3), ("scan.pdf", 1), ("p.png", 1)):  # too little text, none, an image: the model
        assert (
            rows[key]["text_source"] == "model" and rows[key]["completion_tokens"] >= 1 and rows[key]["attempts"] >= 1
        )
    assert rows[("digital.pdf", 3)]["pdf_text"] == "Page 3" and rows[("scan.pdf", 1)]["pdf_text"] == ""
    assert rows[("p.png", 1)]["pdf_text"] is None


def _loops(tokenizer, text: str) -> bool:
    """The engine's own loop rule (SequenceState with the guard's defaults), run over the text's tokens again."""
    from model.sampling import SamplingParams, SequenceState

    state = SequenceState(SamplingParams(repetition_guard=True))
    for t in tokenizer.encode(text, add_special_tokens=False):
        state.record(t)
    return state.repeating


def test_the_ladder_on_the_real_engine_ends_loops(tiny_checkpoint, ray_session, tmp_path):
    from model.processor import Processor

    # the tiny random model, greedy, loops on some of these pages within 200 tokens (and not at temperature > 0)
    docs = write_files(tmp_path / "docs", {f"p{i}.png": samples.png_page(i, (300, 400)) for i in range(3)})
    cfg = config(tiny_checkpoint, [docs], tmp_path / "out", max_new_tokens=200, max_attempts=4)
    run_job(cfg, progress=False)
    rows = read_rows(cfg.output)
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried, "no page looped greedily: the test lost its loop"
    tokenizer = Processor.from_pretrained(tiny_checkpoint).tokenizer
    for r in rows:
        reasons = r["attempt_finish_reasons"]
        assert len(reasons) == r["attempts"] == len(r["attempt_temperatures"]) and reasons[-1] == r["finish_reason"]
        assert all(x == "repetition" for x in reasons[:-1])  # retried only while it looped
        if r["error_type"] is None:
            assert r["finish_reason"] in ("stop", "length") and not _loops(tokenizer, r["text"]), r["text"]
        else:
            assert r["error_type"] == "repetition" and r["text"] is None and r["attempts"] == 4
    assert any(r["error_type"] is None for r in retried), "no retry ever ended the loop"
    assert all(r["attempt_temperatures"][:2] == [0.0, 0.1] for r in retried)

    # a ladder that cannot help (greedy again): every looping page becomes a repetition error row
    looped = tuple(r["source_uri"] for r in retried)
    stuck = with_settings(cfg, inputs=looped, output=str(tmp_path / "stuck"), temperature_ladder=(0.0,), max_attempts=2)
    run_job(stuck, progress=False)
    again = {r["source_uri"]: r for r in read_rows(stuck.output)}
    assert set(again) == set(looped)
    for r in retried:
        assert again[r["source_uri"]]["error_type"] == "repetition"
        assert again[r["source_uri"]]["attempt_finish_reasons"] == ["repetition", "repetition"]
    assert TEST_SETTINGS["max_new_tokens"] < 64  # (the other tests' 4 tokens never reach the guard)
