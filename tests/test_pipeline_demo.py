"""The README's first command: `make demo` (python -m demo) on this machine, as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Of the demo's 3 word pages, how many the shipped demo reader must read exactly (its held-out exact match is in
# checkpoints/demo-reader/eval.json).
MIN_WORDS_READ = 2


@pytest.mark.timeout(400)
def test_demo_runs_the_batch_job_end_to_end(tmp_path):
    from runtime.checkpoints import demo_checkpoint

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["INFIMM_TINY_CHECKPOINT"] = str(tmp_path / "tiny")  # a fresh machine (only used without the demo reader)
    p = subprocess.run([sys.executable, "-m", "demo"], capture_output=True, text=True, env=env, timeout=380)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert ("DEMO READER" if demo_checkpoint() else "RANDOM WEIGHTS") in p.stderr, "the banner says what the model is"
    out = p.stdout
    # 9 documents: 2 PNG + 1 JPEG pages, a 3-page PDF, a 2-page TIFF, one corrupt PNG, 3 word pages -> 12 rows, 1 error
    assert "(12 rows, 9 documents, 12 pages)" in out and "errors      1 rows: decode_error 1" in out
    table = out[out.index("source ") :].split("\n\n")[0].splitlines()[2:]
    assert len(table) == 12 and sum("[decode_error]" in line for line in table) == 1
    assert sum("report.pdf" in line for line in table) == 3 and sum("fax.tiff" in line for line in table) == 2
    words = out[out.index("word page") :].split("\n\n")[0].splitlines()[1:]
    assert len(words) == 3, f"three synthetic word pages, each with what is printed and what was read: {words}"
    if demo_checkpoint():
        # The demo reader reads its own task through the whole pipeline (S3 -> Ray Data -> engine -> Parquet).
        right = [line for line in words if line.endswith(" ok")]
        assert len(right) >= MIN_WORDS_READ, f"demo reader read {len(right)} of 3 word pages: {words}"
