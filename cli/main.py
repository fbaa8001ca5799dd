"""`infimm-hd` command line: the model commands here; `batch`, `serve` and `train` come from the front ends.

The top of the library's package graph: it imports pipelines/, deployments/ and training/ by name (so
tests/test_layout.py sees those edges); only demo/ (`make demo` runs `batch run` through `main`) and tests import it.

    infimm-hd generate --checkpoint DIR --image PAGE.png --prompt "Transcribe this page."
    infimm-hd make-tiny-checkpoint DIR [--seed N] [--format safetensors|bin]
    infimm-hd convert-checkpoint SRC DST [--shard-gb 5] [--dtype bfloat16]
    infimm-hd plan-memory --gpu-memory 24GiB [--quantize int4] [--table]   (no GPU needed)
    infimm-hd batch run|submit|status|logs|stop ...   (pipelines/cli.py)
    infimm-hd serve ...                               (deployments/cli.py)
    infimm-hd train --stage N ...                     (training/cli.py)

The front ends' CLIs are imported when the parser is built, not at import time: `--help` loads neither torch nor
Ray, and without the [ray] extra their commands are left out instead of failing the model commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from runtime.checkpoints import resolve_checkpoint


def cmd_generate(args) -> int:
    import torch

    from model.engine import Engine, EngineConfig, SamplingParams
    from model.windows import WindowConfig

    checkpoint = resolve_checkpoint(args.checkpoint, random=args.random)
    engine = Engine.from_pretrained(
        checkpoint,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        windows=WindowConfig(max_windows=args.max_windows),
        config=EngineConfig(max_slots=1, quantize=args.quantize, gpu_memory_utilization=args.gpu_memory_utilization),
        prompt_format=args.prompt_format,
    )
    image = Path(args.image).read_bytes()
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    request = engine.make_request(args.prompt, [image], sampling)
    result = engine.generate([request])[0]
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        grid = request.images[0]
        print(
            f"page {grid.width}x{grid.height} -> {grid.rows}x{grid.cols} windows + thumbnail; "
            f"{result.prompt_tokens} prompt tokens, {result.completion_tokens} new ({result.finish_reason})",
            file=sys.stderr,
        )
        print(result.text)
    return 0


def cmd_make_tiny(args) -> int:
    from model.weights import make_tiny_checkpoint

    folder = make_tiny_checkpoint(args.dir, seed=args.seed, preset=args.preset, fmt=args.format)
    print(f"wrote a RANDOM-WEIGHT {args.preset} checkpoint to {folder}")
    return 0


def cmd_convert(args) -> int:
    import torch

    from model.weights import convert_checkpoint

    report = convert_checkpoint(
        args.src, args.dst, shard_gb=args.shard_gb, dtype=getattr(torch, args.dtype) if args.dtype else None
    )
    print(f"converted {args.src} -> {args.dst}\n{report}")
    return 0


def cmd_plan_memory(args) -> int:
    from model.config import InfiMMHDConfig
    from model.memory import fit_table, gb, parse_size, plan_memory

    cfg = InfiMMHDConfig.from_pretrained(args.checkpoint) if args.checkpoint else InfiMMHDConfig.preset(args.preset)
    lengths = dict(
        max_seq_len=args.max_seq_len,
        max_views=args.max_windows + 1,
        max_slots=args.max_slots,
        vit_batch_views=args.vit_batch_views,
        max_prefill_batch=args.max_prefill_batch,
        feature_cache_mb=args.feature_cache_mb,
    )
    if args.table:
        rows = fit_table(cfg, utilization=args.gpu_memory_utilization, **lengths)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'card':>8} {'quantize':>8} {'weights':>10} {'slots':>6} {'ViT batch':>9} {'prefill':>7}")
        for r in rows:
            slots = r["max_slots"] if r["fits"] else "-"
            print(
                f"{r['card_gib']:>4} GiB {r['quantize']:>8} {gb(r['weights']):>10} {slots:>6} "
                f"{r['vit_batch'] if r['fits'] else '-':>9} {r['prefill_batch'] if r['fits'] else '-':>7}"
            )
        return 0
    if not args.gpu_memory:
        raise ValueError("--gpu-memory is required (e.g. 24GiB), or --table for 24/48/80 GiB")
    plan = plan_memory(cfg, parse_size(args.gpu_memory), args.gpu_memory_utilization, quantize=args.quantize, **lengths)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.line())
    if not plan.fits:
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infimm-hd", description="InfiMM-HD batch and online serving")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one question about one page image")
    p.add_argument("--checkpoint", help="official-layout checkpoint folder (default: the demo reader)")
    p.add_argument(
        "--random", action="store_true", help="without --checkpoint: tiny RANDOM weights instead of the demo reader"
    )
    p.add_argument("--image", required=True, help="page image file (PNG, JPEG, TIFF, ...)")
    p.add_argument("--prompt", default="Transcribe the text of this page.", help="the question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=16, help="cap on 448x448 windows per page")
    p.add_argument("--prompt-format", default="vicuna", help="vicuna | vicuna-hf")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_memory_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan-memory", help="what fits a card: slots, ViT batch, prefill batch (no GPU needed)")
    p.add_argument("--gpu-memory", help="the card's memory: 24GiB, 48GB, 81559MiB, ...")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "fp8"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of the card to use")
    p.add_argument("--checkpoint", help="take the model shape from this checkpoint's config.json")
    p.add_argument("--preset", default="infimm-hd-13b", help="model shape without --checkpoint")
    p.add_argument("--max-seq-len", type=int, default=1024, help="prompt + new tokens per slot")
    p.add_argument("--max-windows", type=int, default=16, help="windows per page (slots keep them + the thumbnail)")
    p.add_argument("--max-slots", type=int, default=256, help="upper bound on decode slots")
    p.add_argument("--vit-batch-views", type=int, default=32, help="upper bound on views per ViT forward")
    p.add_argument("--max-prefill-batch", type=int, default=16, help="upper bound on requests prefilled together")
    p.add_argument("--feature-cache-mb", type=int, default=1024, help="the engine's cache of encoded pages")
    p.add_argument("--table", action="store_true", help="every mode at 24, 48 and 80 GiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_memory)

    p = sub.add_parser("make-tiny-checkpoint", help="write a tiny RANDOM-weight checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert-checkpoint", help="official checkpoint -> sharded safetensors + config + tokenizer")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument(
        "--dtype", default=None, help="cast while converting (e.g. bfloat16); default keeps the stored dtype"
    )
    p.set_defaults(func=cmd_convert)

    add_front_end_commands(sub)
    return parser


# What the [ray] extra installs that the front ends' CLIs import: without it their commands are left out.
RAY_EXTRA = ("ray", "pyarrow", "pypdfium2", "fastapi")


def add_front_end_commands(sub: argparse._SubParsersAction) -> None:
    """`batch`, `serve` and `train`: each front end's CLI registers its own commands through `add_commands`."""
    try:
        from pipelines import cli as batch_cli
    except ModuleNotFoundError as e:
        skip_front_end("pipelines.cli", e)
    else:
        batch_cli.add_commands(sub)
    try:
        from deployments import cli as serve_cli
    except ModuleNotFoundError as e:
        skip_front_end("deployments.cli", e)
    else:
        serve_cli.add_commands(sub)
    try:
        from training import cli as train_cli
    except ModuleNotFoundError as e:
        skip_front_end("training.cli", e)
    else:
        train_cli.add_commands(sub)


def skip_front_end(module: str, e: ModuleNotFoundError) -> None:
    if e.name not in RAY_EXTRA:  # a missing module of our own is a bug, not a missing extra
        raise e
    logging.getLogger(__name__).debug("%s unavailable: %s", module, e)


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """--quantize and --gpu-memory-utilization, the same on every command that loads the model."""
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4", "fp8"],
        help="weights: int8 (CPU and GPU), int4 (GPU, cc >= 8.0), fp8 (GPU, cc >= 8.9); see docs/performance.md",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="size slots and the ViT batch to this fraction of the card (the slot count is then an upper bound)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model.weights import CheckpointError

    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad input: a message, not a traceback
        print(f"infimm-hd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
