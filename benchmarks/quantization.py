"""Accuracy of each quantization mode against fp32, on the CPU, at tiny and golden size.

    python benchmarks/quantization.py [--prompts 16] [--new-tokens 32] [--out results/quantization.json]

For each config (the tiny preset with random weights, seed 0; the golden vectors' checkpoint) and each mode, the same
prompts are run through the fp32 model and the quantized one, each encoding the pages with its own ViT (the ViT is
quantized too). Prompts: the golden greedy cases (d, d_batch) on the golden checkpoint, plus `--prompts` random prompts
with random pages (1x1 and 2x3 grids) on both. Per mode:
* `greedy_identical`: share of generated positions whose token equals fp32's (free-running greedy, no stop token);
  `rows_identical`: share of prompts whose whole output is equal; `first_divergence`: the earliest differing step;
* `teacher_forced_top1`: share of steps where the quantized model's argmax equals fp32's, both fed fp32's tokens
  (no drift after a first difference);
* `max_logit_error` over those teacher-forced logits, and `logit_range` (max - min of fp32's) to read it against.
Modes the CPU cannot run are reported with their refusal; `int4_emulated` runs int4's numerics (asymmetric groups of
128, or the largest of 64/32 that divides a tiny width) through torchao's unpacked int4 tensor, which has a CPU path,
to estimate int4's accuracy before a GPU run. Random weights: near-ties between logits are common, so these shares
are a floor for a trained model, whose top logits are further apart.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import emit, environment  # noqa: E402
from model import InfiMMHD, InfiMMHDConfig, load_pretrained  # noqa: E402
from model.quantize import check_supported, int4_group, model_bytes, quantize_model, torchao  # noqa: E402
from model.weights import init_random_  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
MODES = ("int8", "int4", "fp8", "int4_emulated")


def int4_emulation() -> dict:
    """int4 group-wise asymmetric weights through torchao's IntxWeightOnlyConfig (dequantizes; runs on the CPU)."""
    q = torchao()

    def per_layer(linear):
        group = int4_group(linear.in_features)
        if group is None:
            return None
        return q.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=q.PerGroup(group), mapping_type=q.MappingType.ASYMMETRIC
        )

    return {"vision": q.Int8WeightOnlyConfig(), "text": per_layer}


