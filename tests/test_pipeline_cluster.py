"""Several nodes: a job whose engine pool spans two nodes survives losing one; the loopback-only setting of local runs
never reaches a cluster (a submitted job's environment, the RayJob and the other KubeRay manifests).

The two-node job runs in its own process with its own `ray.cluster_utils.Cluster` (tests/two_node_job.py), so it
neither uses nor disturbs the session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .conftest import ROOT

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.mark.timeout(600)
def test_a_job_across_two_nodes_completes_with_every_page_once_when_one_node_is_removed(tiny_checkpoint, tmp_path):
    result_path = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's
    proc = subprocess.run(
        [sys.executable, "-m", "tests.two_node_job", str(tiny_checkpoint), str(tmp_path / "work"), str(result_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_path.read_text())

    nodes = result["nodes_before"]
    assert len(set(nodes)) == 2 and result["worker_node_id"] in nodes, f"the pool did not span both nodes: {nodes}"
    assert result["removed"] and not result["replaced"]
    expected = {(f"p{i:02d}.png", 1) for i in range(16)} | {("long.pdf", p) for p in range(1, 13)}
    assert result["rows_before_removal"] < len(expected), "the node was removed after the job had finished"

    rows = result["rows"]
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "a page written twice"
    pages = Counter((Path(r["source_uri"]).name, r["page"]) for r in rows)
    assert set(pages) == expected and len(rows) == len(expected), f"lost or extra pages: {set(pages) ^ expected}"
    assert not [r for r in rows if r["error_type"]], [r for r in rows if r["error_type"]][:3]
    assert result["summary_run"]["rows"] == len(expected)


# ---- the loopback-only setting stays local ---------------------------------------------------------------------------
def test_a_submitted_jobs_environment_lacks_the_loopback_setting(monkeypatch):
    from pipelines import submit

    monkeypatch.setenv(LOOPBACK_ONLY, "0")  # as in every local run (and in this test session)
    env = submit.runtime_env({"AWS_REGION": "eu-west-1"})["env_vars"]
    assert LOOPBACK_ONLY not in env, env
    assert env["AWS_REGION"] == "eu-west-1"


def test_the_job_entrypoint_does_not_set_it_when_imported():
    # The RayJob runs `infimm-hd batch run` on the cluster: importing the CLI must leave the variable alone.
    env = {k: v for k, v in os.environ.items() if k != LOOPBACK_ONLY}
    # Serve imports deployments.app on every replica of a cluster, and training.cli is the RayJob of `train --submit`.
    modules = "cli.main, pipelines.cli, pipelines.job, deployments.app, deployments.cli, training.cli"
    code = f"import os, {modules}; print(os.environ.get({LOOPBACK_ONLY!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None", f"importing {modules} set {LOOPBACK_ONLY}={out.stdout.strip()}"


def test_a_library_caller_gets_a_loopback_local_ray():
    # ensure_ray() without an address starts a private local Ray: the loopback setting must be in place before
    # `import ray`, because Ray reads it once, at import (ray_constants.ENABLE_RAY_CLUSTER).
    env = {k: v for k, v in os.environ.items() if k not in (LOOPBACK_ONLY, "RAY_ADDRESS")}
    code = (
        "import sys, pipelines.cluster as c; assert 'ray' not in sys.modules, 'imported Ray early'; c.ensure_ray(); "
        "import ray; from ray._private import ray_constants as c; "
        "print(c.ENABLE_RAY_CLUSTER, ray.util.get_node_ip_address()); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "127.0.0.1"], out.stdout


def test_the_kuberay_manifests_lack_it():
    sys.path.insert(0, str(ROOT / "infra"))
    try:
        import render
    finally:
        sys.path.remove(str(ROOT / "infra"))
    rendered = {str(path.relative_to(ROOT)): text for path, text in render.outputs().items()}
    committed = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "infra" / "kuberay").glob("*.yaml")}
    assert "infra/kuberay/rayjob.yaml" in rendered and "infra/kuberay/rayjob.yaml" in committed
    for name, text in {**rendered, **committed}.items():
        assert LOOPBACK_ONLY not in text, f"{name} sets {LOOPBACK_ONLY}"
