"""Shared by the processor tests: small settings, one page of every kind a row may give, the engine alone as the
reference (pipelines/processor.py). The test modules make fixtures `pages` and `reference` of make_pages and
make_reference."""

from __future__ import annotations

import base64

import numpy as np
from PIL import Image

from demo.samples import page_image, pdf_document, png_page, tiff_document
from pipelines.decode import DecodeConfig, open_document
from pipelines.processor import InfimmProcessorConfig

QUESTION = "Transcribe the text of this page."
MAX_WINDOWS = 4
SIZE = (500, 640)  # a 1x1 grid plus the thumbnail at 448: cheap on the CPU


def settings(checkpoint, **kw) -> InfimmProcessorConfig:
    base = dict(
        checkpoint=str(checkpoint),
        batch_size=4,
        max_windows=MAX_WINDOWS,
        dpi=72,
        gpus_per_replica=0.0,
        engine_kwargs=dict(max_slots=4),
        prepare_memory=512 * 2**20,
        metrics="none",
    )
    return InfimmProcessorConfig(**{**base, **kw})


def user_row(image, max_tokens=4, question=QUESTION, page=None, **params) -> dict:
    part = {"type": "image", "image": image}
    if page is not None:
        part["page"] = page
    return dict(
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        sampling_params=dict(temperature=0, max_tokens=max_tokens, **params),
    )


def make_pages(tmp_path_factory):
    """One page of each kind a row may give, and the PIL image each one is (for the reference)."""
    folder = tmp_path_factory.mktemp("processor-pages")
    path = folder / "scan.png"
    path.write_bytes(png_page(4, SIZE))
    pdf = folder / "doc.pdf"
    pdf.write_bytes(pdf_document(2, start=5, size=SIZE))
    arr = np.asarray(page_image(2, SIZE))
    kinds = {
        "bytes": png_page(0, SIZE),
        "pil": page_image(1, SIZE),
        "numpy": arr,
        "data_url": "data:image/png;base64," + base64.b64encode(png_page(3, SIZE)).decode(),
        "path": str(path),
        "pdf_page": (str(pdf), 2),
        "tiff_page": (tiff_document(2, start=7, size=SIZE), 2),
    }
    decode = DecodeConfig(dpi=72)

    def doc_page(data, n):
        doc = open_document(data, "x.pdf" if data[:5] == b"%PDF-" else "x", decode)
        return doc.page(n - 1)

    reference = {
        "bytes": kinds["bytes"],
        "pil": kinds["pil"],
        "numpy": Image.fromarray(arr),
        "data_url": png_page(3, SIZE),
        "path": path.read_bytes(),
        "pdf_page": doc_page(pdf.read_bytes(), 2),
        "tiff_page": doc_page(kinds["tiff_page"][0], 2),
    }
    return kinds, reference


def make_reference(tiny_checkpoint):
    """The engine alone, with the processor's window and slot settings."""
    from model.engine import Engine as InfimmEngine
    from model.engine import EngineConfig
    from model.sampling import SamplingParams
    from model.windows import WindowConfig

    engine = InfimmEngine.from_pretrained(
        tiny_checkpoint,
        device="cpu",
        config=EngineConfig(max_slots=4, max_views=MAX_WINDOWS + 1),
        windows=WindowConfig(max_windows=MAX_WINDOWS),
    )

    def answer(image, max_tokens=4, question=QUESTION):
        req = engine.make_request(question, [image], SamplingParams(max_new_tokens=max_tokens))
        return engine.generate([req])[0]

    return answer


def kind_rows(kinds) -> list[dict]:
    rows = []
    for name, value in kinds.items():
        image, page = value if isinstance(value, tuple) else (value, None)
        rows.append({"id": name, "image": image, "page": page})
    return rows


def make_request(row: dict) -> dict:
    return user_row(row["image"], page=row["page"])
