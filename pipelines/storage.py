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
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
DOCUMENT_SUFFIXES = IMAGE_SUFFIXES + (".pdf",)
SINGLE_PAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # never more than one page (first frame)
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None = AWS itself
    region: str | None = None
    access_key: str | None = None  # None: pyarrow's default chain (profile, instance role, ...)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False

    @classmethod
    def from_env(
        cls, endpoint: str | None = None, region: str | None = None, anonymous: bool = False, env: dict | None = None
    ) -> S3Settings:
        env = os.environ if env is None else env
        return cls(
            endpoint=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            anonymous=anonymous,
        )

    def filesystem(self) -> pafs.S3FileSystem:
        kw: dict = {"region": self.region or "us-east-1"}
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


class TooLarge(OSError):
    """An object over the per-document byte limit (not read into memory)."""


class Storage:
    """Resolves URIs to (filesystem, path) and reads whole objects. Picklable; holds no open connections."""

    def __init__(self, s3: S3Settings = S3Settings()):
        self.s3 = s3
        self._s3fs: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    def __getstate__(self):
        return {"s3": self.s3}

    def __setstate__(self, state):
        self.__init__(state["s3"])

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
        """The whole object. FileNotFoundError when it is missing, OSError for other I/O failures."""
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"the object is over the {max_bytes / 2**20:.0f} MiB limit on one document")
        return data

    def join(self, base: str, name: str) -> str:
        return base.rstrip("/") + "/" + name if self.is_s3(base) else os.path.join(base, name)

    def list_files(self, uri: str) -> list[str]:
        """Every file below a folder/prefix (recursive), as URIs in the same form, sorted."""
        fs, path = self.resolve(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return []
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        return ["s3://" + p for p in files] if self.is_s3(uri) else files

    def kind(self, uri: str) -> str:
        """'file', 'dir' or 'missing'."""
        fs, path = self.resolve(uri)
        t = fs.get_file_info(path.rstrip("/") if self.is_s3(uri) else path).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


# ---- sources ---------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One document to read. `doc_id`: the manifest's id, else None (the row ids then derive from the uri)."""

    uri: str
    doc_id: str | None = None
    prompt: str | None = None  # per-document prompt from a manifest; None = the job's prompts


def suffix(uri: str) -> str:
    return Path(urlparse(uri).path if "://" in uri else uri).suffix.lower()


def _hidden(uri: str) -> bool:
    return any(part.startswith(".") for part in uri.replace("s3://", "", 1).split("/")[1:] if part)


def list_sources(inputs: list[str], storage: Storage) -> list[Source]:
    """Expand every --input into Sources, in a stable order. Raises ValueError for an input that matches nothing."""
    sources: list[Source] = []
    for spec in inputs:
        found = _expand(spec, storage)
        if not found:
            raise ValueError(f"--input {spec} matches no documents ({', '.join(DOCUMENT_SUFFIXES)} or a manifest)")
        log.info("input %s: %d documents", spec, len(found))
        sources.extend(found)
    return sources


def _expand(spec: str, storage: Storage) -> list[Source]:
    if _GLOB_CHARS.search(spec):
        return [Source(u) for u in _glob(spec, storage) if suffix(u) in DOCUMENT_SUFFIXES]
    kind = storage.kind(spec)
    if kind == "file" or (kind == "missing" and not spec.endswith("/") and suffix(spec)):
        if suffix(spec) in MANIFEST_SUFFIXES:
            return read_manifest(spec, storage)
        return [Source(spec if storage.is_s3(spec) else os.path.abspath(spec))]  # a missing one becomes an error row
    if kind == "dir" or storage.is_s3(spec):
        return [Source(u) for u in storage.list_files(spec) if suffix(u) in DOCUMENT_SUFFIXES and not _hidden(u)]
    return []


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


def read_manifest(uri: str, storage: Storage) -> list[Source]:
    """JSONL / CSV / Parquet with a `uri` column (required) and `prompt`, `id` (optional)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    kind = suffix(uri)
    if kind == ".parquet":
        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open_input_stream(path) as f:
            reader = pajson.read_json if kind == ".jsonl" else pacsv.read_csv
            # Strings stay strings: an id column of digits must not become integers (ids are compared as text).
            strings = pacsv.ConvertOptions(column_types={c: "string" for c in ("uri", "prompt", "id")})
            table = reader(f, convert_options=strings) if kind == ".csv" else reader(f)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no `uri` column (columns: {table.column_names})")
    base = uri[: uri.rfind("/") + 1] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    out, skipped = [], 0
    for row in table.select([c for c in ("uri", "prompt", "id") if c in table.column_names]).to_pylist():
        u = str(row["uri"]).strip() if row.get("uri") is not None else ""
        if not u:
            skipped += 1
            continue
        if not storage.is_s3(u) and not os.path.isabs(os.path.expanduser(u)):
            u = storage.join(base, u) if storage.is_s3(uri) else os.path.normpath(os.path.join(base, u))
        prompt = row.get("prompt")
        doc_id = row.get("id")
        out.append(
            Source(
                u,
                doc_id=None if doc_id in (None, "") else str(doc_id),
                prompt=None if prompt in (None, "") else str(prompt),
            )
        )
    if skipped:
        log.warning("manifest %s: skipped %d rows without a uri", uri, skipped)
    return out
