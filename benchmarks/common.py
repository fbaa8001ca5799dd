"""Shared pieces of the benchmarks: synthetic document pages and JSON output. Benchmarks print JSON, never assert."""

from __future__ import annotations

import io
import json
import os
import platform
import sys
from pathlib import Path

from PIL import Image, ImageDraw

LINES = [
    "INVOICE No. 2024-0117        Date: 12 March 2024",
    "Customer: Northwind Traders, 42 Harbour Road, Springfield",
    "Item                 Quantity   Unit price     Total",
    "Paper, A4, 80 g            10         4.50     45.00",
    "Toner cartridge             2        61.00    122.00",
    "Subtotal 167.00     Tax 20% 33.40     Amount due 200.40",
]


def document_page(width: int = 1344, height: int = 1344, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A white page with lines of text; `seed` shifts the content so pages differ (no feature-cache hits)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    y = 40 + (seed * 7) % 60
    for i in range(height // 40 - 2):
        d.text((40 + (seed * 13 + i * 5) % 50, y), f"{seed:04d} " + LINES[(i + seed) % len(LINES)], fill="black")
        y += 36
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def emit(result: dict, out: str | None = None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.flush()
