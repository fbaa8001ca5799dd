"""A corpus of awkward inputs for the batch job: each case is a file name, its bytes and what the job must make of it.

`error` is the expected error_type (None: a good document), `pages` the rows it must produce per prompt, `page` the
page number an error row carries (0: the document could not be opened). Built in memory, deterministic.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from demo import samples


@dataclass
class Case:
    name: str
    data: bytes
    error: str | None = None
    pages: int = 1
    page: int = 1  # of the error row
    size: tuple[int, int] | None = None  # (width, height) expected for a good single page


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def decompression_bomb() -> bytes:
    """A 100-byte PNG that declares 60000 x 60000 pixels (3.6 gigapixels)."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _pdf(objects: list[str], trailer_extra: str = "") -> bytes:
    """A minimal PDF with a correct xref table from object bodies (numbered from 1; object 1 is the catalog)."""
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R {trailer_extra}>>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def empty_pdf() -> bytes:
    return _pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [] /Count 0 >>"])


def encrypted_pdf() -> bytes:
    """Standard security handler (RC4, R2) whose /U entry matches no password: readers must ask for one."""
    return _pdf(
        [
            "<< /Type /Catalog /Pages 2 0 R >>",
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
            "<< /Filter /Standard /V 1 /R 2 /O <" + "ab" * 32 + "> /U <" + "cd" * 32 + "> /P -4 >>",
        ],
        "/Encrypt 4 0 R /ID [<" + "01" * 16 + "> <" + "01" * 16 + ">] ",
    )


def exif_rotated_jpeg() -> bytes:
    """Stored 300 wide x 400 high with EXIF Orientation 6 (rotate 90): shown 400 wide x 300 high."""
    img = samples.page_image(7, (300, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    return samples.encode(img, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [samples.page_image(i, (200, 260)).convert("P") for i in range(3)]
    return samples.encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def bad_corpus() -> list[Case]:
    png = samples.png_page(1, (400, 520))
    jpeg = samples.jpeg_page(2, (400, 520))
    pal = Image.new("P", (240, 320), 0)
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    pal.paste(1, (20, 20, 200, 60))
    pal.info["transparency"] = 0
    sixteen = Image.fromarray((np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16))
    return [
        Case("good.png", png, size=(400, 520)),
        Case("good-3-pages.pdf", samples.pdf_document(3, size=(300, 400)), pages=3),
        Case("good-2-pages.tiff", samples.tiff_document(2, size=(300, 400)), pages=2),
        Case("zero-bytes.png", b"", "empty_file", page=0),
        Case("truncated.png", png[: len(png) // 2], "decode_error", page=1),
        Case("truncated.jpg", jpeg[: len(jpeg) // 3], "decode_error", page=1),
        Case(
            "not-an-image.jpg",
            b"Quarterly report\nThis is plain text with an image extension.\n" * 20,
            "decode_error",
            page=0,
        ),
        Case("bomb.png", decompression_bomb(), "too_large", page=0),
        Case("cmyk.jpg", samples.encode(samples.page_image(3, (320, 400)).convert("CMYK"), "JPEG"), size=(320, 400)),
        Case("16-bit.png", samples.encode(sixteen, "PNG"), size=(300, 200)),
        Case("palette-alpha.png", samples.encode(pal, "PNG"), size=(240, 320)),
        Case("exif-rotated.jpg", exif_rotated_jpeg(), size=(400, 300)),
        Case("animated.gif", animated_gif(), size=(200, 260)),
        Case(
            "corrupt.pdf",
            b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n" + b"\x00garbage" * 40,
            "pdf_error",
            page=0,
        ),
        Case("encrypted.pdf", encrypted_pdf(), "pdf_encrypted", page=0),
        Case("no-pages.pdf", empty_pdf(), "empty_document", page=0),
    ]


def png_bytes(size=(64, 80), color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()
