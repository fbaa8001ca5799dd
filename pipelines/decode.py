"""CPU stage of the batch job: read a document, split it into pages, cut each page into windows.

Page rules:
* PDF (by content, or by a .pdf name): every page, rasterized with pypdfium2 at `dpi`, scaled down where a page would
  be over `max_render_pixels` (a poster at 150 dpi is ~35 MP; the windows use at most `max_windows` x 448^2 of it), so
  one page's peak memory is known whatever the page size; pages after `max_pages` become `page_limit` error rows
  without being rendered.
* TIFF: every page (frame). GIF, WebP, PNG (APNG), ...: the first frame only. All else that PIL reads: one page.
* EXIF orientation, mode conversion (CMYK, 16-bit, palette, alpha) and window cutting are model.windows'.
* PDF text layer: every PDF page's embedded text goes into `pdf_text`. With `use_pdf_text` "auto" a page whose text
  layer is usable (see `usable_pdf_text`) is not rendered: its row carries `text_source="pdf_text"` and the engine
  stage answers it with that text, without an engine call; "always" does so for every PDF page whose text could be
  extracted (even an empty one), "never" (the default) for none.

Long documents are spread: `SplitDocuments` (a cheap first stage: read, count pages, render nothing) turns a document
of more than `pages_per_task` pages into one decode task per page range, so a 1,000-page PDF is decoded by many tasks
on many nodes and no task holds more than its range's pages. Each page is in exactly one range; pages already in the
output (resume) are dropped from their range, and a range with nothing left is not a task.

Failures never escape: a document that cannot be opened becomes one error row with page 0 (its page count is unknown);
a page that cannot be decoded becomes an error row for that page. See pipelines/rows.py for ids and error types.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from model.windows import ImageError, WindowConfig, choose_grid, cut_views, load_image, open_image

from .rows import DECODED_SCHEMA, error_fields, prompt_key
from .storage import SINGLE_PAGE_SUFFIXES, Storage, StorageUnavailable, TooLarge, suffix

log = logging.getLogger(__name__)


PDF_TEXT_MODES = ("never", "auto", "always")


@dataclass(frozen=True)
class DecodeConfig:
    windows: WindowConfig = field(default_factory=WindowConfig)
    dpi: int = 150  # PDF rasterization; 150 dpi puts a Letter page at 1275x1650 px, a 3x4 window grid
    max_pages: int = 1000  # per document; later pages become `page_limit` rows
    max_bytes: int = 1 << 30  # per document object
    chunk_pages: int = 4  # pages per output block (a page is up to 17 views of 448x448x3 bytes, ~10 MB)
    # A rendered PDF page is at most this many pixels (the dpi is lowered for larger pages). 12 MP keeps A4/Letter
    # unscaled up to 300 dpi; the default 16 windows use at most 16 x 448^2 = 3.2 MP of a page.
    max_render_pixels: int = 12_000_000
    pages_per_task: int = 16  # a longer document is split into decode tasks of this many pages
    use_pdf_text: str = "never"  # "never" | "auto" | "always": answer PDF pages with their text layer (see module doc)
    pdf_text_min_chars: int = 50  # letters and digits a text layer needs to be usable ("auto")
    page_images: bool = False  # pages as `image_url` (data: URLs) for running replicas instead of cut views

    def __post_init__(self):
        if self.use_pdf_text not in PDF_TEXT_MODES:
            raise ValueError(f"use_pdf_text must be one of {', '.join(PDF_TEXT_MODES)}, got {self.use_pdf_text!r}")
        if not 10 <= self.dpi <= 1200:
            raise ValueError(f"dpi must be within 10..1200, got {self.dpi}")
        if self.max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {self.max_pages}")
        if not 100_000 <= self.max_render_pixels <= self.windows.max_pixels:
            raise ValueError(
                f"max_render_pixels must be within 0.1 MP..{self.windows.max_pixels / 1e6:.0f} MP (the decoded-size "
                f"limit), got {self.max_render_pixels / 1e6:g} MP"
            )
        if self.pages_per_task < 1:
            raise ValueError(f"pages_per_task must be >= 1, got {self.pages_per_task}")


# ---- documents: page count + page i as an RGB image ------------------------------------------------------------------
def is_pdf(data: bytes, uri: str = "") -> bool:
    # The header may follow a little junk (the PDF spec lets readers search the first 1024 bytes).
    return b"%PDF-" in data[:1024] or uri.lower().endswith(".pdf")


class ImageDocument:
    def __init__(self, data: bytes, cfg: WindowConfig):
        self.cfg = cfg
        self.data = data  # the encoded file (a replica-bound job sends a single-page PNG or JPEG as it is)
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
    def __init__(self, data: bytes, cfg: WindowConfig, dpi: int, max_render_pixels: int | None = None):
        import pypdfium2 as pdfium

        self.cfg, self.dpi = cfg, dpi
        self.max_render_pixels = min(max_render_pixels or cfg.max_pixels, cfg.max_pixels)
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
                if w_pt * h_pt * scale**2 > self.max_render_pixels:  # a poster-sized page: render smaller, not fail
                    scale = math.sqrt(self.max_render_pixels / (w_pt * h_pt)) * 0.999
                    log.debug("PDF page %d (%.0fx%.0f pt) rendered at %.0f dpi", i + 1, w_pt, h_pt, scale * 72)
                image = page.render(scale=scale).to_pil()
            finally:
                page.close()
        except Exception as e:
            raise ImageError("pdf_error", f"PDF page {i + 1} failed to render: {e}") from e
        return load_image(image, self.cfg)

    def text(self, i: int) -> str | None:
        """The embedded text of page i (pdfium's reading order), or None if it cannot be extracted."""
        try:
            page = self.pdf[i]
            try:
                textpage = page.get_textpage()
                try:
                    text = textpage.get_text_range()
                finally:
                    textpage.close()
            finally:
                page.close()
        except Exception as e:  # noqa: BLE001 - no text layer is not an error: the page is still rendered
            log.debug("PDF page %d: no text layer (%s)", i + 1, e)
            return None
        # pdfium ends lines with CRLF and marks a hyphen it joined across a line break as U+FFFE: put back what the
        # page shows (hyphen, line break), so the text is the page's and not pdfium's guess at the word
        return text.replace("\r\n", "\n").replace("\ufffe", "-\n")

    def close(self) -> None:
        self.pdf.close()


# Characters a real text layer does not have: unassigned, private use (the glyph codes of fonts without a Unicode map),
# controls, surrogates, and U+FFFD (pdfium's "no Unicode for this glyph").
_GARBAGE = frozenset({"Cn", "Co", "Cc", "Cs"})


def usable_pdf_text(text: str | None, min_chars: int = 50) -> bool:
    """Whether a page's text layer can stand in for a transcription: at least `min_chars` letters or digits (any
    script), which are at least half of its non-blank characters, and at most 1 % of those characters garbage (see
    _GARBAGE). A scan with an empty or whitespace-only layer, a page with only a page number, and a layer whose fonts
    map glyphs to private-use codes all fail and are rendered for the model instead."""
    if not text:
        return False
    chars = [c for c in text if not c.isspace()]
    alnum = sum(c.isalnum() for c in chars)
    garbage = sum(c == "\ufffd" or unicodedata.category(c) in _GARBAGE for c in chars)
    return alnum >= min_chars and 2 * alnum >= len(chars) and 100 * garbage <= len(chars)


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
        return PdfDocument(data, cfg.windows, cfg.dpi, cfg.max_render_pixels)
    return ImageDocument(data, cfg.windows)


_NO_VIEWS = {k: None for k in ("views", "n_views", "window", "width", "height", "grid_rows", "grid_cols")}
_NO_TEXT = {"pdf_text": None, "text_source": None}

# A decode task: a document, or pages `first`..`last` of one whose page count `n_pages` the split stage learned.
TASK_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("doc", pa.string()),
        ("prompts", pa.list_(pa.string())),
        ("done", pa.list_(pa.string())),  # "page:prompt_hash" keys already in the output, of this task's pages
        ("first", pa.int32()),  # null: the whole document, page count unknown (not read or not opened yet)
        ("last", pa.int32()),
        ("n_pages", pa.int32()),
        ("data", pa.binary()),  # the bytes, when the split stage read them and this one task covers the document
    ]
)


