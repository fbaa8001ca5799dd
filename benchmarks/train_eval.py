"""How well a trained checkpoint reads: CER and exact match on held-out synthetic pages, through the batch job
(`pipelines.job.run_job` on the manifest, Parquet out) and through the engine directly, plus the training curve.

    python benchmarks/train_eval.py [--checkpoint checkpoints/demo-reader] [--heldout MANIFEST] [--out eval.json]

Without --heldout it generates the demo task's held-out set (seed 12345, never used for training: the training corpus
uses seed 0). CER = Levenshtein distance / answer length, averaged over pages; exact = answer matches after stripping
whitespace. Writes JSON (and the training curve PNG next to it when the checkpoint has `training_curve.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-reader"


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(pairs: list[tuple[str, str]]) -> dict:
    """(expected, got) pairs -> mean CER (capped at 1 per page) and exact-match rate."""
    cers = [min(1.0, edit_distance(g.strip(), e) / max(1, len(e))) for e, g in pairs]
    exact = [g.strip() == e for e, g in pairs]
    return {"pages": len(pairs), "cer": sum(cers) / len(pairs), "exact_match": sum(exact) / len(pairs)}


def eval_engine(checkpoint: Path, rows: list[dict], base: Path, max_new_tokens: int) -> tuple[dict, list[str]]:
    from model.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(checkpoint, config=EngineConfig(max_slots=16))
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    requests = [engine.make_request(r["prompt"], [(base / r["uri"]).read_bytes()], sampling) for r in rows]
    texts = [res.text for res in engine.generate(requests)]
    out = score([(r["answer"], t) for r, t in zip(rows, texts, strict=True)])
    return {**out, "seconds": time.perf_counter() - t0}, texts


def eval_batch_job(checkpoint: Path, manifest: Path, rows: list[dict], max_new_tokens: int) -> tuple[dict, dict]:
    import pyarrow.parquet as pq

    from pipelines.job import JobConfig, ensure_ray, run_job

    ensure_ray()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_job(
            JobConfig(inputs=(str(manifest),), output=out, checkpoint=str(checkpoint), max_new_tokens=max_new_tokens),
            progress=False,
        )
        seconds = time.perf_counter() - t0
        table = pq.read_table(out).to_pylist()
    by_name = {Path(r["source_uri"]).name: r for r in table}
    missing = [r["uri"] for r in rows if Path(r["uri"]).name not in by_name]
    if missing:
        raise RuntimeError(f"the batch job wrote no row for {len(missing)} pages, e.g. {missing[:3]}")
    texts = {r["uri"]: by_name[Path(r["uri"]).name]["text"] or "" for r in rows}
    out = score([(r["answer"], texts[r["uri"]]) for r in rows])
    errors = sum(1 for r in table if r.get("error_type"))
    return {**out, "seconds": seconds, "error_rows": errors}, texts


def plot_curve(history: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for stage in sorted({h["stage"] for h in history}):
        hs = [h for h in history if h["stage"] == stage]
        ax.plot([offset + h["step"] for h in hs], [h["loss"] for h in hs], label=f"stage {stage}")
        offset += hs[-1]["step"]
    ax.set_xlabel("optimizer step (stages back to back)")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("demo reader: InfiMM-HD recipe, tiny presets, synthetic pages")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--heldout", type=Path, help="manifest with uri, prompt, answer (default: generate the demo's)")
    p.add_argument("--n", type=int, default=200, help="pages of the generated held-out set")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--skip-batch", action="store_true", help="engine only")
    p.add_argument("--out", type=Path, default=Path("train_eval.json"))
    a = p.parse_args(argv)

    tmp = None
    if a.heldout is None:
        from training.corpus import CorpusConfig, generate

        tmp = tempfile.TemporaryDirectory()
        a.heldout = generate(tmp.name, CorpusConfig(n=a.n, seed=12345, kinds=("word",), layout="fixed", jitter=4))
    rows = [json.loads(line) for line in a.heldout.read_text().splitlines() if line.strip()]
    heldout = str(a.heldout) if tmp is None else f"generated: {a.n} pages, seed 12345, word, fixed layout, jitter 4"
    result = {"checkpoint": str(a.checkpoint), "heldout": heldout, "pages": len(rows)}
    result["engine"], texts = eval_engine(a.checkpoint, rows, a.heldout.parent, a.max_new_tokens)
    print(f"engine:    CER {result['engine']['cer']:.3f}  exact {result['engine']['exact_match']:.3f}", flush=True)
    if not a.skip_batch:
        result["batch_job"], batch_texts = eval_batch_job(a.checkpoint, a.heldout, rows, a.max_new_tokens)
        print(f"batch job: CER {result['batch_job']['cer']:.3f}  exact {result['batch_job']['exact_match']:.3f}")
        result["batch_equals_engine"] = sum(batch_texts[r["uri"]] == t for r, t in zip(rows, texts, strict=True))
    result["examples"] = [{"answer": r["answer"], "engine": t} for r, t in zip(rows[:12], texts, strict=False)]
    curve = a.checkpoint / "training_curve.jsonl"
    if curve.exists():
        history = [json.loads(line) for line in curve.read_text().splitlines()]
        png = a.out.with_suffix(".png")
        plot_curve(history, png)
        result["curve_png"] = str(png)
        result["final_loss"] = history[-1]["loss"]
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
