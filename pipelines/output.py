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
from .storage import Retry, Storage, StorageUnavailable

log = logging.getLogger(__name__)


class Output:
    """The job's output folder, resolved once: `uri` as given (for messages), and `fs` with `path` (no trailing '/')
    for every listing, read and write, each of which goes through the storage's retry budget."""

    def __init__(self, uri: str, storage: Storage):
        self.uri, self.storage = uri, storage
        self.fs, path = storage.resolve(uri)
        self.path = path.rstrip("/")
        self.s3 = storage.is_s3(uri)

    @property
    def retry(self) -> Retry:
        # read at every use, not kept: a job gives its storage the shared outage clock once Ray is up
        return self.storage.retry

    def __repr__(self) -> str:
        return f"Output({self.uri!r})"

    def create(self) -> None:
        if not self.s3:  # (on S3 it would leave a 0-byte marker object)
            self.retry(f"creating {self.path}", self.fs.create_dir, self.path, recursive=True)

    def parts(self) -> list[str]:
        """The Parquet parts (not `_`/`.` files, not the 0-byte folder markers S3 writers leave)."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        infos = self.retry(f"listing the output {self.path}", self.fs.get_file_info, selector)
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not os.path.basename(i.path).startswith(("_", "."))
        )

    def done_ids(self) -> pa.ChunkedArray:
        """Ids of every row already written, as Arrow strings (compact: a million ids are tens of MB, not a Python
        set). A part that cannot be read (it should not happen: parts are written whole) is moved to `_incomplete/`
        so it neither breaks readers nor counts as done."""
        chunks: list[pa.ChunkedArray] = []
        for part in self.parts():
            try:
                ids = self.retry(f"reading {part}", pq.read_table, part, columns=["id"], filesystem=self.fs)
                chunks += ids.column("id").chunks
            except pa.ArrowInvalid as e:  # not Parquet (truncated, empty); a storage error (OSError) is retried,
                # then raised, never taken for a corrupt part: good output must not be moved aside because S3 hiccupped
                aside = f"{self.path}/_incomplete"
                log.warning("unreadable part %s (%s): moved to %s/; its rows will be redone", part, e, aside)
                if isinstance(self.fs, pafs.LocalFileSystem):
                    self.fs.create_dir(aside, recursive=True)
                self.fs.move(part, f"{aside}/{os.path.basename(part)}")
        return pa.chunked_array(chunks, pa.string())

    def delete_parts(self) -> int:
        """Delete every part (`--no-resume`); returns how many there were."""
        old = self.parts()
        for p in old:
            self.retry(f"deleting {p}", self.fs.delete_file, p)
        return len(old)

    def record_settings(self, settings: dict) -> None:
        """Record the settings that shape the rows in `_job.json`; warn when a resumed run changes them."""
        path = f"{self.path}/_job.json"

        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        try:
            before = json.loads(self.retry(f"reading {path}", read))
        except StorageUnavailable:
            raise
        except (OSError, ValueError):  # none yet (or unreadable): nothing to compare with
            before = None
        if before and self.parts():
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if changed:
                log.warning(
                    "resuming %s with different settings %s: earlier rows keep the old ones (use a new --output or "
                    "--no-resume to redo everything)",
                    self.path,
                    changed,
                )
        self.write_bytes("_job.json", json.dumps(settings, indent=2).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """A file of the folder (`_job.json`, `_summary.json`), replaced whole."""
        path = f"{self.path}/{name}"

        def write() -> None:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

        self.retry(f"writing {path}", write)


class PartWriter:
    """Buffers result rows and writes them as Parquet parts; drops any id already written (exactly-once output).
    A part whose write fails after the retry budget keeps its rows (and its name: a retried upload replaces, never
    duplicates) for the next flush; `flush(final=True)` raises StorageUnavailable instead."""

    def __init__(self, output: Output, seen: set[str], rows_per_file: int, flush_seconds: float):
        self.output = output
        self.fs, self.path = output.fs, output.path
        self.seen = seen
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.duplicates = 0
        self.write_retries = 0  # failed write attempts that were retried (storage faults survived)
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
            self.output.retry(f"writing {target}", self._write, table, name, target, on_retry=count)
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
