"""The processor for users' own Datasets (pipelines/processor.py): same text as the engine alone, hooks, per-row
sampling, error rows. The stages are checked directly first (no Ray, seconds), then once through a Ray Dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from demo.samples import png_page
from pipelines.messages import sampling_kwargs, split_messages
from pipelines.processor import (
    REQUEST,
    Engine,
    InfimmProcessorConfig,
    Postprocess,
    Prepare,
    Preprocess,
    build_processor,
)

from . import processor_helpers
from .processor_helpers import QUESTION, SIZE, kind_rows, make_request, settings, user_row

page_kinds = pytest.fixture(scope="module", name="pages")(processor_helpers.make_pages)
engine_alone = pytest.fixture(scope="module", name="reference")(processor_helpers.make_reference)


def run_stages(config, rows: list[dict], preprocess=None, postprocess=None) -> list[dict]:
    """The four stages in this process, as Ray would run them (unit level)."""
    pre = [Preprocess(preprocess)(r) for r in rows]
    table = pa.table({"id": [r["id"] for r in pre], REQUEST: [r[REQUEST] for r in pre]})
    windows = config.windows()
    table = Prepare(config, windows)(table)
    table = Engine(config, windows)(table)
    return [Postprocess(postprocess)(r) for r in table.to_pylist()]


# ---- pieces ------------------------------------------------------------------------------------------------------
def test_sampling_params_take_openai_names_and_refuse_unknown_ones():
    assert sampling_kwargs({"max_tokens": 7, "min_tokens": 2, "stop": "END", "seed": np.int64(3)}) == {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "stop": ("END",),
        "seed": 3,
    }
    with pytest.raises(ValueError, match=r"unknown sampling parameter 'best_of'; known: .*max_tokens"):
        sampling_kwargs({"max_tokens": 4, "best_of": 2})
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling_kwargs({"temperature": -1})
    with pytest.raises(ValueError, match="given twice"):
        sampling_kwargs({"max_tokens": 4, "max_new_tokens": 5})


def test_messages_in_ray_and_openai_forms():
    turns, images = split_messages(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "image", "image": b"png", "page": 2},
                    {"type": "text", "text": "Compare."},
                ],
            },
        ]
    )
    assert turns == [
        {"role": "system", "parts": ["Be brief."]},
        {"role": "user", "parts": [{"image": 0}, {"image": 1}, "Compare."]},
    ]
    assert images == [("data:image/png;base64,AA==", None), (b"png", 2)]
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        split_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        split_messages(None)


def test_config_checks():
    with pytest.raises(ValueError, match=r"unknown engine_kwargs \['max_batch'\]"):
        InfimmProcessorConfig(checkpoint="x", engine_kwargs={"max_batch": 4})
    with pytest.raises(ValueError, match="concurrency"):
        InfimmProcessorConfig(checkpoint="x", concurrency=(3, 2))
    assert InfimmProcessorConfig(checkpoint="x", concurrency=[1, 4]).pool == {"min_size": 1, "max_size": 4}
    assert InfimmProcessorConfig(checkpoint="x", concurrency=2).pool == {"size": 2}
    with pytest.raises(ValueError, match="builder_kwargs"):
        build_processor(InfimmProcessorConfig(checkpoint="x"), builder_kwargs={"chat_template_kwargs": {}})


# ---- the stages without Ray ----------------------------------------------------------------------------------------
def test_every_image_kind_gives_the_engines_text(tiny_checkpoint, pages, reference):
    kinds, ref = pages
    rows = [{**r, **make_request(r)} for r in kind_rows(kinds)]
    out = run_stages(settings(tiny_checkpoint), rows)
    assert [r["id"] for r in out] == list(kinds)
    for r in out:
        want = reference(ref[r["id"]])
        assert r["error_type"] is None, (r["id"], r["error_message"])
        assert (r["generated_text"], r["num_generated_tokens"]) == (want.text, want.completion_tokens), r["id"]
        assert r["num_input_tokens"] == want.prompt_tokens
        assert r["finish_reason"] == want.finish_reason
        assert r["time_taken_llm"] > 0 and r["generate_ms"] > 0


def test_bad_rows_raise_when_asked(tiny_checkpoint):
    config = settings(tiny_checkpoint, should_continue_on_error=False)
    row = Preprocess(None)(user_row(b"not an image"))
    with pytest.raises(ValueError, match="decode_error: image 1: not a readable image"):
        Prepare(config, config.windows())(pa.table({REQUEST: [row[REQUEST]]}))


def test_a_multi_page_pdf_needs_a_page(tiny_checkpoint, pages):
    kinds, _ = pages
    out = run_stages(settings(tiny_checkpoint), [{"id": "pdf", **user_row(kinds["pdf_page"][0])}])
    assert out[0]["error_type"] == "invalid_request"
    assert "the PDF has 2 pages: give the image part a 'page'" in out[0]["error_message"]


# ---- through a Ray Dataset ------------------------------------------------------------------------------------------
def test_processor_on_a_ray_dataset(ray_session, tiny_checkpoint, pages, reference):
    import ray

    kinds, ref = pages
    items = kind_rows(kinds)
    items += [
        # per-row sampling: the same page, two lengths
        {"id": "short", "image": kinds["bytes"], "page": None, "max_tokens": 2},
        {"id": "long", "image": kinds["bytes"], "page": None, "max_tokens": 7},
        # bad rows
        {"id": "undecodable", "image": b"\x89PNG\r\n\x1a\n not really", "page": None},
        {"id": "too_long", "image": kinds["bytes"], "page": None, "question": "word " * 1200},
        {"id": "unknown_param", "image": kinds["bytes"], "page": None, "extra": {"best_of": 2}},
    ]

    def preprocess(row):
        extra = row.get("extra") or {}
        return user_row(
            row["image"],
            max_tokens=row.get("max_tokens") or 4,
            question=row.get("question") or QUESTION,
            page=row["page"],
            **extra,
        )

    def postprocess(row):
        return {"id": row["id"], "text": row["generated_text"], "tokens": row["num_generated_tokens"], "post": True}

    processor = build_processor(settings(tiny_checkpoint), preprocess=preprocess, postprocess=postprocess)
    got = {r["id"]: r for r in processor(ray.data.from_items(items)).take_all()}
    assert sorted(got) == sorted(i["id"] for i in items)

    for name in kinds:  # every kind: the engine's own text, and the postprocess ran
        want = reference(ref[name])
        assert got[name]["post"] is True
        assert (got[name]["text"], got[name]["tokens"]) == (want.text, want.completion_tokens), name
    for name, n in (("short", 2), ("long", 7)):
        want = reference(kinds["bytes"], max_tokens=n)
        assert (got[name]["text"], got[name]["tokens"]) == (want.text, want.completion_tokens), name
        assert got[name]["tokens"] == n  # random weights rarely stop early: each row ran to its own length
    # error rows skip the postprocess and keep the input columns, their messages and the error (Ray Data unifies
    # the blocks' columns: the postprocess's own columns are null on them)
    bad = {n: got[n] for n in ("undecodable", "too_long", "unknown_param")}
    assert all(r.get("post") is None and r["generated_text"] is None for r in bad.values())
    assert bad["undecodable"]["error_type"] == "decode_error"
    assert (
        "image 1: image data is corrupt" in bad["undecodable"]["error_message"]
        or "not a readable image" in (bad["undecodable"]["error_message"])
    )
    assert bad["too_long"]["error_type"] == "invalid_request"
    assert "context of this engine" in bad["too_long"]["error_message"]
    assert bad["unknown_param"]["error_type"] == "invalid_request"
    assert "unknown sampling parameter 'best_of'" in bad["unknown_param"]["error_message"]
    assert bad["unknown_param"]["messages"][0]["content"][1]["text"] == QUESTION


def test_error_rows_without_hooks_keep_the_answer_columns(tiny_checkpoint):
    """No preprocess: the rows hold `messages` themselves; every row has the engine's columns."""
    rows = [{"id": "ok", **user_row(png_page(0, SIZE))}, {"id": "bad", **user_row(b"")}]
    out = run_stages(settings(tiny_checkpoint), rows)
    assert out[0]["error_type"] is None and out[0]["generated_text"]
    assert out[1]["error_type"] == "empty_file" and out[1]["generated_text"] is None
    assert set(out[0]) == set(out[1])
    assert pickle.loads(pickle.dumps(out[1]["messages"]))[0]["role"] == "user"
