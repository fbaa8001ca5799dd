"""The window rule (model/windows.py): grid choice and caps, image modes, orientation, clear errors."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.windows import (
    CLIP_MEAN_RGB,
    ImageError,
    WindowConfig,
    choose_grid,
    make_thumbnail,
    normalize_views,
    prepare_image,
    window_position_encoding,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "size,grid",
    [
        ((1344, 1344), (3, 3)),  # the standard job: 3x3 windows
        ((896, 1344), (3, 2)),  # portrait (w, h) = (896, 1344)
        ((1344, 896), (2, 3)),  # landscape
        # US letter at 200 dpi: 2200/448 = 4.9 -> 5 rows, 1700/448 = 3.8 -> 4 cols = 20 windows, over the default cap
        # of 16: the largest scale that fits gives 5 x 3 (rows need scale >= 0.916, 3 cols need scale < 0.923)
        ((1700, 2200), (5, 3)),
        ((100, 80), (1, 1)),  # tiny: at least one window each way
        ((671, 672), (2, 1)),  # half-up rounding: 672/448 = 1.5 -> 2, 671/448 = 1.498 -> 1
    ],
)
def test_grid_rule(size, grid):
    assert choose_grid(*size) == grid


def test_letter_page_without_cap():
    assert choose_grid(1700, 2200, WindowConfig(max_windows=20)) == (5, 4)


def test_ceil_rounding_knob():
    assert choose_grid(500, 460, WindowConfig(rounding="ceil")) == (2, 2)
    assert choose_grid(500, 460) == (1, 1)


def test_caps_shrink_keeping_aspect_ratio():
    # an A0 scan at 300 dpi: 9933 x 14043 px would be 31 x 22 windows; capped at 16 windows
    rows, cols = choose_grid(9933, 14043)
    assert rows * cols <= 16 and rows > cols
    assert (rows, cols) == (5, 3)  # the largest scale whose snapped grid fits: 15 windows
    # max_side bounds each side of the resized page
    rows, cols = choose_grid(20000, 600, WindowConfig(max_windows=64, max_side=448 * 5))
    assert cols == 5 and rows == 1
    # a smaller cap is respected for every aspect ratio
    for w, h in [(3000, 3000), (5000, 800), (800, 5000), (4000, 2500)]:
        r, c = choose_grid(w, h, WindowConfig(max_windows=6))
        assert r * c <= 6, (w, h, r, c)


def test_views_are_thumbnail_then_row_major_windows():
    # a 2x3 page whose every 448 block has its own colour, so the cut order is visible
    blocks = np.zeros((896, 1344, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            blocks[448 * r : 448 * (r + 1), 448 * c : 448 * (c + 1)] = (40 * (3 * r + c + 1), 10, 200)
    page = prepare_image(Image.fromarray(blocks))
    assert (page.rows, page.cols, page.n_views) == (2, 3, 7)
    assert page.views.dtype == torch.uint8 and page.views.shape == (7, 3, 448, 448)
    for k in range(6):
        assert int(page.views[1 + k, 0, 224, 224]) == 40 * (k + 1)  # window k = block (k // 3, k % 3)
    thumb = page.views[0]
    assert tuple(int(x) for x in thumb[:, 5, 224]) == CLIP_MEAN_RGB  # pad band above a landscape page
    x = normalize_views(page.views)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 3


def test_window_encoding_shape_and_halves():
    pe = window_position_encoding(3, 2, 16)
    assert pe.shape == (6, 16)
    assert torch.equal(pe[2, 8:], pe[3, 8:])  # same row -> same row half
    assert torch.equal(pe[0, :8], pe[2, :8])  # same column -> same column half
    with pytest.raises(ValueError, match="even"):
        window_position_encoding(1, 1, 15)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (900, 450), (255, 255, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    page = prepare_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert (page.width, page.height) == (450, 900)
    assert (page.rows, page.cols) == (2, 1)


@pytest.mark.parametrize("mode", ["palette+alpha", "rgba", "la", "16-bit", "cmyk", "1-bit", "grey"])
def test_image_modes_become_rgb(mode):
    if mode == "palette+alpha":
        img = Image.new("P", (300, 200), 0)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.info["transparency"] = 0  # index 0 transparent -> white background
        data = encode(img)
    elif mode == "rgba":
        data = encode(Image.new("RGBA", (300, 200), (255, 0, 0, 0)))
    elif mode == "la":
        data = encode(Image.new("LA", (300, 200), (0, 0)))
    elif mode == "16-bit":
        arr = np.full((200, 300), 65535 // 2, dtype=np.uint16)  # mid grey in 16 bits
        data = encode(Image.fromarray(arr))
    elif mode == "cmyk":
        data = encode(Image.new("CMYK", (300, 200), (0, 0, 0, 0)), "JPEG")
    elif mode == "1-bit":
        data = encode(Image.new("1", (300, 200), 1))
    else:
        data = encode(Image.new("L", (300, 200), 128))
    page = prepare_image(data)
    centre = page.views[1, :, 100, 224].tolist()
    if mode in ("palette+alpha", "rgba", "la", "cmyk", "1-bit"):
        assert centre == [255, 255, 255], mode  # transparent/white stays white
    elif mode == "16-bit":
        assert all(abs(v - 127) <= 1 for v in centre)  # scaled down, not clipped to white
    else:
        assert centre == [128, 128, 128]


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (100, 100), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    page = prepare_image(buf.getvalue())
    r, g, b = page.views[1, :, 200, 200].tolist()
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", "empty_file"),
        (b"this is not an image at all", "decode_error"),
        (None, "decode_error"),  # truncated PNG, filled in below
        ("bomb", "too_large"),
    ],
)
def test_unusable_images_raise_clear_errors(data, kind):
    if data is None:
        full = encode(Image.effect_noise((400, 400), 64).convert("RGB"))
        data = full[: len(full) // 2]
    elif data == "bomb":
        # a tiny PNG declaring 20000 x 20000 pixels (400 MP)
        data = encode(Image.new("1", (20000, 20000)), optimize=True)
        assert len(data) < 200_000
    with pytest.raises(ImageError) as e:
        prepare_image(data)
    assert e.value.kind == kind
    assert str(e.value)  # a message a person can read


def test_megapixel_limit_is_configurable():
    data = encode(Image.new("RGB", (2000, 1000)))
    with pytest.raises(ImageError, match="MP limit"):
        prepare_image(data, WindowConfig(max_pixels=1_000_000))
    assert prepare_image(data, WindowConfig(max_pixels=3_000_000)).n_views == 1 + 2 * 4


def _padded_full_size_thumbnail(img: Image.Image, win: int = 448) -> np.ndarray:
    """The former definition: pad the full-size page to a square, then scale (what the official processor does)."""
    side = max(img.size)
    square = Image.new("RGB", (side, side), CLIP_MEAN_RGB)
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return np.asarray(square.resize((win, win), Image.BICUBIC)).astype(int)


def _document_like(size) -> Image.Image:
    from PIL import ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 12))
        draw.rectangle((x, y, x + int(rng.integers(10, 40)), y + 10), fill=(20, 20, 20))
    return img


@pytest.mark.parametrize("size", [(1344, 896), (600, 1800), (2480, 3508)])
def test_thumbnail_is_the_official_pad_then_scale_for_ordinary_pages(size):
    img = _document_like(size)
    assert np.array_equal(np.asarray(make_thumbnail(img)).astype(int), _padded_full_size_thumbnail(img))


@pytest.mark.parametrize("size", [(1344, 896), (600, 1800), (2480, 3508)])
def test_thumbnail_scaled_first_beyond_the_square_budget_stays_close(size):
    """Past `thumbnail_square_max_pixels` the page is scaled before padding: at most a fraction of a thumbnail pixel
    off where the page sits. Measured on document-like pages: mean |diff| 0.7-2.5 of 255, 99th percentile 20-89."""
    img = _document_like(size)
    new = np.asarray(make_thumbnail(img, WindowConfig(thumbnail_square_max_pixels=1))).astype(int)
    diff = np.abs(new - _padded_full_size_thumbnail(img))
    assert diff.mean() < 4.0, (size, diff.mean())
    assert np.percentile(diff, 90) < 20, (size, np.percentile(diff, 90))
    # the pad band is the CLIP mean colour either way
    assert tuple(new[2, 2]) == tuple(_padded_full_size_thumbnail(img)[2, 2]), size


def test_extreme_aspect_pages_cut_in_bounded_memory():
    """A few hundred bytes of PNG must not cost gigabytes: 30000x10 and 10x40000 into views with < 300 MB growth."""
    code = (
        "import io, resource, sys\n"
        "from PIL import Image\n"
        "from model.windows import prepare_image\n"
        "datas = []\n"
        "for size in [(30000, 10), (10, 40000)]:\n"
        "    b = io.BytesIO(); Image.new('RGB', size, (255, 255, 255)).save(b, 'PNG'); datas.append(b.getvalue())\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for d in datas:\n"
        "    page = prepare_image(d)\n"
        "    assert page.views.shape[1:] == (3, 448, 448), page.views.shape\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, max(len(d) for d in datas))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown_mb, biggest = (int(x) for x in out.stdout.split())
    assert biggest < 5000, f"the test images should be tiny files, got {biggest} bytes"
    assert grown_mb < 300, f"cutting extreme-aspect pages grew the peak RSS by {grown_mb} MB"
