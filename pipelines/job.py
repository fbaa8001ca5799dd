"""The document batch job: list -> decode on CPU -> engine on a GPU actor pool -> Parquet parts, resumable.

    sources (driver: list inputs, drop what is done: pipelines/plan.py)
      -> SplitDocuments    Ray tasks: read, count pages, long documents -> page ranges      (pipelines/decode.py)
      -> DecodePages       Ray tasks (CPU), one per range: render PDF pages, decode images, cut windows
      -> GenerateStage     Ray actor pool, num_gpus per actor, autoscaling MIN..MAX           (pipelines/generate.py)
      -> PartWriter        the driver, streaming: dedupe by id, write `part-<run>-<n>.parquet` files (output.py)

What is asked is a `JobConfig` (pipelines/config.py); where it runs, pipelines/cluster.py.

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
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .cluster import cpu_engine_args, ensure_ray, resolve_resources
from .config import JobConfig, result_settings
from .decode import DecodePages, SplitDocuments
from .documents_out import write_documents
from .generate import GenerateStage
from .output import Output, PartWriter
from .plan import Plan, plan_job
from .progress import Progress
from .replicas import ServerPagesStage
from .storage import SharedClock, Storage, StorageUnavailable

log = logging.getLogger(__name__)


class JobIncomplete(RuntimeError):
    """Finished rows could not be written: storage stayed down past the retry budget (the CLI exits 3)."""


def build_dataset(records: pa.Table, config: JobConfig, storage: Storage):
    """The whole Dataset: decoded pages, then the engine actors (or the client workers of running replicas). `config`
    has its windows and resources resolved (`with_checkpoint_windows`, `resolve_resources`)."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = config.ray_progress
    if config.server is not None:  # running replicas answer: client workers (they wait on HTTP), no engine
        return decoded_pages(records, config, storage).map_batches(
            ServerPagesStage,
            fn_constructor_args=(config.server, config.generate),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
            num_cpus=0.25,
        )
    return decoded_pages(records, config, storage).map_batches(
        GenerateStage,
        fn_constructor_args=(config.generate, config.decode.windows),  # the pages' windows, as the decode tasks cut
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
        **cpu_engine_args(config.gpus_per_actor),
    )


def decoded_pages(records: pa.Table, config: JobConfig, storage: Storage):
    """Sources -> split into decode tasks -> one block per task -> decoded pages (the Dataset before the engine),
    cut into `config.decode.windows` (run_job resolves them from the checkpoint: `with_checkpoint_windows`)."""
    import ray

    table = records  # SOURCE_SCHEMA, from plan_job
    # Many small input blocks: documents spread over split tasks instead of queueing behind one.
    per_block = max(1, -(-len(records) // 1000))
    blocks = [table.slice(i, per_block) for i in range(0, len(records), per_block)] or [table]
    decode_config = replace(config.decode, page_images=config.server is not None)
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


def prepare_output(config: JobConfig, output: Output) -> None:
    """Once the job is accepted: create the output folder, delete the earlier parts (`--no-resume`), record the
    settings in `_job.json`."""
    output.create()
    if not config.resume:
        deleted = output.delete_parts()
        if deleted:
            log.warning("--no-resume: deleted %d earlier parts in %s", deleted, config.output)
    output.record_settings(result_settings(config))


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
    if not config.generate.checkpoint:
        raise ValueError("JobConfig.generate.checkpoint is required (the CLI defaults to the demo reader)")
    started = datetime.now(UTC)
    storage = Storage(config.s3)
    output = Output(config.output, storage)
    plan = plan_job(config, output, sources)
    if plan.records.num_rows:  # (nothing left to do needs no Ray, nor the checkpoint's windows)
        config = config.with_checkpoint_windows()  # once, for the decode tasks and the engine actors alike
        ensure_ray(ray_address)
        if config.server is not None:  # the replicas hold the GPUs; the client workers need 0.25 CPU each
            config = replace(config, gpus_per_actor=0.0, cpus_per_actor=0.25)
        config = resolve_resources(config)  # may refuse the job: still nothing written
        # One outage clock for the decode tasks and this driver: the budget runs once per outage, not per document
        storage.clock = SharedClock.start(config.s3.retry_seconds)
    try:
        return _run(config, storage, output, plan, started, progress, on_batch)
    finally:
        if isinstance(storage.clock, SharedClock):
            storage.clock.stop()


def _run(
    config: JobConfig, storage: Storage, output: Output, plan: Plan, started: datetime, progress: bool, on_batch
) -> dict:
    from model.weights import is_random_checkpoint

    from .summary import summarize, write_summary

    records = plan.records
    prepare_output(config, output)
    writer = PartWriter(output, plan.seen, config.rows_per_file, config.flush_seconds)
    bar = Progress(enabled=progress)
    unavailable: set[str] = set()  # documents that storage would not give us: left for a rerun, never written
    t0 = time.monotonic()
    try:
        if records.num_rows:
            ds = build_dataset(records, config, storage)
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
        run["documents_out"] = write_documents(output, config.documents_out, plan.document_prompts)
    if unavailable:
        log.warning(
            "%d documents could not be read (storage failing for over %.0fs, --io-retry-seconds: the reads left "
            "stopped trying); they are not in the output: rerun the same command to do them",
            len(unavailable),
            config.s3.retry_seconds,
        )
    try:
        checkpoint = config.generate.checkpoint
        summary = summarize(output, run, model=Path(checkpoint).name, random_weights=is_random_checkpoint(checkpoint))
        write_summary(output, summary)
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
