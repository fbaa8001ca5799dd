"""Prefill without padding (prompts packed back to back) and decode over each slot's own length: the same logits as
the padded, masked paths, and the same tokens as single-request generate, for mixed prompt lengths and media."""

from __future__ import annotations

import pytest
import torch

from model import ChatMessage, load_pretrained
from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams

from .model_helpers import page, record_logits

PADDED = dict(packed_prefill=False, decode_attention="bucket")


def requests(engine, new_tokens=8):
    """Prompts of different lengths; pages of different window grids (media lengths); text-only rows between them."""
    pages = [page(900, 1300, "INVOICE 2024"), page(1400, 500, "Minutes"), page(300, 300, "x")]
    sampling = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())
    questions = ["Read.", "What is the total amount due on this invoice, with the currency?", "Who was present?"]
    reqs = []
    for i in range(7):
        q = questions[i % 3] + " Please." * (i % 4) * 3  # lengths spread over tens of tokens
        if i % 3 == 2:
            reqs.append(engine.make_chat_request([ChatMessage("user", [q])], sampling))
        else:
            reqs.append(engine.make_request(q, [pages[i % 3]], sampling))
    return reqs


def logits_of(model, processor, slots, **config):
    """Every row of logits the engine computes (prefill rows, then each decode step's active rows)."""
    engine = Engine(model, processor, EngineConfig(max_slots=slots, max_seq_len=256, late_copy=False, **config))
    seen = record_logits(engine)
    results = engine.generate(requests(engine))
    return [r.token_ids for r in results], seen


@pytest.mark.parametrize("slots", [1, 3, 7])
def test_packed_prefill_and_own_length_decode_match_the_padded_paths(model, processor, slots):
    ids, logits = logits_of(model, processor, slots)
    ref_ids, ref_logits = logits_of(model, processor, slots, **PADDED)
    assert ids == ref_ids
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits, strict=True):  # same rows; decode steps may include rows of free slots
        assert a.shape == b.shape
    worst = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True))
    assert worst < 1e-4, worst


def test_each_switch_alone_gives_the_same_tokens(model, processor):
    ref, _ = logits_of(model, processor, 4, **PADDED)
    assert logits_of(model, processor, 4, packed_prefill=True, decode_attention="bucket")[0] == ref
    assert logits_of(model, processor, 4, packed_prefill=False, decode_attention="own_length")[0] == ref


def test_packed_prefill_writes_the_same_cache(model, processor):
    """KV columns of each slot after one prefill of mixed prompts: packed == padded (the valid columns)."""

    def cache_after_prefill(**config):
        engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=256, **config))
        reqs = requests(engine, new_tokens=1)[:4]
        engine.generate(reqs)
        return engine.kv, [len(r.prompt_ids) for r in reqs], [engine.media_len[i] for i in range(4)]

    (kv, lengths, media), (ref, ref_lengths, ref_media) = cache_after_prefill(), cache_after_prefill(**PADDED)
    assert lengths == ref_lengths and media == ref_media
    for slot, L in enumerate(lengths):
        assert torch.allclose(kv.k[:, slot, :, :L], ref.k[:, slot, :, :L], atol=1e-5)
        assert torch.allclose(kv.v[:, slot, :, :L], ref.v[:, slot, :, :L], atol=1e-5)
        assert bool(kv.valid[slot, :L].all()) and not bool(kv.valid[slot, L:].any())


def test_row_ranges_group_neighbours_and_split_long_gaps(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=256, decode_split_bytes=0))
    assert engine.runner.row_ranges([5, 5, 9]) == [(0, 2, 5, False), (2, 3, 9, False)]  # no split cost: own lengths
    engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=256, decode_split_bytes=2**30))
    assert engine.runner.row_ranges([5, 5, 9]) == [(0, 3, 9, True)]  # calls cost more than any padding: one range


def test_an_unknown_decode_attention_is_refused(model, processor):
    with pytest.raises(ValueError, match="own_length"):
        Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=64, decode_attention="paged"))


def test_onednn_packed_linears_keep_tokens_and_logits(tiny_checkpoint, processor):
    """CPU linears through oneDNN with packed weights (on by default) against the same model unpacked."""
    from model import cpu_linear

    if not cpu_linear.available():
        pytest.skip("PyTorch built without oneDNN")
    plain, packed = load_pretrained(tiny_checkpoint), load_pretrained(tiny_checkpoint)
    runs = {}
    for name, m, on in (("plain", plain, False), ("packed", packed, True)):
        engine = Engine(m, processor, EngineConfig(max_slots=3, max_seq_len=256, cpu_packed_linear=on))
        seen = record_logits(engine)
        runs[name] = [r.token_ids for r in engine.generate(requests(engine))], seen
    assert not any(isinstance(x.__dict__.get("forward"), cpu_linear._PackedForward) for x in plain.modules())
    assert sum(isinstance(x.__dict__.get("forward"), cpu_linear._PackedForward) for x in packed.modules()) > 0
    assert runs["packed"][0] == runs["plain"][0]
    worst = max((a - b).abs().max().item() for a, b in zip(runs["packed"][1], runs["plain"][1], strict=True))
    assert worst < 1e-4, worst
    cpu_linear.unpack_linears(packed)
    assert not any(isinstance(x.__dict__.get("forward"), cpu_linear._PackedForward) for x in packed.modules())
