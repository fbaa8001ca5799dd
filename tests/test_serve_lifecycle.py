"""`infimm-hd serve` as an operator runs it: a subprocess in its own process group, stopped with SIGTERM or SIGINT.
Nothing it started may survive (Ray's raylet, GCS, DashboardAgent, RuntimeEnvAgent, workers) and its ports are free."""

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

from tests.conftest import ROOT, free_port
from tests.serve_helpers import cmdline, live_pids, port_free, process_tree, wait_for


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything_and_frees_the_ports(tiny_checkpoint, tmp_path, sig):
    port, metrics_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": ray_tmp,  # this Ray's session folder, apart from the test session's Ray
    }
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)]
        + ["--metrics-port", str(metrics_port), "--num-cpus", "4"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a service manager starts it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _healthy(base), 240, 1.0, "serve answers /health")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "infimm-hd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        started = process_tree(proc.pid)
        names = {cmdline(p).split(" ", 1)[0] for p in started}
        assert any("raylet" in n for n in names) and len(started) > 3, names  # Ray's processes are in the tree
        os.kill(proc.pid, sig)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)  # where the stop hangs: every thread's stack, into the log
            time.sleep(3)
            raise AssertionError("serve did not exit:\n" + (tmp_path / "serve.log").read_text()[-12000:]) from None
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        left = lambda: {p: cmdline(p) for p in started & set(live_pids())}  # noqa: E731
        try:
            wait_for(lambda: not left(), 60, 1.0, "every started process gone")
        except AssertionError:
            raise AssertionError(f"still running after the CLI exited: {left()}") from None
        for p in (port, metrics_port):
            wait_for(lambda p=p: port_free(p), 30, 0.5, f"port {p} free")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
