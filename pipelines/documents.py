"""CPU stage of the batch job: read a document, split it into pages, cut each page into windows.

Page rules:
* PDF (by content, or by a .pdf name): every page, rasterized with pypdfium2 at `dpi` (scaled down if a page would be
  over `max_pixels`); pages after `max_pages` become `page_limit` error rows without being rendered.
* TIFF: every page (frame). GIF, WebP, PNG (APNG), ...: the first frame only. All else that PIL reads: one page.
* EXIF orientation, mode conversion (CMYK, 16-bit, palette, alpha) and window cutting are model.windows'.

Failures never escape: a document that cannot be opened becomes one error row with page 0 (its page count is unknown);
a page that cannot be decoded becomes an error row for that page. See pipelines/rows.py for ids and error types.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from model.windows import ImageError, WindowConfig, cut_views, load_image, open_image

from .rows import DECODED_SCHEMA, error_fields, prompt_key
from .storage import Storage, TooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeConfig:
    windows: WindowConfig = field(default_factory=WindowConfig)
    dpi: int = 150  # PDF rasterization; 150 dpi puts a Letter page at 1275x1650 px, a 3x4 window grid
    max_pages: int = 1000  # per document; later pages become `page_limit` rows
    max_bytes: int = 1 << 30  # per document object
    chunk_pages: int = 4  # pages per output block (a page is up to 17 views of 448x448x3 bytes, ~10 MB)

    def __post_init__(self):
        if not 10 <= self.dpi <= 1200:
            raise ValueError(f"dpi must be within 10..1200, got {self.dpi}")
        if self.max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {self.max_pages}")


# ---- documents: page count + page i as an RGB image ------------------------------------------------------------------
def is_pdf(data: bytes, uri: str = "") -> bool:
    # The header may follow a little junk (the PDF spec lets readers search the first 1024 bytes).
    return b"%PDF-" in data[:1024] or uri.lower().endswith(".pdf")


class ImageDocument:
    def __init__(self, data: bytes, cfg: WindowConfig):
        self.cfg = cfg
        self.image = open_image(data, cfg)  # header only; ImageError(empty_file | decode_error | too_large)
        # Only TIFF frames are pages; the frames of GIF/WebP/APNG are an animation (first frame is the page).
        self.n_pages = getattr(self.image, "n_frames", 1) if self.image.format == "TIFF" else 1

    def page(self, i: int) -> Image.Image:
        if i:
            try:
                self.image.seek(i)
            except (EOFError, OSError, ValueError) as e:
                raise ImageError("decode_error", f"TIFF page {i + 1} cannot be read: {e}") from e
        return load_image(self.image, self.cfg)

    def close(self) -> None:
        self.image.close()


class PdfDocument:
    def __init__(self, data: bytes, cfg: WindowConfig, dpi: int):
        import pypdfium2 as pdfium

        self.cfg, self.dpi = cfg, dpi
        try:
            self.pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as e:
            raise _pdf_open_error(data, e) from e
        self.n_pages = len(self.pdf)
        if self.n_pages == 0:
            raise ImageError("empty_document", "the PDF has no pages")

    def page(self, i: int) -> Image.Image:
        try:
            page = self.pdf[i]
            try:
                w_pt, h_pt = page.get_size()  # points (1/72 inch)
                scale = self.dpi / 72
                if w_pt * h_pt * scale**2 > self.cfg.max_pixels:  # a poster-sized page: render smaller, not fail
                    scale = math.sqrt(self.cfg.max_pixels / (w_pt * h_pt)) * 0.999
                image = page.render(scale=scale).to_pil()
            finally:
                page.close()
        except Exception as e:
            raise ImageError("pdf_error", f"PDF page {i + 1} failed to render: {e}") from e
        return load_image(image, self.cfg)

    def close(self) -> None:
        self.pdf.close()


def _pdf_open_error(data: bytes, e: Exception) -> ImageError:
    # pdfium's error code is process-global and not reset by every failure (a load that fails without setting one
    # reports the previous document's code), so each verdict is confirmed from the bytes too.
    code = getattr(e, "err_code", None)
    if code == 4 and b"/Encrypt" in data:  # FPDF_ERR_PASSWORD: the empty user password did not open it
        return ImageError("pdf_encrypted", "the PDF is encrypted and needs a password")
    # pdfium refuses a document whose page tree is empty with a generic error; say what is actually wrong. Only when
    # nothing could hide page objects (no compressed object streams), so a corrupt PDF is not called empty.
    if re.search(rb"/Count\s*0\b", data) and not re.search(rb"/Type\s*/Page\b(?!s)", data) and b"/ObjStm" not in data:
        return ImageError("empty_document", "the PDF has no pages")
    detail = f" ({e})" if code not in (0, 4) else ""  # 0/4 here can only be a stale code from another document
    return ImageError("pdf_error", f"not a loadable PDF: corrupt or truncated{detail}")


def open_document(data: bytes, uri: str, cfg: DecodeConfig) -> ImageDocument | PdfDocument:
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    if is_pdf(data, uri):
        return PdfDocument(data, cfg.windows, cfg.dpi)
    return ImageDocument(data, cfg.windows)


_NO_VIEWS = {k: None for k in ("views", "n_views", "window", "width", "height", "grid_rows", "grid_cols")}


# ---- the Ray stage ---------------------------------------------------------------------------------------------------
class DecodePages:
    """Source rows (`uri`, `doc`, `prompts`, `done`) -> decoded page rows (DECODED_SCHEMA).

    `done` lists "page:prompt_hash" keys already in the output (resume): those pages are not rendered again. Ray runs
    this as tasks; it yields a block every `chunk_pages` pages so a long PDF never sits in memory whole.
    """

    def __init__(self, storage: Storage, config: DecodeConfig = DecodeConfig()):
        self.storage = storage
        self.config = config

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        rows, emitted = [], False
        for src in batch.to_pylist():
            for row in self.pages(src):
                rows.append(row)
                if len(rows) >= self.config.chunk_pages:
                    yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
                    rows, emitted = [], True
        if rows or not emitted:
            yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)

    def pages(self, src: dict) -> Iterator[dict]:
        uri, prompts, done = src["uri"], list(src["prompts"]), set(src.get("done") or ())
        base = {"doc": src["doc"], "source_uri": uri}

        def todo(page: int) -> list[str]:
            return [p for p in prompts if f"{page}:{prompt_key(p)}" not in done]

        def error(page: int, kind: str, message: str, ps: list[str]) -> dict:
            return {**base, **_NO_VIEWS, "page": page, "prompts": ps, **error_fields(kind, message)}

        try:
            data = self.storage.read(uri, max_bytes=self.config.max_bytes)
            doc = open_document(data, uri, self.config)
        except Exception as e:  # noqa: BLE001 - a document that fails becomes typed error rows, never a crash
            kind, message = classify(e)
            # A prompt with any page of this document already written is finished for it (the object may have been
            # deleted or replaced since): a page-0 row now would answer it twice.
            answered = {k.rsplit(":", 1)[1] for k in done}
            ps = [p for p in prompts if prompt_key(p) not in answered]
            if ps:
                yield error(0, kind, message, ps)
            return
        try:
            for i in range(1, doc.n_pages + 1):
                ps = todo(i)
                if not ps:
                    continue
                if i > self.config.max_pages:
                    yield error(
                        i, "page_limit", f"page {i} of {doc.n_pages} is beyond --max-pages {self.config.max_pages}", ps
                    )
                    continue
                try:
                    views = cut_views(doc.page(i - 1), self.config.windows)
                except Exception as e:  # noqa: BLE001 - one bad page is one error row; the rest go on
                    yield error(i, *classify(e), ps)
                    continue
                yield {
                    **base,
                    "page": i,
                    "prompts": ps,
                    "views": views.views.numpy().tobytes(),
                    "n_views": views.n_views,
                    "window": views.views.shape[-1],
                    "width": views.width,
                    "height": views.height,
                    "grid_rows": views.rows,
                    "grid_cols": views.cols,
                    "error_type": None,
                    "error_message": None,
                }
        finally:
            doc.close()


def classify(e: BaseException) -> tuple[str, str]:
    """An exception from reading/decoding -> (error_type, message)."""
    if isinstance(e, ImageError):
        return e.kind, str(e)
    if isinstance(e, TooLarge):
        return "too_large", str(e)
    if isinstance(e, FileNotFoundError):
        return "not_found", f"the object does not exist: {e}"
    if isinstance(e, OSError):
        return "io_error", f"the object could not be read: {e}"
    log.exception("unexpected error while decoding")
    return "internal_error", f"{type(e).__name__}: {e}"