def prompts(cfg: InfiMMHDConfig, n: int, seed: int) -> list[dict]:
    """Random prompts `[bos, <image>, ...]` with random pages, grouped by grid (rows of a batch share a shape)."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    out = []
    for rows, cols in ((1, 1), (2, 3)):
        k = n // 2
        body = torch.randint(3, cfg.eoc_token_id, (k, 22), generator=g)
        ids = torch.cat((torch.full((k, 1), cfg.text.bos_token_id), torch.full((k, 1), cfg.image_token_id), body), 1)
        pixels = torch.randn(k, 1 + rows * cols, 3, S, S, generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixels": pixels, "grid": (rows, cols)})
    return out


def golden_prompts() -> list[dict]:
    """The golden greedy cases: d (one row) and d_batch (left-padded rows), with their own media recipe."""
    import numpy as np
    from safetensors.torch import load_file

    g = load_file(os.path.join(GOLDEN, "cases.safetensors"))
    px = torch.from_numpy(np.random.RandomState(1002).standard_normal((7, 3, 448, 448)).astype(np.float32))
    d = {"input_ids": g["d.input_ids"], "attention_mask": g["d.attention_mask"], "pixels": px[None], "grid": (2, 3)}
    rows = g["d_batch.input_ids"].shape[0]
    batch = {
        "input_ids": g["d_batch.input_ids"],
        "attention_mask": g["d_batch.attention_mask"],
        "media": g["c.media"].float(),  # given as features (the golden case): only the decoder's quantization shows
        "rows": rows,
    }
    return [d, batch]


@torch.inference_mode()
def media_of(model: InfiMMHD, p: dict) -> torch.Tensor:
    if "media" in p:
        return p["media"]
    rows, cols = p["grid"]
    return torch.stack([model.build_media(model.encode_views(px), rows, cols) for px in p["pixels"]])[:, None]


@torch.inference_mode()
def run(model: InfiMMHD, items: list[dict], new_tokens: int, forced: list[torch.Tensor] | None = None):
    """Greedy ids per item; with `forced` (fp32's ids) also the teacher-forced logits of each generated step."""
    ids_out, logits_out = [], []
    for i, p in enumerate(items):
        media = media_of(model, p)
        ids = model.generate(p["input_ids"], p["attention_mask"], media, new_tokens, stop_token_ids=[])
        ids_out.append(ids)
        ref = forced[i] if forced is not None else ids
        full = torch.cat((p["input_ids"], ref), 1)
        mask = torch.cat((p["attention_mask"], torch.ones_like(ref)), 1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(full, mask, media, position_ids)[:, p["input_ids"].shape[1] - 1 : -1]  # (B, new, vocab)
        logits_out.append(logits)
    return ids_out, logits_out


def compare(ref_ids, ref_logits, ids, logits) -> dict:
    same = total = rows_same = rows = 0
    first = None
    top1 = steps = 0
    err = rng = 0.0
    for r_ids, r_log, q_ids, q_log in zip(ref_ids, ref_logits, ids, logits, strict=True):
        eq = r_ids == q_ids
        same += int(eq.sum())
        total += eq.numel()
        rows_same += int(eq.all(1).sum())
        rows += eq.shape[0]
        for row in eq:
            bad = (~row).nonzero()
            if len(bad):
                first = int(bad[0]) if first is None else min(first, int(bad[0]))
        top1 += int((r_log.argmax(-1) == q_log.argmax(-1)).sum())
        steps += r_log.shape[0] * r_log.shape[1]
        err = max(err, float((r_log - q_log).abs().max()))
        rng = max(rng, float(r_log.max() - r_log.min()))
    return {
        "greedy_identical": same / total,
        "tokens": total,
        "rows_identical": rows_same / rows,
        "rows": rows,
        "first_divergence": first,
        "teacher_forced_top1": top1 / steps,
        "max_logit_error": err,
        "logit_range": rng,
    }


def evaluate(name: str, fp32: InfiMMHD, items: list[dict], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    ref_ids, ref_logits = run(fp32, items, new_tokens)
    out: dict = {"fp32_bytes": model_bytes(fp32), "fp32_seconds": time.perf_counter() - t0}
    for mode in MODES:
        real = mode.removesuffix("_emulated")
        try:
            if mode == real:
                check_supported(mode, "cpu", torch.float32)
        except ValueError as e:
            out[mode] = {"refused": str(e)}
            continue
        model = copy.deepcopy(fp32)
        layers = quantize_model(model, real, parts=int4_emulation() if mode != real else None)
        t0 = time.perf_counter()
        ids, logits = run(model, items, new_tokens, forced=ref_ids)
        out[mode] = {
            **compare(ref_ids, ref_logits, ids, logits),
            "quantized_layers": layers,
            "bytes": model_bytes(model),
            "seconds": time.perf_counter() - t0,
        }
        print(f"[quantization] {name} {mode}: {out[mode]['greedy_identical']:.4f} identical", file=sys.stderr)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="random prompts per config (half 1x1, half 2x3 pages)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--configs", default="tiny,golden")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result: dict = {"benchmark": "quantization", "device": "cpu", "args": vars(args), "environment": environment()}
    for name in args.configs.split(","):
        if name == "golden":
            model = load_pretrained(GOLDEN)
            items = golden_prompts() + prompts(model.config, args.prompts, seed=1)
        else:
            model = InfiMMHD(InfiMMHDConfig.preset(name)).eval()
            init_random_(model, seed=0)
            items = prompts(model.config, args.prompts, seed=1)
        result[name] = evaluate(name, model, items, args.new_tokens)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
