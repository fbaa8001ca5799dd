"""Smoke runs of the model benchmarks at tiny size on the CPU: they run end to end and print the promised JSON.
(Speed is never asserted; the numbers are for people.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu

TINY = ["--size", "tiny", "--device", "cpu", "--batches", "2", "--new-tokens", "3", "--vit-views", "2"]
TINY += ["--prompt-tokens", "12", "--switch-tokens", "3"]


def test_gpu_benchmark_runs_at_tiny_size_on_cpu_and_exercises_every_switch(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(TINY + ["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    failed = {k: v for k, v in result["sections"].items() if not v["ok"] and k != "checks/cuda_graphs"}
    assert not failed, failed
    assert "skipped" in result["checks"]["cuda_graphs"]  # no CUDA here: not verified, and it says so
    golden = result["checks"]["golden"]
    assert golden["ok"] and golden["golden_b_logits_max_abs_diff"] < 1e-4 and golden["tf32"] is False
    switches = result["checks"]["switches"]
    assert set(gpu.SWITCHES) | set(gpu.SCHEDULER_SWITCHES) <= set(switches), "a switch is not checked"
    assert all(v["same_ids"] for k, v in switches.items() if k != "ok"), switches
    measured = result["switches"]["batch_2"]
    assert set(gpu.SWITCHES) | set(gpu.SCHEDULER_SWITCHES) | {"default"} <= set(measured), "a switch is not measured"
    assert all(measured[k]["same_ids_as_default"] for k in gpu.SWITCHES), measured
    for key in ("matmul_tflops", "copy_gb_per_s"):
        assert result["ceilings"][key] > 0
    assert result["vit"]["tflops"] > 0 and result["vit"]["flash_forced"] == "ok"
    b1 = result["decode_batch1"]
    assert b1["bandwidth_floor_ms"] > 0 and b1["forced_backend"]["dense"] == b1["forced_backend"]["masked"] == "ok"
    assert b1["graphs"]["used"] is False  # the CPU never captures, and the report does not pretend otherwise
    job = result["standard_job"]["batch_2"]
    assert job["summary"]["pages_per_s"] > 0 and job["wave_1"]["decode_ms_per_step"] > 0
    assert "aten::" in result["profile"]["batch_2"]["table"]
    assert job["summary"]["memory_plan"]["planned_bytes"] > 0  # on a GPU: against measured_peak_bytes
    q = result["quantized"]
    assert "no CPU kernel" in q["int4"]["refused"] and "needs a CUDA GPU" in q["fp8"]["refused"]
    int8 = q["int8"]
    assert int8["build"]["weights_bytes"] == int8["build"]["planned_weights_bytes"]
    assert int8["vit"]["tflops"] > 0 and int8["decode_batch1"]["ms_per_token"] > 0
    sized = int8["standard_job_sized"]
    assert sized["pages_per_s"] > 0 and sized["batch"] == sized["plan"]["max_slots"] and sized["plan"]["fits"]
    assert sized["memory_plan"]["line"].startswith("memory plan:") and "quantize int8" in sized["memory_plan"]["line"]


def test_gpu_benchmark_keeps_the_partial_json_when_a_section_fails(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(TINY + ["--quick", "--fail", "ceilings,checks/golden", "--out", str(out)])
    result = json.loads(out.read_text())
    for name in ("ceilings", "checks/golden"):
        assert not result["sections"][name]["ok"]
    assert "injected failure" in result["checks"]["golden"]["error"]
    assert "Traceback" in result["checks"]["golden"]["traceback"]
    assert result["sections"]["build"]["ok"]  # the sections after the failures still ran
    assert result["standard_job"]["batch_2"]["wave_0"]["pages_per_s"] > 0


def test_gpu_benchmark_writes_what_it_has_at_the_deadline(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(TINY + ["--quick", "--deadline-s", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "deadline" in result["ceilings"]["skipped"] and "deadline" in result["build"]["skipped"]
    assert "standard_job" not in result  # nothing ran past the deadline


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


def test_driver_scale_benchmark_plans_what_is_left(tmp_path):
    out = tmp_path / "d.json"
    p = subprocess.run(
        [sys.executable, "benchmarks/driver_scale.py", "--documents", "200", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    # 180 of 200 done; every 5th is a 3-page PDF (36 of them done): done PDFs are reopened to count their pages
    assert r["documents_done"] == 180 and r["rows_already_done"] == 144 + 36 * 3
    assert r["documents_skipped_complete"] == 144 and r["documents_to_process"] == 20 + 36
    assert r["rss_peak_growth_mb"] >= 0 and r["per_million_documents"]["plan_seconds"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager_and_golden_on_gpu():
    golden = gpu.check_golden(torch.device("cuda"))  # fp32 with TF32 off: the CPU's tolerance
    assert golden["ok"], golden
    graphs = gpu.check_graphs(torch.device("cuda"))
    assert graphs["ok"], graphs
