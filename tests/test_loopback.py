"""Loopback means loopback: every port that a local `infimm-hd serve` and the demo (SeaweedFS and a local
`batch run`) open, in every process they start (Ray's GCS, raylet, agents, workers, Serve's proxy and replicas,
`weed`), is on 127.0.0.1. Sockets are read from /proc while the command runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from benchmarks.common import listening_sockets
from tests.conftest import ROOT, free_port
from tests.serve_helpers import cmdline, process_tree, wait_for

LOOPBACK = ("127.0.0.1", "::1")


class SocketWatch:
    """Every (process, protocol, address, port) listening in the process tree of `root`, over repeated looks."""

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[tuple[str, str, int], str] = {}  # (protocol, address, port) -> the process's command

    def look(self) -> None:
        for pid, sockets in listening_sockets(process_tree(self.root)).items():
            program, _, args = cmdline(pid).partition(" ")
            name = f"{program.rsplit('/', 1)[-1]} {args}"[:100]
            for s in sockets:
                self.seen.setdefault(s, name)

    def exposed(self) -> dict[tuple[str, str, int], str]:
        return {s: name for s, name in self.seen.items() if s[1] not in LOOPBACK}

    def programs(self) -> set[str]:
        return {name.split(" ", 1)[0] for name in self.seen.values()}


def _env(ray_tmp: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}


@pytest.mark.timeout(400)
def test_a_local_serve_listens_on_loopback_only(tiny_checkpoint, tmp_path):
    port, metrics_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
        + ["--metrics-port", str(metrics_port), "--num-cpus", "4"],
        cwd=ROOT,
        env=_env(ray_tmp),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    watch = SocketWatch(proc.pid)

    def healthy() -> bool:
        watch.look()
        try:
            return proc.poll() is not None or httpx.get(base + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 300, 1.0, "serve answers /health")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post(  # the model replica has served a request through both hops
            base + "/v1/chat/completions",
            json={"model": "infimm-hd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        for _ in range(3):
            watch.look()
            time.sleep(0.5)
        ports = {p for _, _, p in watch.seen}
        assert port in ports and metrics_port in ports, watch.seen  # the HTTP proxy and the metrics export
        replicas = [n for n in watch.seen.values() if "ServeReplica" in n]
        assert any("InfimmModel" in n for n in replicas) and any("OpenAIIngress" in n for n in replicas), watch.seen
        assert not watch.exposed(), f"listening beyond loopback: {watch.exposed()}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(500)
def test_the_demo_and_its_batch_run_listen_on_loopback_only(tmp_path):
    """`python -m demo`: SeaweedFS, then `batch run` in the same process with a local Ray of its own."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {**_env(ray_tmp), "INFIMM_TINY_CHECKPOINT": str(tmp_path / "tiny")}
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo", "--random"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    watch = SocketWatch(proc.pid)
    try:
        deadline = time.monotonic() + 450
        while proc.poll() is None and time.monotonic() < deadline:
            watch.look()
            time.sleep(0.3)
        assert proc.wait(timeout=30) == 0, (tmp_path / "demo.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    programs = watch.programs()
    assert {"weed", "gcs_server", "raylet"} <= programs, programs  # the looks saw the store and Ray's processes
    assert not watch.exposed(), f"listening beyond loopback: {watch.exposed()}"
