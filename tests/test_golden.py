"""Parity with the official InfiMM-HD code: every case of the golden vectors (tests/data/golden, see its README).

fp32 on CPU; logits and features within 1e-4 (measured ~1e-6), generated ids exact.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import Processor, load_pretrained
from model.engine import EncodedImage, Engine, EngineConfig, Request
from model.sampling import SamplingParams

ATOL = 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(str(golden_dir / "cases.safetensors"))


@pytest.fixture(scope="module")
def cases(golden_dir):
    return json.loads((golden_dir / "cases.json").read_text())


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_pretrained(golden_dir)


def pixels(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).standard_normal((n, 3, 448, 448)).astype(np.float32))


@pytest.fixture(scope="module")
def hd_media(model, golden):
    """Case b/d: 7 views = thumbnail + 2x3 windows -> one media item of 7*1025 tokens."""
    views = pixels(1002, 7)
    assert torch.equal(views[:, :, 0, :8], golden["b.pixels_head"]), "pixel regeneration drifted"
    assert torch.allclose(views.double().sum((1, 2, 3)), golden["b.pixels_sum"], rtol=0, atol=1e-6)
    with torch.no_grad():
        return model.build_media(model.encode_views(views), 2, 3)


def close(a, b, mask=None):
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max())


def test_copy_matches_shared_golden(golden_dir):
    """tests/data/golden is a copy of ../shared/golden; when the shared folder is present it must be identical."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "golden"
    if not shared.exists():
        pytest.skip(f"{shared} not present on this machine; the committed copy is used")
    cmp = filecmp.dircmp(shared, golden_dir)
    assert not cmp.diff_files and not cmp.left_only, f"golden copy out of date: {cmp.diff_files + cmp.left_only}"
    for name in ("cases.safetensors", "model.safetensors", "cases.json"):
        assert filecmp.cmp(shared / name, golden_dir / name, shallow=False)


def test_load_report_is_clean(model):
    r = model.load_report
    assert r.ok and r.aliases_skipped == 94
    assert sum(p.numel() for p in model.parameters()) == 1_023_480  # unique parameters, as the golden README states


def test_a_vit_features(model, golden):
    views = pixels(1001, 3)
    assert torch.equal(views[:, :, 0, :8], golden["a.pixels_head"])
    assert torch.allclose(views.double().sum((1, 2, 3)), golden["a.pixels_sum"], rtol=0, atol=1e-6)
    with torch.no_grad():
        feats = model.encode_views(views)
    assert feats.shape == (3, 1025, 64)
    assert close(feats, golden["a.vit_features"]) < ATOL


def test_b_window_encoding_and_media(model, golden, hd_media):
    from model import window_position_encoding

    assert close(window_position_encoding(2, 3, 64), golden["b.pe"]) < 1e-6
    per_view = hd_media.view(7, 1025, 64)
    assert close(per_view.mean(1), golden["b.media_view_mean"]) < ATOL
    assert close(per_view[:, :8], golden["b.media_head"]) < ATOL


def test_b_hd_forward_and_layer3_intermediates(model, golden, hd_media):
    seen = {}
    block = model.xattn["3"]
    hooks = [
        block.register_forward_hook(lambda m, args, out: seen.update(x_in=args[0], x_out=out)),
        block.attn.register_forward_hook(lambda m, args, out: seen.update(attn_out=out)),
    ]
    try:
        with torch.no_grad():
            logits = model(golden["b.input_ids"], golden["b.attention_mask"], hd_media[None, None])
    finally:
        for h in hooks:
            h.remove()
    assert close(logits, golden["b.logits"]) < ATOL
    assert close(seen["x_in"], golden["b.l3_xattn_in"]) < ATOL
    assert close(seen["attn_out"], golden["b.l3_attn_out"]) < ATOL
    assert close(seen["x_out"], golden["b.l3_xattn_out"]) < ATOL
    # the window encoding matters: without it the logits are those of b.logits_no_pe
    with torch.no_grad():
        feats = model.encode_views(pixels(1002, 7))
    no_pe = feats.reshape(1, 1, -1, 64)
    with torch.no_grad():
        assert close(model(golden["b.input_ids"], golden["b.attention_mask"], no_pe), golden["b.logits_no_pe"]) < ATOL


def test_c_interleaved_batch_masking(model, golden):
    mask = golden["c.attention_mask"]
    seen = {}
    h = model.xattn["3"].attn.register_forward_hook(lambda m, a, out: seen.update(attn_out=out))
    try:
        with torch.no_grad():
            logits = model(golden["c.input_ids"], mask, golden["c.media"].float())
    finally:
        h.remove()
    assert close(logits, golden["c.logits"], mask[..., None].expand_as(logits)) < ATOL
    m3 = mask[..., None].expand_as(seen["attn_out"])
    assert close(seen["attn_out"], golden["c.l3_attn_out"], m3) < ATOL
    # tokens before the first <image> (positions < 11 in row 0) get exactly zero attention output
    assert torch.equal(seen["attn_out"][0, :11], torch.zeros_like(seen["attn_out"][0, :11]))


