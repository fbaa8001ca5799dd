"""Where documents come from and where rows go: local paths and s3:// URIs behind one pyarrow filesystem API.

Inputs (`list_sources`), each expanded to one `Source` per document:
* `s3://bucket/prefix/` or a local folder: every supported file below it (recursive);
* a glob, local or S3 (`/data/**/*.pdf`, `s3://bucket/scans/2024-*.tif`);
* a single file or object (any extension: the content decides how it is read);
* a manifest, `.jsonl` / `.csv` / `.parquet`, with a `uri` column and optional `prompt` and `id` columns; relative
  local uris are resolved against the manifest's folder.

S3 settings follow the standard AWS environment (`AWS_ENDPOINT_URL[_S3]`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`), overridable by flags. They are resolved once in the driver
and travel (pickled) inside the stages, because Ray workers need not share the driver's environment.

Storage faults: every request goes through the AWS SDK's standard retry strategy (`retries` attempts, for throttling,
5xx and dropped connections), and every read, listing and write through `Retry`, which keeps retrying a transient
failure (the server down, connections refused or timing out, 5xx, SlowDown) with exponential backoff and jitter for
`retry_seconds` before it raises `StorageUnavailable`. Permanent failures (missing object, access denied) are raised
at once. The budget is for an outage, not for each request: an `OutageClock` (a Ray actor in a job, shared by the
decode tasks and the driver) starts when storage first fails and stops at the first success; once it has run for
`retry_seconds`, every request still retrying gives up after its next attempt and reads not yet started give up
without trying, so a job against a dead endpoint ends after about the budget plus one request, whatever its size.

Keys are names, never URLs: `#`, `?`, `%`, `+`, spaces are characters of the key.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
DOCUMENT_SUFFIXES = IMAGE_SUFFIXES + (".pdf",)
SINGLE_PAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # never more than one page (first frame)
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
# What a listing, a manifest or `sources=` becomes: one row per (document, manifest prompt); compact for millions.
SOURCES_SCHEMA = pa.schema([("uri", pa.string()), ("doc_id", pa.string()), ("prompt", pa.string())])
T = TypeVar("T")


# ---- transient vs permanent storage failures -------------------------------------------------------------------------
class StorageUnavailable(OSError):
    """A transient storage failure that outlasted the retry budget. Never a final answer for a document: the job
    leaves it for a rerun (and exits non-zero)."""


class TooLarge(OSError):
    """An object over the per-document byte limit (not read into memory)."""


# The AWS SDK's error names (as pyarrow reports them) and curl's codes for "could not resolve/connect", "timed out",
# "empty reply", "send/receive failed"; S3-compatible servers answer 500/503 with these codes when busy or down.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode: (?:5|6|7|28|35|52|55|56)\b|SLOW_DOWN|SlowDown|THROTTL|Throttl|TooManyRequests|"
    r"SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|InternalError|REQUEST_TIMEOUT|RequestTimeout|"
    r"HTTP response code: 5\d\d|[Cc]onnection (?:reset|refused|aborted)|[Tt]imed? ?out|Broken pipe"
)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the same request may well succeed in a moment."""
    if isinstance(e, StorageUnavailable | ConnectionError | TimeoutError):
        return True
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | TooLarge):
        return False
    return isinstance(e, OSError) and bool(_TRANSIENT.search(str(e)))


