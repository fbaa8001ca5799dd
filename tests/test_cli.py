"""The `infimm-hd` model commands, run as a user would (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image


def run(*args, env=None, check=True):
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=e, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_generate_without_checkpoint_says_weights_are_random(tmp_path):
    page = tmp_path / "page.png"
    Image.new("RGB", (900, 1200), "white").save(page)
    p = run(
        "generate",
        "--image",
        str(page),
        "--prompt",
        "Transcribe.",
        "--max-new-tokens",
        "5",
        "--json",
        "--random",
        env={"INFIMM_TINY_CHECKPOINT": str(tmp_path / "tiny")},
    )
    assert "RANDOM WEIGHTS" in p.stderr
    out = json.loads(p.stdout)
    assert 1 <= out["completion_tokens"] <= 5 and out["finish_reason"] in ("stop", "length")
    assert (tmp_path / "tiny" / "RANDOM_WEIGHTS.txt").exists()


def test_make_convert_and_generate_with_a_checkpoint(tmp_path):
    run("make-tiny-checkpoint", str(tmp_path / "bin"), "--format", "bin", "--seed", "4")
    p = run("convert-checkpoint", str(tmp_path / "bin"), str(tmp_path / "st"), "--shard-gb", "0.001")
    assert "checkpoint matches the model" in p.stdout
    page = tmp_path / "p.png"
    Image.new("RGB", (300, 300), "white").save(page)
    a = run("generate", "--checkpoint", str(tmp_path / "bin"), "--image", str(page), "--max-new-tokens", "6", "--json")
    b = run("generate", "--checkpoint", str(tmp_path / "st"), "--image", str(page), "--max-new-tokens", "6", "--json")
    assert "RANDOM WEIGHTS" not in a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    p = run("generate", "--image", str(bad), env={"INFIMM_TINY_CHECKPOINT": str(tmp_path / "tiny")}, check=False)
    assert p.returncode == 2
    assert "infimm-hd: error: not a readable image" in p.stderr and "Traceback" not in p.stderr
