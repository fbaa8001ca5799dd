"""`infimm-hd serve`: the online service on a local Ray (or a running cluster), for development and demos.

    infimm-hd serve                                   # tiny RANDOM weights, http://127.0.0.1:8000/v1
    infimm-hd serve --checkpoint DIR --port 8000
    infimm-hd serve --config infra/serve.yaml --checkpoint DIR   # the production config, flags on top

Production deploys use the Serve config directly: `serve deploy infra/serve.yaml` (or a KubeRay RayService).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import time

from runtime.local_ray import prepare_local_env

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible online service (Ray Serve) until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="checkpoint folder (default: the demo reader, loudly)")
    p.add_argument(
        "--random", action="store_true", help="without --checkpoint: tiny RANDOM weights instead of the demo reader"
    )
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--config",
        help="a Serve config file (e.g. infra/serve.yaml): its args and deployment options, "
        "with the flags given here on top",
    )
    p.add_argument("--model-name", help="model id clients send (default infimm-hd)")
    p.add_argument("--max-slots", type=int, help="engine decode slots per replica")
    p.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], help="engine weights (default none)")
    p.add_argument("--gpu-memory-utilization", type=float, help="size each replica's engine to this share of its GPU")
    p.add_argument("--replicas", type=int, default=1, help="model replicas without --config (fixed count)")
    p.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs per model replica (default: 1 if this machine has CUDA, else 0)",
    )
    p.add_argument(
        "--api-key-env",
        default="INFIMM_API_KEY",
        help="environment variable with the bearer token clients must send (unset: no auth)",
    )
    p.add_argument(
        "--allow-http-host",
        action="append",
        default=[],
        metavar="HOST",
        help="allow http(s) image URLs on this host (repeatable; default: none)",
    )
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster instead of starting one")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: max(cores, 8))")
    p.add_argument("--metrics-port", type=int, default=None, help="Ray's Prometheus export port (default: Ray picks)")
    p.set_defaults(func=cmd_serve)


def plan(args: argparse.Namespace, gpus: float):
    """(application, app name, route prefix, http options) for these flags; no Ray started."""
    from .app import application_from_config, compose
    from .config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeArgs, load_serve_config

    app_args = {"checkpoint": args.checkpoint, "api_key_env": args.api_key_env}
    if args.model_name:
        app_args["model_name"] = args.model_name
    if args.max_slots:
        app_args["max_slots"] = args.max_slots
    if args.quantize:
        app_args["quantize"] = args.quantize
    if args.gpu_memory_utilization:
        app_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.allow_http_host:
        app_args["allowed_http_hosts"] = args.allow_http_host
    model_opts = {"ray_actor_options": {"num_gpus": gpus}}
    http = {"host": args.host, "port": args.port}
    if args.config:
        app, name, prefix, file_http = application_from_config(
            load_serve_config(args.config), app_args, {MODEL_DEPLOYMENT: model_opts}
        )
        return app, name, prefix, {**file_http, **http}
    model_opts = {**model_opts, "num_replicas": args.replicas}
    model_opts["ray_actor_options"]["num_cpus"] = 1
    app = compose(
        ServeArgs.model_validate(app_args),
        {MODEL_DEPLOYMENT: model_opts, INGRESS_DEPLOYMENT: {"ray_actor_options": {"num_cpus": 0.5}}},
    )
    return app, "infimm-hd", "/", http


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_serve(args: argparse.Namespace) -> int:
    # SIGTERM (systemd, Kubernetes, `kill`) takes the Ctrl-C path: Serve and the local Ray are shut down, which stops
    # every process Ray started (raylet, GCS, DashboardAgent, RuntimeEnvAgent, workers) and frees their ports. The
    # default action would end this process alone and leave Ray's agents running, holding the metrics port.
    signal.signal(signal.SIGTERM, _interrupt)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what to look at when a start or a stop hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    local = args.ray_address is None and not os.environ.get("RAY_ADDRESS")
    env = prepare_local_env() if local else {}  # before `import ray`: a local Ray stays on loopback
    from runtime.checkpoints import resolve_checkpoint

    args.checkpoint = str(resolve_checkpoint(args.checkpoint, random=args.random))  # prints a banner when defaulted
    if args.num_gpus is None:
        import torch

        args.num_gpus = 1 if torch.cuda.is_available() else 0
    app, name, prefix, http = plan(args, args.num_gpus)

    import ray
    from ray import serve

    try:
        if not ray.is_initialized():
            init = {
                # "local": a private Ray even where `ray start` left a cluster that ray.init() would otherwise join
                "address": "local" if local else args.ray_address,  # None: RAY_ADDRESS
                "include_dashboard": False,
                "runtime_env": {"env_vars": env},
            }
            if local:
                # Logical CPUs are scheduling tokens: enough for the config's replicas (infra/serve.yaml asks 4 + 2)
                # even on a laptop; real parallelism is whatever the machine has.
                init["num_cpus"] = args.num_cpus or max(os.cpu_count() or 1, 8)
                if args.metrics_port:
                    init["_metrics_export_port"] = args.metrics_port
            ray.init(**init)
            # again: ray.init replaced it (a C++ handler that logs a stack trace and a Python one that exits at once)
            signal.signal(signal.SIGTERM, _interrupt)
        serve.start(http_options=http)
        serve.run(app, name=name, route_prefix=prefix)
        base = f"http://{http['host']}:{http['port']}{prefix.rstrip('/')}"
        auth = f" (bearer token from ${args.api_key_env})" if os.environ.get(args.api_key_env) else " (no auth)"
        print(f"InfiMM-HD is serving on {base}/v1{auth}; readiness: {base}/ready. Ctrl-C stops it.", file=sys.stderr)
        while True:
            time.sleep(5)
    except KeyboardInterrupt:
        print("stopping: Serve, then Ray", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
