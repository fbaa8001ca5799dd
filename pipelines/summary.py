"""End-of-job summary: totals over the whole output folder (every run so far) plus this run's throughput.

Written beside the parts as `_summary.json` and `_summary.png` (throughput over time, windows-per-page histogram);
the leading underscore keeps them out of Parquet readers.
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .output import Output
from .rows import OUTPUT_SCHEMA

log = logging.getLogger(__name__)

_COLUMNS = ["id", "source_uri", "page", "error_type", "prompt_tokens", "completion_tokens", "grid_rows", "grid_cols"]
_EMPTY = pa.schema([OUTPUT_SCHEMA.field(c) for c in _COLUMNS]).empty_table()


def summarize(output: Output, run: dict, model: str = "", random_weights: bool = False) -> dict:
    """Totals over every part, computed in Arrow (a million rows stay columns, not Python objects)."""
    parts = [
        output.retry(f"reading {part}", pq.read_table, part, columns=_COLUMNS, filesystem=output.fs)
        for part in output.parts()
    ]
    t = pa.concat_tables(parts, promote_options="permissive") if parts else _EMPTY
    errors = t["error_type"].drop_null().value_counts()
    errors_by_type = {e.as_py(): c.as_py() for e, c in zip(errors.field("values"), errors.field("counts"), strict=True)}
    pages = t.group_by(["source_uri", "page"]).aggregate([]).num_rows
    ok = t.filter(pc.is_null(t["error_type"]))
    ok = ok.append_column("windows", pc.multiply(ok["grid_rows"], ok["grid_cols"]))
    per_page = ok.group_by(["source_uri", "page"]).aggregate([("windows", "max")])["windows_max"].drop_null()
    hist = per_page.value_counts()
    windows = {int(k.as_py()): c.as_py() for k, c in zip(hist.field("values"), hist.field("counts"), strict=True)}
    n_error = sum(errors_by_type.values())
    return {
        "output": output.uri,
        "model": model,
        "random_weights": random_weights,
        "rows": t.num_rows,
        "unique_ids": pc.count_distinct(t["id"]).as_py(),
        "documents": pc.count_distinct(t["source_uri"]).as_py(),
        "pages": pages,
        "ok_rows": t.num_rows - n_error,
        "error_rows": n_error,
        "errors_by_type": dict(sorted(errors_by_type.items())),
        "prompt_tokens": pc.sum(t["prompt_tokens"]).as_py() or 0,
        "completion_tokens": pc.sum(t["completion_tokens"]).as_py() or 0,
        "windows_per_page": {
            "mean": round(sum(k * n for k, n in windows.items()) / max(1, len(per_page)), 3),
            "histogram": {str(k): n for k, n in sorted(windows.items())},
        },
        "run": run,
    }


def write_summary(output: Output, summary: dict) -> None:
    output.write_bytes("_summary.json", json.dumps(summary, indent=2).encode())
    try:
        png = plot(summary)
    except Exception:  # noqa: BLE001 - a missing font or backend must not fail a finished job
        log.exception("could not draw the summary plot")
        return
    output.write_bytes("_summary.png", png)


def plot(summary: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = summary["run"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tl = run.get("timeline") or [(0.0, 0, 0)]
    t = [x[0] for x in tl]
    pages = [x[1] for x in tl]
    # pages/s in equal time bins (results arrive in bursts, one engine batch at a time, so per-arrival rates spike)
    width = max(1.0, t[-1] / 30)
    n_bins = max(1, int(t[-1] // width) + 1)
    done = [0] * n_bins
    for i in range(1, len(tl)):
        done[min(n_bins - 1, int(t[i] // width))] += pages[i] - pages[i - 1]
    if t[-1] > 0:
        a.step(
            [k * width for k in range(n_bins + 1)],
            [done[0] / width] + [d / width for d in done],
            where="pre",
            label=f"pages/s ({width:.0f}s bins)",
        )
        a.axhline(run.get("pages_per_s", 0), color="k", ls="--", lw=1, label=f"mean {run.get('pages_per_s', 0):.2f}")
        a.legend(loc="upper left", fontsize=8)
    a2 = a.twinx()
    a2.step(t, pages, where="post", color="tab:orange", lw=1)
    a2.set_ylabel("pages done", color="tab:orange")
    a.set_xlabel("seconds since start")
    a.set_ylabel("pages/s")
    a.set_title(f"throughput ({run.get('pages', 0)} pages in {run.get('seconds', 0):.0f}s)")
    hist = summary["windows_per_page"]["histogram"]
    b.bar([int(k) for k in hist], list(hist.values()))
    b.set_xticks([int(k) for k in hist])
    b.set_xlabel("448x448 windows per page (thumbnail not counted)")
    b.set_ylabel("pages")
    b.set_title(f"windows per page (mean {summary['windows_per_page']['mean']})")
    title = f"{summary['output']}  -  model {summary['model']}"
    fig.suptitle(title + ("  (RANDOM WEIGHTS)" if summary.get("random_weights") else ""), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def format_summary(summary: dict) -> str:
    """Human-readable lines for the CLI."""
    run = summary["run"]
    lines = [
        f"output      {summary['output']}  ({summary['rows']} rows, {summary['documents']} documents, "
        f"{summary['pages']} pages)",
        f"this run    {run['pages']} pages, {run['rows']} rows in {run['seconds']:.1f}s: {run['pages_per_s']:.2f} "
        f"pages/s, {run['tokens_per_s']:.1f} tokens/s; {run['documents_skipped_complete']} documents and "
        f"{run['rows_already_done']} rows were already done",
        f"errors      {summary['error_rows']} rows"
        + (
            ": " + ", ".join(f"{k} {v}" for k, v in summary["errors_by_type"].items())
            if summary["errors_by_type"]
            else ""
        ),
        f"windows     {summary['windows_per_page']['mean']} per page; histogram "
        + ", ".join(f"{k}: {v}" for k, v in summary["windows_per_page"]["histogram"].items()),
    ]
    return "\n".join(lines)
