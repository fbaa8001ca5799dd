"""The batch job's output folder: Parquet parts, the ids already written (resume), and `_job.json`.

The output folder is the manifest of completed work: a part appears whole (a local part is renamed into place; an S3
object appears only when its upload completes), every id is written once, and a rerun reads the `id` column of the
`*.parquet` parts to know what is done.

Storage faults: every listing, read and write here retries transient failures for the job's retry budget (`Retry`,
pipelines/storage.py). A part that still cannot be written keeps its rows buffered (they go with the next flush);
only the final flush gives up, with StorageUnavailable.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .rows import OUTPUT_SCHEMA
from .storage import Retry, StorageUnavailable

log = logging.getLogger(__name__)


def output_parts(fs: pafs.FileSystem, path: str, retry: Retry = Retry()) -> list[str]:
    """The Parquet parts of an output folder (not `_`/`.` files, not the 0-byte folder markers S3 writers leave)."""
    selector = pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True)
    infos = retry(f"listing the output {path}", fs.get_file_info, selector)
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not os.path.basename(i.path).startswith(("_", "."))
    )


def read_done_ids(fs: pafs.FileSystem, path: str, retry: Retry = Retry()) -> pa.ChunkedArray:
    """Ids of every row already written, as Arrow strings (compact: a million ids are tens of MB, not a Python set).
    A part that cannot be read (it should not happen: parts are written whole) is moved to `_incomplete/` so it
    neither breaks readers nor counts as done."""
    chunks: list[pa.ChunkedArray] = []
    for part in output_parts(fs, path, retry):
        try:
            ids = retry(f"reading {part}", pq.read_table, part, columns=["id"], filesystem=fs).column("id")
            chunks += ids.chunks
        except pa.ArrowInvalid as e:  # not Parquet (truncated, empty); a storage error (OSError) is retried, then
            # raised, never taken for a corrupt part: good output must not be moved aside because S3 hiccupped
            aside = f"{path.rstrip('/')}/_incomplete"
            log.warning("unreadable part %s (%s): moved to %s/; its rows will be redone", part, e, aside)
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(aside, recursive=True)
            fs.move(part, f"{aside}/{os.path.basename(part)}")
    return pa.chunked_array(chunks, pa.string())


class PartWriter:
    """Buffers result rows and writes them as Parquet parts; drops any id already written (exactly-once output).
    A part whose write fails after the retry budget keeps its rows (and its name: a retried upload replaces, never
    duplicates) for the next flush; `flush(final=True)` raises StorageUnavailable instead."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        path: str,
        seen: set[str],
        rows_per_file: int,
        flush_seconds: float,
        retry: Retry = Retry(),
    ):
        self.fs, self.path = fs, path.rstrip("/")
        self.seen = seen
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.duplicates = 0
        self.write_retries = 0  # failed write attempts that were retried (storage faults survived)
        self.retry = retry
        self._last_flush = time.monotonic()

    def add(self, table: pa.Table) -> pa.Table:
        """Keep the rows with new ids; return them."""
        ids = table.column("id").to_pylist()
        keep = []
        for i, rid in enumerate(ids):
            if rid not in self.seen:
                self.seen.add(rid)
                keep.append(i)
        if len(keep) < len(ids):
            self.duplicates += len(ids) - len(keep)
            log.warning("dropped %d rows whose ids were already written", len(ids) - len(keep))
            table = table.take(keep)
        if table.num_rows:
            self.buffer.append(table.cast(OUTPUT_SCHEMA))
            self.buffered += table.num_rows
        if self.buffered >= self.rows_per_file or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()
        return table

    def flush(self, final: bool = False) -> None:
        if not self.buffered:
            self._last_flush = time.monotonic()
            return
        table = pa.concat_tables(self.buffer)
        self.buffer = [table]
        name = f"part-{self.run_id}-{len(self.parts):05d}.parquet"
        target = f"{self.path}/{name}"

        def count(_):
            self.write_retries += 1

        try:
            self.retry(f"writing {target}", self._write, table, name, target, on_retry=count)
        except StorageUnavailable as e:
            if final:
                raise
            log.warning("%s; its %d rows stay buffered and go with the next part", e, table.num_rows)
            self._last_flush = time.monotonic()
            return
        self._last_flush = time.monotonic()
        self.parts.append(target)
        self.buffer, self.buffered = [], 0
        log.debug("wrote %s (%d rows)", target, table.num_rows)

    def _write(self, table: pa.Table, name: str, target: str) -> None:
        if self.local:  # rename into place: a reader (or a resume) never sees half a file
            tmp = f"{self.path}/.{name}.tmp"
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, target)
        else:  # an S3 object appears only when its upload completes
            pq.write_table(table, target, filesystem=self.fs)


def record_settings(fs: pafs.FileSystem, out: str, settings: dict, retry: Retry = Retry()) -> None:
    """Record the settings that shape the rows in `_job.json`; warn when a resumed run changes them."""
    path = f"{out}/_job.json"
    now = settings

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        before = json.loads(retry(f"reading {path}", read))
    except StorageUnavailable:
        raise
    except (OSError, ValueError):  # none yet (or unreadable): nothing to compare with
        before = None
    if before and output_parts(fs, out, retry):
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            log.warning(
                "resuming %s with different settings %s: earlier rows keep the old ones (use a new --output or "
                "--no-resume to redo everything)",
                out,
                changed,
            )
    write_bytes(fs, path, json.dumps(now, indent=2).encode(), retry)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, retry: Retry = Retry()) -> None:
    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(f"writing {path}", write)
