"""A processor row's request, checked and made ready for the engine on the CPU: its OpenAI-style messages and
sampling parameters, and each image it holds resolved (bytes, PIL, numpy, `data:` URL, path, s3:// URI; a PDF or
TIFF page), decoded and cut into views, or sent on as a `data:` URL to a running Serve app.

The processor's Prepare tasks (pipelines/processor.py) run these per row; a ValueError (an ImageError carries its
`kind`) says what is wrong with the row and becomes its error.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .decode import DecodeConfig, PdfDocument, open_document
from .storage import Storage

# a row's images, cut into views (Prepare -> Engine)
IMAGE_TYPE = pa.list_(
    pa.struct(
        [
            ("views", pa.binary()),  # uint8 (V, 3, W, W)
            ("n_views", pa.int32()),
            ("window", pa.int32()),
            ("rows", pa.int32()),
            ("cols", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("key", pa.string()),  # the engine's feature-cache key, computed here on the CPU
        ]
    )
)

# OpenAI / vLLM names -> SamplingParams fields; SamplingParams' own names are accepted too
SAMPLING_ALIASES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
}
ROLES = ("system", "user", "assistant")


# ---- rows in: messages and sampling parameters -------------------------------------------------------------------
def _plain(x):
    """Values as Ray Data hands them back (numpy arrays of objects for lists, numpy scalars) -> plain Python."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray) and x.dtype == object:
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return list(x)
    return x


def sampling_kwargs(params: Mapping | None) -> dict:
    """A row's `sampling_params` (OpenAI/vLLM names or SamplingParams' own) -> checked SamplingParams keyword
    arguments. ValueError names an unknown parameter and lists the known ones."""
    from model.sampling import SamplingParams

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    out: dict = {}
    for name, value in dict(params or {}).items():
        key = SAMPLING_ALIASES.get(name, name)
        if key not in fields:
            known = sorted(fields | set(SAMPLING_ALIASES))
            raise ValueError(f"unknown sampling parameter {name!r}; known: {', '.join(known)}")
        if key in out:
            raise ValueError(f"sampling parameter {key!r} given twice (as {name!r} and another name)")
        value = _plain(value)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if key == "stop" and isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = tuple(value)
        if value is not None or key in ("seed", "stop_token_ids", "json_schema"):
            out[key] = value
    SamplingParams(**out)  # every value check, now, with its message
    return out


def split_messages(messages) -> tuple[list[dict], list[tuple[Any, int | None]]]:
    """OpenAI-style messages -> ([{role, parts: [str | {"image": i}]}], [(image, page)]). Content: a string or parts
    `{"type": "text", "text"}`, `{"type": "image", "image": X}` (Ray's form) or `{"type": "image_url", "image_url":
    {"url": X}}` (OpenAI's); an image part may carry `"page": n` (1-based) to pick a PDF or TIFF page."""
    messages = _plain(messages)
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list of {role, content} (give a preprocess that builds it)")
    turns, images = [], []
    for m in messages:
        m = _plain(m)
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"each message must be a dict with a role and content, got {type(m).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        content = _plain(m.get("content"))
        parts: list = []
        for p in [content] if isinstance(content, str) else (content or []):
            p = _plain(p)
            if isinstance(p, str):
                parts.append(p)
                continue
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "text":
                parts.append(str(p.get("text") or ""))
            elif kind in ("image", "image_url"):
                image = p.get(kind)
                if kind == "image_url" and isinstance(image, Mapping):
                    image = image.get("url")
                if image is None:
                    raise ValueError(f"a {kind!r} part without its {kind!r} value")
                page = _plain(p.get("page"))
                if page is not None and (not isinstance(page, int) or isinstance(page, bool) or page < 1):
                    raise ValueError(f"an image part's page must be an integer >= 1, got {page!r}")
                parts.append({"image": len(images)})
                images.append((image, page))
            else:
                raise ValueError(f"unknown content part {p!r:.80}; use type text, image or image_url")
        turns.append({"role": m["role"], "parts": parts})
    return turns, images


