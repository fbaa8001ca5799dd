"""From a page image to the views InfiMM-HD encodes: a thumbnail plus a rows x cols grid of 448x448 windows.

Rule (paper §3.2 "dynamic resolution"; the official processor is unreadable, spec §3.2, so every choice is a knob):
1. decode, apply the EXIF orientation, convert to 8-bit RGB (alpha composited on `background`, 16-bit scaled down);
2. rows = round(H / 448), cols = round(W / 448) (half up; `rounding="ceil"` rounds up), each at least 1;
3. if rows*cols > max_windows or a side of the resized page would exceed max_side, the page is scaled down, aspect ratio
   kept, to the largest scale whose grid fits;
4. resize to (cols*448, rows*448) bicubic and cut row-major;
5. thumbnail = the page padded to a square with the CLIP mean colour, resized to 448 (`thumbnail="squash"` skips
   the pad);
6. views = [thumbnail, windows row-major] as uint8 (V, 3, 448, 448); `normalize_views` applies the CLIP mean/std.

The 2-D sinusoidal window encoding `[table(col) | table(row)]` is added after the ViT (`InfiMMHD.build_media`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), the official expand2square background


@dataclass(frozen=True)
class WindowConfig:
    window: int = 448  # the ViT input size; windows and thumbnail are window x window
    max_windows: int = 16  # cap on rows*cols (the thumbnail is extra)
    max_side: int = 448 * 8  # cap on each side of the resized page, in pixels
    rounding: str = "round"  # "round" (half up) or "ceil"
    thumbnail: str = "pad"  # "pad" (to square with the CLIP mean colour, as expand2square) or "squash"
    # "pad" pads the full-size page first, exactly as the official processor, while that square has at most this many
    # pixels (3 bytes each); larger (extreme aspect ratios, posters) it scales first and pads the small result
    thumbnail_square_max_pixels: int = 40_000_000
    single_window_thumbnail: bool = True  # a 1x1 grid still gets a thumbnail view
    max_pixels: int = 100_000_000  # decoded size cap, checked from the header before decoding (decompression bombs)
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels become

    def __post_init__(self):
        if self.rounding not in ("round", "ceil"):
            raise ValueError(f"rounding must be 'round' or 'ceil', got {self.rounding!r}")
        if self.thumbnail not in ("pad", "squash"):
            raise ValueError(f"thumbnail must be 'pad' or 'squash', got {self.thumbnail!r}")
        if self.max_windows < 1 or self.max_side < self.window:
            raise ValueError(f"max_windows must be >= 1 and max_side >= {self.window}")


class ImageError(ValueError):
    """An image that cannot be used; `kind` is a short stable tag (used as error_type in batch output)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class PageViews:
    views: torch.Tensor  # (V, 3, W, W) uint8: thumbnail, then windows row-major
    rows: int
    cols: int
    width: int  # of the oriented source image
    height: int
    key: str | None = None  # feature-cache key from `feature_key` (set by whoever knows the page's source)

    @property
    def n_views(self) -> int:
        return self.views.shape[0]

    @functools.cached_property
    def cache_key(self) -> str:
        """The engine's feature-cache key: `key` when the source gave one, else a hash of the views and grid
        (computed once per PageViews; ~3-10 MB hashed, so sources that can name the page should)."""
        if self.key:
            return self.key
        return feature_key(self.views.contiguous().numpy().tobytes() + f"{self.rows}x{self.cols}".encode())


def feature_key(source: bytes | str, cfg: WindowConfig | None = None) -> str:
    """The one definition of a page's feature-cache key: a hash of what identifies its pixels (a file's bytes; a name
    unique to the page, like a batch job's `doc#page`; or the views themselves) and the window settings that cut it.
    Equal keys must mean equal views: the engine reuses ViT features by key."""
    h = hashlib.blake2b(source if isinstance(source, bytes) else source.encode(), digest_size=16)
    h.update(repr(cfg).encode())
    return h.hexdigest()


# ---- decoding ------------------------------------------------------------------------------------------------------
def open_image(data: bytes, cfg: WindowConfig = WindowConfig()) -> Image.Image:
    """Open (lazily, header only) and check the declared size; raises ImageError."""
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"declared image size is too large: {e}") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for garbage
        raise ImageError("decode_error", f"not a readable image: {e}") from e
    check_size(*img.size, cfg)
    return img


def check_size(width: int, height: int, cfg: WindowConfig) -> None:
    if width * height > cfg.max_pixels:
        raise ImageError(
            "too_large",
            f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the {cfg.max_pixels / 1e6:.0f} MP limit; "
            "raise max_pixels or downscale",
        )
    if width < 1 or height < 1:
        raise ImageError("decode_error", f"image has no pixels ({width}x{height})")


