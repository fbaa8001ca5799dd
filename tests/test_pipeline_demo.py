"""The README's first command: `make demo` (python -m demo) on this machine, as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(400)
def test_demo_runs_the_batch_job_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["INFIMM_TINY_CHECKPOINT"] = str(tmp_path / "tiny")  # a fresh machine: the checkpoint is built on the spot
    p = subprocess.run([sys.executable, "-m", "demo"], capture_output=True, text=True, env=env, timeout=380)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "RANDOM WEIGHTS" in p.stderr
    out = p.stdout
    # 6 documents: 2 PNG + 1 JPEG pages, a 3-page PDF, a 2-page TIFF, one corrupt PNG -> 9 rows, one error
    assert "(9 rows, 6 documents, 9 pages)" in out and "errors      1 rows: decode_error 1" in out
    table = out[out.index("source ") :].splitlines()[2:]
    assert len(table) == 9 and sum("[decode_error]" in line for line in table) == 1
    assert sum("report.pdf" in line for line in table) == 3 and sum("fax.tiff" in line for line in table) == 2
