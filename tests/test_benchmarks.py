"""Smoke runs of the model benchmarks at tiny size on the CPU: they run end to end and print the promised JSON.
(Speed is never asserted; the numbers are for people.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu


def test_gpu_benchmark_runs_at_tiny_size_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(
        [
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--batches",
            "2",
            "--new-tokens",
            "3",
            "--vit-views",
            "2",
            "--prompt-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["checks"]["golden_d_ids_equal"] and result["checks"]["golden_d_batch_ids_equal"]
    assert result["checks"]["golden_b_logits_max_abs_diff"] < 1e-4
    for key in ("matmul_tflops", "copy_gb_per_s"):
        assert result["ceilings"][key] > 0
    assert result["vit"]["tflops"] > 0 and result["decode_batch1"]["bandwidth_floor_ms"] > 0
    job = result["standard_job"]["batch_2"]
    assert job["pages_per_s"] > 0 and job["steady"]["decode_ms_per_step"] > 0


def test_vit_flop_count_matches_the_baseline_note():
    from model import InfiMMHDConfig

    # gpu-baseline.md: 9.40 TFLOP per 448 view for EVA-CLIP-E (2 x 4.35 B params x 1025 tokens + attention)
    assert abs(gpu.vit_flops_per_view(InfiMMHDConfig()) / 1e12 - 9.40) < 0.05


def test_engine_cpu_benchmark_prints_json(tmp_path):
    out = tmp_path / "e.json"
    p = subprocess.run(
        [
            sys.executable,
            "benchmarks/engine_cpu.py",
            "--pages",
            "2",
            "--new-tokens",
            "3",
            "--slots",
            "2",
            "--size",
            "500",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["pages"] == 2 and r["bare_loop_pages_per_s"] > 0 and r["engine_pages_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager_and_golden_on_gpu():
    r = gpu.checks(torch.device("cuda"))
    assert r["golden_d_ids_equal"] and r["golden_d_batch_ids_equal"] and r["cuda_graph_decode_equals_eager"]
    assert r["golden_b_logits_max_abs_diff"] < 1e-3  # TF32/SDPA kernels on the GPU
