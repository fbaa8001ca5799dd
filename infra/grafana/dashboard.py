"""The Grafana dashboard, built with the Grafana foundation SDK's typed builders (`grafana-foundation-sdk`).

    python infra/grafana/dashboard.py           # write infra/grafana/infimm-hd.json
    python infra/grafana/dashboard.py --check   # exit 1 if the committed JSON differs from what this builds

`infra/render.py` renders this file's output together with the other operations files; tests/test_dashboard.py checks
that the committed JSON is this builder's output and survives a round trip through the SDK's typed dashboard model.

Each panel's description is `kind=<kind>`: "throughput" | "latency" | "errors" | "load" | "gpu". After a run on the
CPU, tests/test_observability.py requires data from every query of the first three kinds (real Prometheus).
Metric names are the ones declared in runtime/metrics.py (Ray exports them with the `ray_` prefix).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = Path(__file__).resolve().parent / "infimm-hd.json"
RATE = "$__rate_interval"  # Grafana picks the range from the scrape interval and the zoom
# Every panel and query reads the datasource chosen in the dashboard's `datasource` variable (a Prometheus).
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
PANEL_HEIGHT, PANEL_WIDTH = 8, 12  # two panels per row of the 24-column grid


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Graph:
    title: str
    kind: str
    unit: str
    queries: tuple[Query, ...]


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> tuple[Query, ...]:
    """p50/p95/p99 of a histogram, one series per value of `by` (legend `p95 {{frontend}}`)."""
    group = "le, " + by if by else "le"
    series = " {{" + by + "}}" if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", f"p{round(q * 100)}{series}"
        )
        for q in qs
    )


def p50(metric: str, legend: str, by: str = "") -> Query:
    (query,) = quantiles(metric, by, (0.5,))
    return Query(query.expr, legend)


# (row title, panels in it), top to bottom
LAYOUT: list[tuple[str, list[Graph]]] = [
    (
        "Throughput",
        [
            Graph(
                "Pages per second",
                "throughput",
                "pps",
                (
                    Query(
                        f"sum by (frontend, status) (rate(ray_infimm_pages_total[{RATE}]))", "{{frontend}} {{status}}"
                    ),
                ),
            ),
            Graph(
                "Tokens per second",
                "throughput",
                "short",
                (
                    Query(
                        f"sum by (frontend) (rate(ray_infimm_generation_tokens_total[{RATE}]))",
                        "generated {{frontend}}",
                    ),
                    Query(f"sum by (frontend) (rate(ray_infimm_prompt_tokens_total[{RATE}]))", "prompt {{frontend}}"),
                ),
            ),
            Graph(
                "Windows encoded per second",
                "throughput",
                "short",
                (Query(f"sum by (frontend) (rate(ray_infimm_windows_encoded_total[{RATE}]))", "{{frontend}}"),),
            ),
            Graph(
                "Requests per second by finish reason",
                "throughput",
                "reqps",
                (
                    Query(
                        f"sum by (frontend, finish_reason) (rate(ray_infimm_requests_total[{RATE}]))",
                        "{{frontend}} {{finish_reason}}",
                    ),
                ),
            ),
        ],
    ),
    (
        "Latency",
        [
            Graph("Request latency", "latency", "s", quantiles("ray_infimm_request_latency_seconds", "frontend")),
            Graph(
                "Time to first token", "latency", "s", quantiles("ray_infimm_time_to_first_token_seconds", "frontend")
            ),
            Graph(
                "Queue wait (arrival to decode slot)",
                "latency",
                "s",
                quantiles("ray_infimm_queue_wait_seconds", "frontend", (0.5, 0.95)),
            ),
            Graph(
                "Engine step times (p50)",
                "latency",
                "s",
                (
                    p50("ray_infimm_encode_seconds", "ViT encode batch"),
                    p50("ray_infimm_prefill_seconds", "prefill batch"),
                    p50("ray_infimm_decode_step_seconds", "decode step"),
                ),
            ),
        ],
    ),
    (
        "Errors",
        [
            Graph(
                "Page errors by type",
                "errors",
                "short",
                (
                    Query(
                        f"sum by (frontend, error_type) (increase(ray_infimm_page_errors_total[{RATE}]))",
                        "{{frontend}} {{error_type}}",
                    ),
                ),
            ),
            Graph(
                "Error ratio",
                "errors",
                "percentunit",
                (
                    Query(
                        f"sum by (frontend) (rate(ray_infimm_page_errors_total[{RATE}])) / "
                        f"clamp_min(sum by (frontend) (rate(ray_infimm_pages_total[{RATE}])), 1e-9)",
                        "{{frontend}}",
                    ),
                ),
            ),
            Graph(
                "Rejected requests by reason (4xx/503/504)",
                "errors",
                "short",
                (Query(f"sum by (reason) (increase(ray_infimm_rejected_requests_total[{RATE}]))", "{{reason}}"),),
            ),
        ],
    ),
    (
        "Load",
        [
            Graph(
                "Queue depth, slots in use, ongoing HTTP requests",
                "load",
                "short",
                (
                    Query("sum by (frontend) (ray_infimm_queue_depth)", "waiting {{frontend}}"),
                    Query("sum by (frontend) (ray_infimm_slots_in_use)", "slots in use {{frontend}}"),
                    Query("sum(ray_infimm_ongoing_requests)", "ongoing HTTP"),
                ),
            ),
            Graph(
                "Serve replicas",
                "load",
                "short",
                (Query("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}"),),
            ),
            Graph("Engine batch sizes (p50)", "load", "short", (p50("ray_infimm_batch_size", "{{stage}}", "stage"),)),
        ],
    ),
    (
        "GPU",
        [
            Graph(
                "GPU memory held by PyTorch",
                "gpu",
                "bytes",
                (Query("sum by (kind) (ray_infimm_gpu_memory_bytes)", "{{kind}}"),),
            ),
            Graph(
                "GPU utilisation (Ray node metrics)",
                "gpu",
                "percent",
                (Query("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}"),),
            ),
        ],
    ),
]


def timeseries(panel_id: int, graph: Graph) -> Timeseries:
    panel = (
        Timeseries()
        .id(panel_id)
        .title(graph.title)
        .description(f"kind={graph.kind}")
        .datasource(DATASOURCE)
        .unit(graph.unit)
        .height(PANEL_HEIGHT)
        .span(PANEL_WIDTH)
        # Grafana's own defaults for a new time series panel, spelled out so the JSON carries no `options: null`
        .legend(
            VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)
        )
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.SINGLE).sort(SortOrder.NONE))
    )
    for i, q in enumerate(graph.queries):
        panel = panel.with_target(
            Dataquery().ref_id(chr(ord("A") + i)).expr(q.expr).legend_format(q.legend).datasource(DATASOURCE)
        )
    return panel


def build() -> Dashboard:
    """The dashboard builder; `.build()` gives the typed model. Panel ids count rows and panels from 1, top to bottom;
    the SDK lays panels out left to right, wrapping at 24 columns, each row starting a new line."""
    board = (
        Dashboard("InfiMM-HD")
        .uid("infimm-hd")
        .tags(["infimm-hd", "ray"])
        .timezone("browser")
        .refresh("30s")
        .time("now-3h", "now")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    panel_id = 0
    for title, graphs in LAYOUT:
        panel_id += 1
        board = board.with_row(Row(title).id(panel_id))
        for graph in graphs:
            panel_id += 1
            board = board.with_panel(timeseries(panel_id, graph))
    return board


def to_json() -> str:
    """The dashboard as written to infimm-hd.json (key order as the SDK emits it; stable)."""
    return JSONEncoder(indent=2).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = p.parse_args(argv)
    text = to_json()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python infra/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