# ---- images ------------------------------------------------------------------------------------------------------
def image_source(image, storage: Storage, max_bytes: int):
    """An image as a row gives it -> (bytes or PIL image, a name for messages and the cache key). Raises ValueError
    (or the storage's OSError) with what was wrong."""
    from PIL import Image

    image = _plain(image)
    if isinstance(image, Mapping):  # Ray's read_images / Hugging Face datasets: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), None
    if isinstance(image, Image.Image):
        return image, None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ValueError(
                f"a numpy image must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image), None
    if isinstance(image, str):
        if image.startswith("data:"):
            head, _, payload = image.partition(",")
            if not head.endswith(";base64"):
                raise ValueError("a data: URL image must be base64 (data:image/png;base64,...)")
            try:
                return base64.b64decode(payload, validate=True), None
            except binascii.Error as e:
                raise ValueError(f"the data: URL is not valid base64: {e}") from None
        if image.startswith(("http://", "https://")):
            raise ValueError("http(s) image URLs are not fetched by the processor: give bytes, a path or an s3:// URI")
        uri = image[len("file://") :] if image.startswith("file://") else image
        return storage.read(uri, max_bytes=max_bytes), uri
    raise ValueError(
        f"unsupported image value of type {type(image).__name__}; give bytes, PIL, numpy, a data: URL, "
        "a path or an s3:// URI"
    )


def load_page(image, page: int | None, storage: Storage, cfg: DecodeConfig):
    """One image of a row -> (its RGB page, the original bytes when they are one encoded single-page image else None,
    their PIL format, a cache name: the bytes and page number, or None for an in-memory image)."""
    from model.windows import load_image

    data, uri = image_source(image, storage, cfg.max_bytes)
    if not isinstance(data, bytes):  # a PIL image
        if page not in (None, 1):
            raise ValueError(f"page {page} of an in-memory image: it has one page")
        return load_image(data, cfg.windows), None, None, None
    doc = open_document(data, uri or "", cfg)
    try:
        if page is None and doc.n_pages > 1 and isinstance(doc, PdfDocument):
            raise ValueError(
                f"the PDF has {doc.n_pages} pages: give the image part a 'page' (one row per page), or use "
                "`infimm-hd batch run` for whole documents"
            )
        n = page or 1
        if n > doc.n_pages:
            raise ValueError(f"page {n} asked of a document of {doc.n_pages} pages")
        rgb = doc.page(n - 1)  # decoded in full here: a corrupt image is this row's error, found on the CPU
        single = isinstance(doc, PdfDocument) is False and doc.n_pages == 1
        fmt = None if isinstance(doc, PdfDocument) else doc.image.format
    finally:
        doc.close()
    return rgb, (data if single else None), fmt, data + f"#{n}".encode()


def cut_image(image, page: int | None, storage: Storage, cfg: DecodeConfig) -> dict:
    """One image of a row -> an IMAGE_TYPE struct (views as bytes, grid, cache key)."""
    from model.windows import cut_views, feature_key

    rgb, _, _, name = load_page(image, page, storage, cfg)
    pv = cut_views(rgb, cfg.windows)
    # a hash of the file and page, or of the views (in-memory images), here rather than in the process feeding the GPU
    key = feature_key(name, cfg.windows) if name else pv.cache_key
    return {
        "views": pv.views.numpy().tobytes(),
        "n_views": pv.n_views,
        "window": pv.views.shape[-1],
        "rows": pv.rows,
        "cols": pv.cols,
        "width": pv.width,
        "height": pv.height,
        "key": key,
    }


def image_url(image, page: int | None, storage: Storage, cfg: DecodeConfig) -> str:
    """One image of a row -> a data: URL for a server: the original file when it is one encoded single-page image in
    a format the server reads, else the decoded page as PNG (lossless: the server cuts the same views)."""
    from PIL import Image

    rgb, original, fmt, _ = load_page(image, page, storage, cfg)
    mime = Image.MIME.get(fmt or "")
    if original is None or fmt not in ("PNG", "JPEG", "WEBP", "BMP", "GIF") or not mime:
        buf = io.BytesIO()
        rgb.save(buf, "PNG", compress_level=1)  # fast: the bytes only cross the network once
        original, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(original).decode()