class OutageClock:
    """How long storage has been failing: opened by the first failure, closed by any success. Every `Retry` of a job
    consults one clock, so the budget runs once per outage instead of once per request (one after another, a dead
    endpoint kept a 60-document job waiting for hours). `failed()` returns the outage's age in seconds; once it reaches
    `seconds` the clock is tripped until a success. An open clock that has heard of no failure for `stale_after`
    seconds (its callers gone) starts a new outage at the next failure rather than charge it for the old one."""

    def __init__(self, seconds: float, stale_after: float = 60.0):
        self.seconds, self.stale_after = seconds, stale_after
        self._since: float | None = None  # time.monotonic() of this process (a Ray actor: the actor's own clock)
        self._last = 0.0
        self._lock = threading.Lock()

    def __getstate__(self):  # pickled into a task without Ray: a clock of that process's own
        return {"seconds": self.seconds, "stale_after": self.stale_after}

    def __setstate__(self, state):
        self.__init__(state["seconds"], state["stale_after"])

    def failed(self) -> float:
        with self._lock:
            now = time.monotonic()
            tripped = self._since is not None and self._last - self._since >= self.seconds
            if self._since is None or (not tripped and now - self._last > self.stale_after):
                self._since = now
            self._last = now
            return now - self._since

    def ok(self) -> None:
        with self._lock:
            self._since = None

    def tripped(self) -> bool:
        with self._lock:
            return self._since is not None and self._last - self._since >= self.seconds

    def age(self) -> float:
        """Seconds since the open outage began (0 when storage is not failing)."""
        with self._lock:
            return 0.0 if self._since is None else time.monotonic() - self._since