def _done_page(key: str) -> int:
    return int(key.split(":", 1)[0])


# ---- the Ray stages --------------------------------------------------------------------------------------------------
class SplitDocuments:
    """Source rows (`uri`, `doc`, `prompts`, `done`) -> decode tasks (TASK_SCHEMA). Cheap: reads and counts, renders
    nothing.

    A document of at most `pages_per_task` pages stays one task and takes its bytes along (read once). A longer one
    becomes one task per page range without the bytes: each task reads the object again, which costs a GET per range
    but keeps one long document from holding one task (and its memory) while the engines wait. An image file by its
    name (one page) is passed on unread; a document that cannot be read or opened is passed on whole, and the decode
    task turns the failure into its error row.
    """

    def __init__(self, storage: Storage, config: DecodeConfig = DecodeConfig()):
        self.storage = storage
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        tasks = [t for src in batch.to_pylist() for t in self.tasks(src)]
        return pa.Table.from_pylist(tasks, schema=TASK_SCHEMA)

    def tasks(self, src: dict) -> Iterator[dict]:
        uri, prompts, done = src["uri"], list(src["prompts"]), list(src.get("done") or ())
        whole = {"uri": uri, "doc": src["doc"], "prompts": prompts, "done": done}
        whole |= {"first": None, "last": None, "n_pages": None, "data": None}
        if suffix(uri) in SINGLE_PAGE_SUFFIXES:
            yield whole
            return
        try:
            data = self.storage.read(uri, max_bytes=self.config.max_bytes)
        except Exception:  # noqa: BLE001 - read again by the decode task, which makes the failure a typed row
            yield whole
            return
        try:
            doc = open_document(data, uri, self.config)
            n = doc.n_pages
            doc.close()
        except Exception:  # noqa: BLE001 - the decode task opens the same bytes and writes the error row
            yield {**whole, "data": data}
            return
        keys = {prompt_key(p) for p in prompts}
        done_by_page: dict[int, set[str]] = {}
        for k in done:
            done_by_page.setdefault(_done_page(k), set()).add(k.rsplit(":", 1)[1])
        per = self.config.pages_per_task
        limit = min(n, self.config.max_pages)
        ranges = [(a, min(a + per - 1, limit)) for a in range(1, limit + 1, per)]
        if n > limit:  # the page_limit rows: no rendering, one task (it does not even read the object)
            ranges.append((limit + 1, n))
        one = len(ranges) - (n > limit) == 1  # a single range to render: it takes the bytes along
        for first, last in ranges:
            if all(keys <= done_by_page.get(i, set()) for i in range(first, last + 1)):
                continue  # every page of the range is in the output for every prompt
            mine = [k for k in done if first <= _done_page(k) <= last]
            yield {
                **whole,
                "done": mine,
                "first": first,
                "last": last,
                "n_pages": n,
                "data": data if one and first <= limit else None,
            }