def to_rgb(img: Image.Image, cfg: WindowConfig = WindowConfig()) -> Image.Image:
    """Decode one frame: EXIF orientation applied, 8-bit RGB, alpha composited on `cfg.background`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                img = _high_bit_depth_to_l(img)
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, cfg.background)
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                img = canvas
            return img.convert("RGB") if img.mode != "RGB" else img
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad compressed streams, unsupported modes
        raise ImageError("decode_error", f"image data is corrupt or unsupported: {e}") from e


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0  # 16-bit range 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.nan_to_num(a * scale), 0, 255).astype(np.uint8), mode="L")


def load_image(data: bytes | Image.Image, cfg: WindowConfig = WindowConfig()) -> Image.Image:
    """bytes or PIL image -> oriented 8-bit RGB image (first frame for animations)."""
    img = data if isinstance(data, Image.Image) else open_image(data, cfg)
    check_size(*img.size, cfg)
    return to_rgb(img, cfg)


# ---- grid and views --------------------------------------------------------------------------------------------------
def choose_grid(width: int, height: int, cfg: WindowConfig = WindowConfig()) -> tuple[int, int]:
    """(rows, cols) for a page of width x height pixels, following the rule in the module docstring."""
    win = cfg.window
    snap = math.ceil if cfg.rounding == "ceil" else (lambda x: math.floor(x + 0.5))

    def grid(scale: float) -> tuple[int, int]:
        return max(1, snap(height * scale / win)), max(1, snap(width * scale / win))

    def fits(rows: int, cols: int) -> bool:
        return rows * cols <= cfg.max_windows and max(rows, cols) * win <= cfg.max_side

    if fits(*grid(1.0)):
        return grid(1.0)
    lo, hi = 0.0, 1.0  # the grid only grows with the scale, so bisect for the largest scale that fits
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(*grid(mid)) else (lo, mid)
    return grid(lo)


def make_thumbnail(img: Image.Image, cfg: WindowConfig = WindowConfig()) -> Image.Image:
    """The page as one window-sized view: "pad" keeps the aspect ratio on a CLIP-mean square, "squash" stretches.

    The official way pads the full-size page to a max(w, h)^2 square and scales that: exact, and what pages up to
    `thumbnail_square_max_pixels` get. Beyond it the square would cost gigabytes for a few hundred bytes of input (a
    30000x10 PNG: a 2.7 GB square), so the page is scaled first and the small result padded; that differs only by
    the page's placement (to the nearest thumbnail pixel instead of a fraction of one) and at the seam with the pad.
    """
    win = cfg.window
    if cfg.thumbnail != "pad":
        return img.resize((win, win), Image.BICUBIC)
    w, h = img.size
    side = max(w, h)
    if side * side <= cfg.thumbnail_square_max_pixels:
        square = Image.new("RGB", (side, side), CLIP_MEAN_RGB)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        return square.resize((win, win), Image.BICUBIC)
    scale = win / side
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    at = (round((side - w) // 2 * scale), round((side - h) // 2 * scale))  # where the full-size pad puts the page
    square = Image.new("RGB", (win, win), CLIP_MEAN_RGB)
    square.paste(img.resize((tw, th), Image.BICUBIC), at)
    return square


def cut_views(img: Image.Image, cfg: WindowConfig = WindowConfig()) -> PageViews:
    """RGB image -> PageViews (thumbnail + windows, uint8)."""
    win = cfg.window
    rows, cols = choose_grid(img.width, img.height, cfg)
    resized = np.asarray(img.resize((cols * win, rows * win), Image.BICUBIC))  # (R*W, C*W, 3)
    windows = (
        torch.from_numpy(resized.copy())
        .view(rows, win, cols, win, 3)
        .permute(0, 2, 4, 1, 3)  # (R, C, 3, W, W)
        .reshape(rows * cols, 3, win, win)
    )
    views = [windows]
    if rows * cols > 1 or cfg.single_window_thumbnail:
        thumb = torch.from_numpy(np.asarray(make_thumbnail(img, cfg)).copy()).permute(2, 0, 1)  # (3, W, W)
        views.insert(0, thumb[None])
    return PageViews(views=torch.cat(views).contiguous(), rows=rows, cols=cols, width=img.width, height=img.height)


def prepare_image(data: bytes | Image.Image, cfg: WindowConfig = WindowConfig()) -> PageViews:
    """bytes or PIL image -> PageViews. Raises ImageError with a clear message for unusable input.

    For bytes the feature-cache key is a hash of the file and the window settings, far cheaper than hashing the cut
    views; a PIL image gets no key (its views are hashed if the engine needs one).
    """
    page = cut_views(load_image(data, cfg), cfg)
    if isinstance(data, (bytes, bytearray)):
        page.key = feature_key(bytes(data), cfg)
    return page


def normalize_views(views: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 (V, 3, W, W) -> CLIP-normalised float pixels, on the views' device."""
    mean = torch.tensor(CLIP_MEAN, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=views.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((views.float() / 255.0 - mean) / std).to(dtype)


# ---- 2-D window position encoding -----------------------------------------------------------------------------------
def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """(n_position, d_hid): angle = pos / 10000^(2*(j//2)/d_hid), sin on even j, cos on odd j (float64 -> float32)."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(d_hid)[None, :]
    angle = pos / np.power(10000.0, 2 * (j // 2) / d_hid)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return torch.from_numpy(table).float()


def window_position_encoding(rows: int, cols: int, dim: int, max_pos: int | None = None) -> torch.Tensor:
    """(rows*cols, dim): window k (r = k // cols, c = k % cols) gets [table(c) | table(r)] (official flamingo.py)."""
    if dim % 2:
        raise ValueError(f"window encoding needs an even width, got {dim}")
    if max_pos is not None and max(rows, cols) > max_pos:
        raise ValueError(f"grid {rows}x{cols} exceeds the window encoding table ({max_pos} positions)")
    table = sinusoid_table(max(rows, cols), dim // 2)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat((table[c.flatten()], table[r.flatten()]), dim=-1)
