"""The pretraining stand-ins for EVA-CLIP and Vicuna (stages `vit` and `lm`) and the training diagnostics: what each
stage trains, that the hand-off to stage 1 is a strict load keeping what the earlier stages trained, and that the
diagnostics measure what they claim (on hand-built cases and on a tiny Ray Train run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.weights import load_pretrained
from tests.training_helpers import small_config
from training.corpus import CorpusConfig, generate
from training.diagnostics import attended_tokens
from training.modeling import (
    Example,
    WordHead,
    apply_freeze_policy,
    corpus_words,
    encode_example,
    init_model,
    save_checkpoint,
    text_loss,
    words_loss,
)
from training.stages import FULL, stage_spec


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    from model.processor import Processor
    from model.tokenizer import load_tokenizer

    return Processor(load_tokenizer(tokenizer_dir), small_config())


def example(processor, answer: str, views: int = 1, size: int = 56) -> Example:
    ids, labels = encode_example(processor, "What word is printed on this page?", answer, 64)
    pixels = torch.randint(0, 255, (views, 3, size, size), dtype=torch.uint8)
    grid = (1, 1) if views <= 2 else (2, 2)
    return Example(ids, labels, pixels, *grid, answer=answer)


def grads(model, extra=()) -> set[str]:
    named = [*model.named_parameters(), *extra]
    return {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}


def test_vit_stage_trains_the_whole_vit_and_nothing_else(processor):
    model = init_model(small_config(), seed=0)
    spec = stage_spec("vit", image_size=56)
    trained = set(apply_freeze_policy(model, spec))
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("vision.")}, "ViT, norm and head only"
    head = WordHead(["invoice", "table", "North"], model.config.vision.embed_dim)
    loss, n = words_loss(model, head, [example(processor, "invoice"), example(processor, "North table")])
    loss.backward()
    assert n == 2 and torch.isfinite(loss), f"both pages scored: {n}, {loss}"
    got = grads(model, [("head." + k, p) for k, p in head.named_parameters()])
    assert got == trained | {"head.table", "head.logit_scale"}, f"gradients differ: {sorted(got ^ trained)[:6]}"


def test_lm_stage_trains_the_decoder_on_text_without_the_page(processor):
    model = init_model(small_config(), seed=0)
    trained = set(apply_freeze_policy(model, stage_spec("lm")))
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("decoder.")}, "the decoder only"
    ex = example(processor, "invoice", views=0)
    loss, n = text_loss(model, [ex])
    loss.backward()
    assert n == len(ex.input_ids) - 1, "every next token of prompt + answer is scored"
    assert grads(model) == trained, "no gradient reaches the ViT or the cross-attention"


def test_word_targets_spread_over_the_printed_words_and_skip_unknown_ones(processor):
    assert corpus_words(["the chair", "invoice", "the"]) == ["chair", "invoice", "the"]
    head = WordHead(["chair", "invoice", "the"], 8)
    t = head.targets([example(processor, "the chair"), example(processor, "zebra"), example(processor, "invoice")])
    assert torch.equal(t, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])), t


def test_pretraining_stages_exist_only_where_nothing_is_pretrained():
    assert stage_spec("vit").objective == "words" and stage_spec("lm").objective == "text"
    assert stage_spec("vit").image_size == stage_spec(1).image_size, "the ViT pretrains at stage 1's resolution"
    assert stage_spec("1").name == "PT", "the CLI's digits name the paper's stages"
    assert "vit" not in FULL, "the full recipe starts from EVA-CLIP and Vicuna"
    with pytest.raises(ValueError, match="EVA-CLIP"):
        stage_spec("vit", "full")
    with pytest.raises(ValueError, match="objective"):
        stage_spec(1, objective="pixels")


def test_attended_tokens_counts_every_token_for_even_attention_and_one_for_a_spike(processor):
    model = init_model(small_config(), seed=0).eval()
    for block in model.xattn.values():
        block.attn.to_q.weight.data.zero_()  # every logit 0: softmax is uniform over the row's real tokens
    n = model.config.vision.tokens
    pages = [example(processor, "invoice", views=2), example(processor, "table", views=5)]  # 2N and 5N tokens
    got = attended_tokens(model, pages)
    assert len(got) == len(model.xattn)
    assert all(abs(g - (2 * n + 5 * n) / 2) < 1e-3 for g in got), f"uniform: mean of 2N and 5N = {3.5 * n}, got {got}"
    # One media token made huge along a direction the query shares: attention collapses onto it.
    model = init_model(small_config(), seed=0).eval()
    for block in model.xattn.values():
        block.attn.to_q.weight.data.zero_()
        block.attn.to_q.weight.data[:, 0] = 1.0
        block.attn.to_kv.weight.data.zero_()
        block.attn.to_kv.weight.data[: block.attn.heads * block.attn.dim_head, 0] = 1.0
    page = example(processor, "invoice", views=2)
    spiky = Example(page.input_ids, page.labels, page.views, 1, 1, page.answer)

    def spike(_module, _args, out):
        out = out.clone()
        out[:, :, 0] = 0.0
        out[0, 3, 0] = 1e4  # one token of the first view
        return out

    handle = model.vision.register_forward_hook(spike)
    try:
        got = attended_tokens(model, [spiky])
    finally:
        handle.remove()
    assert all(g < 1.01 for g in got), f"all attention on one token: {got}"


# ---- the stages on Ray Train, tiny ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_chain(ray_session, tmp_path_factory, tokenizer_dir):
    """vit (8 steps) -> lm (4 steps) -> stage 1 (4 steps) on 16 small pages, diagnostics on 4 held-out pages."""
    from training.loop import RunSpec, run_stage

    root = tmp_path_factory.mktemp("pretrain")
    words = ("invoice", "table", "North")
    small = dict(words=words, width=(112, 112), font_size=(20, 24))
    manifest = generate(root / "corpus", CorpusConfig(n=16, seed=5, **small))
    heldout = generate(root / "heldout", CorpusConfig(n=4, seed=6, **small))
    init = save_checkpoint(init_model(small_config(56), seed=0), root / "init", tokenizer_dir)
    outs = {}
    for name, stage, start, steps in (("vit", "vit", init, 8), ("lm", "lm", None, 4), ("s1", 1, None, 4)):
        start = start or outs[list(outs)[-1]]
        spec = stage_spec(stage, image_size=56, steps=steps, warmup=2, batch=4)
        run = RunSpec(
            spec,
            str(start),
            checkpoint_every=4,
            log_every=2,
            threads=1,
            eval_data=[str(heldout)],
            eval_n=4,
            diag_every=2,
        )
        run_stage(run, [str(manifest)], root / name, cpus_per_worker=0.5, max_failures=0)
        outs[name] = root / name
    return init, outs


def history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def test_each_pretraining_stage_changes_its_component_only_and_hands_off_strictly(pretrained_chain):
    init, outs = pretrained_chain
    models = {k: load_pretrained(v, strict=True) for k, v in {"init": init, **outs}.items()}
    assert all(m.load_report.ok for m in models.values()), "every stage output loads strictly"

    def same(a, b, prefix) -> bool:
        sa, sb = models[a].state_dict(), models[b].state_dict()
        return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))

    assert not same("init", "vit", "vision.") and same("init", "vit", "decoder.") and same("init", "vit", "xattn.")
    assert same("vit", "lm", "vision.") and not same("vit", "lm", "decoder.") and same("vit", "lm", "xattn.")
    assert same("lm", "s1", "vision.") and not same("lm", "s1", "xattn."), "stage 1 keeps the pretrained ViT"


def test_diagnostics_are_logged_from_the_first_step_on_a_tiny_run(pretrained_chain):
    _, outs = pretrained_chain
    vit = [h for h in history(outs["vit"]) if "heldout_word_accuracy" in h]
    assert [h["step"] for h in vit] == [0, 2, 4, 6, 8], "at step 0 and every diag_every steps"
    assert all(0 <= h["heldout_word_accuracy"] <= 1 and h["media_rms"] > 0 for h in vit)
    assert all("heldout_text_loss" in h for h in history(outs["lm"]) if h["step"] in (0, 2, 4))
    s1 = [h for h in history(outs["s1"]) if "attended_tokens" in h]
    assert [h["step"] for h in s1] == [0, 2, 4]
    tokens = small_config(56).vision.tokens  # stage 1: the page as one view of N tokens
    for h in s1:
        assert all(1.0 <= a <= tokens for a in h["attended_tokens"]), h["attended_tokens"]
        assert all(0 < g < 1 for g in h["attn_gates"] + h["ff_gates"]), "tanh gates start at 0.5 and stay inside"
        assert h["image_gap"] == pytest.approx(h["heldout_loss_shuffled"] - h["heldout_loss"])
        assert 0 <= h["heldout_exact"] <= 1 and h["media_rms"] > 0


def test_diagnose_pairs_questions_with_other_pages_of_any_grid(processor):
    from training.diagnostics import diagnose

    model = init_model(small_config(), seed=0)
    pages = [example(processor, "invoice", views=2), example(processor, "table", views=5)]  # 1x1 + thumb, 2x2 + thumb
    d = diagnose(model, pages, "answer", processor=processor)
    assert d["image_gap"] == pytest.approx(d["heldout_loss_shuffled"] - d["heldout_loss"])
    assert len(d["attended_tokens"]) == len(d["attn_gates"]) == len(model.xattn) and 0 <= d["heldout_exact"] <= 1
    assert model.training, "the model is back in training mode afterwards"


def test_train_eval_scores_every_layout_and_draws_every_stage(tmp_path):
    """benchmarks/train_eval.py on the shipped reader, engine only, 3 pages of two layouts: per-layout JSON with the
    first layout's figures at the top level (where runtime/checkpoints.py reads them) and the diagnostics PNG."""
    from benchmarks import train_eval
    from runtime.checkpoints import DEMO_CHECKPOINT

    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(DEMO_CHECKPOINT), "--layouts", "word-fixed,lines-random", "--n", "3"]
    assert train_eval.main([*argv, "--skip-batch", "--skip-service", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["layouts"]) == {"word-fixed", "lines-random"}
    assert result["engine"] == result["layouts"]["word-fixed"]["engine"] and result["engine"]["pages"] == 3
    assert train_eval.score([("table", "table"), ("table", "tablx")]) == {"pages": 2, "cer": 0.1, "exact_match": 0.5}
    assert out.with_suffix(".png").stat().st_size > 10_000, "the loss and diagnostics of every stage are drawn"
