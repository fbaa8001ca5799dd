"""Per-document output (`--documents-out DIR`): one Markdown file per document and a Dolma-style JSONL of documents.

    DIR/documents.jsonl     one JSON line per listed document, sorted by id (schema in docs/batch.md, "Digitization")
    DIR/text/<name>.md      the document's pages in page order, each after a marker line:
                                <!-- page 1 -->
                                ...page 1's text...

                                <!-- page 2: error pdf_error (PDF page 2 failed to render: ...) -->

                                <!-- page 3 -->
                                ...

Document text: the answers to the document's *first* prompt (the manifest row's prompt, else the first --prompt /
--prompts-file line): put the transcription prompt first. A JSONL line's `text` is those answers in page order joined
by a blank line ("\n\n"); an error or missing page adds nothing there, it is a marked gap in the Markdown and a status
in `pages`. `attributes.pdf_page_numbers` holds [start, end, page] spans into `text` (end exclusive, olmOCR's field),
so `text[start:end]` is exactly that page's row text.

Why the files are built from the Parquet parts at the end of every run (and not written as rows arrive): a document's
pages arrive in any order and over several runs (a killed run leaves some, the rerun adds the rest), while the parts are
the exactly-once record of what is done. Text built from them can neither duplicate nor drop a page whatever was
killed before, and building again is idempotent. Memory stays bounded: documents are taken in groups whose text fits
`budget_bytes`, each group is read from all parts (one pass when the job's text fits, as most jobs' does), and each
document's file is written before the next is assembled; only a small per-document index lives through the build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .output import Output
from .rows import split_row_id

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"  # between page texts in a document's `text`
_COLUMNS = (
    "id",
    "page",
    "prompt",
    "text",
    "error_type",
    "error_message",
    "text_source",
    "finish_reason",
    "attempts",
    "model",
)
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def file_name(doc: str) -> str:
    """A document id as a file name: itself when it is plain, else its plain characters and a hash (ids may hold
    '/', ':' or anything a manifest put there)."""
    if _SAFE.fullmatch(doc):
        return doc
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", doc).strip("._-")[:80]
    return f"{plain or 'doc'}-{hashlib.blake2b(doc.encode(), digest_size=4).hexdigest()}"


def write_documents(
    output: Output, documents_out: str, document_prompts: pa.Table, budget_bytes: int = 256 * 2**20
) -> dict:
    """Build DIR/documents.jsonl and DIR/text/*.md for the listed documents (`plan.document_prompts`: one row per
    listed doc, uri and prompt, with its listing `order`) from the parts in `output`; returns totals."""
    fs = output.fs
    dfs, dpath = output.storage.resolve(documents_out)
    dpath = dpath.rstrip("/")
    local = isinstance(dfs, pafs.LocalFileSystem)
    if local:
        dfs.create_dir(f"{dpath}/text", recursive=True)
    # the document prompt of each listed document: its first prompt in listing order
    wanted: dict[str, tuple[str, str]] = {}
    ordered = document_prompts.sort_by("order").select(["doc", "uri", "prompt"]).to_pydict()
    for doc, uri, prompt in zip(ordered["doc"], ordered["uri"], ordered["prompt"], strict=True):
        wanted.setdefault(doc, (uri, prompt))
    parts = output.parts()

    sizes: dict[str, int] = defaultdict(int)  # pass 1: text bytes of each document, to group documents by budget
    for part in parts:
        t = pq.read_table(part, columns=["id", "prompt", "text"], filesystem=fs).to_pydict()
        for rid, prompt, text in zip(t["id"], t["prompt"], t["text"], strict=True):
            doc = split_row_id(rid)[0]
            if doc in wanted and prompt == wanted[doc][1]:
                sizes[doc] += len(text or "") + 64
    groups: list[list[str]] = [[]]
    used = 0
    for doc in sorted(wanted):
        if groups[-1] and used + sizes[doc] > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(doc)
        used += sizes[doc]

    built = datetime.now(UTC).isoformat(timespec="seconds")
    totals = {"path": documents_out, "documents": 0, "pages": 0, "gaps": 0, "passes": len(groups)}
    names: set[str] = set()
    jsonl = f"{dpath}/documents.jsonl"
    tmp = f"{dpath}/.documents.jsonl.tmp" if local else jsonl  # an S3 object appears only when its upload completes
    with dfs.open_output_stream(tmp) as f:
        for group in groups:
            rows = _read_group(fs, parts, {d: wanted[d][1] for d in group})
            for doc in group:
                record, markdown = _document(doc, wanted[doc][0], wanted[doc][1], rows.pop(doc, {}), built)
                name = file_name(doc)
                names.add(f"{name}.md")
                record["metadata"]["text_path"] = f"text/{name}.md"
                _write(dfs, f"{dpath}/text/{name}.md", markdown.encode("utf-8"), local)
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                totals["documents"] += 1
                totals["pages"] += len(record["pages"])
                totals["gaps"] += sum(p["status"] != "ok" for p in record["pages"])
    if local:
        dfs.move(tmp, jsonl)
    _remove_stale(dfs, f"{dpath}/text", names)  # documents of an earlier listing (or before --no-resume)
    log.info(
        "documents out: %d documents, %d pages (%d gaps) in %s",
        totals["documents"],
        totals["pages"],
        totals["gaps"],
        documents_out,
    )
    return totals


def _read_group(fs: pafs.FileSystem, parts: list[str], prompt_of: dict[str, str]) -> dict[str, dict[int, dict]]:
    """doc -> page -> row (the document prompt's rows only) for the documents of one group, from every part."""
    rows: dict[str, dict[int, dict]] = defaultdict(dict)
    for part in parts:
        have = set(pq.read_schema(part, filesystem=fs).names)  # parts written before a column existed lack it
        t = pq.read_table(part, columns=[c for c in _COLUMNS if c in have], filesystem=fs)
        docs = [split_row_id(rid)[0] for rid in t.column("id").to_pylist()]
        prompts = t.column("prompt").to_pylist()
        keep = [i for i, (d, p) in enumerate(zip(docs, prompts, strict=True)) if prompt_of.get(d) == p]
        if not keep:
            continue
        for i, r in zip(keep, t.take(pa.array(keep, pa.int64())).to_pylist(), strict=True):
            rows[docs[i]].setdefault(r["page"], r)  # (ids are unique over the parts: one row per page)
    return rows


def _document(doc: str, uri: str, prompt: str, pages: dict[int, dict], built: str) -> tuple[dict, str]:
    """One document's JSONL record and Markdown, pages in order; a page number without a row is "missing"."""
    text, md, spans, entries = [], [], [], []
    pos = 0
    numbers = sorted(pages) if 0 in pages else range(1, max(pages, default=0) + 1)
    for n in numbers:
        r = pages.get(n)
        if r is None:
            status, page_text = "missing", None
            md.append(f"<!-- page {n}: missing (no row in the output) -->\n\n")
        elif r.get("error_type"):
            status, page_text = r["error_type"], None
            md.append(f"<!-- page {n}: error {r['error_type']} ({_one_line(r.get('error_message') or '')}) -->\n\n")
        else:
            status, page_text = "ok", r.get("text") or ""
            md.append(f"<!-- page {n} -->\n{page_text}\n\n")
        entry = {"page": n, "status": status, "start": pos, "end": pos}
        if page_text is not None:
            if text:
                pos += len(PAGE_SEPARATOR)
            entry.update(start=pos, end=pos + len(page_text))
            spans.append([pos, pos + len(page_text), n])
            text.append(page_text)
            pos += len(page_text)
        if r is not None:
            entry.update(
                text_source=r.get("text_source"),
                finish_reason=r.get("finish_reason"),
                attempts=r.get("attempts"),
                error_message=r.get("error_message"),
            )
        entries.append(entry)
    models = sorted({r["model"] for r in pages.values() if r.get("model")})
    statuses = [e["status"] for e in entries]
    record = {
        "id": doc,
        "text": PAGE_SEPARATOR.join(text),
        "source": uri,
        "added": built,
        "metadata": {
            "prompt": prompt,
            "model": ", ".join(models),
            "pages": len(entries),
            "ok_pages": statuses.count("ok"),
            "error_pages": sum(s not in ("ok", "missing") for s in statuses),
            "missing_pages": statuses.count("missing"),
            "pdf_text_pages": sum(e.get("text_source") == "pdf_text" for e in entries),
            "retried_pages": sum((e.get("attempts") or 0) > 1 for e in entries),
        },
        "attributes": {"pdf_page_numbers": spans},
        "pages": entries,
    }
    return record, "".join(md)


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).replace("--", "- -")[:300]  # (a "-->" in it would end the comment)


def _write(fs: pafs.FileSystem, path: str, data: bytes, local: bool) -> None:
    target = path
    if local:  # rename into place: a reader never sees half a file
        path = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp"
    with fs.open_output_stream(path) as f:
        f.write(data)
    if local:
        fs.move(path, target)


def _remove_stale(fs: pafs.FileSystem, folder: str, keep: set[str]) -> None:
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
    for i in infos:
        name = i.path.rsplit("/", 1)[-1]
        if i.type == pafs.FileType.File and name.endswith(".md") and name not in keep:
            fs.delete_file(i.path)