def test_e_text_only_and_mixed_batch(model, golden):
    with torch.no_grad():
        e = model(golden["e.input_ids"], golden["e.attention_mask"], golden["e.media_dummy"].float())
        e_none = model(golden["e.input_ids"], golden["e.attention_mask"], None)
        mixed = model(golden["e_mixed.input_ids"], golden["e_mixed.attention_mask"], golden["e_mixed.media"].float())
    assert close(e, golden["e.logits"]) < ATOL
    assert torch.equal(e, e_none), "a row without <image> must ignore the media exactly"
    mask = golden["e_mixed.attention_mask"]
    assert close(mixed, golden["e_mixed.logits"], mask[..., None].expand_as(mixed)) < ATOL
    assert torch.equal(mixed[0], e[0]), "row 0 of the mixed batch must equal the text-only run exactly"


@pytest.mark.parametrize("name,stop", [("eoc", None), ("eos2", [2]), ("nostop", []), ("stopx", [326])])
def test_d_greedy_generation(model, golden, hd_media, name, stop):
    out = model.generate(golden["d.input_ids"], golden["d.attention_mask"], hd_media[None, None], 24, stop)
    assert out.tolist() == golden[f"d.new_tokens_{name}"].tolist()


def test_d_batch_left_padding_and_stop(model, golden):
    media = golden["c.media"].float()
    ids, mask = golden["d_batch.input_ids"], golden["d_batch.attention_mask"]
    assert model.generate(ids, mask, media, 24).tolist() == golden["d_batch.new_tokens"].tolist()
    assert model.generate(ids, mask, media, 24, [292]).tolist() == golden["d_batch.new_tokens_stopy"].tolist()


def test_tokenizer_reproduces_stored_ids(golden_dir, golden, cases):
    proc = Processor.from_pretrained(golden_dir)
    c = cases["cases"]
    assert proc.encode(c["b"]["text"]) == golden["b.input_ids"][0].tolist()
    assert proc.encode(c["d"]["prompt"]) == golden["d.input_ids"][0].tolist()
    assert proc.encode(c["e"]["text"]) == golden["e.input_ids"][0].tolist()
    for row, text in enumerate(c["c"]["texts"]):
        m = golden["c.attention_mask"][row].bool()
        assert proc.encode(text) == golden["c.input_ids"][row][m].tolist()
    # the default prompt form renders the inference prompt of case d exactly
    question = "What is written on the red sign?"
    assert proc.question_prompt(question) == c["d"]["prompt"]
    ids, mask = proc.pad([proc.encode(p) for p in c["d_batch"]["prompts"]], side="left")
    assert torch.equal(ids, golden["d_batch.input_ids"]) and torch.equal(mask, golden["d_batch.attention_mask"])


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_engine_reproduces_golden_ids_in_any_order(model, golden_dir, golden, hd_media, slots):
    """Continuous batching with 1, 3 or 8 slots, requests shuffled: every request gets its golden ids."""
    proc = Processor.from_pretrained(golden_dir)
    engine = Engine(model, proc, EngineConfig(max_slots=slots, max_seq_len=128, max_views=8))
    prompt = golden["d.input_ids"][0].tolist()
    reqs, expected = [], []
    for name, stop in [("eoc", (400,)), ("eos2", (2,)), ("nostop", ()), ("stopx", (326,))]:
        reqs.append(Request(prompt, [EncodedImage(hd_media)], SamplingParams(max_new_tokens=24, stop_token_ids=stop)))
        expected.append(golden[f"d.new_tokens_{name}"][0].tolist())
    media = golden["c.media"].float()
    for row in range(2):
        ids = golden["d_batch.input_ids"][row][golden["d_batch.attention_mask"][row].bool()].tolist()
        images = [EncodedImage(media[row, i]) for i in range(ids.count(401))]
        for stop, key in (((400,), "d_batch.new_tokens"), ((292,), "d_batch.new_tokens_stopy")):
            reqs.append(Request(ids, images, SamplingParams(max_new_tokens=24, stop_token_ids=stop)))
            exp = golden[key][row].tolist()
            expected.append(exp[: exp.index(292) + 1] if 292 in exp and stop == (292,) else exp)
    order = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(slots)).tolist()
    results = engine.generate([reqs[i] for i in order])
    for res, i in zip(results, order, strict=True):
        assert res.token_ids == expected[i], f"request {i} with {slots} slots"