class SharedClock:
    """An OutageClock in a Ray actor (no CPU), for the decode tasks and the driver of one job. Picklable: the tasks
    get the actor's handle. A success is reported without waiting for the answer.

    The actor lives on the driver's node (a worker node may be removed mid-job); a call that finds it gone anyway
    answers "no outage", so a lost clock only falls back to each call's own retry budget, never fails the job."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def start(cls, seconds: float) -> SharedClock:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        actor = ray.remote(num_cpus=0, scheduling_strategy=here)(OutageClock)
        return cls(actor.remote(seconds))

    def _ask(self, method: str, default):
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote())
        except ray.exceptions.RayActorError:
            log.warning("the job's outage clock is gone; storage calls keep their own retry budgets")
            return default

    def failed(self) -> float:
        return self._ask("failed", 0.0)

    def ok(self) -> None:
        self.handle.ok.remote()

    def tripped(self) -> bool:
        return self._ask("tripped", False)

    def age(self) -> float:
        return self._ask("age", 0.0)

    def stop(self) -> None:
        import ray

        ray.kill(self.handle)


@dataclass(frozen=True)
class Retry:
    """Retry transient failures for up to `seconds` (exponential backoff from `first_delay`, capped at `max_delay`,
    full jitter), then raise StorageUnavailable. `seconds=0`: one attempt. With a shared `clock` (OutageClock or
    SharedClock) the `seconds` count from the start of the outage, whoever met it first; a call also never retries
    for more than `seconds` of its own (a key that keeps failing while others succeed)."""

    seconds: float = 120.0
    first_delay: float = 0.5
    max_delay: float = 10.0
    clock: Any = field(default=None, compare=False, repr=False)

    def __call__(self, what: str, fn: Callable[..., T], *args, on_retry: Callable | None = None, **kw) -> T:
        deadline, delay, attempt = None, self.first_delay, 0
        while True:
            try:
                result = fn(*args, **kw)
            except OSError as e:
                if isinstance(e, StorageUnavailable) or not is_transient(e):
                    raise
                now = time.monotonic()
                deadline = now + self.seconds if deadline is None else deadline
                if self.clock is not None:  # the outage's own deadline, when it began before this call's first failure
                    deadline = min(deadline, now + self.seconds - self.clock.failed())
                if now >= deadline:
                    raise StorageUnavailable(
                        f"{what}: storage still failing after {self.seconds:.0f}s of retries (--io-retry-seconds): {e}"
                    ) from e
                attempt += 1
                (log.warning if attempt == 1 else log.debug)(
                    "%s failed (%s); retrying for up to %.0fs", what, e, deadline - now
                )
                if on_retry is not None:
                    on_retry(e)
                time.sleep(min(deadline - now, random.uniform(0, delay)) + 0.01)
                delay = min(delay * 2, self.max_delay)
            else:
                if self.clock is not None:
                    self.clock.ok()
                return result

    def given_up(self, what: str) -> None:
        """Raise StorageUnavailable without a request when the shared clock says storage has been failing for the
        whole budget: a read not yet started stops trying (the job then ends with what it has)."""
        if self.clock is not None and self.clock.tripped():
            raise StorageUnavailable(
                f"{what}: not tried: storage has been failing for over {self.seconds:.0f}s (--io-retry-seconds)"
            )


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None = AWS itself
    region: str | None = None
    access_key: str | None = None  # None: pyarrow's default chain (profile, instance role, ...)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False
    retries: int = 5  # attempts per request inside the AWS SDK (its standard strategy: throttling, 5xx, connections)
    retry_seconds: float = 120.0  # then our own retries of the whole read/listing/write, for outages of this long

    @classmethod
    def from_env(
        cls,
        endpoint: str | None = None,
        region: str | None = None,
        anonymous: bool = False,
        env: dict | None = None,
        retries: int = 5,
        retry_seconds: float = 120.0,
    ) -> S3Settings:
        env = os.environ if env is None else env
        return cls(
            endpoint=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            anonymous=anonymous,
            retries=retries,
            retry_seconds=retry_seconds,
        )

    def __post_init__(self):
        if self.retries < 1 or self.retry_seconds < 0:
            raise ValueError(
                f"--io-retries must be >= 1 and --io-retry-seconds >= 0, got {self.retries}, {self.retry_seconds}"
            )

    @property
    def retry(self) -> Retry:
        return Retry(self.retry_seconds)

    def filesystem(self) -> pafs.S3FileSystem:
        kw: dict = {
            "region": self.region or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.retries),
        }
        if self.endpoint:
            u = urlparse(self.endpoint if "://" in self.endpoint else "https://" + self.endpoint)
            kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
        if self.anonymous:
            kw["anonymous"] = True
        elif self.access_key and self.secret_key:
            kw.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kw["session_token"] = self.session_token
        return pafs.S3FileSystem(**kw)


class Storage:
    """Resolves URIs to (filesystem, path) and reads whole objects. Picklable; holds no open connections."""

    def __init__(self, s3: S3Settings = S3Settings(), clock: OutageClock | SharedClock | None = None):
        self.s3 = s3
        self.clock = clock or OutageClock(s3.retry_seconds)  # a job replaces it with a SharedClock once Ray is up
        self._s3fs: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    @property
    def retry(self) -> Retry:
        return replace(self.s3.retry, clock=self.clock)

    def __getstate__(self):
        return {"s3": self.s3, "clock": self.clock}

    def __setstate__(self, state):
        self.__init__(state["s3"], state.get("clock"))

    @staticmethod
    def is_s3(uri: str) -> bool:
        return uri.startswith("s3://")

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if self.is_s3(uri):
            if self._s3fs is None:
                self._s3fs = self.s3.filesystem()
            return self._s3fs, uri[len("s3://") :]
        return self._local, os.path.abspath(os.path.expanduser(uri))

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object. FileNotFoundError when it is missing, StorageUnavailable when transient failures outlast
        the retry budget, OSError for other (permanent) I/O failures."""
        fs, path = self.resolve(uri)
        retry = self.retry
        if self.is_s3(uri):
            retry.given_up(f"reading {uri}")

        def read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read() if max_bytes is None else f.read(max_bytes + 1)

        data = retry(f"reading {uri}", read)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"the object is over the {max_bytes / 2**20:.0f} MiB limit on one document")
        return data

    def join(self, base: str, name: str) -> str:
        return base.rstrip("/") + "/" + name if self.is_s3(base) else os.path.join(base, name)

    def list_files(self, uri: str) -> list[str]:
        """Every file below a folder/prefix (recursive), as URIs in the same form, sorted."""
        fs, path = self.resolve(uri)
        selector = pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True)
        try:
            infos = self.retry(f"listing {uri}", fs.get_file_info, selector)
        except FileNotFoundError:
            return []
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        return ["s3://" + p for p in files] if self.is_s3(uri) else files

    def kind(self, uri: str) -> str:
        """'file', 'dir' or 'missing'."""
        fs, path = self.resolve(uri)
        t = self.retry(f"looking up {uri}", fs.get_file_info, path.rstrip("/") if self.is_s3(uri) else path).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


