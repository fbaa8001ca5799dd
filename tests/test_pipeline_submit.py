"""`infimm-hd batch submit|status|logs` against a real Ray head (`ray start --head` on 127.0.0.1, token auth on),
with documents in and results out through the SeaweedFS fixture: the same job, run by the cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

from demo import samples

from .pipeline_helpers import PROMPT, SMALL_JOB_FLAGS, by_page, read_rows
from .pipeline_helpers import batch_cli as cli

pytestmark = pytest.mark.timeout(600)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own (own ports, own temp dir: nothing else on the machine attaches to it), with token
    authentication switched on explicitly. Stopped by signalling the process group this fixture started."""
    token = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    dash = _port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        f"--port={_port()}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={_port()}",
        f"--dashboard-agent-listen-port={_port()}",
        f"--metrics-export-port={_port()}",
        "--num-cpus=3",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log = open(os.path.join(tmp, "head.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, open(os.path.join(tmp, "head.log")).read()[-3000:]
        assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401: up, and asking for the token
            break
        except OSError:
            time.sleep(0.5)
    yield address, token
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started...
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:  # ...but may take a minute: every process of this head is in this group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_submit_runs_the_job_on_the_cluster_and_status_and_logs_report_it(
    ray_head, s3_server, tiny_checkpoint, tmp_path
):
    address, token = ray_head
    s3_server.create_bucket("batch-submit")
    client = s3_server.client()
    for i in range(3):
        client.put_object(Bucket="batch-submit", Key=f"in/p{i}.png", Body=samples.png_page(i, (300, 400)))
    client.put_object(Bucket="batch-submit", Key="in/two.pdf", Body=samples.pdf_document(2, size=(300, 400)))
    auth = {"RAY_AUTH_TOKEN": token}

    p = cli(
        "submit",
        "--address",
        address,
        "--env",
        "AWS_ACCESS_KEY_ID",
        "--env",
        "AWS_SECRET_ACCESS_KEY",
        "--wait",
        "--timeout",
        "420",
        "--input",
        "s3://batch-submit/in/",
        "--output",
        "s3://batch-submit/out/",
        "--prompt",
        PROMPT,
        "--checkpoint",
        str(tiny_checkpoint),
        *SMALL_JOB_FLAGS,
        env=auth,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    job_id = p.stdout.splitlines()[0].strip()
    assert "5 pages" in p.stdout  # the job's own summary, from its logs

    rows = by_page(read_rows("s3://batch-submit/out/"))
    assert set(rows) == {(f"p{i}.png", 1, PROMPT) for i in range(3)} | {("two.pdf", 1, PROMPT), ("two.pdf", 2, PROMPT)}
    assert all(r["error_type"] is None and r["text"] is not None for r in rows.values())

    status = cli("status", job_id, "--address", address, env=auth)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = cli("logs", job_id, "--address", address, env=auth)
    assert logs.returncode == 0 and "this run    5 pages" in logs.stdout

    # the token is what lets us in: without it (and without ~/.ray/auth_token) the cluster refuses
    home = tmp_path / "home"
    home.mkdir()
    refused = cli("status", job_id, "--address", address, env={"RAY_AUTH_TOKEN": "", "HOME": str(home)})
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr


def test_submit_wait_timeout_says_the_job_goes_on_or_stops_it(ray_head, s3_server, tiny_checkpoint):
    address, token = ray_head
    s3_server.create_bucket("batch-timeout")
    s3_server.client().put_object(Bucket="batch-timeout", Key="in/p.png", Body=samples.png_page(0, (300, 400)))
    auth = {"RAY_AUTH_TOKEN": token}
    run = ["--input", "s3://batch-timeout/in/", "--prompt", PROMPT, "--checkpoint", str(tiny_checkpoint)]
    run += ["--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY", "--max-new-tokens", "4"]

    def status_of(job_id: str) -> str:
        return json.loads(cli("status", job_id, "--address", address, env=auth).stdout)["status"]

    p = cli(
        "submit", "--address", address, "--wait", "--timeout", "1", "--output", "s3://batch-timeout/a/", *run, env=auth
    )
    job_id = p.stdout.splitlines()[0].strip()
    assert p.returncode == 4 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "it goes on" in p.stderr.splitlines()[-1] and job_id in p.stderr.splitlines()[-1]
    assert status_of(job_id) in ("PENDING", "RUNNING", "SUCCEEDED")  # not stopped by us
    cli("stop", job_id, "--address", address, env=auth)

    p = cli(
        "submit",
        "--address",
        address,
        "--wait",
        "--timeout",
        "1",
        "--stop-on-timeout",
        "--output",
        "s3://batch-timeout/b/",
        *run,
        env=auth,
    )
    job_id = p.stdout.splitlines()[0].strip()
    assert p.returncode == 4 and "stopped it" in p.stderr.splitlines()[-1], p.stderr[-3000:]
    deadline = time.monotonic() + 60
    while status_of(job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "the job did not stop within 60 s"
        time.sleep(1)
    assert status_of(job_id) == "STOPPED"
