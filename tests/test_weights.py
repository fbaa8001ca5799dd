"""Checkpoint loading (official layout, pickle and safetensors, sharded, aliases, bare Flamingo), conversion."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, convert_checkpoint, load_pretrained, make_tiny_checkpoint


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def same(a, b) -> bool:
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def bin_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bin") / "ckpt", seed=3, fmt="bin")


@pytest.fixture(scope="module")
def st_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("st") / "ckpt", seed=3)


def test_pickle_and_safetensors_load_the_same_weights(bin_checkpoint, st_checkpoint):
    a, b = load_pretrained(bin_checkpoint), load_pretrained(st_checkpoint)
    assert same(a, b)
    assert a.load_report.ok and a.load_report.aliases_skipped > 0  # the official layout repeats blocks under aliases
    # weights are stored in bf16 (as the real checkpoint) and loaded exactly into fp32
    stored = load_file(str(st_checkpoint / "model.safetensors"))
    key = "model.lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight"
    assert stored[key].dtype == torch.bfloat16
    q = params(b)["decoder.layers.0.attn.wqkv.weight"][: stored[key].shape[0]]
    assert torch.equal(q, stored[key].float())


def test_load_in_bfloat16(st_checkpoint):
    m = load_pretrained(st_checkpoint, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.decoder.rope.dtype == torch.float32  # RoPE tables stay float32 whatever the weight dtype
    m.to(torch.float16)
    assert m.decoder.rope.dtype == torch.float32


def test_convert_to_sharded_safetensors_round_trip(bin_checkpoint, tmp_path):
    out = tmp_path / "sharded"
    report = convert_checkpoint(bin_checkpoint, out, shard_gb=0.0005)  # ~0.5 MB shards -> several files
    assert report.ok
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not any("old_decoder_blocks" in k or "gated_cross_attn_layers" in k for k in index["weight_map"])
    assert (out / "tokenizer" / "tokenizer.json").exists() and (out / "config.json").exists()
    assert same(load_pretrained(bin_checkpoint), load_pretrained(out))


def test_golden_checkpoint_converts_and_reloads(golden_dir, tmp_path):
    convert_checkpoint(golden_dir, tmp_path / "g", dtype=torch.float32)
    assert same(load_pretrained(golden_dir), load_pretrained(tmp_path / "g"))


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(fn(state), str(dst / "model.safetensors"))
    return dst


def test_missing_and_unexpected_keys_are_reported(st_checkpoint, tmp_path):
    gone = "model.lang_encoder.model.layers.3.gated_cross_attn_layer.attn.to_kv.weight"

    def drop(state):
        state.pop(gone)
        state.pop(gone.replace("model.layers.3.gated_cross_attn_layer", "gated_cross_attn_layers.3"))
        state["model.lang_encoder.some_new_module.weight"] = torch.zeros(2)
        return state

    broken = _edit(st_checkpoint, tmp_path / "broken", drop)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(broken)
    text = str(e.value)
    assert "missing from the checkpoint (1)" in text and gone in text
    assert "unexpected in the checkpoint (1)" in text and "some_new_module" in text


def test_shape_mismatch_is_reported(st_checkpoint, tmp_path):
    cfg = json.loads((st_checkpoint / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(st_checkpoint, bad)
    cfg["language"]["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_pretrained(bad)


def test_bare_flamingo_and_alias_only_layouts_load(st_checkpoint, tmp_path):
    # stage-1 style: no "model." prefix; only the alias names for decoder layers; a stray rotary buffer
    def rewrite(state):
        out = {}
        for k, v in state.items():
            if ".model.layers." in k and ".decoder_layer." in k:
                continue  # keep only old_decoder_blocks.* for decoder layers
            out[k.removeprefix("model.")] = v
        out["lang_encoder.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        return out

    bare = _edit(st_checkpoint, tmp_path / "bare", rewrite)
    m = load_pretrained(bare)
    assert m.load_report.ok and m.load_report.ignored == 1
    assert same(m, load_pretrained(st_checkpoint))


def test_unusable_folders_are_clear_errors(st_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an InfiMM-HD config.json"):
        load_pretrained(tmp_path)
    shutil.copy(st_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_pretrained(tmp_path)