# ---- sources ---------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One document to read. `doc_id`: the manifest's id, else None (the row ids then derive from the uri)."""

    uri: str
    doc_id: str | None = None
    prompt: str | None = None  # per-document prompt from a manifest; None = the job's prompts


def sources_table(sources) -> pa.Table:
    """A SOURCES_SCHEMA table from a table (returned as is) or from Source objects (tests, library callers)."""
    if isinstance(sources, pa.Table):
        return sources
    return pa.table(
        {k: pa.array([getattr(s, k) for s in sources], pa.string()) for k in SOURCES_SCHEMA.names}, SOURCES_SCHEMA
    )


def _uris_table(uris: list[str]) -> pa.Table:
    n = len(uris)
    return pa.table([pa.array(uris, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string())], SOURCES_SCHEMA)


def suffix(uri: str) -> str:
    """The lower-case extension of a local path or an s3:// key. A key is a name, not a URL: '#', '?', '%' in it are
    characters (urlparse would cut the name at the first '#' or '?')."""
    return PurePosixPath(uri[len("s3://") :] if uri.startswith("s3://") else uri).suffix.lower()


def _hidden(uri: str, base: str) -> bool:
    """A file or folder below the listed `base` whose name starts with '.' (the base's own path may have such parts)."""
    rel = uri[len(base) :] if uri.startswith(base) else uri
    return any(part.startswith(".") for part in rel.split("/") if part)


def list_sources(inputs: list[str], storage: Storage) -> pa.Table:
    """Expand every --input into one SOURCES_SCHEMA table, in a stable order. Raises ValueError for an input that
    matches nothing or names a single file that does not exist."""
    tables = []
    for spec in inputs:
        found, skipped = _expand(spec, storage)
        if not found.num_rows:
            raise ValueError(f"--input {spec} matches no documents ({', '.join(DOCUMENT_SUFFIXES)} or a manifest)")
        extra = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
        log.info("input %s: %d documents%s", spec, found.num_rows, f" (skipped {extra})" if extra else "")
        tables.append(found)
    return pa.concat_tables(tables) if tables else SOURCES_SCHEMA.empty_table()


def _expand(spec: str, storage: Storage) -> tuple[pa.Table, Counter]:
    """(sources, files skipped by reason)."""
    kind = storage.kind(spec)
    # A name with glob characters that exists is that file: `scan[1].png`, `what?.png` are ordinary S3 keys.
    if kind == "missing" and _GLOB_CHARS.search(spec):
        return _keep_documents(_glob(spec, storage), base="")
    if kind == "file":
        if suffix(spec) in MANIFEST_SUFFIXES:
            return read_manifest(spec, storage), Counter()
        return _uris_table([spec if storage.is_s3(spec) else os.path.abspath(spec)]), Counter()
    if kind == "missing" and not spec.endswith("/") and suffix(spec):
        # a mistyped file name must not become a job with one not_found row
        raise ValueError(f"--input {spec}: no such file or object")
    if kind == "dir" or storage.is_s3(spec):
        base = spec.rstrip("/") + "/" if storage.is_s3(spec) else os.path.abspath(spec).rstrip("/") + "/"
        return _keep_documents(storage.list_files(spec), base=base, hidden=True)
    return _uris_table([]), Counter()


def _keep_documents(uris: list[str], base: str, hidden: bool = False) -> tuple[pa.Table, Counter]:
    keep, skipped = [], Counter()
    for u in uris:
        if hidden and _hidden(u, base):
            skipped["hidden"] += 1
        elif suffix(u) not in DOCUMENT_SUFFIXES:
            skipped["with another extension"] += 1
        else:
            keep.append(u)
    return _uris_table(keep), skipped


