"""Every metric of the service, declared once: Prometheus names with units, fixed buckets, low-cardinality tags.

Used by the batch actors (pipelines/) and the Serve replicas (deployments/). Inside Ray the instruments are Ray's
(`ray.util.metrics`), served by Ray's metrics exporter with a `ray_` prefix and, for counters, a `_total` suffix:
`infimm_pages` is scraped as `ray_infimm_pages_total`. Outside Ray `prometheus_client` instruments are used (same
names without the `ray_` prefix). Tags never carry per-request or per-file values.

Nothing here imports Ray or prometheus_client until a backend is chosen, so `model/` stays importable without them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FRONTENDS = ("batch", "serve")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    tags: tuple[str, ...] = ("frontend",)
    buckets: tuple[float, ...] | None = None


CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec(
        "infimm_pages",
        "counter",
        "Batch output rows finished, one per page and prompt (status=ok|error)",
        ("frontend", "status"),
    ),
    MetricSpec(
        "infimm_page_errors",
        "counter",
        "Batch rows that became error rows, by error type (online refusals: infimm_rejected_requests)",
        ("frontend", "error_type"),
    ),
    MetricSpec(
        "infimm_requests", "counter", "Generation requests finished, by finish reason", ("frontend", "finish_reason")
    ),
    MetricSpec(
        "infimm_rejected_requests",
        "counter",
        "Requests refused before generation (4xx/503), by reason",
        ("frontend", "reason"),
    ),
    MetricSpec(
        "infimm_client_disconnects",
        "counter",
        "Requests whose client went away before the answer was complete (dropped stream, closed connection)",
    ),
    MetricSpec("infimm_windows_encoded", "counter", "Views (thumbnails and 448x448 windows) through the ViT"),
    MetricSpec("infimm_prompt_tokens", "counter", "Prompt tokens prefilled"),
    MetricSpec("infimm_generation_tokens", "counter", "Tokens generated"),
    MetricSpec(
        "infimm_feature_cache_hits",
        "counter",
        "Images admitted with their ViT features already encoded (feature cache, or the same page in the same step)",
    ),
    MetricSpec("infimm_feature_cache_misses", "counter", "Images admitted whose page went through the ViT for them"),
    MetricSpec(
        "infimm_feature_cache_evictions", "counter", "Encoded pages dropped from the feature cache (LRU, byte bound)"
    ),
    MetricSpec("infimm_feature_cache_bytes", "gauge", "Bytes of ViT features held in the feature cache"),
    MetricSpec(
        "infimm_request_latency_seconds", "histogram", "Arrival to last token, per request", buckets=LATENCY_BUCKETS
    ),
    MetricSpec(
        "infimm_time_to_first_token_seconds",
        "histogram",
        "Arrival to first token, per request",
        buckets=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "infimm_queue_wait_seconds", "histogram", "Arrival to admission into a decode slot", buckets=LATENCY_BUCKETS
    ),
    MetricSpec("infimm_encode_seconds", "histogram", "ViT time per encode batch", buckets=STEP_BUCKETS),
    MetricSpec("infimm_prefill_seconds", "histogram", "Time per prefill batch", buckets=STEP_BUCKETS),
    MetricSpec(
        "infimm_decode_step_seconds", "histogram", "Time per decode step (all active slots)", buckets=STEP_BUCKETS
    ),
    MetricSpec(
        "infimm_batch_size",
        "histogram",
        "Items per engine step (stage=encode_views|prefill|decode)",
        ("frontend", "stage"),
        BATCH_BUCKETS,
    ),
    MetricSpec("infimm_queue_depth", "gauge", "Requests waiting for a decode slot"),
    MetricSpec("infimm_slots_in_use", "gauge", "Engine decode slots holding a sequence"),
    MetricSpec("infimm_ongoing_requests", "gauge", "HTTP requests in flight in this replica"),
    MetricSpec(
        "infimm_gpu_memory_bytes", "gauge", "GPU memory held by PyTorch (kind=allocated|reserved)", ("frontend", "kind")
    ),
)
BY_NAME = {m.name: m for m in CATALOG}


def exported_name(spec: MetricSpec, ray: bool = True) -> str:
    """The name Prometheus sees (counters get `_total`; Ray adds `ray_`)."""
    name = spec.name + ("_total" if spec.kind == "counter" and not spec.name.endswith("_total") else "")
    return ("ray_" if ray else "") + name


class Metrics:
    """The catalog's instruments for one process. backend: "ray" (inside Ray), "prometheus" (prometheus_client,
    optionally into `registry`) or "none" (records nothing). `frontend` is filled into the frontend tag."""

    def __init__(self, frontend: str, backend: str = "ray", registry=None):
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
        self.frontend = frontend
        self.backend = backend
        self._m: dict[str, object] = {}
        if backend == "ray":
            from ray.util import metrics as rm

            for s in CATALOG:
                if s.kind == "counter":
                    self._m[s.name] = rm.Counter(s.name, description=s.help, tag_keys=s.tags)
                elif s.kind == "gauge":
                    self._m[s.name] = rm.Gauge(s.name, description=s.help, tag_keys=s.tags)
                else:
                    self._m[s.name] = rm.Histogram(
                        s.name, description=s.help, boundaries=list(s.buckets), tag_keys=s.tags
                    )
        elif backend == "prometheus":
            import prometheus_client as pc

            kw = {"registry": registry} if registry is not None else {}
            cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}
            for s in CATALOG:
                extra = {"buckets": s.buckets} if s.buckets else {}
                self._m[s.name] = cls[s.kind](s.name, s.help, s.tags, **extra, **kw)
        elif backend != "none":
            raise ValueError(f"unknown metrics backend {backend!r}")

    def _record(self, name: str, method: str, value: float, tags: dict) -> None:
        spec = BY_NAME[name]
        tags = {"frontend": self.frontend, **tags}
        unknown = set(tags) - set(spec.tags)
        assert not unknown, f"{name} has no tags {unknown}"
        m = self._m.get(name)
        if m is None:
            return
        if self.backend == "ray":
            getattr(m, {"inc": "inc", "observe": "observe", "set": "set"}[method])(value, tags=tags)
        else:
            getattr(m.labels(**tags), method)(value)

    def inc(self, name: str, value: float = 1.0, **tags) -> None:
        if value:
            self._record(name, "inc", value, tags)

    def observe(self, name: str, value: float, **tags) -> None:
        self._record(name, "observe", value, tags)

    def set(self, name: str, value: float, **tags) -> None:
        self._record(name, "set", value, tags)

    # ---- helpers for the common events ------------------------------------------------------------------------------
    def page_done(self, error_type: str | None = None) -> None:
        self.inc("infimm_pages", status="error" if error_type else "ok")
        if error_type:
            self.inc("infimm_page_errors", error_type=error_type)

    def rejected(self, reason: str) -> None:
        self.inc("infimm_rejected_requests", reason=reason)

    def gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.set("infimm_gpu_memory_bytes", torch.cuda.memory_allocated(), kind="allocated")
            self.set("infimm_gpu_memory_bytes", torch.cuda.memory_reserved(), kind="reserved")

    def engine_observer(self, gpu_every_s: float = 5.0):
        return MetricsObserver(self, gpu_every_s)


class MetricsObserver:
    """`engine.EngineObserver` that records into a `Metrics`."""

    def __init__(self, metrics: Metrics, gpu_every_s: float = 5.0):
        self.m = metrics
        self.gpu_every_s = gpu_every_s
        self._gpu_at = 0.0

    def on_encode(self, views: int, seconds: float) -> None:
        self.m.inc("infimm_windows_encoded", views)
        self.m.observe("infimm_encode_seconds", seconds)
        self.m.observe("infimm_batch_size", views, stage="encode_views")

    def on_prefill(self, requests: int, tokens: int, seconds: float) -> None:
        self.m.inc("infimm_prompt_tokens", tokens)
        self.m.observe("infimm_prefill_seconds", seconds)
        self.m.observe("infimm_batch_size", requests, stage="prefill")

    def on_decode_step(self, batch: int, seconds: float) -> None:
        self.m.observe("infimm_decode_step_seconds", seconds)
        self.m.observe("infimm_batch_size", batch, stage="decode")

    def on_finish(self, result) -> None:
        t = result.timings
        self.m.inc("infimm_requests", finish_reason=result.finish_reason)
        self.m.inc("infimm_generation_tokens", result.completion_tokens)
        if result.finish_reason == "abort":
            return
        self.m.observe("infimm_request_latency_seconds", t.total_s)
        self.m.observe("infimm_time_to_first_token_seconds", t.ttft_s)
        self.m.observe("infimm_queue_wait_seconds", t.queue_s)

    def on_feature_cache(self, hits: int, misses: int, evictions: int, cached_bytes: int) -> None:
        self.m.inc("infimm_feature_cache_hits", hits)
        self.m.inc("infimm_feature_cache_misses", misses)
        self.m.inc("infimm_feature_cache_evictions", evictions)
        self.m.set("infimm_feature_cache_bytes", cached_bytes)

    def on_queue(self, waiting: int, active: int) -> None:
        self.m.set("infimm_queue_depth", waiting)
        self.m.set("infimm_slots_in_use", active)
        now = time.monotonic()
        if now - self._gpu_at > self.gpu_every_s:
            self._gpu_at = now
            self.m.gpu_memory()
