"""Row identity and the two Arrow schemas of the batch job (decoded pages between the stages, result rows out).

One output row per (document, page, prompt). Its id is deterministic so that a rerun can tell what is done:

    id = "{doc}:{page}:{prompt_hash}"

* doc: the manifest's `id` when given, else the first 16 hex digits of blake2b(source_uri);
* page: 1-based page number; 0 means "the document could not be opened, its page count is unknown"
  (missing object, empty file, corrupt or encrypted PDF, a header PIL cannot identify, ...);
* prompt_hash: the first 8 hex digits of blake2b(prompt).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# error_type values (stable; dashboards and users filter on them). The first three come from model.windows.ImageError.
ERROR_TYPES = {
    "empty_file": "the object has 0 bytes",
    "decode_error": "not a readable image, or its pixel data is corrupt/truncated",
    "too_large": "declared pixel count over the limit (decompression bomb guard) or object over the size limit",
    "not_found": "the object does not exist (e.g. deleted between listing and reading)",
    "io_error": "the object could not be read for a reason retrying cannot fix (access denied, ...)",
    # never in the output: the driver drops these rows, counts their documents and exits 3 (a rerun does them)
    "storage_unavailable": "transient storage failures (server down, timeouts, 5xx, throttling) outlasted the retries",
    "pdf_error": "not a loadable PDF (corrupt, truncated) or a page failed to render",
    "pdf_encrypted": "the PDF needs a password",
    "empty_document": "the PDF has no pages",
    "page_limit": "page beyond --max-pages of a long document (not rendered)",
    "invalid_request": "the engine refused the request (prompt + max_new_tokens over its context, too many windows)",
    "generation_error": "the engine failed while generating this page",
    "repetition": "every attempt of the temperature ladder ended in a repetition loop (text is null; see attempts)",
    "internal_error": "an unexpected exception while decoding this record (a bug: please report it)",
}

# Temperatures of the retries of a page whose answer looped (pipelines/generate.py): olmOCR's range, 0.1 -> 1.0.
LADDER = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _h(text: str, n: int) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()[:n]


def doc_key(source_uri: str, doc_id: str | None = None) -> str:
    return doc_id if doc_id else _h(source_uri, 16)


def prompt_key(prompt: str) -> str:
    return _h(prompt, 8)


def row_id(doc: str, page: int, prompt: str) -> str:
    return f"{doc}:{page}:{prompt_key(prompt)}"


def split_row_id(rid: str) -> tuple[str, int, str]:
    """Inverse of row_id (the doc part may itself contain ':')."""
    doc, page, q = rid.rsplit(":", 2)
    return doc, int(page), q


# A decoded page on its way to the GPU stage: uint8 views (V, 3, W, W) as raw bytes, or an error.
DECODED_SCHEMA = pa.schema(
    [
        ("doc", pa.string()),
        ("source_uri", pa.string()),
        ("page", pa.int32()),
        ("prompts", pa.list_(pa.string())),  # the prompts still to answer for this page
        ("views", pa.binary()),  # null for error rows
        ("n_views", pa.int32()),
        ("window", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("grid_rows", pa.int32()),
        ("grid_cols", pa.int32()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("pdf_text", pa.string()),  # the PDF page's embedded text layer; null for images
        ("text_source", pa.string()),  # "pdf_text": the page's answer is its text layer, it has no views
        ("image_url", pa.string()),  # instead of views, for running replicas (pipelines/replicas.py): the page
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_uri", pa.string()),
        ("page", pa.int32()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("grid_rows", pa.int32()),
        ("grid_cols", pa.int32()),
        ("encode_ms", pa.float64()),
        ("generate_ms", pa.float64()),
        ("model", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("pdf_text", pa.string()),  # the PDF page's embedded text layer (null for images and unreadable PDFs)
        ("text_source", pa.string()),  # "model" | "pdf_text" (--use-pdf-text); null for error rows
        ("attempts", pa.int32()),  # engine generations made for this row (> 1: repetition retries); 0 for pdf_text
        ("attempt_finish_reasons", pa.list_(pa.string())),  # finish_reason of each attempt, in order
        ("attempt_temperatures", pa.list_(pa.float64())),  # temperature of each attempt, in order
    ]
)


def error_fields(error_type: str, message: str) -> dict:
    assert error_type in ERROR_TYPES, f"unknown error_type {error_type!r}; add it to ERROR_TYPES with a description"
    return {"error_type": error_type, "error_message": message[:2000]}
