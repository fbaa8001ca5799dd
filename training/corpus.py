"""Synthetic document pages with known answers: the demo model's training data and its evaluation set.

Each page is a white sheet with dark text drawn by PIL: one of a few kinds of content, in one of several fonts and
sizes, laid out at a fixed place or at random, on a page of random aspect ratio. The manifest row carries the prompt
and the exact expected answer, so the same file feeds training (`training/data.py`) and the batch job
(`infimm-hd batch run --input manifest.jsonl`, whose manifests take `uri`, `prompt` and `id`; `answer` is extra).

Kinds (prompt -> answer):
* `word`:   one word of the closed list           "What word is printed on this page?" -> "invoice"
* `number`: a 2-5 digit number                     "What number is printed on this page?" -> "4812"
* `field`:  a label and its value ("Total: 4812")  "What is the Total?" -> "4812"
* `lines`:  two or three short lines of words      "Transcribe the text of this page." -> "the chair\\nNorth day"

Fonts: the DejaVu TrueType family when installed (Debian `fonts-dejavu-core`, which `make setup` installs), else
Pillow's built-in scalable font (Pillow >= 10.1), so the generator works on any machine; the manifest records which.
Everything is drawn from one `random.Random(seed)`: the same seed gives the same pages, byte for byte.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Words of the tiny tokenizer's own corpus (model/tokenizer.py), so most are one to three tokens: a closed list the
# small demo model can learn in minutes on a CPU.
WORDS = (
    "the and for day was who one per four year user read chat page date this days chair pages table "
    "North Table Total Date West Present The answers question questions tables reading treasurer meeting invoice "
    "assistant board report office members item items accounts letter museum visitor number region survey results "
    "machines week project hour first clocks April cold bright scanned shows figure paper toner price quantity tax "
    "amount due payment customer harbour road chapter minutes previous approved presented secretary director answer "
    "twice before table text exactly order headings document detailed helpful polite curious artificial "
    "intelligence gives between written"
).split()
WORDS = tuple(dict.fromkeys(WORDS))[:100]  # de-duplicated, order kept
LABELS = ("Total", "Date", "Invoice", "Amount", "Tax", "Item", "Page", "Year")
PROMPTS = {
    "word": "What word is printed on this page?",
    "number": "What number is printed on this page?",
    "lines": "Transcribe the text of this page.",
}
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/TTF", "/usr/local/share/fonts")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")


@dataclass(frozen=True)
class CorpusConfig:
    n: int = 1000
    seed: int = 0
    kinds: tuple[str, ...] = ("word",)
    layout: str = "fixed"  # "fixed": text block centred (plus `jitter`); "random": anywhere it fits
    jitter: int = 4  # px of random offset around the fixed place
    width: tuple[int, int] = (224, 224)  # page width range (px); height follows from `aspect`
    aspect: tuple[float, float] = (1.0, 1.0)  # height / width range: (1.0, 1.0) square, (0.7, 1.5) varied
    font_size: tuple[int, int] = (36, 48)
    fonts: tuple[str, ...] = FONT_NAMES  # file names looked up in FONT_DIRS; missing ones are skipped
    ink: tuple[int, int] = (0, 60)  # grey level of the text (0 = black)
    words: tuple[str, ...] = field(default=WORDS)

    def __post_init__(self):
        unknown = set(self.kinds) - {"word", "number", "field", "lines"}
        if unknown or not self.kinds:
            raise ValueError(f"unknown corpus kinds {sorted(unknown)}; use word, number, field, lines")
        if self.layout not in ("fixed", "random"):
            raise ValueError(f"layout must be 'fixed' or 'random', got {self.layout!r}")
        if self.n < 1 or self.width[0] < 32 or self.font_size[0] < 6:
            raise ValueError("need n >= 1, width >= 32 px and font_size >= 6")


def find_fonts(names: tuple[str, ...] = FONT_NAMES) -> list[str]:
    """Paths of the TrueType fonts among `names` that this machine has (may be empty)."""
    found = []
    for name in names:
        for d in FONT_DIRS:
            if (Path(d) / name).exists():
                found.append(str(Path(d) / name))
                break
    return found


def load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def sample_text(kind: str, rng: random.Random, cfg: CorpusConfig) -> tuple[str, str, str]:
    """-> (text drawn on the page, prompt, expected answer)."""
    if kind == "word":
        w = rng.choice(cfg.words)
        return w, PROMPTS["word"], w
    if kind == "number":
        n = str(rng.randint(10, 99999))
        return n, PROMPTS["number"], n
    if kind == "field":
        label, value = rng.choice(LABELS), str(rng.randint(10, 9999))
        return f"{label}: {value}", f"What is the {label}?", value
    lines = [" ".join(rng.choice(cfg.words) for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(2, 3))]
    return "\n".join(lines), PROMPTS["lines"], "\n".join(lines)


def render_page(text: str, rng: random.Random, cfg: CorpusConfig, fonts: list[str]) -> tuple[Image.Image, dict]:
    """Draw `text` on a fresh page; -> (RGB image, layout facts for the manifest)."""
    width = rng.randint(*cfg.width)
    height = max(32, round(width * rng.uniform(*cfg.aspect)))
    font_path = rng.choice(fonts) if fonts else None
    size = rng.randint(*cfg.font_size)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    font = load_font(font_path, size)
    # Shrink the font until the block fits with a margin (long words in big fonts on narrow pages).
    while True:
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=size // 4)
        if (right - left <= width - 8 and bottom - top <= height - 8) or size <= 8:
            break
        size = max(8, int(size * 0.9))
        font = load_font(font_path, size)
    tw, th = right - left, bottom - top
    if cfg.layout == "fixed":
        x = (width - tw) // 2 + rng.randint(-cfg.jitter, cfg.jitter)
        y = (height - th) // 2 + rng.randint(-cfg.jitter, cfg.jitter)
    else:
        x, y = rng.randint(4, max(4, width - tw - 4)), rng.randint(4, max(4, height - th - 4))
    grey = rng.randint(*cfg.ink)
    draw.multiline_text((x - left, y - top), text, font=font, fill=(grey, grey, grey), spacing=size // 4)
    facts = {"font": Path(font_path).name if font_path else "pil-default", "size": size, "box": [x, y, tw, th]}
    return page, facts


def generate(folder: str | Path, cfg: CorpusConfig = CorpusConfig()) -> Path:
    """Write `cfg.n` PNG pages and `manifest.jsonl` (uri relative to the folder, prompt, answer, id, kind, ...)
    into `folder`; returns the manifest path."""
    folder = Path(folder)
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    fonts = find_fonts(cfg.fonts)
    rows = []
    for i in range(cfg.n):
        kind = rng.choice(cfg.kinds)
        text, prompt, answer = sample_text(kind, rng, cfg)
        page, facts = render_page(text, rng, cfg, fonts)
        name = f"pages/{cfg.seed}-{i:06d}.png"
        page.save(folder / name)
        rows.append(
            {"id": f"{cfg.seed}-{i:06d}", "uri": name, "prompt": prompt, "answer": answer, "kind": kind, **facts}
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "corpus.json").write_text(json.dumps({**asdict(cfg), "fonts_found": fonts}, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="word", help="comma list of word, number, field, lines")
    p.add_argument("--layout", default="fixed", choices=["fixed", "random"])
    p.add_argument("--jitter", type=int, default=4)
    p.add_argument("--width", default="224,224", help="MIN,MAX page width in px")
    p.add_argument("--aspect", default="1.0,1.0", help="MIN,MAX height/width")
    p.add_argument("--font-size", default="36,48", help="MIN,MAX")
    a = p.parse_args(argv)

    def pair(s, cast):
        lo, _, hi = s.partition(",")
        return cast(lo), cast(hi or lo)

    cfg = CorpusConfig(
        n=a.n,
        seed=a.seed,
        kinds=tuple(a.kinds.split(",")),
        layout=a.layout,
        jitter=a.jitter,
        width=pair(a.width, int),
        aspect=pair(a.aspect, float),
        font_size=pair(a.font_size, int),
    )
    print(generate(a.folder, cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
