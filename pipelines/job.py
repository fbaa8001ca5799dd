"""The document batch job: list -> decode on CPU -> engine on a GPU actor pool -> Parquet parts, resumable.

    sources (driver: list inputs, drop what is done)
      -> SplitDocuments    Ray tasks: read, count pages, long documents -> page ranges      (pipelines/decode.py)
      -> DecodePages       Ray tasks (CPU), one per range: render PDF pages, decode images, cut windows
      -> GenerateStage     Ray actor pool, num_gpus per actor, autoscaling MIN..MAX           (pipelines/generate.py)
      -> PartWriter        the driver, streaming: dedupe by id, write `part-<run>-<n>.parquet` files

Why the driver writes the Parquet and not `Dataset.write_parquet`: result rows are small (text and a few numbers),
and writing them where they arrive gives exactly-once output (every id is checked against all ids written so far),
atomic parts (a local part is renamed into place; an S3 object appears only when its upload completes), and the
timeline the progress bar and the summary plot need. Ray Data's own checkpointing (`CheckpointConfig`) does not fit:
it needs an id column that exists in the input and survives every operator, and here one input document fans out
into pages x prompts whose ids are known only after decoding.

Resume: the output folder is the manifest of completed work. A rerun reads the `id` column of its `*.parquet` parts;
single-page documents whose rows are all there are not read again; multi-page documents are opened (to count pages)
but only missing pages are rendered and generated. `--no-resume` deletes the earlier parts first.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from runtime.local_ray import prepare_local_env

from .decode import PDF_TEXT_MODES, DecodeConfig, DecodePages, SplitDocuments
from .documents_out import write_documents
from .generate import GenerateConfig, GenerateStage
from .output import PartWriter, output_parts, read_done_ids, record_settings
from .plan import document_prompts, plan_documents
from .progress import Progress
from .replicas import ServerPagesStage, ServerSettings
from .rows import LADDER
from .storage import S3Settings, SharedClock, Storage, StorageUnavailable, list_sources

log = logging.getLogger(__name__)

# settings that change what a row contains: a resumed run with other values mixes two kinds of rows
RESULT_SETTINGS = (
    "checkpoint",
    "quantize",
    "max_new_tokens",
    "max_windows",
    "dpi",
    "use_pdf_text",
    "pdf_text_min_chars",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "repetition_guard",
    "temperature_ladder",
    "max_attempts",
)


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...]
    output: str
    prompts: tuple[str, ...] = ()  # for documents without a manifest prompt
    checkpoint: str = ""
    max_new_tokens: int = 512
    dpi: int = 150
    max_pages: int = 1000
    max_windows: int = 16
    actors: tuple[int, int] = (1, 1)  # GPU-stage actor pool, autoscaling between these
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0 (engine on CPU)
    cpus_per_actor: float = 1.0
    batch_size: int = 16  # pages per engine call (they share ViT batches and decode steps)
    max_slots: int = 16  # sequences the engine decodes together (an upper bound with gpu_memory_utilization)
    quantize: str = "none"  # engine weights: none | int8 | int4 | fp8
    gpu_memory_utilization: float | None = None  # size the engine to this fraction of its GPU
    decode_cpus: float = 1.0  # per decode task
    # Memory reserved per decode task: what a task's worker process peaked at (USS, what Ray Data compares with the
    # reservation) with the default settings, over the page kinds of benchmarks/decode_memory.py, plus a quarter.
    # It also keeps decoding in its own tasks on CPU-only clusters: with identical resource asks Ray Data would fuse
    # it into the engine actors.
    decode_memory: int = 1536 * 2**20
    max_render_pixels: int = 12_000_000  # a rendered PDF page is at most this many pixels (dpi lowered beyond)
    pages_per_task: int = 16  # longer documents are split into decode tasks of this many pages
    resume: bool = True
    rows_per_file: int = 5000
    flush_seconds: float = 60.0  # at most this much finished work is lost to a hard kill
    s3: S3Settings = field(default_factory=S3Settings)
    torch_threads: int | None = None  # CPU engine threads per actor (default: cpus_per_actor)
    ray_progress: bool = False  # Ray Data's own per-operator progress bars
    # A pool the cluster cannot place is refused up front; with this, waited for (an autoscaling cluster adds nodes).
    wait_for_resources: bool = False
    # -- digitization: PDF text layer, documents out, retries --
    documents_out: str | None = None  # folder for one text file per document + documents.jsonl (documents_out.py)
    use_pdf_text: str = "never"  # "never" | "auto" | "always": answer PDF pages with their text layer (decode.py)
    pdf_text_min_chars: int = 50  # letters/digits a text layer needs to count as usable ("auto")
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_guard: bool = True  # loops end with finish_reason "repetition" and are retried up the ladder
    temperature_ladder: tuple[float, ...] = LADDER
    max_attempts: int = 1 + len(LADDER)
    # Pages to a running Serve app of ours instead of engine actors (pipelines/replicas.py); `actors` is then the pool
    # of light client workers, `checkpoint` the one the replicas serve (window size, `model` column)
    server: ServerSettings | None = None

    def __post_init__(self):
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ValueError(f"--actors MIN,MAX needs 1 <= MIN <= MAX, got {lo},{hi}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")
        if not self.inputs:
            raise ValueError("give at least one --input")
        if self.rows_per_file < 1 or self.flush_seconds < 0:
            raise ValueError("--rows-per-file must be >= 1 and --flush-seconds >= 0")
        if self.use_pdf_text not in PDF_TEXT_MODES:
            raise ValueError(f"--use-pdf-text must be one of {', '.join(PDF_TEXT_MODES)}, got {self.use_pdf_text!r}")
        if self.max_attempts < 1 or (self.max_attempts > 1 and not self.temperature_ladder):
            raise ValueError("--max-attempts must be >= 1, and retries need a non-empty --temperature-ladder")
        if any(t < 0 for t in self.temperature_ladder) or self.repetition_penalty <= 0:
            raise ValueError("--temperature-ladder values must be >= 0 and --repetition-penalty > 0")


# ---- the job ---------------------------------------------------------------------------------------------------------
def ensure_ray(address: str | None = None) -> None:
    """Use the Ray this process already has; else connect to `address` / RAY_ADDRESS (a cluster, or the driver of a
    submitted job); else start a private local one. Never auto-attach to some other local cluster."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray's variables go into this process before `import ray` (Ray reads the loopback setting at import);
    # a driver joining a cluster never gets them.
    local_env = None if address else prepare_local_env()
    import ray

    if address:  # no runtime_env here: a submitted job's own (working_dir, env_vars) must not be contradicted
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": local_env})


