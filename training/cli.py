"""`infimm-hd train ...`: one stage of the recipe on Ray Train, and the synthetic corpus generator.

    infimm-hd train --stage 1 --init demo --data corpus/manifest.jsonl --output runs/s1
    infimm-hd train --stage 2 --from runs/s1 --data corpus/manifest.jsonl --output runs/s2
    infimm-hd train --stage 4 --preset full --from s3ckpt/ --data s3://corpus/m.parquet --output out --workers 8 --gpu

Registered by the root CLI through `add_commands(subparsers)`, like pipelines/cli.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train one stage of InfiMM-HD's recipe (1 PT, 2 CPT, 3 DRA, 4 IFT) on Ray Train")
    p.add_argument(
        "--stage",
        required=True,
        choices=["vit", "lm", "0", "1", "2", "3", "4"],
        help="vit / lm: stand-ins for EVA-CLIP and Vicuna (tiny preset, run first); 0 JOINT: tiny-from-scratch only",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "full", "tiny-from-scratch"],
        help="stage settings (full = the paper's; tiny-from-scratch adds stage 0, a joint warm-up NOT in the paper)",
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--from", dest="init", metavar="DIR", help="the previous stage's official-layout checkpoint")
    start.add_argument("--init", dest="fresh", choices=["demo", "tiny"], help="start from freshly initialised weights")
    p.add_argument("--data", action="append", required=True, metavar="MANIFEST", help=".jsonl/.csv/.parquet, s3 ok")
    p.add_argument("--output", required=True, metavar="DIR", help="where the stage's checkpoint is written")
    p.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    p.add_argument("--warmup", type=int)
    p.add_argument("--batch", type=int, help="global batch")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-windows", type=int, help="windows per page in DRA/IFT (serving's default is 16)")
    p.add_argument("--image-size", type=int, help="the stage's ViT input size (the checkpoint's is interpolated to it)")
    p.add_argument("--patch-lr-mult", type=float, help="learning-rate multiplier of the ViT patch embedding")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-text-len", type=int)
    p.add_argument("--gate-init", type=float, default=0.5, help="tanh gates at init (--init only; official: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="fsdp: full size on GPU workers")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="MANIFEST",
        help="held-out pages for the "
        "diagnostics logged every --diag-every steps (image gap, attention spread, gates, exact match)",
    )
    p.add_argument("--eval-n", type=int, default=32, help="held-out examples the diagnostics use")
    p.add_argument("--diag-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-failures", type=int, default=2, help="worker failures survived (Ray Train FailureConfig)")
    p.add_argument("--storage", help="Ray Train storage path (local or s3://); default: next to --output")
    p.add_argument("--run-name", help="Ray Train run name; rerunning with the same name and storage resumes")
    p.add_argument("--address", default=None, help="Ray cluster address to drive from here (default: a local Ray)")
    p.add_argument(
        "--submit",
        metavar="DASHBOARD",
        help="instead: submit this same command as a Ray job (e.g. http://HEAD:8265), like `batch submit`; "
        "paths are then read on the cluster (use s3:// or shared storage); follow it with `batch status|logs`",
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="with --submit: job env var")
    p.set_defaults(func=cmd_train)


def submit_argv(argv: list[str]) -> list[str]:
    """The train command line without the flags that only mean something here (--submit, --env)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--submit", "--env"):
            skip = True
            continue
        if a.startswith(("--submit=", "--env=")):
            continue
        out.append(a)
    return out


def cmd_submit(args) -> int:
    import shlex

    from pipelines import submit

    argv = submit_argv(sys.argv[1:])
    entrypoint = "python -m cli " + " ".join(shlex.quote(a) for a in argv)
    job_id = submit.client(args.submit).submit_job(
        entrypoint=entrypoint,
        runtime_env=submit.runtime_env(submit.parse_env(args.env)),
        metadata={"app": "infimm-hd-train"},
    )
    print(job_id)
    return 0


def fresh_checkpoint(kind: str, folder: Path, image_size: int, seed: int, gate: float) -> Path:
    """Write a freshly initialised official-layout checkpoint (the input of stage 1 when nothing is pretrained)."""
    import tempfile

    from model.config import InfiMMHDConfig, VisionConfig
    from model.tokenizer import save_tiny_tokenizer

    from .modeling import demo_config, init_model, save_checkpoint

    if kind == "demo":
        cfg = demo_config(image_size)
    else:
        tiny = InfiMMHDConfig.preset("tiny")
        cfg = tiny.replace(vision=VisionConfig(**{**tiny.vision.__dict__, "image_size": image_size}))
    with tempfile.TemporaryDirectory() as tok:
        save_tiny_tokenizer(tok, base_vocab=cfg.eoc_token_id)
        return save_checkpoint(init_model(cfg, seed, gate), folder, tok, extra={"init": kind, "seed": seed})


def cmd_train(args) -> int:
    if args.submit:
        return cmd_submit(args)
    from .loop import RunSpec, run_stage
    from .stages import stage_spec

    spec = stage_spec(
        args.stage,
        args.preset,
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        lr=args.lr,
        min_lr=args.min_lr,
        grad_accum=args.grad_accum,
        grad_checkpointing=args.grad_checkpointing,
        max_text_len=args.max_text_len,
        patch_lr_mult=args.patch_lr_mult,
        image_size=args.image_size,
        max_windows=args.max_windows,
    )
    output = Path(args.output)
    init = args.init
    if args.fresh:
        init = str(
            fresh_checkpoint(
                args.fresh, output.with_name(output.name + "-init"), spec.image_size, args.seed, args.gate_init
            )
        )
    elif not (Path(init) / "config.json").exists():
        raise FileNotFoundError(f"--from {init}: no config.json there (is it a stage output?)")
    run = RunSpec(
        spec=spec,
        init=str(Path(init).resolve()),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        threads=args.threads,
        strategy=args.strategy,
        eval_data=[m if "://" in m else str(Path(m).resolve()) for m in args.eval_data],  # workers run elsewhere
        eval_n=args.eval_n,
        diag_every=args.diag_every,
    )
    _ensure_ray(args.address)
    print(
        f"stage {spec.stage} {spec.name}: {spec.policy}; {spec.steps} steps, batch {spec.batch}, lr {spec.lr}",
        file=sys.stderr,
    )
    metrics = run_stage(
        run,
        args.data,
        output,
        workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage=args.storage,
        run_name=args.run_name,
        max_failures=args.max_failures,
    )
    print(json.dumps({"output": str(output), **metrics}))
    return 0


def _ensure_ray(address: str | None) -> None:
    if address:
        import ray

        if not ray.is_initialized():
            ray.init(address=address)
        return
    from runtime.local_ray import prepare_local_env

    env = prepare_local_env()  # loopback only for a local Ray; before `import ray`
    if "OMP_WAIT_POLICY" in os.environ:  # workers inherit a passive OpenMP wait (spinning collapses on shared cores)
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    import ray

    for attempt in range(3):  # a raylet gets 30 s to come up; on a machine under heavy load it sometimes needs more
        if ray.is_initialized():
            return
        try:
            ray.init(
                address="local", include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env}
            )
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a node that timed out starting
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            log.warning("local Ray did not start in time (%s); retrying", e)
            ray.shutdown()
