"""The text decoder against the current transformers `LlamaForCausalLM` at tiny configs (same weights)."""

from __future__ import annotations

import pytest
import torch

from model import InfiMMHD
from model.attention import attention
from model.weights import init_random_, official_state_dict

from .model_helpers import CONFIGS

transformers = pytest.importorskip("transformers")


def hf_llama(model: InfiMMHD):
    t = model.config.text
    hf_cfg = transformers.LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        rms_norm_eps=t.rms_eps,
        rope_theta=t.rope_theta,
        max_position_embeddings=t.max_positions,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    prefix = "model.lang_encoder."
    state = {}
    for key, value in official_state_dict(model).items():
        if key.startswith(prefix):
            state[key[len(prefix) :].replace(".decoder_layer.", ".")] = value
    state = {k: v for k, v in state.items() if ".gated_cross_attn_layer." not in k}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    model = InfiMMHD(CONFIGS[request.param])
    init_random_(model, seed=5)
    return model.eval(), hf_llama(model)


def test_logits_match_transformers(pair):
    model, hf = pair
    vocab = model.config.eoc_token_id  # no <image> tokens: the blocks are identities
    ids = torch.randint(3, vocab, (3, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding: positions 0..L-1 agree with transformers' default positions
    mask[2, 9:] = 0
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() < 1e-4


def test_greedy_generation_matches_transformers_with_left_padding(pair):
    model, hf = pair
    vocab = model.config.eoc_token_id
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, vocab, (5,), generator=g), torch.randint(3, vocab, (12,), generator=g)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, 7:], mask[0, 7:] = a, 1
    ids[1], mask[1] = b, 1
    ours = model.generate(ids, mask, None, max_new_tokens=10, stop_token_ids=[])
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, 12:]
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_reference_attention_agree(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    mask = None if causal else torch.rand(2, 1, 9, 9, generator=g) > 0.3
    if mask is not None:
        mask |= torch.eye(9, dtype=torch.bool)  # every row attends somewhere
    fast = attention(q, k, v, mask, causal=causal)
    ref = attention(q, k, v, mask, causal=causal, impl="reference")
    assert (fast - ref).abs().max() < 1e-5
    # grouped-query attention: 4 query heads share 2 key/value heads
    kv = torch.randn(2, 2, 9, 16, generator=g)
    assert (
        attention(q, kv, kv) - attention(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1))
    ).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_reference(dtype):
    from model.text import rms_norm, rms_norm_fused

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 96, generator=g) * 3).to(dtype)
    w = (torch.rand(96, generator=g) + 0.5).to(dtype)
    ref, fused = rms_norm(x, w, 1e-5), rms_norm_fused(x, w, 1e-5)
    assert fused.dtype == ref.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: at most a last-bit difference after the cast back
    assert torch.allclose(fused.float(), ref.float(), rtol=tol, atol=tol)
