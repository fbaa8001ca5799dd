"""The Ray Serve app: a thin OpenAI-compatible ingress plus the model deployment that owns the engine.

    serve run deployments.app:build_app                 # defaults (tiny RANDOM weights without a checkpoint)
    serve run infra/serve.yaml                          # the production config (GPUs, autoscaling, limits)
    infimm-hd serve --checkpoint DIR --port 8000        # local convenience (deployments/cli.py)

`OpenAIIngress` (CPU, scales on HTTP load) parses and checks requests, downloads and cuts images, and streams answers;
`InfimmModel` (one GPU each, autoscaled on ongoing requests) tokenizes and generates. Requests from every ingress
replica meet in a model replica's engine, whose background loop batches them step by step (continuous batching).

Backpressure, outermost first: the proxy's queue for the ingress (`max_queued_requests` of OpenAIIngress: Serve's own
plain-text 503, with Retry-After from `backpressure_config`), the ingress's handle queue for the model
(BackPressureError -> our OpenAI-body 503 + Retry-After), and the engine queue (`max_waiting` -> 503).
`max_ongoing_requests` of InfimmModel bounds what one engine holds; keep it at about 2x `max_slots` so a freed slot is
refilled at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os

from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from .config import IMPORT_PATH, INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeArgs
from .engine_server import EngineServer, GenerationPayload
from .frontend import Frontend, FrontendSettings, make_api
from .images import ImageFetcher, ImagePolicy
from .schemas import APIError

log = logging.getLogger(__name__)


def load_engine(a: ServeArgs, observer=None):
    """The engine a model replica owns (the batch pipeline's engine, with the same WindowConfig defaults)."""
    import torch

    from model.config import InfiMMHDConfig
    from model.engine import Engine, EngineConfig
    from runtime.checkpoints import default_banner, default_checkpoint

    checkpoint = a.checkpoint
    if not checkpoint:
        log.warning("\n%s", default_banner(a.random_weights))
        checkpoint = default_checkpoint(a.random_weights)
    positions = InfiMMHDConfig.from_pretrained(checkpoint).text.max_positions
    if a.max_seq_len > positions:  # e.g. the production config run with the tiny checkpoint
        log.warning(
            "max_seq_len %d is over this checkpoint's %d positions; using %d", a.max_seq_len, positions, positions
        )
    return Engine.from_pretrained(
        checkpoint,
        device=a.device,
        dtype=getattr(torch, a.dtype) if a.dtype else None,
        config=EngineConfig(
            max_slots=a.max_slots,
            max_seq_len=min(a.max_seq_len, positions),
            quantize=a.quantize,
            gpu_memory_utilization=a.gpu_memory_utilization,
            feature_cache_mb=a.feature_cache_mb,
        ),
        windows=a.window_config(),  # the engine's processor sets the window to the checkpoint's ViT size
        prompt_format=a.prompt_format,
        observer=observer,
    )


def ingress_windows(a: ServeArgs):
    """The ingress cuts pages exactly as the replica's engine expects: window size from the checkpoint."""
    from model.processor import checkpoint_windows
    from runtime.checkpoints import default_checkpoint

    return checkpoint_windows(a.checkpoint or default_checkpoint(a.random_weights), a.window_config())


def bind_internal_grpc_to_node_ip() -> None:
    """Ray Serve (2.60, `replica.py` `_on_initialized`) starts an inter-deployment gRPC server in every replica on
    `[::]:0`: every interface, although a local Ray keeps everything else on 127.0.0.1 and a local `infimm-hd serve`
    promises loopback only. Serve has no setting for its address (ray-project/ray#64623 adds a port range, not a
    host), so the replica binds it to the address Ray advertises for its node instead, the one handles connect to
    (`node_ip` of the replica): 127.0.0.1 on a local Ray, the node's IP on a cluster. Called in each deployment's
    constructor, which Serve runs before it starts that server. Without the hook (another Ray) nothing changes and
    tests/test_loopback.py says so."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "binds_node_ip", False):
        return

    def bind_node_ip(server, address: str):
        if address == "[::]:0":
            import ray

            ip = ray.util.get_node_ip_address()
            address = f"[{ip}]:0" if ":" in ip else f"{ip}:0"
        return bind(server, address)

    bind_node_ip.binds_node_ip = True
    replica.add_port_to_grpc_server = bind_node_ip


# glibc mallopt parameters (malloc.h): the heap is trimmed and large blocks are mmapped above 128 KiB, fixed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = ((M_ARENA_MAX, 2), (M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024))


def level_malloc() -> bool:
    """Keep a replica's heap from ratcheting up under load (glibc only; False elsewhere).

    Measured in the ingress under a soak (benchmarks/serve_memory.py): Python's traced memory stayed at 4-5 MB and
    malloc's bytes in use flat, while the free memory glibc kept grew (70 -> 142 MB): after the first large free glibc
    raises its mmap threshold, so later image buffers come from the heap and fragment it. A fixed 128 KiB mmap and trim
    threshold returns them to the system; two arenas bound the per-thread heaps. The same as MALLOC_ARENA_MAX=2
    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072, set from the constructor so no deployment option
    (a Serve config's runtime_env) can drop it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)


def _metrics(a: ServeArgs):
    if not a.metrics:
        return None
    from runtime.metrics import Metrics

    return Metrics(frontend="serve")


@serve.deployment(
    name=MODEL_DEPLOYMENT,
    max_ongoing_requests=16,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class InfimmModel:
    """Owns one engine; every method is safe to call concurrently (the engine queues and batches)."""

    def __init__(self, args: dict):
        bind_internal_grpc_to_node_ip()
        level_malloc()
        a = ServeArgs.model_validate(args)
        metrics = _metrics(a)
        engine = load_engine(a, observer=metrics.engine_observer() if metrics else None)
        self.server = EngineServer(engine, a.limits, max_waiting=a.max_waiting, retry_after_s=a.retry_after_s)

    async def complete(self, payload: GenerationPayload) -> dict:
        return await self.server.complete(payload)

    async def stream(self, payload: GenerationPayload):
        async for event in self.server.stream(payload):
            yield event

    async def stats(self) -> dict:
        return self.server.stats()

    def check_health(self) -> None:  # Serve calls this every health_check_period_s; raising restarts the replica
        self.server.check_health()

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()


class HandleModelClient:
    """ModelClient over a DeploymentHandle: Serve's overload and failure exceptions become OpenAI-body errors."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def complete(self, payload: GenerationPayload) -> dict:
        response = self.handle.complete.remote(payload)
        try:
            return await response
        except asyncio.CancelledError:  # our timeout or the client went away: stop the work in the replica too
            response.cancel()
            raise
        except TaskCancelledError:  # Serve cancelled it with its parent request (the client went away): not a failure
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the hop is translated into an APIError
            raise _translate(e) from None

    async def stream(self, payload: GenerationPayload):
        gen = self.handle.options(stream=True).stream.remote(payload)
        try:
            async for event in gen:
                yield event
        except (asyncio.CancelledError, TaskCancelledError):  # the client went away (see complete)
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the hop is translated into an APIError
            raise _translate(e) from None
        finally:
            gen.cancel()  # no-op when finished; otherwise aborts the request in the engine

    async def stats(self) -> dict:
        try:
            return await self.handle.stats.remote()
        except Exception as e:  # noqa: BLE001 - every failure of the hop is translated into an APIError
            raise _translate(e) from None


def _translate(e: Exception) -> APIError:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, BackPressureError):
        return APIError(503, "all model replicas are at capacity; retry later", "overloaded")
    if isinstance(e, (DeploymentUnavailableError, RayActorError)):
        return APIError(503, f"the model is unavailable ({type(e).__name__}); retry later", "model_unavailable")
    log.error("model call failed: %r", e)
    return APIError(500, "the model replica failed; see the replica log", "internal_error")


@serve.deployment(
    name=INGRESS_DEPLOYMENT,
    max_ongoing_requests=1024,  # cheap asyncio tasks; slow clients must not fill them (body_timeout_s, buffered bytes)
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress()
class OpenAIIngress:
    """Thin HTTP front: FastAPI routes from frontend.make_api around a handle to InfimmModel."""

    def __init__(self, model: DeploymentHandle, args: dict):
        bind_internal_grpc_to_node_ip()
        level_malloc()
        a = ServeArgs.model_validate(args)
        api_key = a.api_key or os.environ.get(a.api_key_env) or None
        policy = ImagePolicy(
            max_image_bytes=a.limits.max_image_bytes,
            windows=ingress_windows(a),
            allowed_http_hosts=tuple(a.allowed_http_hosts),
            allowed_s3_prefixes=tuple(a.allowed_s3_prefixes),
            s3_endpoint_url=a.s3_endpoint_url,
            fetch_timeout_s=a.fetch_timeout_s,
        )
        settings = FrontendSettings(
            model_name=a.model_name,
            limits=a.limits,
            api_key=api_key,
            request_timeout_s=a.request_timeout_s,
            body_timeout_s=a.body_timeout_s,
            retry_after_s=a.retry_after_s,
        )
        # Ray's TaskCancelledError: what Serve's ASGI `receive` raises once the proxy has dropped a disconnected
        # client's request, and what a model call cancelled with it raises: a client leaving, not a failure
        client = HandleModelClient(model)
        self.frontend = Frontend(
            client, ImageFetcher(policy), settings, _metrics(a), disconnect_errors=(TaskCancelledError,)
        )
        log.info(
            "ingress for %r: auth %s, http image hosts %s, s3 prefixes %s",
            a.model_name,
            "on" if api_key else "off",
            a.allowed_http_hosts or "off",
            a.allowed_s3_prefixes or "off",
        )

    def __serve_build_asgi_app__(self):
        return make_api(self.frontend)


def compose(args: ServeArgs, options: dict[str, dict] | None = None) -> Application:
    """Ingress(model) with per-deployment option overrides (the `deployments:` block of a Serve config)."""
    options = options or {}
    plain = args.model_dump()
    model = InfimmModel.options(**options.get(MODEL_DEPLOYMENT, {})).bind(plain)
    return OpenAIIngress.options(**options.get(INGRESS_DEPLOYMENT, {})).bind(model, plain)


def build_app(args: dict) -> Application:
    """The builder `serve run deployments.app:build_app key=value ...` and infra/serve.yaml point at."""
    return compose(ServeArgs.model_validate(args or {}))


# ---- Serve config files ----------------------------------------------------------------------------------------------
def _merge(base: dict, overrides: dict) -> dict:
    """Overrides win; dict values (ray_actor_options, autoscaling_config, limits) merge one level deeper."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def application_from_config(config: dict, args: dict | None = None, deployments: dict[str, dict] | None = None):
    """The InfiMM-HD app of a Serve config dict as an Application, with `args` and per-deployment option overrides
    merged in (as `serve deploy` applies the file's `deployments:` block over the code's defaults).

    Returns (application, app_name, route_prefix, http_options)."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    apps = [a for a in schema.applications if a.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"expected one application with import_path {IMPORT_PATH!r} in the config, found {len(apps)}")
    app = apps[0]
    merged_args = _merge(app.args or {}, args or {})
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    for name, extra in (deployments or {}).items():
        options[name] = _merge(options.get(name, {}), extra)
    unknown = set(options) - {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    if unknown:
        raise ValueError(
            f"config names unknown deployments {sorted(unknown)}; this app has "
            f"{MODEL_DEPLOYMENT} and {INGRESS_DEPLOYMENT}"
        )
    http = schema.http_options.model_dump(exclude_unset=True)
    return compose(ServeArgs.model_validate(merged_args), options), app.name, app.route_prefix, http
