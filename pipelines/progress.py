"""Progress of a batch job at the driver: a tqdm bar on a terminal, log lines elsewhere, the summary's timeline."""

from __future__ import annotations

import logging
import sys
import time

import pyarrow as pa

log = logging.getLogger(__name__)


class Progress:
    """Counts what arrives at the driver; a tqdm bar on a terminal, a log line every `log_every_s` elsewhere (job
    logs), and the timeline for the summary plot."""

    def __init__(self, enabled: bool = True, log_every_s: float = 15.0):
        self.t0 = time.monotonic()
        self.rows = self.pages = self.tokens = self.errors = 0
        self.timeline: list[tuple[float, int, int]] = [(0.0, 0, 0)]  # (seconds, pages, tokens)
        self.enabled, self.log_every_s, self._logged = enabled, log_every_s, self.t0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc="pages", unit="page", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def update(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        cols = table.select(["source_uri", "page", "completion_tokens", "error_type"]).to_pydict()
        pages = len(
            set(zip(cols["source_uri"], cols["page"], strict=True))
        )  # all prompts of a page come in the same table
        self.rows += table.num_rows
        self.pages += pages
        self.tokens += sum(t or 0 for t in cols["completion_tokens"])
        self.errors += sum(1 for e in cols["error_type"] if e)
        now = time.monotonic()
        elapsed = now - self.t0
        self.timeline.append((round(elapsed, 3), self.pages, self.tokens))
        if self.bar is not None:
            self.bar.update(pages)
            self.bar.set_postfix(rows=self.rows, errors=self.errors, tok_s=f"{self.tokens / max(elapsed, 1e-9):.1f}")
        elif self.enabled and now - self._logged >= self.log_every_s:
            self._logged = now
            log.info(
                "progress: %d pages, %d rows (%d errors) in %.0fs: %.2f pages/s, %.1f tokens/s",
                self.pages,
                self.rows,
                self.errors,
                elapsed,
                self.pages / elapsed,
                self.tokens / elapsed,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
