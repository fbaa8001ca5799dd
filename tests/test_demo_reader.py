"""The shipped demo reader reads, so these tests assert words, not shapes: held-out word pages (never trained on)
through the batch job's rows, its documents-out Markdown (a multi-page TIFF in page order), and streamed chat
completions from `infimm-hd serve` started without --checkpoint (the reader is the default), with the official
`openai` client. A bug that keeps shapes right and meaning wrong (window order, a mask in continuous batching, media of
the wrong page) fails here."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from runtime.checkpoints import DEMO_PROMPT, demo_checkpoint
from tests.conftest import ROOT, free_port
from tests.serve_helpers import data_url, wait_for
from training.corpus import CorpusConfig, find_fonts, render_page, sample_text

READER = demo_checkpoint()


def word_pages(n: int, seed: int) -> list[tuple[bytes, str]]:
    """n held-out pages of the reader's task (PNG bytes, printed word); training used seed 0."""
    import io

    cfg, rng, fonts = CorpusConfig(kinds=("word",)), random.Random(seed), find_fonts()
    out = []
    for _ in range(n):
        text, _, answer = sample_text("word", rng, cfg)
        page, _ = render_page(text, rng, cfg, fonts)
        buf = io.BytesIO()
        page.save(buf, "PNG")
        out.append((buf.getvalue(), answer))
    return out


def test_the_shipped_demo_reader_reads_so_it_is_the_default():
    assert READER is not None, "checkpoints/demo-reader must read (eval.json: exact match >= 0.5 through the batch job)"


@pytest.mark.skipif(READER is None, reason="no reader: test_the_shipped_demo_reader_reads_so_it_is_the_default fails")
def test_batch_rows_and_documents_out_transcribe_held_out_pages(ray_session, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from model.engine import Engine
    from pipelines.config import JobConfig
    from pipelines.generate import GenerateConfig
    from pipelines.job import run_job

    pages = word_pages(11, seed=777)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (png, _) in enumerate(pages[:8]):
        (folder / f"page-{i}.png").write_bytes(png)
    import io

    frames = [Image.open(io.BytesIO(png)) for png, _ in pages[8:]]
    frames[0].save(folder / "letter.tiff", save_all=True, append_images=frames[1:])  # one document, three pages
    docs = tmp_path / "docs"
    cfg = JobConfig(
        inputs=(str(folder),),
        output=str(tmp_path / "out"),
        prompts=(DEMO_PROMPT,),
        generate=GenerateConfig(checkpoint=str(READER), max_new_tokens=12),
        documents_out=str(docs),
    )
    run_job(cfg, progress=False)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 11 and not any(r["error_type"] for r in rows), [
        (r["source_uri"], r["error_type"]) for r in rows
    ]
    by_page = {(Path(r["source_uri"]).name, r["page"]): r["text"].strip() for r in rows}
    want = {(f"page-{i}.png", 1): w for i, (_, w) in enumerate(pages[:8])}
    want |= {("letter.tiff", p + 1): w for p, (_, w) in enumerate(pages[8:])}
    assert set(by_page) == set(want), sorted(by_page)
    right = sum(by_page[k] == w for k, w in want.items())
    assert right >= 9, f"read {right} of 11 held-out pages: {[(w, by_page[k]) for k, w in want.items()]}"

    engine = Engine.from_pretrained(READER)  # each row is the engine's own answer for that page alone
    for i, (png, _) in enumerate(pages[:4]):
        alone = engine.generate([engine.make_request(DEMO_PROMPT, [png])])[0].text.strip()
        assert by_page[(f"page-{i}.png", 1)] == alone, f"page {i}: batch row differs from the engine alone"

    lines = [json.loads(x) for x in (docs / "documents.jsonl").read_text().splitlines()]
    assert len(lines) == 9, "one line per document: 8 single pages and the letter"
    letter = next(x for x in lines if x["source"].endswith("letter.tiff"))
    markdown = (docs / letter["metadata"]["text_path"]).read_text()
    chunks = markdown.split("<!-- page ")[1:]
    assert [c.split(" ", 1)[0].rstrip("->\n") for c in chunks] == ["1", "2", "3"], markdown
    texts = [c.split("-->", 1)[1].strip() for c in chunks]
    assert texts == [by_page[("letter.tiff", p)] for p in (1, 2, 3)], "the document is its rows in page order"
    assert sum(t == w for t, (_, w) in zip(texts, pages[8:], strict=True)) >= 2, (
        f"{texts} vs {[w for _, w in pages[8:]]}"
    )
    assert letter["text"] == "\n\n".join(texts), "documents.jsonl holds the same text"


@pytest.mark.skipif(READER is None, reason="no reader: test_the_shipped_demo_reader_reads_so_it_is_the_default fails")
@pytest.mark.timeout(400)
def test_serve_without_a_checkpoint_streams_the_printed_words(tmp_path):
    import openai

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # this Ray's session folder, apart from the test session's
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port), "--num-cpus", "4"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

    def up() -> bool:
        try:
            return proc.poll() is not None or bool(client.models.list().data)
        except openai.APIError:
            return False

    try:
        wait_for(up, 240, 1.0, "serve answers /v1/models")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert "DEMO READER" in log.read_text(), "the banner says the default is the demo reader"
        pages = word_pages(6, seed=778)
        right = 0
        for png, word in pages:
            content = [
                {"type": "image_url", "image_url": {"url": data_url(png)}},
                {"type": "text", "text": DEMO_PROMPT},
            ]
            messages = [{"role": "user", "content": content}]
            model = client.models.list().data[0].id
            stream = client.chat.completions.create(
                model=model, messages=messages, max_tokens=12, temperature=0, stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
            assert streamed == whole.choices[0].message.content, "streamed deltas add up to the whole answer"
            right += streamed.strip() == word
        assert right >= 5, f"read {right} of 6 pages through the service"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
