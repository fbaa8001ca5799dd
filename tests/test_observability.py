"""Metrics end to end: a real Prometheus on 127.0.0.1 scrapes the local Ray metrics export while a small batch job and a
few HTTP requests run; then every dashboard panel query and every alert expression is evaluated through Prometheus'
HTTP API. Each must parse, and each throughput / latency / error panel must return data.

Prometheus comes from Debian's package (`make setup` installs it). Where the binary is missing the test skips with a
reason, except when INFIMM_REQUIRE_PROMETHEUS=1 (set by .ci/run): CI must never skip it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from runtime.metrics import CATALOG, exported_name

from .conftest import ROOT, free_port
from .docs_helpers import docs_hooks
from .pipeline_helpers import config as job_config
from .pipeline_helpers import write_files
from .serve_helpers import tiny_serve_app
from .serve_helpers import wait_for as poll

INFRA = ROOT / "infra"
RANGE = "5m"  # what Grafana's $__rate_interval becomes in these queries


@pytest.fixture(scope="module")
def prometheus(ray_session, ray_metrics_port, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("INFIMM_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("the prometheus binary is missing (apt-get install prometheus; `make setup` does it)")
        pytest.skip("prometheus binary not installed here (Debian package `prometheus`; `make setup` installs it)")
    folder = tmp_path_factory.mktemp("prometheus")
    # Ray's head writes this service-discovery file when its dashboard runs; the tests run Ray without a dashboard,
    # so write the same format by hand, pointing at this session's metrics export port.
    sd = folder / "ray_sd.json"
    sd.write_text(json.dumps([{"targets": [f"127.0.0.1:{ray_metrics_port}"], "labels": {"job": "ray"}}]))
    cfg = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [str(INFRA / "prometheus" / "alerts.yml")]
    (job,) = cfg["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(sd)]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
        try:
            return httpx.get(base + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll(ready, 60, 0.5, "Prometheus ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def query(base: str, expr: str) -> dict:
    r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
    return body["data"]


def wait_for(base: str, expr: str, timeout: float = 90.0) -> list:
    """The first non-empty result of `expr`, polled once a second (the scrape interval) for at most `timeout` s."""
    return poll(lambda: query(base, expr)["result"], timeout, 1.0, f"data for {expr}")


@pytest.fixture(scope="module")
def traffic(prometheus, ray_session, tiny_checkpoint, tmp_path_factory):
    """A small batch job (one corrupt file among the pages) and a few HTTP requests (one refused) in this session."""
    from demo.samples import png_page  # a generated document page
    from pipelines.job import run_job

    folder = tmp_path_factory.mktemp("obs")
    docs = write_files(
        folder / "in",
        {
            "a.png": png_page(1, (600, 800)),
            "b.png": png_page(2, (600, 800)),
            "broken.png": b"\x89PNG\r\n\x1a\n not really",
        },
    )
    summary = run_job(job_config(tiny_checkpoint, [docs], folder / "out"), progress=False)
    assert summary["run"]["rows"] == 3

    with tiny_serve_app(tiny_checkpoint, "obs", "/obs", {"api_key": None}) as app:
        url = app.base + "/v1/chat/completions"
        ok = {"model": "infimm-hd", "max_tokens": 4, "messages": [{"role": "user", "content": "Say something."}]}
        statuses = [httpx.post(url, json=ok, timeout=120).status_code for _ in range(3)]
        statuses.append(httpx.post(url, json={**ok, "max_tokens": 0}, timeout=60).status_code)  # refused: 400
        assert statuses == [200, 200, 200, 400]
        # both frontends visible in Prometheus before the panels are evaluated
        wait_for(prometheus, 'ray_infimm_pages_total{frontend="batch"}')
        wait_for(prometheus, 'ray_infimm_requests_total{frontend="serve"}')
        wait_for(prometheus, "ray_infimm_rejected_requests_total")
        # rate() and increase() need two samples of a series in their range: wait for them on the series the HTTP
        # requests created last (the batch job's series have had them since the job ended)
        wait_for(prometheus, f'rate(ray_infimm_requests_total{{frontend="serve"}}[{RANGE}])')
        wait_for(prometheus, f"increase(ray_infimm_rejected_requests_total[{RANGE}])")
        yield summary


def dashboard_targets() -> list[tuple[str, str, str]]:
    dash = json.loads((INFRA / "grafana" / "infimm-hd.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            kind = panel["description"].removeprefix("kind=")
            out.append((panel["title"], kind, t["expr"].replace("$__rate_interval", RANGE)))
    return out


@pytest.mark.parametrize("title,kind,expr", dashboard_targets(), ids=lambda x: re.sub(r"\W+", "_", str(x))[:60])
def test_dashboard_panel_queries(prometheus, traffic, title, kind, expr):
    result = query(prometheus, expr)["result"]
    if kind in ("throughput", "latency", "errors"):
        assert result, f"panel {title!r} returned no data: {expr}"


def alert_rules() -> list[tuple[str, str]]:
    groups = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


@pytest.mark.parametrize("name,expr", alert_rules(), ids=[a for a, _ in alert_rules()])
def test_alert_expressions_evaluate(prometheus, traffic, name, expr):
    query(prometheus, expr)  # parses and evaluates; firing is not expected after a healthy run


def test_prometheus_loaded_the_alert_rules(prometheus):
    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"] for g in rules for r in g["rules"]}
    assert loaded == {name for name, _ in alert_rules()}


def test_error_types_and_serve_metrics_are_scraped(prometheus, traffic):
    errors = query(prometheus, 'sum by (error_type) (ray_infimm_page_errors_total{frontend="batch"})')["result"]
    assert [e["metric"]["error_type"] for e in errors] == ["decode_error"]
    # Ray Serve's own metrics come through the same exporter
    assert wait_for(prometheus, "ray_serve_num_http_requests_total")
    assert wait_for(prometheus, "ray_serve_deployment_replica_healthy")


def documented_metrics() -> set[str]:
    """The metric names docs/operating.md shows (its table is generated from the catalog while the docs build)."""
    page = docs_hooks().render((ROOT / "docs" / "operating.md").read_text())
    return set(re.findall(r"`(ray_infimm_[a-z_]+)`", page))


def test_docs_document_exactly_the_exported_metric_names():
    documented = documented_metrics()
    exported = {exported_name(s) for s in CATALOG}
    assert documented == exported, f"missing: {exported - documented}; stale: {documented - exported}"


def test_every_dashboard_and_alert_metric_is_declared():
    declared = {exported_name(s) for s in CATALOG}
    exprs = [e for _, _, e in dashboard_targets()] + [e for _, e in alert_rules()]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_infimm_[a-z_]+", e)}
    assert used <= declared, used - declared


def test_operations_files_are_rendered_from_their_sources():
    import sys

    p = subprocess.run([sys.executable, str(INFRA / "render.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    service = yaml.safe_load((INFRA / "kuberay" / "rayservice.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load((INFRA / "serve.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert job["spec"]["rayClusterSpec"] == cluster["spec"] == service["spec"]["rayClusterConfig"]


def test_manifests_reference_real_code():
    import importlib
    import shlex

    from cli.main import build_parser

    serve_cfg = yaml.safe_load((INFRA / "serve.yaml").read_text())
    for app in serve_cfg["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "infimm-hd"
    args = build_parser().parse_args(argv[1:])  # the CLI accepts the RayJob's command line as written
    assert args.func.__module__ == "pipelines.cli"
    docker = (INFRA / "Dockerfile").read_text()
    for folder in ("model", "pipelines", "deployments"):
        assert f"COPY {folder} ./{folder}" in docker
    assert "ray:2.60.0" in docker and "torch==2.13.0" in docker  # same pins as pyproject.toml


def test_names_prometheus_scraped_are_the_documented_ones(prometheus, traffic):
    """What Ray actually exported (not what we meant to export) against the docs' table."""
    names = httpx.get(prometheus + "/api/v1/label/__name__/values", timeout=10).json()["data"]
    scraped = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names if n.startswith("ray_infimm_")}
    documented = documented_metrics()
    assert scraped <= documented, f"exported but not documented: {scraped - documented}"
    # everything a CPU run can produce was seen (GPU memory needs a GPU; cache hits and evictions need repeated pages
    # or a full cache; disconnects a client that leaves)
    rare = {
        "ray_infimm_gpu_memory_bytes",
        "ray_infimm_feature_cache_hits_total",
        "ray_infimm_feature_cache_evictions_total",
        "ray_infimm_client_disconnects_total",
    }
    assert documented - scraped <= rare, documented - scraped
