"""Shared by the model and engine tests: tiny configs the golden vectors do not cover, a few generated pages, and what
the engine tests watch an engine with (its logits, its finished requests)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from model import InfiMMHDConfig
from model.config import CrossAttnConfig, TextConfig, VisionConfig
from model.engine import EngineObserver

# Widths, depths, GQA and block placements other than the tiny preset's (test_configs.py, test_text_decoder.py)
CONFIGS = {
    "gqa-every2": InfiMMHDConfig(
        vision=VisionConfig(width=48, layers=1, head_width=12, mlp_ratio=2.0, embed_dim=16),
        text=TextConfig(vocab_size=120, hidden=96, layers=6, heads=6, kv_heads=2, intermediate=128, max_positions=256),
        xattn=CrossAttnConfig(every_n_layers=2, heads=3, dim_head=16, ff_mult=2),
        image_token_id=119,
        eoc_token_id=118,
    ),
    "narrow-every4": InfiMMHDConfig(
        vision=VisionConfig(width=32, layers=3, head_width=8, mlp_ratio=1.5, embed_dim=8),
        text=TextConfig(vocab_size=100, hidden=32, layers=4, heads=2, kv_heads=2, intermediate=48, max_positions=256),
        xattn=CrossAttnConfig(every_n_layers=4, heads=2, dim_head=8, ff_mult=1),
        image_token_id=99,
        eoc_token_id=98,
    ),
}


def page(w: int, h: int, text: str) -> bytes:
    """A white PNG page of w x h pixels with `text` printed line by line."""
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(text.split("\n")):
        d.text((20, 20 + 30 * i), line, fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# Three window grids (portrait, landscape, one window) and three questions: the engine tests' mixed requests
PAGES = [
    page(900, 1300, "INVOICE 2024-0117\nTotal 200.40"),
    page(1400, 500, "Minutes of the meeting"),
    page(300, 300, "x"),
]
QUESTIONS = ["Transcribe this page.", "What is the total?", "Who was present?"]


def record_logits(engine) -> list:
    """Every row of logits `engine` computes from now on (prefill rows, then each decode step's active rows)."""
    seen = []
    real = engine.runner.logits

    def spy(h):
        seen.append(real(h))
        return seen[-1]

    engine.runner.logits = spy
    return seen


class Finishes(EngineObserver):
    """The result of every request the engine finishes, by request id (aborted ones included)."""

    def __init__(self):
        self.results = {}

    def on_finish(self, result):
        self.results[result.request_id] = result

    @property
    def reasons(self) -> dict[str, str]:
        return {rid: r.finish_reason for rid, r in self.results.items()}
