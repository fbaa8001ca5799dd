"""MkDocs hook: reference tables generated from the code while the site builds, so the docs cannot drift from it.

A page asks for one with an HTML comment on a line of its own, `<!-- generated: NAME (where it comes from) -->`;
the comment is replaced by the Markdown of `GENERATORS[NAME]`. An unknown NAME fails the build. Docstrings are read
with `ast` (no torch import for the window rule); `RUN_OPTIONS` and the metrics catalog are imported.
`tests/test_docs.py` uses the same functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([a-z-]+)\b.*-->$", re.M)


def _docstring(path: str) -> str:
    return ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def batch_flags() -> str:
    """`infimm-hd batch run` flags: pipelines/cli.py RUN_OPTIONS (what argparse's --help prints)."""
    from pipelines.cli import RUN_OPTIONS

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for flag, kw in RUN_OPTIONS:
        metavar = kw.get("metavar") or {int: "N", float: "F", None: "VALUE"}.get(kw.get("type"), "VALUE")
        if kw.get("action") == "store_true":
            metavar = ""
        choices = kw.get("choices")
        if choices:
            metavar = "{" + ",".join(choices) + "}"
        default = kw.get("default")
        if kw.get("required"):
            shown = "required"
        elif kw.get("action") == "store_true" or default is None:
            shown = ""
        elif isinstance(default, tuple):
            shown = ",".join(str(x) for x in default)
        else:
            shown = str(default)
        repeat = " (repeatable)" if kw.get("action") == "append" and "repeatable" not in kw.get("help", "") else ""
        usage = f"`{flag} {metavar}`" if metavar else f"`{flag}`"
        rows.append(f"| {_cell(usage)} | {_cell(shown)} | {_cell(kw.get('help', '') + repeat)} |")
    return "\n".join(rows)


def exit_codes() -> str:
    """The exit code list of pipelines/cli.py's docstring as a table."""
    doc = _docstring("pipelines/cli.py")
    block = doc[doc.index("Exit codes") :].split("\n\n")[0].splitlines()[1:]
    codes: list[list[str]] = []
    for line in block:
        m = re.match(r"\s+(\d)\s+(.*)", line)
        if m:
            codes.append([m.group(1), m.group(2)])
        else:
            codes[-1][1] += " " + line.strip()
    assert codes, "pipelines/cli.py's docstring lost its 'Exit codes' list"
    return "\n".join(["| code | meaning |", "|---|---|"] + [f"| {c} | {_cell(text)} |" for c, text in codes])


def window_rule() -> str:
    """The numbered rule of model/windows.py's docstring (everything after its first paragraph)."""
    doc = _docstring("model/windows.py")
    body = doc.split("\n\n", 1)[1]
    return re.sub(r"\n(?=1\. )", "\n\n", body, count=1)  # Markdown wants a blank line before a list


def metrics() -> str:
    """runtime/metrics.py's CATALOG under the names Prometheus scrapes."""
    from runtime.metrics import CATALOG, exported_name

    rows = ["| name | type | tags | meaning |", "|---|---|---|---|"]
    rows += [f"| `{exported_name(m)}` | {m.kind} | {', '.join(m.tags)} | {_cell(m.help)} |" for m in CATALOG]
    return "\n".join(rows)


GENERATORS = {"batch-flags": batch_flags, "exit-codes": exit_codes, "window-rule": window_rule, "metrics": metrics}


def render(markdown: str) -> str:
    """`markdown` with every generated-table marker replaced by its table."""

    def one(m: re.Match) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block {name!r}; known: {sorted(GENERATORS)} (docs/hooks.py)")
        return GENERATORS[name]()

    return MARKER.sub(one, markdown)


def on_page_markdown(markdown, page, config, files):  # MkDocs hook
    return render(markdown)