def _glob(pattern: str, storage: Storage) -> list[str]:
    if not storage.is_s3(pattern):
        return sorted(
            os.path.abspath(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
    # S3 has no globbing: list below the fixed part of the pattern and match the keys ('**' crosses folders).
    head = _GLOB_CHARS.split(pattern, 1)[0]
    prefix = head[: head.rfind("/") + 1]
    regex = glob_regex(pattern)
    return [u for u in storage.list_files(prefix) if regex.fullmatch(u)]


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob -> regex over '/'-separated keys: `*` and `?` stay within a folder, `**` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


_MANIFEST_BATCH = 65536  # rows turned into Python strings at a time (relative uris are resolved in Python)


def read_manifest(uri: str, storage: Storage) -> pa.Table:
    """JSONL / CSV / Parquet with a `uri` column (required) and `prompt`, `id` (optional), read in batches into a
    SOURCES_SCHEMA table (a million rows stay a few tens of MB of Arrow strings)."""
    return storage.retry(f"reading manifest {uri}", _read_manifest, uri, storage)


def _manifest_batches(uri: str, fs: pafs.FileSystem, path: str):
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    kind = suffix(uri)
    if kind == ".parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "uri" not in names:
                raise ValueError(f"manifest {uri} has no `uri` column (columns: {names})")
            cols = [c for c in ("uri", "prompt", "id") if c in names]
            yield from pf.iter_batches(batch_size=_MANIFEST_BATCH, columns=cols)
        return
    with fs.open_input_stream(path) as f:
        if kind == ".jsonl":
            reader = pajson.open_json(f)
        else:  # strings stay strings: an id column of digits must not become integers (ids are compared as text)
            strings = pacsv.ConvertOptions(column_types={c: "string" for c in ("uri", "prompt", "id")})
            reader = pacsv.open_csv(f, convert_options=strings)
        if "uri" not in reader.schema.names:
            raise ValueError(f"manifest {uri} has no `uri` column (columns: {reader.schema.names})")
        yield from reader


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.string())
    col = pc.utf8_trim_whitespace(batch.column(name).cast(pa.string())) if name == "uri" else batch.column(name)
    col = col.cast(pa.string())
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)  # "" is no value


def _read_manifest(uri: str, storage: Storage) -> pa.Table:
    fs, path = storage.resolve(uri)
    base = uri[: uri.rfind("/") + 1] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    chunks, skipped = [], 0
    for batch in _manifest_batches(uri, fs, path):
        table = pa.table([_column(batch, c) for c in ("uri", "id", "prompt")], SOURCES_SCHEMA)
        keep = pc.is_valid(table["uri"])
        skipped += table.num_rows - pc.sum(pc.cast(keep, pa.int64())).as_py() if table.num_rows else 0
        table = table.filter(keep)
        absolute = pc.or_(pc.starts_with(table["uri"], "s3://"), pc.match_substring_regex(table["uri"], r"^[/~]"))
        relative = pc.invert(absolute)
        if pc.any(relative).as_py():  # resolved against the manifest's folder, in Python (normpath)
            rel = table["uri"].filter(relative).to_pylist()
            if storage.is_s3(uri):
                resolved = [storage.join(base, u) for u in rel]
            else:
                resolved = [os.path.normpath(os.path.join(base, u)) for u in rel]
            uris = pc.replace_with_mask(table["uri"].combine_chunks(), relative.combine_chunks(), pa.array(resolved))
            table = table.set_column(0, "uri", uris)
        chunks.append(table)
    if skipped:
        log.warning("manifest %s: skipped %d rows without a uri", uri, skipped)
    return pa.concat_tables(chunks) if chunks else SOURCES_SCHEMA.empty_table()