class DecodePages:
    """Decode tasks (TASK_SCHEMA, or source rows: a whole document) -> decoded page rows (DECODED_SCHEMA).

    `done` lists "page:prompt_hash" keys already in the output (resume): those pages are not rendered again. Ray runs
    this as tasks, one per range; it yields a table every `chunk_pages` pages (Ray Data ships them in blocks of up to
    128 MiB), so a task holds at most its range's views (`pages_per_task` x up to ~10 MB), never a whole long document.
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
        first, last, n_pages = src.get("first"), src.get("last"), src.get("n_pages")
        base = {"doc": src["doc"], "source_uri": uri}
        max_pages = self.config.max_pages

        def todo(page: int) -> list[str]:
            return [p for p in prompts if f"{page}:{prompt_key(p)}" not in done]

        def error(page: int, kind: str, message: str, ps: list[str]) -> dict:
            return {**base, **_NO_VIEWS, **_NO_TEXT, "page": page, "prompts": ps, **error_fields(kind, message)}

        def beyond(page: int, n: int) -> str:
            return f"page {page} of {n} is beyond --max-pages {max_pages}"

        if first is not None and first > max_pages:  # a range of page_limit rows: nothing to read or render
            for i in range(first, last + 1):
                if ps := todo(i):
                    yield error(i, "page_limit", beyond(i, n_pages), ps)
            return
        try:
            data = src.get("data")
            if data is None:
                data = self.storage.read(uri, max_bytes=self.config.max_bytes)
            doc = open_document(data, uri, self.config)
        except Exception as e:  # noqa: BLE001 - a document that fails becomes typed error rows, never a crash
            kind, message = classify(e)
            if first is not None:  # its page count is known: one row per page of this range, as any other range
                for i in range(first, last + 1):
                    if ps := todo(i):
                        yield error(i, kind, message, ps)
                return
            # A prompt with any page of this document already written is finished for it (the object may have been
            # deleted or replaced since): a page-0 row now would answer it twice. A storage outage is no answer at
            # all: the driver counts the marker row and never writes it, whatever is done already.
            answered = set() if kind == "storage_unavailable" else {k.rsplit(":", 1)[1] for k in done}
            ps = [p for p in prompts if prompt_key(p) not in answered]
            if ps:
                yield error(0, kind, message, ps)
            return
        try:
            n = doc.n_pages
            for i in range(first or 1, (last or n) + 1):
                ps = todo(i)
                if not ps:
                    continue
                if i > n:  # the object was replaced by a shorter one after it was split: say so, do not drop it
                    yield error(i, "not_found", f"page {i} no longer exists: the document has {n} pages now", ps)
                    continue
                if i > max_pages:
                    yield error(i, "page_limit", beyond(i, n), ps)
                    continue
                text = self._pdf_text(doc, i - 1)
                if text["text_source"]:  # answered by its text layer: not rendered
                    yield {
                        **base,
                        **_NO_VIEWS,
                        **text,
                        "page": i,
                        "prompts": ps,
                        "error_type": None,
                        "error_message": None,
                    }
                    continue
                if self.config.page_images:  # for running replicas: the page itself, they cut it
                    try:
                        yield {**base, **text, **self._page_image(doc, i), "page": i, "prompts": ps}
                    except Exception as e:  # noqa: BLE001 - one bad page is one error row; the rest go on
                        yield error(i, *classify(e), ps)
                    continue
                try:
                    views = cut_views(doc.page(i - 1), self.config.windows)
                except Exception as e:  # noqa: BLE001 - one bad page is one error row; the rest go on
                    yield error(i, *classify(e), ps)
                    continue
                yield {
                    **base,
                    **text,
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

    def _page_image(self, doc, i: int) -> dict:
        """Page i as a `data:` URL for a server (pipelines/replicas.py): a single-page PNG or JPEG file as it is, else
        the decoded page as PNG (lossless, so the server cuts the views this stage would have); decoded here either
        way, so that a corrupt page is its error row and the grid columns are filled."""
        import base64
        import io

        img = doc.page(i - 1)
        rows, cols = choose_grid(img.width, img.height, self.config.windows)
        original = getattr(doc, "image", None)
        if isinstance(doc, ImageDocument) and doc.n_pages == 1 and original.format in ("PNG", "JPEG") and doc.data:
            data, mime = doc.data, Image.MIME[original.format]
        else:
            buf = io.BytesIO()
            img.save(buf, "PNG", compress_level=1)
            data, mime = buf.getvalue(), "image/png"
        url = f"data:{mime};base64," + base64.b64encode(data).decode()
        return {
            **_NO_VIEWS,
            "image_url": url,
            "width": img.width,
            "height": img.height,
            "grid_rows": rows,
            "grid_cols": cols,
            "error_type": None,
            "error_message": None,
        }

    def _pdf_text(self, doc, i: int) -> dict:
        """`pdf_text` and `text_source` of page i: the text layer (PDFs only), and "pdf_text" when it is the answer."""
        if not isinstance(doc, PdfDocument):
            return dict(_NO_TEXT)
        text = doc.text(i)
        mode = self.config.use_pdf_text
        use = text is not None and (
            mode == "always" or (mode == "auto" and usable_pdf_text(text, self.config.pdf_text_min_chars))
        )
        return {"pdf_text": text, "text_source": "pdf_text" if use else None}


def classify(e: BaseException) -> tuple[str, str]:
    """An exception from reading/decoding -> (error_type, message)."""
    if isinstance(e, ImageError):
        return e.kind, str(e)
    if isinstance(e, TooLarge):
        return "too_large", str(e)
    if isinstance(e, StorageUnavailable):
        return "storage_unavailable", str(e)
    if isinstance(e, FileNotFoundError):
        return "not_found", f"the object does not exist: {e}"
    if isinstance(e, OSError):
        return "io_error", f"the object could not be read: {e}"
    log.exception("unexpected error while decoding")
    return "internal_error", f"{type(e).__name__}: {e}"
