"""The batch job under storage faults, odd keys, small clusters and bad arguments: a real SeaweedFS stopped and
restarted (same port, same data) while a real local Ray job reads or writes, S3 keys that look like URLs, and the CLI's
exit codes and one-line messages."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from demo import samples
from demo.seaweed import SeaweedFS
from pipelines.cluster import placement_problem
from pipelines.config import JobConfig
from pipelines.job import run_job
from pipelines.storage import (
    OutageClock,
    Retry,
    S3Settings,
    Storage,
    StorageUnavailable,
    is_transient,
    list_sources,
    suffix,
)

from .pipeline_helpers import PROMPT, by_page, config, read_rows, write_files
from .pipeline_helpers import batch_cli as cli

pytestmark = pytest.mark.timeout(600)

ODD_NAMES = ["a#b.png", "what?.png", "100%.png", "1+1.png", "two words.png", "ünïcödé.png", "-dash.png", "scan[1].png"]


@pytest.fixture()
def flaky_s3(tmp_path):
    """A SeaweedFS of this test's own, to stop and start again (the session's server stays up for the others)."""
    server = SeaweedFS(tmp_path / "seaweedfs").start()
    server.create_bucket("flaky")
    yield server
    server.stop()


def s3_settings(server: SeaweedFS, retry_seconds: float) -> S3Settings:
    return S3Settings.from_env(env=server.env(), retry_seconds=retry_seconds)


def cli_timed(*args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """`cli`, and how long the process ran after its first storage failure was logged (forwarded from a Ray worker,
    so a little late)."""
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "batch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    stderr, first = [], None
    for line in proc.stderr:
        stderr.append(line)
        if first is None and "retrying for up to" in line:
            first = time.monotonic()
    proc.wait(timeout=300)
    reader.join()
    after = time.monotonic() - first if first is not None else float("nan")
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(stdout), "".join(stderr)), after


def one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("infimm-hd:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


# ---- storage faults --------------------------------------------------------------------------------------------------
def test_retry_gives_up_on_transient_failures_only_after_the_budget_and_never_retries_permanent_ones(flaky_s3):
    storage = Storage(s3_settings(flaky_s3, retry_seconds=1.5))
    flaky_s3.client().put_object(Bucket="flaky", Key="x.png", Body=b"x")
    with pytest.raises(FileNotFoundError):  # permanent: at once, no StorageUnavailable
        storage.read("s3://flaky/missing.png")
    flaky_s3.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="--io-retry-seconds") as e:
        storage.read("s3://flaky/x.png")
    assert time.monotonic() - t0 >= 1.5, "gave up before the retry budget was spent"
    assert is_transient(e.value.__cause__), e.value.__cause__  # pyarrow's own error for a refused connection

    calls = []

    def flaky():  # a 503 twice, then success: retried, not raised
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation: HTTP response code: 503")
        return "ok"

    assert Retry(seconds=30, first_delay=0.01)("reading", flaky) == "ok" and len(calls) == 3
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        Retry(seconds=30)("reading", lambda: (_ for _ in ()).throw(OSError("AWS Error ACCESS_DENIED during GetObject")))


def test_one_clock_per_outage_shared_by_every_call_and_reset_by_a_success():
    """The budget runs once per outage: a second call meeting the same outage gives up after one attempt, a read not
    yet started does not try, and any success (storage back) gives the next outage a whole budget again."""
    down = OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect")
    attempts = []

    def failing():
        attempts.append(time.monotonic())
        raise down

    clock = OutageClock(0.6)
    retry = Retry(seconds=0.6, first_delay=0.05, max_delay=0.1, clock=clock)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable):
        retry("reading a", failing)
    assert 0.6 <= time.monotonic() - t0 < 1.5 and clock.tripped()
    attempts.clear()
    with pytest.raises(StorageUnavailable):  # the same outage: one attempt, no second budget
        retry("reading b", failing)
    assert len(attempts) == 1
    with pytest.raises(StorageUnavailable, match="not tried"):
        retry.given_up("reading c")
    assert retry("writing d", lambda: "ok") == "ok" and not clock.tripped() and clock.age() == 0
    retry.given_up("reading e")  # storage is back: reads try again
    attempts.clear()
    with pytest.raises(StorageUnavailable):  # a new outage gets the whole budget
        retry("reading f", failing)
    assert attempts[-1] - attempts[0] >= 0.5


def test_s3_down_while_reading_leaves_documents_for_a_rerun_that_does_exactly_those(
    tiny_checkpoint, ray_session, flaky_s3, tmp_path
):
    local = write_files(tmp_path / "local", {f"local-{i}.png": samples.png_page(i, (300, 400)) for i in range(2)})
    client = flaky_s3.client()
    remote = ["scan-1.png", "scan#2.png", "scan 3.png"]
    for i, name in enumerate(remote):
        client.put_object(Bucket="flaky", Key=f"in/{name}", Body=samples.png_page(10 + i, (300, 400)))
    out = tmp_path / "out"
    cfg = config(tiny_checkpoint, [local, "s3://flaky/in/"], out, s3=s3_settings(flaky_s3, retry_seconds=2))
    sources = list_sources(list(cfg.inputs), Storage(cfg.s3))  # listed while S3 is up; read while it is down
    assert sources.num_rows == 5

    flaky_s3.stop()
    summary = run_job(cfg, progress=False, sources=sources)
    assert summary["run"]["documents_unavailable"] == 3
    rows = by_page(read_rows(str(out)))
    assert set(rows) == {(f"local-{i}.png", 1, PROMPT) for i in range(2)}  # no row at all for the unread ones
    assert all(r["error_type"] is None for r in rows.values())

    flaky_s3.start()  # same port, same data
    again = run_job(cfg, progress=False)
    assert again["run"]["documents_unavailable"] == 0 and again["run"]["rows"] == 3
    rows = by_page(read_rows(str(out)))  # (asserts one row per page)
    assert set(rows) == {(f"local-{i}.png", 1, PROMPT) for i in range(2)} | {(n, 1, PROMPT) for n in remote}
    assert all(r["error_type"] is None and r["text"] is not None for r in rows.values())
    assert again["error_rows"] == 0 and again["rows"] == again["unique_ids"] == 5


class _BackAfterFirstRetry(logging.Handler):
    """Brings the stopped server back 2 s after the first storage retry is logged: the outage surely meets a write,
    and ends well within the budget."""

    def __init__(self, server: SeaweedFS):
        super().__init__(logging.WARNING)
        self.server, self.thread = server, None

    def emit(self, record: logging.LogRecord) -> None:
        if self.thread is None and "retrying" in record.getMessage():
            self.thread = threading.Thread(target=lambda: (time.sleep(2), self.server.start()), daemon=True)
            self.thread.start()


def test_s3_down_during_a_part_upload_and_back_within_the_budget_loses_no_row(
    tiny_checkpoint, ray_session, flaky_s3, tmp_path
):
    docs = write_files(tmp_path / "docs", {f"p{i}.png": samples.png_page(i, (300, 400)) for i in range(6)})
    cfg = config(tiny_checkpoint, [docs], "s3://flaky/out/", s3=s3_settings(flaky_s3, retry_seconds=90))
    back = _BackAfterFirstRetry(flaky_s3)
    logging.getLogger("pipelines.storage").addHandler(back)

    def stop_after_the_first_part(table: pa.Table) -> None:
        if flaky_s3.proc is not None and back.thread is None:  # the next upload (or the final one) meets it
            flaky_s3.stop()

    try:
        summary = run_job(cfg, progress=False, on_batch=stop_after_the_first_part)
    finally:
        logging.getLogger("pipelines.storage").removeHandler(back)
    assert back.thread is not None and summary["run"]["part_write_retries"] >= 1, "no upload met the outage"
    back.thread.join(timeout=120)
    rows = by_page(read_rows(cfg.output, Storage(cfg.s3)))
    assert set(rows) == {(f"p{i}.png", 1, PROMPT) for i in range(6)}
    assert all(r["error_type"] is None for r in rows.values())
    written = json.loads(flaky_s3.client().get_object(Bucket="flaky", Key="out/_summary.json")["Body"].read())
    assert written["rows"] == written["unique_ids"] == 6 and written["run"]["part_write_retries"] >= 1


def test_cli_exits_3_with_one_line_when_storage_stays_down_at_listing_or_resume(flaky_s3, tmp_path, tiny_checkpoint):
    write_files(tmp_path / "in", {"p.png": samples.png_page(0, (200, 260))})
    flaky_s3.stop()
    common = ["--prompt", PROMPT, "--checkpoint", str(tiny_checkpoint), "--io-retry-seconds", "1", "--no-progress"]
    p = cli("run", "--input", "s3://flaky/in/", "--output", str(tmp_path / "out"), *common, env=flaky_s3.env())
    assert p.returncode == 3 and "storage" in one_line_error(p), p.stderr[-2000:]
    p = cli("run", "--input", str(tmp_path / "in"), "--output", "s3://flaky/out/", *common, env=flaky_s3.env())
    assert p.returncode == 3 and "s3://flaky/out/" in one_line_error(p), p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_cli_exits_3_when_documents_are_left_unread_and_the_rerun_exits_0(flaky_s3, tmp_path, tiny_checkpoint):
    """Through the command a user runs: a manifest (read while S3 is down: it is local) names a local page and two S3
    objects. The run writes the local row, says in one line that 2 documents are left and exits 3; the same command
    after S3 is back does exactly those and exits 0."""
    client = flaky_s3.client()
    for name in ("a.png", "b#2.png"):
        client.put_object(Bucket="flaky", Key=f"in/{name}", Body=samples.png_page(len(name), (200, 260)))
    local = write_files(tmp_path / "in", {"local.png": samples.png_page(0, (200, 260))})
    manifest = tmp_path / "manifest.jsonl"
    uris = [str(local / "local.png"), "s3://flaky/in/a.png", "s3://flaky/in/b#2.png"]
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in uris))
    out = tmp_path / "out"
    argv = ["run", "--input", str(manifest), "--output", str(out), "--prompt", PROMPT]
    argv += ["--checkpoint", str(tiny_checkpoint), "--io-retry-seconds", "1", "--no-progress", "--json"]

    flaky_s3.stop()
    p = cli(*argv, env=flaky_s3.env())
    assert p.returncode == 3, p.stderr[-3000:]
    assert "2 documents could not be read" in one_line_error(p) and "rerun" in one_line_error(p)
    assert json.loads(p.stdout)["run"]["documents_unavailable"] == 2, "the summary is still printed"
    assert [r["source_uri"] for r in read_rows(str(out))] == [uris[0]], "only the page that was read"

    flaky_s3.start()
    p = cli(*argv, env=flaky_s3.env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["run"]["rows"] == 2, "the rerun does exactly the two left"
    rows = by_page(read_rows(str(out)))
    assert sorted(uri for uri, _, _ in rows) == sorted(Path(u).name for u in uris)
    assert all(r["error_type"] is None for r in rows.values())


def test_an_outage_ends_the_job_after_one_budget_not_one_per_document(tiny_checkpoint, ray_session, flaky_s3, tmp_path):
    """Nine documents (eight on S3, stopped; one local) and a 10 s budget: the decode tasks and the driver share one
    outage clock, so once S3 has been down for 10 s the reads still retrying give up after their next attempt and the
    reads not yet started do not try. The job writes the local row and exits 3 naming the eight within 2x the budget
    (with a budget per document it took about 3x: three decode tasks at a time); the rerun after S3 is back does
    exactly those eight."""
    budget = 10
    client = flaky_s3.client()
    remote = [f"s3://flaky/in/scan-{i}.png" for i in range(8)]
    for i, uri in enumerate(remote):
        client.put_object(Bucket="flaky", Key=uri.removeprefix("s3://flaky/"), Body=samples.png_page(i, (200, 260)))
    local = write_files(tmp_path / "in", {"local.png": samples.png_page(99, (200, 260))})
    manifest = tmp_path / "manifest.jsonl"  # local: read while S3 is down
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in [str(local / "local.png"), *remote]))
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    argv = ["run", "--input", str(manifest), "--output", str(out), "--prompt", PROMPT, "--ray-address", address]
    argv += ["--checkpoint", str(tiny_checkpoint), "--io-retry-seconds", str(budget), "--no-progress", "--json"]
    argv += ["--max-new-tokens", "4"]

    flaky_s3.stop()
    p, first_failure = cli_timed(*argv, env=flaky_s3.env())
    assert p.returncode == 3, p.stderr[-3000:]
    assert "8 documents could not be read" in one_line_error(p)
    run = json.loads(p.stdout)["run"]
    assert run["documents_unavailable"] == 8 and run["rows"] == 1, run
    # The outage clock's age when the reads ended (it opens when the first request has failed: one request late).
    # Before it: the process, Ray and the engine actor starting (a minute on this loaded machine), which no budget
    # counts; after it: the summary and its plot.
    assert run["storage_outage_seconds"] <= 2 * budget, (run, f"exit {first_failure:.1f}s after the first failure")
    assert [r["source_uri"] for r in read_rows(str(out))] == [str(local / "local.png")]

    flaky_s3.start()
    p = cli(*argv, env=flaky_s3.env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["run"]["rows"] == 8, "the rerun does exactly the eight left"
    rows = read_rows(str(out))
    assert sorted(r["source_uri"] for r in rows) == sorted([str(local / "local.png"), *remote])
    assert all(r["error_type"] is None for r in rows)


# ---- any key ---------------------------------------------------------------------------------------------------------
def test_keys_that_look_like_urls_are_listed_globbed_and_read(tiny_checkpoint, ray_session, s3_server, caplog):
    s3_server.create_bucket("odd-keys")
    client = s3_server.client()
    for i, name in enumerate(ODD_NAMES):
        for prefix in ("listed", "globbed"):
            client.put_object(Bucket="odd-keys", Key=f"{prefix}/{name}", Body=samples.png_page(i, (300, 400)))
    client.put_object(Bucket="odd-keys", Key="listed/notes.txt", Body=b"not a page")
    client.put_object(Bucket="odd-keys", Key="listed/.thumbs/x.png", Body=b"hidden")
    client.put_object(Bucket="odd-keys", Key="single/#1 scan?.png", Body=samples.png_page(99, (300, 400)))
    assert suffix("s3://b/a#b.png") == suffix("s3://b/what?.png") == ".png"

    storage = Storage(S3Settings.from_env())
    with caplog.at_level(logging.INFO, logger="pipelines.storage"):
        listed = list_sources(["s3://odd-keys/listed/"], storage)["uri"].to_pylist()
    assert sorted(listed) == sorted(f"s3://odd-keys/listed/{n}" for n in ODD_NAMES)
    assert "skipped 1 hidden, 1 with another extension" in caplog.text
    globbed = list_sources(["s3://odd-keys/globbed/*.png"], storage)["uri"].to_pylist()
    assert sorted(globbed) == sorted(f"s3://odd-keys/globbed/{n}" for n in ODD_NAMES)
    # a single object whose name has glob characters is that object, not a pattern
    assert list_sources(["s3://odd-keys/globbed/scan[1].png"], storage)["uri"].to_pylist() == [
        "s3://odd-keys/globbed/scan[1].png"
    ]

    inputs = ["s3://odd-keys/listed/", "s3://odd-keys/globbed/*.png", "s3://odd-keys/single/#1 scan?.png"]
    summary = run_job(config(tiny_checkpoint, inputs, "s3://odd-keys/out/"), progress=False)
    rows = read_rows("s3://odd-keys/out/")
    got = sorted(r["source_uri"] for r in rows)
    assert got == sorted(listed + globbed + ["s3://odd-keys/single/#1 scan?.png"])
    assert summary["error_rows"] == 0 and all(r["text"] is not None for r in rows)


# ---- clusters and arguments ------------------------------------------------------------------------------------------
def test_placement_is_checked_against_the_nodes_with_the_numbers():
    cfg = JobConfig(inputs=("x",), output="y", actors=(2, 4), cpus_per_actor=1.0, gpus_per_actor=0.0)
    gib = float(2**30)
    assert placement_problem(cfg, [{"CPU": 4.0, "memory": 8 * gib}]) is None
    problem = placement_problem(cfg, [{"CPU": 2.0, "memory": 8 * gib}])
    assert "2 engine actor(s)" in problem and "need 3 CPUs" in problem and "have 2 CPUs" in problem
    # enough CPUs in total, but no single node has room for the one-GPU actor
    gpu = replace(cfg, actors=(1, 1), gpus_per_actor=1.0)
    assert "placed 0 of 1 actors" in placement_problem(gpu, [{"CPU": 8.0, "memory": 8 * gib}])
    assert placement_problem(gpu, [{"CPU": 1.0, "memory": 8 * gib}, {"CPU": 2.0, "GPU": 1.0, "memory": gib}]) is None


@pytest.fixture()
def two_cpu_cluster():
    """A Ray cluster of its own with 2 CPUs (the session's has 4), on 127.0.0.1, used from CLI subprocesses."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


def test_on_a_two_cpu_cluster_defaults_finish_and_a_pool_that_cannot_fit_is_refused_with_one_line(
    two_cpu_cluster, tmp_path, tiny_checkpoint
):
    docs = write_files(tmp_path / "in", {f"p{i}.png": samples.png_page(i, (200, 260)) for i in range(2)})
    common = ["--prompt", PROMPT, "--checkpoint", str(tiny_checkpoint), "--no-progress"]
    small = ["--ray-address", two_cpu_cluster.address, "--max-new-tokens", "4", "--max-windows", "4"]

    p = cli("run", "--input", str(docs), "--output", str(tmp_path / "out"), "--actors", "2,2", *small, *common)
    line = one_line_error(p)  # 2 actors x 1 CPU + one decode task (1 CPU) on 2 CPUs
    assert p.returncode == 2 and "cannot run this job" in line and "need 3 CPUs" in line, line
    assert "have 2 CPUs" in line and "--wait-for-resources" in line, line
    assert not (tmp_path / "out").exists(), "a refused job wrote its output folder"

    p = cli("run", "--input", str(docs), "--output", str(tmp_path / "out"), *small, *common, "--json", timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout[p.stdout.index("{") :])
    assert summary["rows"] == 2 and summary["error_rows"] == 0


def test_cli_bad_paths_exit_2_with_one_line(tmp_path, tiny_checkpoint):
    docs = write_files(tmp_path / "in", {"p.png": samples.png_page(0, (200, 260))})
    (tmp_path / "taken").write_text("a file, not a folder")
    common = ["--prompt", PROMPT, "--checkpoint", str(tiny_checkpoint), "--no-progress"]
    p = cli("run", "--input", str(docs), "--output", str(tmp_path / "taken"), *common)
    assert p.returncode == 2 and "is a file" in one_line_error(p)
    p = cli("run", "--input", str(docs / "typo.png"), "--output", str(tmp_path / "out"), *common)
    assert p.returncode == 2 and "no such file" in one_line_error(p)
    assert not (tmp_path / "out").exists()
