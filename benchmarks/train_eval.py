"""How well a trained checkpoint reads: CER and exact match on held-out synthetic pages of each layout, through the
engine directly, the batch job (`pipelines.job.run_job` on the manifest, Parquet out) and the service (streamed chat
completions with the official `openai` client against the Serve app on 127.0.0.1), plus the training curves.

    python benchmarks/train_eval.py [--checkpoint checkpoints/demo-reader] [--layouts word-fixed,word-random]
                                    [--heldout MANIFEST] [--out eval.json]

Each layout's held-out set is generated with seed 12345 (the training corpus uses seed 0); --heldout replaces the
first layout's. CER = Levenshtein distance / answer length, averaged over pages; exact = answer matches after
stripping whitespace. Writes JSON (the first layout's figures at the top level, every layout under "layouts") and a
PNG next to it with every stage's loss and diagnostics when the checkpoint has `training_curve.jsonl`.
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

    from pipelines.cluster import ensure_ray
    from pipelines.config import JobConfig
    from pipelines.generate import GenerateConfig
    from pipelines.job import run_job

    ensure_ray()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        generate = GenerateConfig(checkpoint=str(checkpoint), max_new_tokens=max_new_tokens)
        run_job(JobConfig(inputs=(str(manifest),), output=out, generate=generate), progress=False)
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


def eval_service(checkpoint: Path, rows: list[dict], base: Path, max_new_tokens: int) -> tuple[dict, list[str]]:
    """The pages as streamed chat completions (the official `openai` client) against our Serve app on 127.0.0.1."""
    import base64
    import socket

    import openai
    from ray import serve

    from deployments.app import compose
    from deployments.config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeArgs
    from pipelines.cluster import ensure_ray

    ensure_ray()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = compose(
        ServeArgs(checkpoint=str(checkpoint), device="cpu", max_slots=16),
        {
            MODEL_DEPLOYMENT: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}},
            INGRESS_DEPLOYMENT: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
        },
    )
    serve.run(app, name="train-eval", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=5)
    texts = []
    t0 = time.perf_counter()
    try:
        for r in rows:
            url = "data:image/png;base64," + base64.b64encode((base / r["uri"]).read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": r["prompt"]}]
            stream = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_new_tokens,
                temperature=0,
                stream=True,
            )
            texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    finally:
        serve.shutdown()
    out = score([(r["answer"], t) for r, t in zip(rows, texts, strict=True)])
    return {**out, "seconds": time.perf_counter() - t0}, texts


# What the PNG draws per stage beside the loss: (history key, axis title)
DIAGNOSTICS = (
    ("heldout_exact", "held-out exact match (answer stages)"),
    ("heldout_word_accuracy", "held-out word accuracy (vit)"),
    ("image_gap", "loss(shuffled images) - loss(own)"),
    ("attended_tokens", "image tokens attended (exp entropy)"),
    ("attn_gates", "tanh(attention gate)"),
    ("media_rms", "media feature rms"),
)


def plot_curve(history: list[dict], png: Path) -> None:
    """The loss of every stage back to back, and under it the diagnostics (training/diagnostics.py) per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 2, figsize=(11, 11))
    stages, offsets, offset = [], {}, 0
    for h in history:
        if h["stage"] not in offsets:
            stages.append(h["stage"])
            offsets[h["stage"]] = offset
        offset = max(offset, offsets[h["stage"]] + h["step"])
    loss_ax, *diag_axes = axes.flat[:7]
    colors = {stage: f"C{i}" for i, stage in enumerate(stages)}  # one colour per stage in every panel
    for stage in stages:
        hs = [h for h in history if h["stage"] == stage and "loss" in h]
        xs = [offsets[stage] + h["step"] for h in hs]
        loss_ax.plot(xs, [h["loss"] for h in hs], color=colors[stage], label=f"stage {stage}")
    loss_ax.set_title("training loss (per stage's objective)")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=7)
    for ax, (key, title) in zip(diag_axes, DIAGNOSTICS, strict=True):
        for stage in stages:
            hs = [h for h in history if h["stage"] == stage and key in h]
            if hs:
                ys = [sum(h[key]) / len(h[key]) if isinstance(h[key], list) else h[key] for h in hs]
                xs = [offsets[stage] + h["step"] for h in hs]
                ax.plot(xs, ys, marker=".", color=colors[stage], label=f"stage {stage}")
        ax.set_title(title + (" (mean over blocks)" if key in ("attended_tokens", "attn_gates") else ""))
        if key == "attended_tokens":
            ax.set_yscale("log")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step (stages back to back)", fontsize=7)
    axes.flat[-1].axis("off")
    fig.suptitle("demo reader: pretraining stand-ins + InfiMM-HD's four stages, tiny presets, synthetic pages")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


