"""Renders the generated operations files from their single sources, or checks they are up to date.

    python infra/render.py           # write infra/grafana/infimm-hd.json, kuberay/rayservice.yaml, kuberay/rayjob.yaml
    python infra/render.py --check   # exit 1 if a committed file differs from what would be rendered (CI runs this)

Sources of truth:
* infra/serve.yaml             -> embedded verbatim as spec.serveConfigV2 of the RayService
* infra/kuberay/raycluster.yaml -> its spec is the cluster of the RayService and of the RayJob
* PANELS below                 -> the Grafana dashboard (metric names from runtime/metrics.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent

# kind: "throughput" | "latency" | "errors" | "load" | "gpu" -- tests require data from the first three after a run.
RATE = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legend": legend}


def quantiles(metric: str, by: str = "", qs=(0.5, 0.95, 0.99)) -> list[dict]:
    group = f"le{', ' + by if by else ''}"
    legend = f"p{{q}}{' {{' + by + '}}' if by else ''}"
    return [
        q(f"histogram_quantile({x}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", legend.format(q=int(x * 100)))
        for x in qs
    ]


PANELS: list[dict] = [
    {"row": "Throughput"},
    {
        "title": "Pages per second",
        "kind": "throughput",
        "unit": "pps",
        "targets": [q(f"sum by (frontend, status) (rate(ray_infimm_pages_total[{RATE}]))", "{{frontend}} {{status}}")],
    },
    {
        "title": "Tokens per second",
        "kind": "throughput",
        "unit": "short",
        "targets": [
            q(f"sum by (frontend) (rate(ray_infimm_generation_tokens_total[{RATE}]))", "generated {{frontend}}"),
            q(f"sum by (frontend) (rate(ray_infimm_prompt_tokens_total[{RATE}]))", "prompt {{frontend}}"),
        ],
    },
    {
        "title": "Windows encoded per second",
        "kind": "throughput",
        "unit": "short",
        "targets": [q(f"sum by (frontend) (rate(ray_infimm_windows_encoded_total[{RATE}]))", "{{frontend}}")],
    },
    {
        "title": "Requests per second by finish reason",
        "kind": "throughput",
        "unit": "reqps",
        "targets": [
            q(
                f"sum by (frontend, finish_reason) (rate(ray_infimm_requests_total[{RATE}]))",
                "{{frontend}} {{finish_reason}}",
            )
        ],
    },
    {"row": "Latency"},
    {
        "title": "Request latency",
        "kind": "latency",
        "unit": "s",
        "targets": quantiles("ray_infimm_request_latency_seconds", "frontend"),
    },
    {
        "title": "Time to first token",
        "kind": "latency",
        "unit": "s",
        "targets": quantiles("ray_infimm_time_to_first_token_seconds", "frontend"),
    },
    {
        "title": "Queue wait (arrival to decode slot)",
        "kind": "latency",
        "unit": "s",
        "targets": quantiles("ray_infimm_queue_wait_seconds", "frontend", (0.5, 0.95)),
    },
    {
        "title": "Engine step times (p50)",
        "kind": "latency",
        "unit": "s",
        "targets": [
            q(
                f"histogram_quantile(0.5, sum by (le) (rate(ray_infimm_encode_seconds_bucket[{RATE}])))",
                "ViT encode batch",
            ),
            q(
                f"histogram_quantile(0.5, sum by (le) (rate(ray_infimm_prefill_seconds_bucket[{RATE}])))",
                "prefill batch",
            ),
            q(
                f"histogram_quantile(0.5, sum by (le) (rate(ray_infimm_decode_step_seconds_bucket[{RATE}])))",
                "decode step",
            ),
        ],
    },
    {"row": "Errors"},
    {
        "title": "Page errors by type",
        "kind": "errors",
        "unit": "short",
        "targets": [
            q(
                f"sum by (frontend, error_type) (increase(ray_infimm_page_errors_total[{RATE}]))",
                "{{frontend}} {{error_type}}",
            )
        ],
    },
    {
        "title": "Error ratio",
        "kind": "errors",
        "unit": "percentunit",
        "targets": [
            q(
                f"sum by (frontend) (rate(ray_infimm_page_errors_total[{RATE}])) / "
                f"clamp_min(sum by (frontend) (rate(ray_infimm_pages_total[{RATE}])), 1e-9)",
                "{{frontend}}",
            )
        ],
    },
    {
        "title": "Rejected requests by reason (4xx/503/504)",
        "kind": "errors",
        "unit": "short",
        "targets": [q(f"sum by (reason) (increase(ray_infimm_rejected_requests_total[{RATE}]))", "{{reason}}")],
    },
    {"row": "Load"},
    {
        "title": "Queue depth, slots in use, ongoing HTTP requests",
        "kind": "load",
        "unit": "short",
        "targets": [
            q("sum by (frontend) (ray_infimm_queue_depth)", "waiting {{frontend}}"),
            q("sum by (frontend) (ray_infimm_slots_in_use)", "slots in use {{frontend}}"),
            q("sum(ray_infimm_ongoing_requests)", "ongoing HTTP"),
        ],
    },
    {
        "title": "Serve replicas",
        "kind": "load",
        "unit": "short",
        "targets": [q("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")],
    },
    {
        "title": "Engine batch sizes (p50)",
        "kind": "load",
        "unit": "short",
        "targets": [
            q(f"histogram_quantile(0.5, sum by (le, stage) (rate(ray_infimm_batch_size_bucket[{RATE}])))", "{{stage}}")
        ],
    },
    {"row": "GPU"},
    {
        "title": "GPU memory held by PyTorch",
        "kind": "gpu",
        "unit": "bytes",
        "targets": [q("sum by (kind) (ray_infimm_gpu_memory_bytes)", "{{kind}}")],
    },
    {
        "title": "GPU utilisation (Ray node metrics)",
        "kind": "gpu",
        "unit": "percent",
        "targets": [q("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}")],
    },
]


def dashboard() -> dict:
    panels, y, x = [], 0, 0
    for i, p in enumerate(PANELS, start=1):
        if "row" in p:
            y += 8 if x else 0
            x = 0
            panels.append(
                {
                    "type": "row",
                    "id": i,
                    "title": p["row"],
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        panels.append(
            {
                "type": "timeseries",
                "id": i,
                "title": p["title"],
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "description": f"kind={p['kind']}",
                "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
                "targets": [
                    {
                        "refId": chr(65 + j),
                        "expr": t["expr"],
                        "legendFormat": t["legend"],
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    }
                    for j, t in enumerate(p["targets"])
                ],
            }
        )
        x = 12 - x
        y += 8 if x == 0 else 0
    return {
        "title": "InfiMM-HD",
        "uid": "infimm-hd",
        "tags": ["infimm-hd", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "panels": panels,
    }


def cluster_spec() -> dict:
    return yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())["spec"]


HEADER = "# GENERATED by infra/render.py from {sources}; edit those and re-render.\n"


def rayservice() -> str:
    serve_text = (INFRA / "serve.yaml").read_text()
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "infimm-hd", "labels": {"app": "infimm-hd"}},
        "spec": {"serveConfigV2": serve_text, "rayClusterConfig": cluster_spec()},
    }
    return HEADER.format(sources="infra/serve.yaml and infra/kuberay/raycluster.yaml") + _dump(doc)


def rayjob() -> str:
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "infimm-hd-batch", "labels": {"app": "infimm-hd"}},
        "spec": {
            # One job per document batch; the cluster is created for it and deleted when it ends.
            "entrypoint": (
                "infimm-hd batch run --input s3://my-scans/incoming/ --output s3://my-scans/text/ "
                "--prompt 'Transcribe the text of this page.' --checkpoint /models/infimm-hd-13b "
                "--actors 1,8 --gpus-per-actor 1"
            ),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": 86400,
            "submissionMode": "K8sJobMode",
            "runtimeEnvYAML": "env_vars:\n  RAY_DEDUP_LOGS: '0'\n",
            "rayClusterSpec": cluster_spec(),
        },
    }
    return HEADER.format(sources="infra/kuberay/raycluster.yaml") + _dump(doc)


def _dump(doc: dict) -> str:
    def represent(dumper, data):
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, represent)
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120)


def outputs() -> dict[Path, str]:
    return {
        INFRA / "grafana" / "infimm-hd.json": json.dumps(dashboard(), indent=2) + "\n",
        INFRA / "kuberay" / "rayservice.yaml": rayservice(),
        INFRA / "kuberay" / "rayjob.yaml": rayjob(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(INFRA.parent)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run python infra/render.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
