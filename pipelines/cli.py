"""`infimm-hd batch ...`: run the document batch job here, or submit it to a Ray cluster.

    infimm-hd batch run --input s3://scans/2024/ --output s3://results/2024/ --prompt "Transcribe this page."
    infimm-hd batch submit --address http://HEAD:8265 [--env AWS_ACCESS_KEY_ID ...] [--wait] <the run flags>
    infimm-hd batch status|logs|stop JOB_ID --address http://HEAD:8265

Exit codes (`batch run`, and `batch submit --wait` passes the job's own on):
    0  done: every listed document has its rows
    1  the job failed (an unexpected error: see its log)
    2  refused before any work: bad flags or inputs, an output path that is a file, a missing single --input, a
       pool the cluster can never place
    3  storage stayed unavailable past --io-retry-seconds: the documents (or rows) it kept from us are not in the
       output; the log says how many; rerun the same command to do exactly those
    4  `submit --wait --timeout`: the timeout passed; the job goes on (or was stopped: --stop-on-timeout)

Registered by cli/main.py through `add_commands(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from runtime.local_ray import prepare_local_env

from .rows import LADDER

log = logging.getLogger(__name__)


def _pair(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(",")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 1,4), got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (e.g. 0.1,0.5,1.0), got {text!r}") from None


# (flag, argparse kwargs): shared by `run` and `submit`, and replayed by `submit` as the job's command line.
RUN_OPTIONS: list[tuple[str, dict]] = [
    (
        "--input",
        dict(
            dest="inputs",
            action="append",
            required=True,
            metavar="URI",
            help="s3://bucket/prefix/, a local folder, a glob, or a manifest (.jsonl/.csv/.parquet with uri, "
            "optional prompt and id); repeatable",
        ),
    ),
    ("--output", dict(required=True, metavar="URI", help="output folder, local or s3://bucket/prefix/")),
    (
        "--prompt",
        dict(
            dest="prompts",
            action="append",
            metavar="TEXT",
            help="question asked of every page; repeatable (one row per page and prompt)",
        ),
    ),
    ("--prompts-file", dict(metavar="FILE", help="one prompt per non-empty line")),
    ("--checkpoint", dict(metavar="DIR", help="official-layout checkpoint folder (default: the demo reader)")),
    (
        "--random",
        dict(action="store_true", help="without --checkpoint: tiny RANDOM weights instead of the demo reader"),
    ),
    ("--max-new-tokens", dict(type=int, default=512)),
    ("--dpi", dict(type=int, default=150, help="PDF rasterization resolution")),
    ("--max-pages", dict(type=int, default=1000, help="pages per document; later ones become page_limit rows")),
    ("--max-windows", dict(type=int, default=16, help="cap on 448x448 windows per page")),
    (
        "--max-render-mp",
        dict(type=float, default=12.0, help="megapixels a rendered PDF page may have; larger pages get a lower dpi"),
    ),
    ("--pages-per-task", dict(type=int, default=16, help="longer documents are decoded by several tasks")),
    (
        "--decode-memory-mb",
        dict(type=int, default=1536, help="memory reserved per decode task (measured: docs/batch.md)"),
    ),
    ("--actors", dict(type=_pair, default=(1, 1), metavar="MIN,MAX", help="engine actor pool size (autoscaling)")),
    (
        "--gpus-per-actor",
        dict(
            type=float,
            default=None,
            help="default: 1 if the cluster has GPUs now, else 0 (engine on CPU); give it on "
            "autoscaling clusters whose GPU nodes may be scaled to 0",
        ),
    ),
    ("--cpus-per-actor", dict(type=float, default=1.0)),
    ("--decode-cpus", dict(type=float, default=1.0, help="CPUs reserved per decode task")),
    (
        "--wait-for-resources",
        dict(
            action="store_true",
            help="an autoscaling cluster: wait for nodes when the engine pool does not fit now (default: refuse)",
        ),
    ),
    ("--batch-size", dict(type=int, default=16, help="pages per engine call (they share GPU steps)")),
    ("--max-slots", dict(type=int, default=16, help="sequences the engine decodes together")),
    (
        "--quantize",
        dict(default="none", choices=["none", "int8", "int4", "fp8"], help="engine weights (docs/performance.md)"),
    ),
    (
        "--gpu-memory-utilization",
        dict(type=float, default=None, help="size slots and the ViT batch to this fraction of the GPU"),
    ),
    (
        "--server",
        dict(
            metavar="URL",
            help="send pages to a running InfiMM-HD Serve app (http://HOST:8000/v1; key from INFIMM_API_KEY) instead "
            "of starting engine actors; --actors is then the pool of client workers",
        ),
    ),
    ("--server-model", dict(default="infimm-hd", help="the `model` id the Serve app answers to")),
    (
        "--server-retry-seconds",
        dict(type=float, default=600.0, help="how long one page keeps retrying 503s from saturated replicas"),
    ),
    ("--no-resume", dict(action="store_true", help="delete the earlier parts in --output and start over")),
    ("--s3-endpoint", dict(metavar="URL", help="default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")),
    ("--s3-region", dict(help="default: AWS_REGION / AWS_DEFAULT_REGION")),
    ("--s3-anonymous", dict(action="store_true", help="unsigned requests (public buckets)")),
    ("--io-retries", dict(type=int, default=5, help="attempts per storage request (AWS SDK standard retries)")),
    (
        "--io-retry-seconds",
        dict(
            type=float,
            default=120.0,
            help="how long storage may fail transiently (server down, timeouts, 5xx, throttling) while reads, "
            "listings and writes keep retrying; the clock runs once per outage for the whole job, then the reads left "
            "stop trying, their documents are left for a rerun and the job exits 3",
        ),
    ),
    ("--rows-per-file", dict(type=int, default=5000)),
    ("--flush-seconds", dict(type=float, default=60.0, help="write a part at least this often")),
    ("--ray-progress", dict(action="store_true", help="also show Ray Data's per-stage progress bars")),
    # -- digitization: documents out, PDF text layer, repetition guard (docs/batch.md) --
    (
        "--documents-out",
        dict(
            metavar="URI",
            help="also write one Markdown file per document (pages in order, page markers) and documents.jsonl "
            "(Dolma-style, page spans) here; the document text is the answers to the first prompt",
        ),
    ),
    (
        "--use-pdf-text",
        dict(
            choices=("never", "auto", "always"),
            default="never",
            help="answer PDF pages with their embedded text layer instead of the model: auto = when it is usable "
            "(--pdf-text-min-chars letters/digits, no garbage), always = every PDF page; pdf_text is stored anyway",
        ),
    ),
    ("--pdf-text-min-chars", dict(type=int, default=50, help="letters/digits a usable text layer has (auto)")),
    ("--repetition-penalty", dict(type=float, default=1.0, help="HF/CTRL penalty on tokens already seen (1 = off)")),
    ("--no-repeat-ngram-size", dict(type=int, default=0, help="ban repeating any n-gram of this size (0 = off)")),
    (
        "--no-repetition-guard",
        dict(action="store_true", help="do not stop looping outputs (finish_reason repetition) nor retry them"),
    ),
    (
        "--temperature-ladder",
        dict(
            type=_floats,
            default=LADDER,
            metavar="T1,T2,...",
            help="temperatures of the retries of a looping page (default 0.1,0.3,0.5,0.7,0.9,1.0)",
        ),
    ),
    (
        "--max-attempts",
        dict(
            type=int, default=1 + len(LADDER), help="attempts per page, the first (greedy) one included; 1 = no retry"
        ),
    ),
]
LOCAL_ONLY = ("--prompts-file",)  # submit sends these differently


def add_run_options(p: argparse.ArgumentParser) -> None:
    for flag, kw in RUN_OPTIONS:
        p.add_argument(flag, **kw)


def run_argv(args: argparse.Namespace) -> list[str]:
    """The run flags of a parsed namespace, back as a command line (prompts from --prompts-file inlined)."""
    argv: list[str] = []
    defaults = {flag: kw.get("default") for flag, kw in RUN_OPTIONS}
    for flag, kw in RUN_OPTIONS:
        if flag in LOCAL_ONLY:
            continue
        value = getattr(args, kw.get("dest", flag[2:].replace("-", "_")))
        if flag == "--prompt":
            value = prompts_of(args) or None
        if value is None or value is False or (value == defaults[flag] and flag not in ("--input", "--prompt")):
            continue
        # FLAG=VALUE: a value starting with '-' (an S3 key like `-scan.png`) must not read as a flag
        if kw.get("action") == "store_true":
            argv.append(flag)
        elif kw.get("action") == "append" or flag == "--prompt":
            argv += [f"{flag}={v}" for v in value]
        elif flag == "--actors":
            argv.append(f"{flag}={value[0]},{value[1]}")
        elif flag == "--temperature-ladder":
            argv.append(f"{flag}={','.join(f'{t:g}' for t in value)}")
        else:
            argv.append(f"{flag}={value}")
    return argv


def prompts_of(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def job_config(args: argparse.Namespace):
    from model.windows import WindowConfig
    from runtime.checkpoints import resolve_checkpoint

    from .config import JobConfig
    from .decode import DecodeConfig
    from .generate import GenerateConfig
    from .storage import S3Settings

    return JobConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        prompts=tuple(prompts_of(args)),
        generate=GenerateConfig(
            checkpoint=str(resolve_checkpoint(args.checkpoint, random=args.random)),  # a banner when defaulted
            max_new_tokens=args.max_new_tokens,
            max_slots=args.max_slots,
            quantize=args.quantize,
            gpu_memory_utilization=args.gpu_memory_utilization,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            repetition_guard=not args.no_repetition_guard,
            temperature_ladder=tuple(args.temperature_ladder),
            max_attempts=args.max_attempts,
        ),
        decode=DecodeConfig(
            windows=WindowConfig(max_windows=args.max_windows),
            dpi=args.dpi,
            max_pages=args.max_pages,
            max_render_pixels=int(args.max_render_mp * 1e6),
            pages_per_task=args.pages_per_task,
            use_pdf_text=args.use_pdf_text,
            pdf_text_min_chars=args.pdf_text_min_chars,
        ),
        decode_memory=args.decode_memory_mb * 2**20,
        actors=tuple(args.actors),
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        decode_cpus=args.decode_cpus,
        wait_for_resources=args.wait_for_resources,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        rows_per_file=args.rows_per_file,
        flush_seconds=args.flush_seconds,
        s3=S3Settings.from_env(
            endpoint=args.s3_endpoint,
            region=args.s3_region,
            anonymous=args.s3_anonymous,
            retries=args.io_retries,
            retry_seconds=args.io_retry_seconds,
        ),
        ray_progress=args.ray_progress,
        documents_out=args.documents_out,
        server=server_settings(args),
    )


def server_settings(args: argparse.Namespace):
    import os

    from .replicas import ServerSettings

    if not args.server:
        return None
    return ServerSettings(
        args.server,
        model=args.server_model,
        api_key=os.environ.get("INFIMM_API_KEY") or None,
        retry_seconds=args.server_retry_seconds,
    )


# ---- commands --------------------------------------------------------------------------------------------------------
EXIT_STORAGE = 3
EXIT_TIMEOUT = 4


def cmd_run(args) -> int:
    from .job import JobIncomplete, run_job
    from .storage import StorageUnavailable
    from .summary import format_summary

    if not (args.ray_address or os.environ.get("RAY_ADDRESS")):
        prepare_local_env()  # a private local Ray will be started: keep it on loopback (before Ray is imported)
    # ValueError for bad flags, inputs or a cluster too small (checked before anything is written): cli.main prints
    # it as one line, exit 2
    try:
        summary = run_job(job_config(args), progress=not args.no_progress, ray_address=args.ray_address)
    except (StorageUnavailable, JobIncomplete) as e:
        print(f"infimm-hd: storage unavailable: {e}", file=sys.stderr)
        return EXIT_STORAGE
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"summary     {summary['output'].rstrip('/')}/_summary.json, _summary.png")
    left = summary["run"].get("documents_unavailable", 0)
    if left:
        print(
            f"infimm-hd: {left} documents could not be read (storage unavailable past --io-retry-seconds) and are not "
            "in the output: rerun the same command to do them",
            file=sys.stderr,
        )
        return EXIT_STORAGE
    return 0


def cmd_submit(args) -> int:
    from . import submit

    run_args = run_argv(args)
    job_id = submit.submit(args.address, run_args, submit.parse_env(args.env), args.submission_id)
    print(job_id)
    if not args.wait:
        print(f"follow it with: infimm-hd batch logs {job_id} --address {args.address} --follow", file=sys.stderr)
        return 0
    try:
        status = submit.wait(args.address, job_id, timeout_s=args.timeout)
    except TimeoutError as e:
        if args.stop_on_timeout:
            submit.stop(args.address, job_id)
            print(f"{e}: stopped it (--stop-on-timeout)", file=sys.stderr)
        else:
            print(f"{e}: it goes on; infimm-hd batch stop {job_id} --address {args.address} stops it", file=sys.stderr)
        return EXIT_TIMEOUT
    sys.stdout.write(submit.logs(args.address, job_id))
    print(f"job {job_id}: {status}", file=sys.stderr)
    if status == "SUCCEEDED":
        return 0
    code = submit.status(args.address, job_id).get("driver_exit_code")
    return code if code in (2, EXIT_STORAGE) else 1  # the job's own verdict when it has one


def cmd_status(args) -> int:
    from . import submit

    info = submit.status(args.address, args.job_id)
    print(json.dumps(info, indent=2))
    return 0


def cmd_logs(args) -> int:
    from . import submit

    if not args.follow:
        sys.stdout.write(submit.logs(args.address, args.job_id))
        return 0
    import asyncio

    async def tail():
        async for lines in submit.follow(args.address, args.job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return 0


def cmd_stop(args) -> int:
    from . import submit

    print("stopped" if submit.stop(args.address, args.job_id) else "not running")
    return 0


def add_commands(subparsers) -> None:
    batch = subparsers.add_parser("batch", help="document batch jobs on Ray Data (object storage in, Parquet out)")
    sub = batch.add_subparsers(dest="batch_command", required=True)
    default_address = (
        os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    )

    p = sub.add_parser("run", help="run a batch job with Ray on this machine (or the cluster at --ray-address)")
    add_run_options(p)
    p.add_argument("--ray-address", help="existing Ray cluster (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit the same job to a Ray cluster (Ray Jobs API)")
    add_run_options(p)
    p.add_argument("--address", default=default_address, help="Ray dashboard address, http://HEAD:8265")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="environment variable for the job (KEY alone copies this shell's value); repeatable",
    )
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish, print its logs, exit 0 on success")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="with --wait: stop waiting after this many seconds (exit 4; the job goes on)",
    )
    p.add_argument("--stop-on-timeout", action="store_true", help="with --wait --timeout: stop the job at the timeout")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "status of a submitted job"),
        ("logs", cmd_logs, "logs of a submitted job"),
        ("stop", cmd_stop, "stop a submitted job"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", default=default_address, help="Ray dashboard address, http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)