# Held-out page sets by layout (training.corpus settings; seed 12345 is never used for training).
LAYOUTS = {
    "word-fixed": dict(kinds=("word",), layout="fixed", jitter=4),
    "word-random": dict(kinds=("word",), layout="random", font_size=(28, 44)),
    "lines-random": dict(kinds=("lines",), layout="random", font_size=(20, 28)),
    "word-multiwindow": dict(kinds=("word",), layout="random", width=(400, 560), aspect=(0.8, 1.3), font_size=(36, 48)),
}


def evaluate(a, manifest: Path) -> dict:
    """One held-out set through the engine, the batch job and the service."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    result = {"pages": len(rows)}
    result["engine"], texts = eval_engine(a.checkpoint, rows, manifest.parent, a.max_new_tokens)
    print(f"engine:    CER {result['engine']['cer']:.3f}  exact {result['engine']['exact_match']:.3f}", flush=True)
    if not a.skip_batch:
        result["batch_job"], batch_texts = eval_batch_job(a.checkpoint, manifest, rows, a.max_new_tokens)
        print(f"batch job: CER {result['batch_job']['cer']:.3f}  exact {result['batch_job']['exact_match']:.3f}")
        result["batch_equals_engine"] = sum(batch_texts[r["uri"]] == t for r, t in zip(rows, texts, strict=True))
    if not a.skip_service:
        result["service"], service_texts = eval_service(a.checkpoint, rows, manifest.parent, a.max_new_tokens)
        print(f"service:   CER {result['service']['cer']:.3f}  exact {result['service']['exact_match']:.3f}")
        result["service_equals_engine"] = sum(x == t for x, t in zip(service_texts, texts, strict=True))
    result["examples"] = [{"answer": r["answer"], "engine": t} for r, t in zip(rows[:12], texts, strict=False)]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument(
        "--heldout", type=Path, help="manifest (uri, prompt, answer) for the first layout instead of generating it"
    )
    p.add_argument(
        "--layouts", default="word-fixed", help=f"comma list of {', '.join(LAYOUTS)}; the first is the headline"
    )
    p.add_argument("--n", type=int, default=200, help="pages of each generated held-out set")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--skip-batch", action="store_true", help="no batch job")
    p.add_argument("--skip-service", action="store_true", help="no Serve app")
    p.add_argument("--out", type=Path, default=Path("train_eval.json"))
    a = p.parse_args(argv)

    layouts = [x for x in a.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown or not layouts:
        p.error(f"--layouts: unknown {unknown}; choose from {sorted(LAYOUTS)}")
    result = {"checkpoint": str(a.checkpoint), "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(layouts):
            if a.heldout is not None and i == 0:
                manifest, where = a.heldout, str(a.heldout)
            else:
                from training.corpus import CorpusConfig, generate

                cfg = CorpusConfig(n=a.n, seed=12345, **LAYOUTS[name])
                manifest = generate(Path(tmp) / name, cfg)
                where = f"generated: {a.n} pages, seed 12345, {LAYOUTS[name]}"
            print(f"-- {name}: {where}", flush=True)
            out = evaluate(a, manifest)
            result["layouts"][name] = {"heldout": where, **out}
            if i == 0:  # the demo task's figures, where runtime/checkpoints.py reads them
                result.update({"heldout": where, **out})
    curve = a.checkpoint / "training_curve.jsonl"
    if curve.exists():
        history = [json.loads(line) for line in curve.read_text().splitlines()]
        png = a.out.with_suffix(".png")
        plot_curve(history, png)
        result["curve_png"] = str(png)
        result["final_loss"] = [h for h in history if "loss" in h][-1]["loss"]
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
