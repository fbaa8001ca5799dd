"""Planning a job before any work: listed sources + the ids already written -> the documents (and pages) still to do.

`plan_job` lists a job's inputs, reads what its output already holds and returns the `Plan`; it writes nothing, and
every check that can refuse the job runs here.

Everything here is Arrow, never a Python object per document or per row: a million listed documents and the ids of
the rows already written are columns of strings, joined and grouped by Arrow's hash kernels (benchmarks/
driver_scale.py measures it). Python objects exist only for the ids the writer must still guard against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import JobConfig
from .output import Output
from .rows import doc_key, prompt_key
from .storage import SINGLE_PAGE_SUFFIXES, Storage, list_sources, sources_table

log = logging.getLogger(__name__)

# One decode-stage record per document left: its prompts, and the "page:prompt_hash" keys already written.
SOURCE_SCHEMA = pa.schema(
    [("uri", pa.string()), ("doc", pa.string()), ("prompts", pa.list_(pa.string())), ("done", pa.list_(pa.string()))]
)
_BATCH = 65536
_SINGLE_PAGE = r"(?i)\.(?:" + "|".join(s[1:] for s in SINGLE_PAGE_SUFFIXES) + r")$"


def document_prompts(sources, prompts: tuple[str, ...]) -> pa.Table:
    """Sources (a SOURCES_SCHEMA table or Source objects) -> one row per (doc, uri, prompt), each once, with the
    prompt's hash `q` and `order` (first appearance). Raises ValueError for a document without any prompt or a manifest
    id used for two documents: every check that can refuse the job, before anything is written."""
    table = sources_table(sources)
    docs = []
    for batch in table.select(["uri", "doc_id"]).to_batches(max_chunksize=_BATCH):
        uris, ids = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        docs.append(pa.array([doc_key(u, i) for u, i in zip(uris, ids, strict=True)], pa.string()))
    doc = pa.chunked_array(docs, pa.string())
    order = _arange(table.num_rows)
    has_prompt = pc.fill_null(pc.not_equal(table["prompt"], ""), False)
    step = len(prompts) + 1
    with_prompt = {"doc": doc, "uri": table["uri"], "prompt": table["prompt"], "order": pc.multiply(order, step)}
    parts = [pa.table(with_prompt).filter(has_prompt)]
    without = pa.table({"doc": doc, "uri": table["uri"], "order": order}).filter(pc.invert(has_prompt))
    if without.num_rows and not prompts:
        where = without["uri"][0]
        raise ValueError(
            f"no prompt for {where}: pass --prompt or --prompts-file, or add a prompt column to the manifest"
        )
    n = without.num_rows
    for i, p in enumerate(prompts):  # `order` (source, then prompt) keeps the job's prompts in their order
        parts.append(
            pa.table(
                {
                    "doc": without["doc"],
                    "uri": without["uri"],
                    "prompt": pa.repeat(pa.scalar(p, pa.string()), n),
                    "order": pc.add(pc.multiply(without["order"], step), i + 1),
                }
            )
        )
    parts = [t for t in parts if t.num_rows] or parts[:1]
    exploded = pa.concat_tables(parts)
    uris_per_doc = exploded.group_by("doc").aggregate([("uri", "count_distinct")])
    clash = uris_per_doc.filter(pc.greater(uris_per_doc["uri_count_distinct"], 1))
    if clash.num_rows:
        doc_id = clash["doc"][0].as_py()
        two = pc.unique(exploded.filter(pc.equal(exploded["doc"], doc_id))["uri"]).to_pylist()[:2]
        raise ValueError(f"manifest id {doc_id!r} names two documents: {two[0]} and {two[1]}; ids must be unique")
    if len(parts) == 1 and uris_per_doc.num_rows == table.num_rows:
        distinct = exploded  # the usual listing: every document once, one kind of prompt; already in order
    else:  # a document listed twice, or with manifest and job prompts: each (document, prompt) once, first order
        distinct = (
            exploded.sort_by("order")
            .group_by(["doc", "uri", "prompt"], use_threads=False)
            .aggregate([("order", "min")])
            .rename_columns({"order_min": "order"})
        )
    # a job has a handful of distinct prompts: hash each once
    encoded = pc.dictionary_encode(distinct["prompt"]).combine_chunks()
    hashes = pa.array([prompt_key(p) for p in encoded.dictionary.to_pylist()], pa.string())
    return distinct.append_column("q", pc.take(hashes, encoded.indices))


def split_done(ids) -> pa.Table:
    """Row ids (`doc:page:prompt_hash`, the doc part may contain ':') -> (id, doc, key "page:hash", q)."""
    if not isinstance(ids, pa.ChunkedArray):
        ids = pa.chunked_array([ids] if isinstance(ids, pa.Array) else [pa.array(list(ids), pa.string())], pa.string())
    parts = pc.split_pattern(ids, ":", max_splits=2, reverse=True)
    page, q = pc.list_element(parts, 1), pc.list_element(parts, 2)
    return pa.table(
        {"id": ids, "doc": pc.list_element(parts, 0), "key": pc.binary_join_element_wise(page, q, ":"), "q": q}
    )


def plan_documents(documents: pa.Table, done_ids) -> tuple[pa.Table, int, set[str]]:
    """(document_prompts table, ids already written) -> (SOURCE_SCHEMA records in listing order, documents skipped as
    complete, ids of the remaining documents already written: what the writer must not write again)."""
    done = split_done(done_ids)
    grouped = documents.group_by(["doc", "uri"], use_threads=False).aggregate([("prompt", "list"), ("order", "min")])
    skipped = 0
    if done.num_rows:
        # A one-page file with a row for every prompt is complete: do not even read it. (A multi-page one must be
        # opened to learn its page count; the decode stage then skips its finished pages.)
        answered = done.group_by(["doc", "q"]).aggregate([])
        answered = answered.append_column("hit", pc.is_valid(answered["doc"]))  # all true
        asked = documents.select(["doc", "q"]).join(answered, ["doc", "q"], join_type="left outer")
        asked = asked.set_column(2, "hit", pc.fill_null(asked["hit"], False))
        per_doc = asked.group_by("doc").aggregate([("hit", "all")])
        complete = per_doc.filter(per_doc["hit_all"])["doc"]
        single = pc.match_substring_regex(grouped["uri"], _SINGLE_PAGE)
        skip = pc.and_(single, pc.is_in(grouped["doc"], value_set=complete.combine_chunks()))
        skipped = pc.sum(pc.cast(skip, pa.int64())).as_py() or 0
        grouped = grouped.filter(pc.invert(skip))
    left = pc.is_in(done["doc"], value_set=grouped["doc"].combine_chunks())
    done_left = done.filter(left)
    keys = done_left.group_by("doc").aggregate([("key", "list")])
    # (Arrow joins carry no list columns: join row numbers, then take the lists by them)
    left_rows = pa.table({"doc": grouped["doc"], "g": _arange(grouped.num_rows), "order": grouped["order_min"]})
    key_rows = pa.table({"doc": keys["doc"], "k": _arange(keys.num_rows)})
    joined = left_rows.join(key_rows, "doc", join_type="left outer").sort_by("order")
    g, k = joined["g"].combine_chunks(), joined["k"].combine_chunks()
    empty = pa.scalar([], pa.list_(pa.string()))
    records = pa.table(
        {
            "uri": grouped["uri"].take(g),
            "doc": grouped["doc"].take(g),
            "prompts": grouped["prompt_list"].take(g),
            "done": pc.fill_null(keys["key_list"].take(k), empty),
        },
        SOURCE_SCHEMA,
    )
    return records, skipped, set(done_left["id"].to_pylist())


def _arange(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def plan_sources(sources, prompts: tuple[str, ...], done) -> tuple[pa.Table, int]:
    """Sources -> decode-stage records (one per document, all its prompts), minus what the output already has.
    Returns (records, documents skipped as complete)."""
    records, skipped, _ = plan_documents(document_prompts(sources, prompts), pa.array(list(done), pa.string()))
    return records, skipped


@dataclass
class Plan:
    """What the driver decided before any work: the documents left (SOURCE_SCHEMA records) and what is done."""

    documents: int  # listed
    rows_done: int  # ids already in the output
    skipped: int  # documents complete, not even read
    records: pa.Table  # decode-stage records, one per document left
    seen: set[str]  # ids of the documents left already written: the writer must never write them again
    document_prompts: pa.Table  # every listed (doc, uri, prompt) in listing order (`document_prompts`)


def plan_job(config: JobConfig, output: Output | None = None, sources=None) -> Plan:
    """List the inputs, read the ids already written, and keep what is left; writes nothing. Raises ValueError for
    what refuses the job and StorageUnavailable when storage stays down. `output`: the job's, resolved (default: from
    `config`); `sources`: a SOURCES_SCHEMA table or Source objects instead of listing `config.inputs`."""
    output = output or Output(config.output, Storage(config.s3))
    if output.s3 and "/" not in output.path:
        raise ValueError(f"--output {config.output}: give a prefix inside the bucket, e.g. s3://bucket/results/")
    if output.storage.kind(config.output) == "file":
        raise ValueError(f"--output {config.output} is a file; give a folder (or an s3:// prefix)")
    sources = list_sources(list(config.inputs), output.storage) if sources is None else sources
    documents = document_prompts(sources, config.prompts)  # every check that can refuse the job, before any write
    listed = pc.count_distinct(documents["doc"]).as_py()

    # --no-resume deletes the earlier parts (once the job is accepted): nothing counts as done
    done = output.done_ids() if config.resume else pa.chunked_array([], pa.string())
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
