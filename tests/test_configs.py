"""Model behaviour on tiny configs the golden vectors do not cover (other widths, depths, GQA, block placement, grids),
checked against the naive spec implementation in tests/naive_reference.py, and the model's own invariants:
cached decode == full forward, left padding == unpadded rows, zero gates == text-only decoder."""

from __future__ import annotations

import pytest
import torch

from model import InfiMMHD, InfiMMHDConfig
from model.engine import EncodedImage, Engine, EngineConfig, Request
from model.sampling import SamplingParams
from model.weights import init_random_, official_state_dict

from . import naive_reference as naive
from .model_helpers import CONFIGS


def build(name: str, seed: int = 0) -> InfiMMHD:
    model = InfiMMHD(CONFIGS[name])
    init_random_(model, seed)
    return model.eval()


def views(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def prompt(cfg: InfiMMHDConfig, n_images: int, length: int = 14, seed: int = 0) -> list[int]:
    """Text before the first image, images spread through the prompt, text after the last."""
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, cfg.eoc_token_id, (length,), generator=g).tolist()
    for i in range(n_images):
        ids.insert(3 + 4 * i, cfg.image_token_id)
    return ids


def test_block_placement_is_explicit():
    assert InfiMMHDConfig().xattn_layers == (3, 7, 11, 15, 19, 23, 27, 31, 35, 39)
    assert CONFIGS["gqa-every2"].xattn_layers == (1, 3, 5)
    assert CONFIGS["narrow-every4"].xattn_layers == (3,)
    assert set(build("gqa-every2").xattn) == {"1", "3", "5"}


def test_hf_config_round_trip():
    for cfg in [InfiMMHDConfig(), *CONFIGS.values()]:
        assert InfiMMHDConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("grid", [(3, 2), (1, 1), (2, 3)])
def test_forward_matches_naive_reference(name, grid):
    model = build(name)
    cfg = model.config
    sd = {k: v.float() for k, v in official_state_dict(model).items()}
    rows, cols = grid
    v = views(1 + rows * cols, seed=rows * 10 + cols)
    with torch.no_grad():
        media = model.build_media(model.encode_views(v), rows, cols)
        expected_media = naive.media_item(sd, cfg, v, rows, cols)
        assert (media - expected_media).abs().max() < 1e-4
        ids = prompt(cfg, 1)
        logits = model(torch.tensor([ids]), None, media[None, None])[0]
    expected = naive.forward_row(sd, cfg, ids, [expected_media])
    assert (logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_batch_and_engine_with_mixed_images_match_naive(name):
    """Rows with 0, 1 and 2 images of different grids: the engine (per-row media of different sizes) and the naive
    reference agree on greedy ids; the right-padded forward agrees on logits."""
    model = build(name, seed=1)
    cfg = model.config
    sd = {k: v.float() for k, v in official_state_dict(model).items()}
    with torch.no_grad():
        a = model.build_media(model.encode_views(views(7, 1)), 3, 2)
        b = model.build_media(model.encode_views(views(2, 2)), 1, 1)
    rows = [(prompt(cfg, 0, seed=3), []), (prompt(cfg, 1, seed=4), [a]), (prompt(cfg, 2, length=18, seed=5), [b, a])]

    # right-padded forward of the rows that have equal-sized media items: row 1 alone with a 3x2 page
    ids, media = rows[1][0], a
    with torch.no_grad():
        padded = torch.tensor([ids + [0, 0, 0]])
        mask = torch.tensor([[1] * len(ids) + [0, 0, 0]])
        logits = model(padded, mask, media[None, None])[0, : len(ids)]
    assert (logits - naive.forward_row(sd, cfg, ids, [a])).abs().max() < 1e-4

    # greedy continuation through the engine vs a no-cache naive greedy loop
    engine = Engine(model, _FakeProcessor(cfg), EngineConfig(max_slots=2, max_seq_len=64, max_views=7))
    reqs = [
        Request(ids, [EncodedImage(m) for m in ms], SamplingParams(max_new_tokens=5, stop_token_ids=()))
        for ids, ms in rows
    ]
    results = engine.generate(reqs)
    for (ids, ms), res in zip(rows, results, strict=True):
        seq = list(ids)
        for _ in range(5):
            seq.append(int(naive.forward_row(sd, cfg, seq, ms)[-1].argmax()))
        assert res.token_ids == seq[len(ids) :]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    model = build(name, seed=2)
    cfg = model.config
    with torch.no_grad():
        media = model.build_media(model.encode_views(views(3, 7)), 1, 2)[None, None]
    ids = torch.tensor([prompt(cfg, 1, seed=9)])
    out = model.generate(ids, None, media, max_new_tokens=8, stop_token_ids=[])
    seq = ids
    for step in range(8):  # no KV cache: the whole sequence every step
        with torch.no_grad():
            nxt = model(seq, None, media)[0, -1].argmax()
        assert int(nxt) == int(out[0, step]), f"step {step}"
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padding_equals_unpadded_rows(name):
    model = build(name, seed=3)
    cfg = model.config
    with torch.no_grad():
        media = model.build_media(model.encode_views(views(3, 8)), 1, 2)
    p1, p2 = prompt(cfg, 1, length=6, seed=1), prompt(cfg, 1, length=15, seed=2)
    T = max(len(p1), len(p2))
    ids = torch.tensor([[0] * (T - len(p1)) + p1, [0] * (T - len(p2)) + p2])
    mask = torch.tensor([[0] * (T - len(p1)) + [1] * len(p1), [0] * (T - len(p2)) + [1] * len(p2)])
    both = model.generate(ids, mask, torch.stack([media, media])[:, None], 6, stop_token_ids=[])
    for row, p in enumerate((p1, p2)):
        alone = model.generate(torch.tensor([p]), None, media[None, None], 6, stop_token_ids=[])
        assert both[row].tolist() == alone[0].tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_gates_give_the_text_only_decoder(name):
    model = build(name, seed=4)
    cfg = model.config
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.zero_()
            block.ff_gate.zero_()
        media = model.build_media(model.encode_views(views(3, 9)), 1, 2)[None, None]
        ids = torch.tensor([prompt(cfg, 1, seed=11)])
        with_media = model(ids, None, media)
        text_only = model(ids, None, None)
    assert torch.equal(with_media, text_only)


class _FakeProcessor:
    """Just what Engine needs from a Processor when requests arrive as ids: stop ids, a tokenizer, padding."""

    def __init__(self, cfg):
        self.config = cfg
        self.stop_token_ids = [cfg.eoc_token_id, cfg.text.eos_token_id]
        self.tokenizer = _IdsTokenizer()

    def pad(self, sequences, side="left"):
        from model.processor import Processor

        return Processor.pad(self, sequences, side)


class _IdsTokenizer:
    def decode(self, ids, **kw):
        return " ".join(str(i) for i in ids)

    def convert_tokens_to_ids(self, tokens):
        return [None] * len(tokens)
