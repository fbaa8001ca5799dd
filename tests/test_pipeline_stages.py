"""The batch job's pieces without Ray: listing, decoding (the bad-input corpus), the engine stage, ids, the writer."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo import samples
from pipelines.decode import DecodeConfig, DecodePages
from pipelines.generate import GenerateConfig, GenerateStage
from pipelines.output import Output, PartWriter
from pipelines.plan import plan_sources
from pipelines.rows import DECODED_SCHEMA, ERROR_TYPES, OUTPUT_SCHEMA, doc_key, prompt_key, row_id, split_row_id
from pipelines.storage import Source, Storage, list_sources

from .corpus import bad_corpus
from .pipeline_helpers import DECODE, PROMPT, TEST_SETTINGS, Reference, batch_cli, batch_parser, decode


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for case in bad_corpus():
        (d / case.name).write_bytes(case.data)
    return d


@pytest.mark.parametrize("case", bad_corpus(), ids=lambda c: c.name)
def test_each_corpus_file_gives_its_pages_or_one_clear_error_row(case, corpus_dir):
    rows = decode(corpus_dir / case.name)
    if case.error is None:
        assert [r["page"] for r in rows] == list(range(1, case.pages + 1))
        assert all(r["error_type"] is None and r["views"] for r in rows)
        for r in rows:  # views are the thumbnail + the grid, as bytes of (V, 3, 448, 448) uint8
            assert r["n_views"] == r["grid_rows"] * r["grid_cols"] + 1
            assert len(r["views"]) == r["n_views"] * 3 * r["window"] ** 2
        if case.size:
            assert (rows[0]["width"], rows[0]["height"]) == case.size
    else:
        assert len(rows) == 1, rows
        assert (rows[0]["page"], rows[0]["error_type"]) == (case.page, case.error), rows[0]["error_message"]
        assert rows[0]["error_message"] and rows[0].get("views") is None
        assert rows[0]["error_type"] in ERROR_TYPES


def test_corpus_has_at_least_twelve_kinds_of_bad_input():
    assert len([c for c in bad_corpus() if c.error or c.name.split(".")[0] not in ("good", "good-3-pages")]) >= 12


def test_missing_object_is_one_not_found_row(tmp_path):
    rows = decode(tmp_path / "gone.png")
    assert [(r["page"], r["error_type"]) for r in rows] == [(0, "not_found")]


def test_exif_rotation_and_modes_reach_the_windows_upright(tmp_path):
    from tests.corpus import exif_rotated_jpeg

    (tmp_path / "r.jpg").write_bytes(exif_rotated_jpeg())
    (row,) = decode(tmp_path / "r.jpg")
    # stored 300x400 portrait, EXIF says rotate: the page is 400x300 landscape
    assert (row["width"], row["height"]) == (400, 300)


def test_pdf_dpi_page_cap_and_done_pages(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(samples.pdf_document(5, size=(300, 400)))  # 300x400 pt pages
    at72 = decode(tmp_path / "doc.pdf")
    at144 = decode(tmp_path / "doc.pdf", config=DecodeConfig(windows=DECODE.windows, dpi=144, max_pages=3))
    assert [r["width"] for r in at72] == [300] * 5
    assert [(r["page"], r["width"], r["error_type"]) for r in at144] == [
        (1, 600, None),
        (2, 600, None),
        (3, 600, None),
        (4, None, "page_limit"),
        (5, None, "page_limit"),
    ]
    # resume: pages 1 and 3 done for this prompt -> only 2, 4, 5 come out; with a second prompt page 1 comes back
    done = [f"1:{prompt_key(PROMPT)}", f"3:{prompt_key(PROMPT)}"]
    assert [r["page"] for r in decode(tmp_path / "doc.pdf", done=done)] == [2, 4, 5]
    two = decode(tmp_path / "doc.pdf", prompts=(PROMPT, "Title?"), done=done)
    assert [(r["page"], r["prompts"]) for r in two][:2] == [(1, ["Title?"]), (2, [PROMPT, "Title?"])]


def test_a_document_that_fails_to_open_is_not_answered_twice(tmp_path):
    # the object had pages written by an earlier run, then vanished: no page-0 row for the prompt it already has
    done = [f"1:{prompt_key(PROMPT)}"]
    rows = decode(tmp_path / "vanished.pdf", prompts=(PROMPT, "Title?"), done=done)
    assert [(r["page"], r["prompts"], r["error_type"]) for r in rows] == [(0, ["Title?"], "not_found")]


def test_decode_stage_yields_bounded_blocks(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(samples.pdf_document(6, size=(200, 260)))
    stage = DecodePages(Storage(), DecodeConfig(windows=DECODE.windows, dpi=72, chunk_pages=4))
    batch = pa.Table.from_pylist([{"uri": str(tmp_path / "doc.pdf"), "doc": "d", "prompts": [PROMPT], "done": []}])
    blocks = list(stage(batch))
    assert [b.num_rows for b in blocks] == [4, 2] and all(b.schema == DECODED_SCHEMA for b in blocks)


# ---- listing and planning --------------------------------------------------------------------------------------------
def uris_of(sources) -> list[str]:
    return sources["uri"].to_pylist()


def test_local_folders_globs_and_manifests(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.pdf", "sub/c.TIFF", "notes.txt", ".hidden.png"):
        (d / name).write_bytes(b"x")
    assert [os.path.basename(u) for u in uris_of(list_sources([str(d)], Storage()))] == ["a.png", "b.pdf", "c.TIFF"]
    assert [os.path.basename(u) for u in uris_of(list_sources([str(d / "**" / "*.pdf")], Storage()))] == ["b.pdf"]

    rows = [{"uri": "docs/a.png", "id": "doc-1", "prompt": "Title?"}, {"uri": str(d / "sub" / "b.pdf")}, {"uri": ""}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "m.csv").write_text("uri,id,prompt\ndocs/a.png,doc-1,Title?\n" + str(d / "sub" / "b.pdf") + ",,\n")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        got = list_sources([str(tmp_path / name)], Storage()).to_pylist()
        assert [(s["uri"], s["doc_id"], s["prompt"]) for s in got] == [
            (str(d / "a.png"), "doc-1", "Title?"),
            (str(d / "sub" / "b.pdf"), None, None),
        ], name

    (tmp_path / "bad.csv").write_text("path\nx.png\n")
    with pytest.raises(ValueError, match="no `uri` column"):
        list_sources([str(tmp_path / "bad.csv")], Storage())
    with pytest.raises(ValueError, match="matches no documents"):
        list_sources([str(tmp_path / "nothing-here")], Storage())


def test_plan_merges_prompts_checks_ids_and_skips_finished_single_pages():
    a, b = Source("/x/a.png"), Source("/x/b.pdf")
    records, skipped = plan_sources([a, b, Source("/x/a.png", prompt="Extra?")], ("Q",), set())
    assert skipped == 0 and [r["prompts"] for r in records.to_pylist()] == [["Q", "Extra?"], ["Q"]]
    done = {row_id(doc_key("/x/a.png"), 1, "Q"), row_id(doc_key("/x/b.pdf"), 1, "Q")}
    records, skipped = plan_sources([a, b], ("Q",), done)
    # a.png is complete and not read again; b.pdf may have more pages: it goes to the decode stage with its done list
    assert skipped == 1 and [(r["uri"], r["done"]) for r in records.to_pylist()] == [
        ("/x/b.pdf", [f"1:{prompt_key('Q')}"])
    ]
    with pytest.raises(ValueError, match="ids must be unique"):
        plan_sources([Source("/x/a.png", doc_id="7"), Source("/x/b.png", doc_id="7")], ("Q",), set())
    with pytest.raises(ValueError, match="no prompt"):
        plan_sources([a], (), set())


def test_plan_handles_ids_with_colons_repeated_documents_and_several_prompts():
    sources = [
        Source("/x/a.png", doc_id="scan:17"),
        Source("/x/a.png", doc_id="scan:17"),  # listed twice: one record, each prompt once
        Source("/x/b.png", doc_id="b", prompt="Own?"),
        Source("/x/c.tif"),
    ]
    done = {row_id("scan:17", 1, "Q1"), row_id("scan:17", 1, "Q2"), row_id("b", 1, "Q1")}
    records, skipped = plan_sources(sources, ("Q1", "Q2"), done)
    # a.png has both prompts (skipped); b.png's own prompt is not answered; c.tif may have pages: always opened
    assert skipped == 1
    assert [(r["uri"], r["prompts"], r["done"]) for r in records.to_pylist()] == [
        ("/x/b.png", ["Own?"], [f"1:{prompt_key('Q1')}"]),
        ("/x/c.tif", ["Q1", "Q2"], []),
    ]


def test_row_ids_are_deterministic_and_reversible():
    rid = row_id("scan:17", 3, PROMPT)
    assert rid == row_id("scan:17", 3, PROMPT) != row_id("scan:17", 3, PROMPT + " ")
    assert split_row_id(rid) == ("scan:17", 3, prompt_key(PROMPT))
    assert doc_key("s3://b/k.png") == doc_key("s3://b/k.png") != doc_key("s3://b/k2.png")
    assert doc_key("s3://b/k.png", "my-id") == "my-id"


# ---- engine stage ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage(tiny_checkpoint):
    return GenerateStage(
        GenerateConfig(
            checkpoint=str(tiny_checkpoint),
            max_new_tokens=TEST_SETTINGS["max_new_tokens"],
            max_slots=4,
            device="cpu",
            metrics="none",
        ),
        DECODE.windows,
    )


def test_engine_stage_answers_every_prompt_of_every_page_like_the_engine_alone(stage, tiny_checkpoint, tmp_path):
    pages = {f"p{i}.png": samples.png_page(i, (300 + 60 * i, 420)) for i in range(3)}
    decoded = []
    for name, data in pages.items():
        (tmp_path / name).write_bytes(data)
        decoded += decode(tmp_path / name, prompts=(PROMPT, "What is the title?"), doc=name)
    decoded += decode(tmp_path / "missing.png", doc="missing")  # an error row passes through, one per prompt
    out = stage(pa.Table.from_pylist(decoded, schema=DECODED_SCHEMA))
    assert out.schema == OUTPUT_SCHEMA and out.num_rows == 3 * 2 + 1
    rows = {(r["source_uri"], r["prompt"]): r for r in out.to_pylist()}
    ref = Reference(tiny_checkpoint)
    for name, data in pages.items():
        for prompt in (PROMPT, "What is the title?"):
            r = rows[(str(tmp_path / name), prompt)]
            assert r["id"] == row_id(name, 1, prompt) and r["error_type"] is None
            assert r["text"] == ref.text(data, prompt)
            assert r["finish_reason"] in ("stop", "length") and 1 <= r["completion_tokens"] <= 4
            assert r["model"] == os.path.basename(str(tiny_checkpoint))
    assert rows[(str(tmp_path / "missing.png"), PROMPT)]["error_type"] == "not_found"


def test_a_request_the_engine_refuses_is_an_error_row_not_a_failed_batch(stage, tmp_path):
    (tmp_path / "p.png").write_bytes(samples.png_page(0, (300, 400)))
    long_prompt = "word " * 1500  # over the engine's 1024-token context
    decoded = decode(tmp_path / "p.png", prompts=(PROMPT, long_prompt))
    rows = {r["prompt"]: r for r in stage(pa.Table.from_pylist(decoded, schema=DECODED_SCHEMA)).to_pylist()}
    assert rows[long_prompt]["error_type"] == "invalid_request" and "context" in rows[long_prompt]["error_message"]
    assert rows[PROMPT]["error_type"] is None and rows[PROMPT]["text"] is not None


# ---- writer and resume bookkeeping -----------------------------------------------------------------------------------
def _rows(ids):
    return pa.Table.from_pylist(
        [{"id": i, "source_uri": "u", "page": 1, "prompt": "q"} for i in ids], schema=OUTPUT_SCHEMA
    )


def test_writer_drops_repeated_ids_and_resume_reads_them_back(tmp_path):
    out = Output(str(tmp_path), Storage())
    w = PartWriter(out, seen={"old"}, rows_per_file=3, flush_seconds=1e9)
    w.add(_rows(["a", "b"]))
    assert not w.parts  # below rows_per_file: buffered
    w.add(_rows(["b", "c", "old", "d"]))
    w.flush()
    assert w.duplicates == 2 and len(w.parts) == 1
    assert sorted(out.done_ids().to_pylist()) == ["a", "b", "c", "d"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_unreadable_part_is_set_aside_not_counted(tmp_path):
    pq.write_table(_rows(["a"]), tmp_path / "part-1.parquet")
    (tmp_path / "part-2.parquet").write_bytes(b"PAR1 torn write")
    assert Output(str(tmp_path), Storage()).done_ids().to_pylist() == ["a"]
    assert os.listdir(tmp_path / "_incomplete") == ["part-2.parquet"]


def test_job_json_keeps_the_flat_settings_of_earlier_runs(tmp_path, caplog):
    """`_job.json` exactly as runs wrote it while JobConfig held every stage setting flat: such an output resumes
    without a settings warning, and a changed setting still warns."""
    from pipelines.job import prepare_output

    from .pipeline_helpers import config, with_settings

    earlier = {
        "checkpoint": "/models/ckpt",
        "max_new_tokens": 4,
        "dpi": 72,
        "max_windows": 4,
        "quantize": "none",
        "use_pdf_text": "never",
        "pdf_text_min_chars": 50,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "repetition_guard": True,
        "temperature_ladder": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        "max_attempts": 7,
    }
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text(json.dumps(earlier, indent=2))
    (out / "part-earlier-00000.parquet").write_bytes(b"")  # settings are compared only when rows exist
    cfg = config("/models/ckpt", ["in/"], out)
    with caplog.at_level("WARNING", logger="pipelines.output"):
        prepare_output(cfg, Output(cfg.output, Storage()))
        assert "different settings" not in caplog.text
        assert (out / "_job.json").read_text() == json.dumps(earlier, indent=2)
        prepare_output(with_settings(cfg, dpi=100, max_windows=6), Output(cfg.output, Storage()))
    assert "different settings" in caplog.text and "'dpi': (72, 100)" in caplog.text
    assert "'max_windows': (4, 6)" in caplog.text


def test_submit_replays_the_run_flags(tmp_path):
    from pipelines.cli import run_argv

    (tmp_path / "prompts.txt").write_text("First?\n\n  Second?  \n")
    parser = batch_parser()
    args = parser.parse_args(
        [
            "batch",
            "submit",
            "--address",
            "http://h:8265",
            "--input",
            "s3://b/in/",
            "--input",
            "m.jsonl",
            "--output",
            "s3://b/out/",
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
            "--actors",
            "1,3",
            "--no-resume",
            "--max-new-tokens",
            "9",
        ]
    )
    argv = run_argv(args)
    again = parser.parse_args(["batch", "run", *argv])
    assert again.inputs == ["s3://b/in/", "m.jsonl"] and again.output == "s3://b/out/"
    assert again.prompts == ["First?", "Second?"] and again.prompts_file is None
    assert again.actors == (1, 3) and again.no_resume and again.max_new_tokens == 9 and again.dpi == 150


def test_cli_refuses_a_job_without_prompts_before_writing_anything(tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.png").write_bytes(samples.png_page(0, (200, 260)))
    p = batch_cli(
        "run",
        *("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint)),
        timeout=120,
    )
    assert p.returncode == 2 and "no prompt for" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_page_that_breaks_the_engine_costs_only_its_own_rows(stage, tiny_checkpoint, tmp_path):
    (tmp_path / "a.png").write_bytes(samples.png_page(1, (300, 400)))
    (tmp_path / "b.png").write_bytes(samples.png_page(2, (300, 400)))
    good, other = decode(tmp_path / "a.png", doc="a"), decode(tmp_path / "b.png", doc="b")
    broken = dict(other[0], grid_rows=3, grid_cols=3)  # 2 views that claim a 3x3 grid: the engine cannot place them
    out = {r["source_uri"]: r for r in stage(pa.Table.from_pylist(good + [broken], schema=DECODED_SCHEMA)).to_pylist()}
    assert out[str(tmp_path / "b.png")]["error_type"] == "generation_error"
    assert out[str(tmp_path / "a.png")]["error_type"] is None
    assert out[str(tmp_path / "a.png")]["text"] == Reference(tiny_checkpoint).text((tmp_path / "a.png").read_bytes())
    again = stage(pa.Table.from_pylist(other, schema=DECODED_SCHEMA)).to_pylist()  # the engine is usable afterwards
    assert again[0]["error_type"] is None and again[0]["text"]