class JobIncomplete(RuntimeError):
    """Finished rows could not be written: storage stayed down past the retry budget (the CLI exits 3)."""


def resolve_resources(config: JobConfig) -> JobConfig:
    """Fill in what depends on the cluster (GPUs per actor when not given, CPU threads) and refuse a pool that can
    never be placed on it (ValueError, with the numbers), unless `wait_for_resources` (an autoscaling cluster, e.g.
    KubeRay scaling its GPU group from 0, adds nodes on demand): then only a warning."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = config.gpus_per_actor
    if gpus is None:  # what the cluster has right now; autoscaling clusters should pass --gpus-per-actor
        have = sum(n.get("GPU", 0) for n in nodes)
        gpus = 1.0 if have > 0 else 0.0
        log.info("--gpus-per-actor not given: %s (the cluster has %s GPUs now)", gpus, have)
    config = replace(config, gpus_per_actor=gpus)
    problem = placement_problem(config, nodes)
    if problem and not config.wait_for_resources:
        raise ValueError(f"{problem}; lower --actors MIN, --cpus-per-actor or --decode-cpus, or --wait-for-resources")
    if problem:
        log.warning("%s: waiting for the cluster to grow (--wait-for-resources)", problem)
    threads = config.torch_threads or (max(1, int(config.cpus_per_actor)) if gpus == 0 else None)
    return replace(config, torch_threads=threads)


def placement_problem(config: JobConfig, nodes: list[dict]) -> str | None:
    """None when the engine pool's MIN actors and then one split task (1 CPU) and one decode task fit on these nodes
    (their total resources, first fit: one actor or task runs on one node), else what does not fit, with the numbers.
    Ray Data starts the MIN actors before it decodes anything, so a job whose tasks have no room left waits forever."""
    lo = config.actors[0]
    actor = {"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor or 0.0}
    decode = {"CPU": config.decode_cpus, "memory": float(config.decode_memory)}
    free = [{k: float(n.get(k, 0)) for k in ("CPU", "GPU", "memory")} for n in nodes]

    def place(ask: dict) -> bool:
        for node in free:
            if all(node[k] >= v for k, v in ask.items()):
                for k, v in ask.items():
                    node[k] -= v
                return True
        return False

    placed = 0
    while placed < lo and place(actor):
        placed += 1
    after_actors = [dict(n) for n in free]
    splits = placed == lo and place({"CPU": 1.0})  # the split task (Ray's default ask), short, before any decode
    free[:] = after_actors
    decodes = placed == lo and place(decode)
    if splits and decodes:
        return None
    total = {k: sum(float(n.get(k, 0)) for n in nodes) for k in ("CPU", "GPU", "memory")}
    need_cpu = lo * actor["CPU"] + decode["CPU"]
    need_gpu = lo * actor["GPU"]
    return (
        f"the cluster cannot run this job: {lo} engine actor(s) x ({actor['CPU']:g} CPU, {actor['GPU']:g} GPU) + one "
        f"decode task ({decode['CPU']:g} CPU, {decode['memory'] / 2**20:.0f} MiB) need {need_cpu:g} CPUs and "
        f"{need_gpu:g} GPUs; its {len(nodes)} node(s) have {total['CPU']:g} CPUs, {total['GPU']:g} GPUs, "
        f"{total['memory'] / 2**30:.1f} GiB (placed {placed} of {lo} actors"
        + (")" if placed < lo else ", no room for a decode task)" if splits else ", no free CPU for the split task)")
    )


def build_dataset(records: pa.Table, config: JobConfig, storage: Storage, generate: GenerateConfig):
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = config.ray_progress
    if config.server is not None:  # running replicas answer: client workers (they wait on HTTP), no engine
        return decoded_pages(records, config, storage).map_batches(
            ServerPagesStage,
            fn_constructor_args=(config.server, generate),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
            num_cpus=0.25,
        )
    return decoded_pages(records, config, storage).map_batches(
        GenerateStage,
        fn_constructor_args=(generate,),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
        **_cpu_engine_args(config),
    )


def decoded_pages(records: pa.Table, config: JobConfig, storage: Storage):
    """Sources -> split into decode tasks -> one block per task -> decoded pages (the Dataset before the engine)."""
    import ray

    table = records  # SOURCE_SCHEMA, from plan_job
    # Many small input blocks: documents spread over split tasks instead of queueing behind one.
    per_block = max(1, -(-len(records) // 1000))
    blocks = [table.slice(i, per_block) for i in range(0, len(records), per_block)] or [table]
    decode_config = DecodeConfig(
        windows=_windows(config),
        dpi=config.dpi,
        max_pages=config.max_pages,
        max_render_pixels=config.max_render_pixels,
        pages_per_task=config.pages_per_task,
        use_pdf_text=config.use_pdf_text,
        pdf_text_min_chars=config.pdf_text_min_chars,
        page_images=config.server is not None,
    )
    return (
        # from_blocks: the blocks' metadata is computed here. from_arrow puts each block and runs one Ray task per
        # block (get_table_block_metadata_schema) on workers that are just starting; in 2 of ~19 runs one of them
        # aborted inside Ray's core ("Mutex corrupt: both reader and writer lock held", an absl check, not our code).
        # Ray Data retries that task without limit, so no row was ever lost; this start does without those tasks.
        ray.data.from_blocks(blocks)
        # Ray Data merges a task's outputs into blocks of up to 128 MiB: without the repartition the ranges of a long
        # document would travel as one block, and one decode task would render them all. The split keeps Ray's default
        # resource ask so that Ray Data fuses it with the repartition (one task, 1 CPU, short: it renders nothing);
        # with any other ask the repartition would be a task of its own, holding a CPU of its own.
        .map_batches(SplitDocuments(storage, decode_config), batch_size=1, batch_format="pyarrow")
        .repartition(target_num_rows_per_block=1)
        .map_batches(
            DecodePages(storage, decode_config),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=config.decode_cpus,
            memory=config.decode_memory,
        )
    )


def _cpu_engine_args(config: JobConfig) -> dict:
    """An engine on the CPU shares cores with the decode tasks. OpenMP's default is to spin-wait between parallel
    regions, burning the cycles decoding needs; passive waiting gave the CPU pipeline 0.71-0.79 of the bare loop's
    pages/s instead of 0.55 (benchmarks/pipeline.py, 2 cores). It must be in the environment before torch loads."""
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}} if config.gpus_per_actor == 0 else {}


def _windows(config: JobConfig):
    from model.processor import checkpoint_windows
    from model.windows import WindowConfig

    return checkpoint_windows(config.checkpoint, WindowConfig(max_windows=config.max_windows))


@dataclass
class Plan:
    """What the driver decided before any work: the documents left (SOURCE_SCHEMA records) and what is done."""

    documents: int  # listed
    rows_done: int  # ids already in the output
    skipped: int  # documents complete, not even read
    records: pa.Table  # decode-stage records, one per document left
    seen: set[str]  # ids of the documents left already written: the writer must never write them again
    document_prompts: pa.Table  # every listed (doc, uri, prompt) in listing order (plan.document_prompts)


def plan_job(config: JobConfig, storage: Storage | None = None, sources=None) -> Plan:
    """List the inputs, read the ids already written, and keep what is left; writes nothing. Raises ValueError for
    what refuses the job and StorageUnavailable when storage stays down. `sources`: a SOURCES_SCHEMA table or Source
    objects instead of listing `config.inputs`."""
    storage = storage or Storage(config.s3)
    retry = storage.retry
    fs, out = storage.resolve(config.output)
    out = out.rstrip("/")
    if storage.is_s3(config.output) and "/" not in out:
        raise ValueError(f"--output {config.output}: give a prefix inside the bucket, e.g. s3://bucket/results/")
    if storage.kind(config.output) == "file":
        raise ValueError(f"--output {config.output} is a file; give a folder (or an s3:// prefix)")
    sources = list_sources(list(config.inputs), storage) if sources is None else sources
    documents = document_prompts(sources, config.prompts)  # every check that can refuse the job, before any write
    listed = pc.count_distinct(documents["doc"]).as_py()

    # --no-resume deletes the earlier parts (prepare_output, once the job is accepted): nothing counts as done
    done = read_done_ids(fs, out, retry) if config.resume else pa.chunked_array([], pa.string())
    records, skipped, seen = plan_documents(documents, done)
    log.info(
        "%d documents listed; %d rows already in %s; %d documents complete, %d to process",
        listed,
        len(done),
        config.output,
        skipped,
        records.num_rows,
    )
    return Plan(listed, len(done), skipped, records, seen, documents)


def prepare_output(config: JobConfig, storage: Storage) -> None:
    """Once the job is accepted: create the output folder, delete the earlier parts (`--no-resume`), record the
    settings in `_job.json`."""
    retry = storage.retry
    fs, out = storage.resolve(config.output)
    out = out.rstrip("/")
    if not storage.is_s3(config.output):
        retry(f"creating {out}", fs.create_dir, out, recursive=True)  # (on S3 it would leave a 0-byte marker object)
    if not config.resume:
        old = output_parts(fs, out, retry)
        if old:
            log.warning("--no-resume: deleting %d earlier parts in %s", len(old), config.output)
            for p in old:
                retry(f"deleting {p}", fs.delete_file, p)
    settings = {
        k: (str(v) if k == "checkpoint" else list(v) if isinstance(v, tuple) else v)  # as JSON reads it back
        for k, v in asdict(config).items()
        if k in RESULT_SETTINGS
    }
    record_settings(fs, out, settings, retry)


def run_job(
    config: JobConfig,
    progress: bool = True,
    on_batch: Callable[[pa.Table], None] | None = None,
    sources: list | None = None,
    ray_address: str | None = None,
) -> dict:
    """Run the job to completion; returns the summary (also written to `_summary.json` and `_summary.png`).
    `on_batch` sees every table of new rows after it is buffered; `sources` replaces listing `config.inputs`
    (both for tests: interrupting a run, deleting an object between listing and reading)."""
    if not config.checkpoint:
        raise ValueError("JobConfig.checkpoint is required (the CLI defaults to the tiny random checkpoint)")
    started = datetime.now(UTC)
    storage = Storage(config.s3)
    plan = plan_job(config, storage, sources)
    if plan.records.num_rows:  # (nothing left to do needs no Ray)
        ensure_ray(ray_address)
        if config.server is not None:  # the replicas hold the GPUs; the client workers need 0.25 CPU each
            config = replace(config, gpus_per_actor=0.0, cpus_per_actor=0.25)
        config = resolve_resources(config)  # may refuse the job: still nothing written
        # One outage clock for the decode tasks and this driver: the budget runs once per outage, not per document
        storage.clock = SharedClock.start(config.s3.retry_seconds)
    try:
        return _run(config, storage, plan, started, progress, on_batch)
    finally:
        if isinstance(storage.clock, SharedClock):
            storage.clock.stop()


def _run(config: JobConfig, storage: Storage, plan: Plan, started: datetime, progress: bool, on_batch) -> dict:
    from model.weights import is_random_checkpoint

    from .summary import summarize, write_summary

    records = plan.records
    fs, out = storage.resolve(config.output)
    out = out.rstrip("/")
    prepare_output(config, storage)
    generate = GenerateConfig(
        checkpoint=str(config.checkpoint),
        max_new_tokens=config.max_new_tokens,
        max_windows=config.max_windows,
        max_slots=config.max_slots,
        quantize=config.quantize,
        gpu_memory_utilization=config.gpu_memory_utilization,
        device="cpu" if config.gpus_per_actor == 0 else None,
        torch_threads=config.torch_threads,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        repetition_guard=config.repetition_guard,
        temperature_ladder=tuple(config.temperature_ladder),
        max_attempts=config.max_attempts,
    )
    writer = PartWriter(fs, out, plan.seen, config.rows_per_file, config.flush_seconds, storage.retry)
    bar = Progress(enabled=progress)
    unavailable: set[str] = set()  # documents that storage would not give us: left for a rerun, never written
    t0 = time.monotonic()
    try:
        if records.num_rows:
            ds = build_dataset(records, config, storage, generate)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                batch = _drop_unavailable(batch, unavailable)
                new = writer.add(batch)
                bar.update(new)
                if on_batch is not None:
                    on_batch(new)
    except BaseException:
        try:  # finished rows are worth keeping whatever stopped the loop (Ctrl-C included)
            writer.flush(final=True)
        except OSError:
            log.exception("the last %d finished rows could not be written either", writer.buffered)
        raise
    else:
        try:
            writer.flush(final=True)
        except StorageUnavailable as e:
            raise JobIncomplete(
                f"{writer.buffered} finished rows could not be written to {config.output} ({e}); the output is "
                "consistent without them: rerun the same command to redo them"
            ) from e
    finally:
        bar.close()
    seconds = time.monotonic() - t0
    outage = storage.clock.age()  # storage failing since this long when the reads ended (0: it was not)
    run = {
        "run_id": writer.run_id,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "documents_listed": plan.documents,
        "documents_skipped_complete": plan.skipped,
        "rows_already_done": plan.rows_done,
        "rows": bar.rows,
        "pages": bar.pages,
        "errors": bar.errors,
        "completion_tokens": bar.tokens,
        "pages_per_s": round(bar.pages / seconds, 4) if seconds > 0 else 0.0,
        "tokens_per_s": round(bar.tokens / seconds, 4) if seconds > 0 else 0.0,
        "duplicates_dropped": writer.duplicates,
        "documents_unavailable": len(unavailable),
        "storage_outage_seconds": round(outage, 1),
        "part_write_retries": writer.write_retries,
        "parts_written": len(writer.parts),
        "actors": list(config.actors),
        "gpus_per_actor": config.gpus_per_actor,
        "batch_size": config.batch_size,
        "timeline": bar.timeline,
    }
    if config.documents_out:  # rebuilt from every part on every run, so it is whole whatever ran before
        run["documents_out"] = write_documents(fs, out, storage, config.documents_out, plan.document_prompts)
    if unavailable:
        log.warning(
            "%d documents could not be read (storage failing for over %.0fs, --io-retry-seconds: the reads left "
            "stopped trying); they are not in the output: rerun the same command to do them",
            len(unavailable),
            config.s3.retry_seconds,
        )
    try:
        summary = summarize(
            fs,
            out,
            config.output,
            run,
            model=Path(config.checkpoint).name,
            random_weights=is_random_checkpoint(config.checkpoint),
            retry=storage.retry,
        )
        write_summary(fs, out, summary, storage.retry)
    except StorageUnavailable as e:
        raise StorageUnavailable(f"every finished row is written, but the summary could not be: {e}") from e
    return summary


def _drop_unavailable(batch: pa.Table, unavailable: set[str]) -> pa.Table:
    """Rows of documents storage would not give us (after the retries) are no answer: count them, never write them."""
    marked = pc.fill_null(pc.equal(batch["error_type"], "storage_unavailable"), False)
    if not pc.any(marked).as_py():
        return batch
    unavailable.update(batch.filter(marked)["source_uri"].to_pylist())
    return batch.filter(pc.invert(marked))
