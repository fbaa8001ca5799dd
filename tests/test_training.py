"""Training recipe: freeze policies, position-embedding interpolation, stage hand-off, Ray Train with a killed worker,
and a trained checkpoint served by the engine giving the training loop's own answer. The shipped reader's words are
asserted in test_demo_reader.py, the pretraining stages in test_training_pretrain.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.weights import load_pretrained
from tests.training_helpers import small_config
from training.corpus import CorpusConfig, generate
from training.modeling import (
    Example,
    apply_freeze_policy,
    batch_loss,
    encode_example,
    greedy_answer,
    init_model,
    interpolate_pos_embed,
    resize_vision,
    save_checkpoint,
    sincos_pos_embed,
)
from training.stages import FULL, TINY, TINY_FROM_SCRATCH, stage_spec


def expected_trained(name: str, stage: int) -> bool:
    """The paper's policy (stages 1-4) and the demo's joint warm-up (stage 0, not in the paper), written out
    independently of training.modeling.trainable."""
    unused = name.startswith(("vision.norm.", "vision.head."))
    return {
        0: not unused,  # everything on the feature path: ViT, cross-attention, embeddings, decoder, head
        1: name.startswith("xattn.") or name == "decoder.embed_tokens.weight",
        2: (name.startswith("vision.") and not unused) or name.startswith("xattn."),
        3: (name.startswith("vision.") and not unused) or name.startswith("xattn."),
        4: name.startswith(("xattn.", "decoder.")),
    }[stage]


@pytest.mark.parametrize(
    ("stage", "preset"), [(0, "tiny-from-scratch"), (1, "tiny"), (2, "tiny"), (3, "tiny"), (4, "tiny")]
)
def test_freeze_policy_is_exactly_the_parameters_that_get_gradients(stage, preset, tokenizer_dir):
    from model.processor import Processor
    from model.tokenizer import load_tokenizer

    cfg = small_config()
    model = init_model(cfg, seed=0)
    spec = stage_spec(stage, preset, image_size=56)
    trained = set(apply_freeze_policy(model, spec))
    names = [n for n, _ in model.named_parameters()]
    assert trained == {n for n in names if expected_trained(n, stage)}, f"stage {stage} policy differs"
    processor = Processor(load_tokenizer(tokenizer_dir), cfg)
    ids, labels = encode_example(processor, "What word is printed on this page?", "invoice", 64)
    views = torch.randint(0, 255, (5, 3, 56, 56), dtype=torch.uint8)  # thumbnail + 2x2 windows
    loss, n = batch_loss(model, [Example(ids, labels, views, 2, 2)], vision_grad=spec.train_vision)
    loss.backward()
    assert n == len(processor.tokenizer("invoice", add_special_tokens=False)["input_ids"]) + 1, "answer + eoc scored"
    got = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == trained, f"stage {stage}: grads on {sorted(got ^ trained)[:6]} disagree with the policy"


def test_stage_presets_carry_the_papers_numbers():
    assert [FULL[s].lr for s in (1, 2, 3, 4)] == [1e-4, 1e-5, 1e-5, 5e-6], "Table 8 peak learning rates"
    assert [FULL[s].batch for s in (1, 2, 3, 4)] == [768, 256, 256, 64], "Table 8 global batches"
    assert [FULL[s].image_size for s in (1, 2)] == [224, 448], "PT at 224, CPT at 448"
    assert all(s.weight_decay == 0.1 and s.clip == 1.0 for s in (*FULL.values(), *TINY.values())), "wd 0.1 clip 1.0"
    assert [s.grad_checkpointing for s in FULL.values()] == [False, False, True, False], "checkpointing in DRA only"
    # The tiny presets stay at 112 px: a CPU-sized CPT does not carry a pretrained ViT across a 2x scale change
    assert {s.image_size for s in TINY.values()} == {112} and TINY[3].dynamic and not TINY[2].dynamic
    assert TINY[2].lr < TINY[1].lr and TINY[2].patch_lr_mult == 0.1, "the pretrained ViT trains at a lower rate"
    assert {s: TINY_FROM_SCRATCH[s] for s in (1, 2, 3, 4)} == TINY, "from-scratch keeps the tiny stages 1-4 as they are"
    assert 0 not in TINY and 0 not in FULL, "the joint warm-up is no paper stage: only the from-scratch preset has it"
    with pytest.raises(ValueError, match="tiny-from-scratch"):
        stage_spec(0, "tiny")


def test_pos_embed_interpolation_keeps_cls_and_resizes_bicubically():
    pe = sincos_pos_embed(8, 32)
    pe[:, 0] = torch.randn(32)
    out = interpolate_pos_embed(pe, 16)
    assert out.shape == (1, 1 + 16 * 16, 32), f"shape {out.shape}"
    assert torch.equal(out[:, 0], pe[:, 0]), "CLS position is carried over unchanged"
    const = torch.cat((torch.zeros(1, 1, 4), torch.full((1, 64, 4), 0.7)), dim=1)
    assert torch.allclose(interpolate_pos_embed(const, 16)[:, 1:], torch.tensor(0.7)), "a constant grid stays constant"
    grid = pe[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 32)), "bicubic, align_corners=False"
    assert torch.equal(interpolate_pos_embed(pe, 8), pe), "same size: unchanged"
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.zeros(1, 11, 4), 4)


def test_stage_hand_off_loads_strictly_and_the_engine_follows_the_window_size(tmp_path, tokenizer_dir):
    from model.engine import Engine

    model = init_model(small_config(56), seed=1)
    s1 = save_checkpoint(model, tmp_path / "s1", tokenizer_dir)
    loaded = load_pretrained(s1, strict=True)
    assert loaded.load_report.ok, str(loaded.load_report)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{n} changed in the round trip"
    grown = resize_vision(loaded, 112)  # stage 2: ViT position embedding 56 -> 112 px
    s2 = save_checkpoint(grown, tmp_path / "s2", s1)
    again = load_pretrained(s2, strict=True)
    assert again.config.vision.image_size == 112 and again.vision.pos_embed.shape[1] == 1 + 8 * 8, "resized ViT"
    engine = Engine.from_pretrained(s2)
    assert engine.processor.windows.window == 112, "the engine cuts 112 px windows for a 112 px ViT"
    page = generate(tmp_path / "pages", CorpusConfig(n=1, width=(224, 224), font_size=(30, 30)))
    row = json.loads(page.read_text())
    request = engine.make_request(row["prompt"], [(tmp_path / "pages" / row["uri"]).read_bytes()])
    assert request.images[0].views.shape[-1] == 112 and request.images[0].rows == 2, "224 px page: 2x2 of 112"


def test_corpus_is_seeded_and_answers_match_what_was_drawn(tmp_path):
    cfg = CorpusConfig(n=6, seed=3, kinds=("word", "number", "field", "lines"), layout="random", aspect=(0.7, 1.4))
    a = generate(tmp_path / "a", cfg).read_text()
    b = generate(tmp_path / "b", cfg).read_text()
    assert a == b, "same seed, same manifest"
    assert (tmp_path / "a/pages/3-000005.png").read_bytes() == (tmp_path / "b/pages/3-000005.png").read_bytes()
    for row in map(json.loads, a.splitlines()):
        if row["kind"] == "field":
            assert row["prompt"].startswith("What is the ") and row["answer"].isdigit(), row
        if row["kind"] == "word":
            assert row["answer"] in cfg.words, row


# ---- Ray Train ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_trained(ray_session, tmp_path_factory, tokenizer_dir):
    """Stage 4 (IFT) of a small model on 24 pages, two workers, one killed at step 12 (after the step-10 checkpoint)."""
    from training.loop import RunSpec, run_stage

    root = tmp_path_factory.mktemp("train")
    words = ("invoice", "table", "North")
    manifest = generate(root / "corpus", CorpusConfig(n=24, seed=5, words=words, width=(112, 112), font_size=(20, 24)))
    init = save_checkpoint(init_model(small_config(56), seed=0), root / "init", tokenizer_dir)
    spec = stage_spec(4, "tiny", image_size=56, steps=24, warmup=3, batch=4, lr=3e-3, min_lr=3e-4)
    marker = root / "killed.txt"
    run = RunSpec(
        spec, str(init), seed=0, checkpoint_every=10, log_every=2, threads=1, fail_at_step=12, fail_marker=str(marker)
    )
    metrics = run_stage(run, [str(manifest)], root / "out", workers=2, cpus_per_worker=0.5, max_failures=1)
    history = [json.loads(line) for line in (root / "out" / "history.jsonl").read_text().splitlines()]
    return root, metrics, history, marker, manifest


def test_two_worker_ray_train_learns_and_resumes_after_a_worker_dies(ray_trained):
    root, metrics, history, marker, _ = ray_trained
    assert marker.exists(), "the fault fired: a worker exited hard at step 12"
    assert metrics["step"] == 24, f"finished all steps after the restart: {metrics}"
    steps = [h["step"] for h in history]
    # Steps 11-12 of the killed attempt were redone from the step-10 checkpoint: its history continues, once each.
    assert steps == list(range(2, 25, 2)), f"one history, continued from the checkpoint: {steps}"
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < first * 0.8, f"loss went from {first:.3f} to {last:.3f}"
    assert all(h["tokens_per_s"] > 0 for h in history), "throughput reported"
    assert load_pretrained(root / "out", strict=True).load_report.ok, "stage output loads strictly"


def test_engine_serving_the_trained_checkpoint_gives_the_training_loops_answer(ray_trained):
    from model.engine import Engine
    from model.processor import Processor
    from training.data import DecodeExamples, examples_from_batch

    root, _, _, _, manifest = ray_trained
    out = root / "out"
    spec = stage_spec(4, "tiny", image_size=56)
    decode = DecodeExamples(str(out), str(out), spec)
    engine = Engine.from_pretrained(out)
    model, processor = load_pretrained(out), Processor.from_pretrained(out)
    answers = []
    for row in map(json.loads, manifest.read_text().splitlines()[:4]):
        path = str(manifest.parent / row["uri"])
        example = examples_from_batch({k: [v] for k, v in decode.example(path, row["prompt"], row["answer"]).items()})
        expected = greedy_answer(model, processor, example[0])
        got = engine.generate([engine.make_request(row["prompt"], [Path(path).read_bytes()])])[0].text
        assert got == expected, f"engine {got!r} vs training loop {expected!r} for {row['uri']}"
        answers.append(got)
    assert any(answers), "the trained model answers something"


def test_train_cli_refuses_a_missing_start_checkpoint_and_submits_the_same_command(tmp_path):
    import subprocess
    import sys

    from training.cli import submit_argv

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            "--stage",
            "2",
            "--from",
            str(tmp_path / "nope"),
            "--data",
            "m.jsonl",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "no config.json" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    argv = ["train", "--stage", "4", "--submit", "http://h:8265", "--env", "A=1", "--from", "s3://b/c", "--env=B"]
    assert submit_argv(argv) == ["train", "--stage", "4", "--from", "s3://b/c"], "only the local flags are dropped"


def test_demo_reader_becomes_the_default_only_once_it_reads(tmp_path, monkeypatch):
    import runtime.checkpoints as rc

    monkeypatch.setattr(rc, "DEMO_CHECKPOINT", tmp_path)
    assert rc.demo_checkpoint() is None, "no checkpoint there"
    (tmp_path / "config.json").write_text("{}")
    assert rc.demo_checkpoint() is None, "not measured: not the default"
    for exact, default in ((0.02, False), (0.85, True)):
        (tmp_path / "eval.json").write_text(json.dumps({"batch_job": {"cer": 0.1, "exact_match": exact}}))
        assert (rc.demo_checkpoint() == tmp_path) is default, f"exact match {exact}"
    assert "DEMO READER" in rc.demo_banner(tmp_path) and "exact match 0.85" in rc.demo_banner(tmp_path), "banner"
