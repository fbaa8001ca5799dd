"""Generated document pages for the demo, the tests and the benchmark: no downloads, deterministic bytes."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

WORDS = (
    "invoice total amount due date account reference page section table figure signature address "
    "quarterly report revenue summary notes payment terms customer order shipping"
).split()


def page_image(n: int, size: tuple[int, int] = (850, 1100), title: str | None = None) -> Image.Image:
    """A white page with a title, lines of words and a table-like box, seeded by `n`."""
    rng = random.Random(n)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((w // 12, h // 20), title or f"Document page {n}", fill="black")
    y = h // 8
    while y < h * 0.6:
        d.text((w // 12, y), " ".join(rng.choice(WORDS) for _ in range(8)), fill=(20, 20, 20))
        y += max(12, h // 40)
    d.rectangle((w // 12, int(h * 0.65), w - w // 12, int(h * 0.85)), outline="black", width=2)
    for i in range(1, 4):
        yy = int(h * (0.65 + 0.05 * i))
        d.line((w // 12, yy, w - w // 12, yy), fill="black")
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_page(n: int, size=(850, 1100)) -> bytes:
    return encode(page_image(n, size), "PNG")


def jpeg_page(n: int, size=(850, 1100)) -> bytes:
    return encode(page_image(n, size), "JPEG", quality=85)


def pdf_document(pages: int, start: int = 0, size=(612, 792)) -> bytes:
    """A PDF with `pages` pages (each an embedded page image; 612x792 px at 72 dpi = US Letter)."""
    imgs = [page_image(start + i, size) for i in range(pages)]
    return encode(imgs[0], "PDF", save_all=True, append_images=imgs[1:], resolution=72.0)


def tiff_document(pages: int, start: int = 0, size=(600, 800)) -> bytes:
    imgs = [page_image(start + i, size) for i in range(pages)]
    return encode(imgs[0], "TIFF", save_all=True, append_images=imgs[1:], compression="tiff_deflate")
