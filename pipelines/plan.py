"""Resume planning: listed sources + the ids already written -> the documents (and pages) still to do."""

from __future__ import annotations

from collections import defaultdict

from .rows import doc_key, prompt_key, split_row_id
from .storage import SINGLE_PAGE_SUFFIXES, suffix


def group_sources(sources, prompts: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """(doc, uri) -> its prompts (manifest prompt, else the job's), each document once. Raises ValueError for
    a document without any prompt or a manifest id used for two documents."""
    groups: dict[tuple[str, str], list[str]] = {}
    uri_of: dict[str, str] = {}
    for s in sources:
        doc = doc_key(s.uri, s.doc_id)
        if uri_of.setdefault(doc, s.uri) != s.uri:
            raise ValueError(f"manifest id {doc!r} names two documents: {uri_of[doc]} and {s.uri}; ids must be unique")
        ps = [s.prompt] if s.prompt else list(prompts)
        if not ps:
            raise ValueError(
                f"no prompt for {s.uri}: pass --prompt or --prompts-file, or add a prompt column to the manifest"
            )
        bucket = groups.setdefault((doc, s.uri), [])
        bucket += [p for p in ps if p not in bucket]
    return groups


def plan_sources(sources, prompts: tuple[str, ...], done: set[str]) -> tuple[list[dict], int]:
    """Sources -> decode-stage records (one per document, all its prompts), minus what the output already has.
    Returns (records, documents skipped as complete)."""
    groups = group_sources(sources, prompts)
    done_by_doc: dict[str, set[str]] = defaultdict(set)
    for rid in done:
        doc, page, q = split_row_id(rid)
        done_by_doc[doc].add(f"{page}:{q}")
    records, skipped = [], 0
    for (doc, uri), ps in groups.items():
        finished = done_by_doc.get(doc, set())
        answered = {k.rsplit(":", 1)[1] for k in finished}
        # A one-page file with a row for every prompt is complete: do not even read it. (A multi-page one must be
        # opened to learn its page count; the decode stage then skips its finished pages.)
        if suffix(uri) in SINGLE_PAGE_SUFFIXES and {prompt_key(p) for p in ps} <= answered:
            skipped += 1
            continue
        records.append({"uri": uri, "doc": doc, "prompts": ps, "done": sorted(finished)})
    return records, skipped
