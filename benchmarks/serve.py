"""Online service on the tiny model: requests/s and latency through HTTP (Ray Serve, OpenAI API) vs the engine alone.

    python benchmarks/serve.py [--requests 48] [--concurrency 8] [--max-tokens 16] [--slots 8] [--out result.json]

Both sides run the same two workloads: `concurrency` clients, each sending requests back to back until `requests`
are done, every answer exactly `max_tokens` long (ignore_eos); "page" requests carry a page image + question, "text"
requests only a question (the HTTP overhead without image work). "engine" calls `Engine.complete` in this process
(image decode and window cutting included, in a worker thread that shares the GIL with the engine loop); "asgi" is
the service's FastAPI app around an in-process EngineServer, served by uvicorn in this process (HTTP, JSON, the
ingress's checks, no Ray); "http" goes through the Serve proxy, the ingress (which decodes and cuts in its own
process) and the model deployment on 127.0.0.1. So asgi - engine is the HTTP layer, http - asgi the proxy, the
handle hop and what crosses the process boundaries. Prints JSON; never asserts timings. Random tiny weights: the
numbers measure the serving machinery, not a real model. Client, proxy, ingress and replica share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.local_ray import prepare_local_env  # noqa: E402

prepare_local_env()  # a script that starts its own local Ray; before Ray is imported

from benchmarks.common import document_page, emit, environment  # noqa: E402

PROMPT = "Transcribe the text of this document page exactly."


def summary(latencies: list[float], wall: float, tokens: int, statuses: dict) -> dict:
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {
        "ok": len(lat),
        "statuses": statuses,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(q[49], 4),
        "latency_p99_s": round(q[98], 4),
        "latency_mean_s": round(statistics.fmean(lat), 4),
    }


async def closed_loop(n: int, concurrency: int, one) -> tuple[list[float], float, dict]:
    """`concurrency` workers share `n` requests; one(i) -> status.

    Returns latencies of the 200s, wall time, statuses."""
    todo = iter(range(n))
    latencies: list[float] = []
    statuses: dict = {}

    async def worker():
        for i in todo:
            t0 = time.perf_counter()
            status = await one(i)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0, statuses


def bench_engine(checkpoint, pages: list[bytes], args) -> dict:
    import torch

    from model.engine import Engine, EngineConfig
    from model.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(checkpoint, device="cpu", config=EngineConfig(max_slots=args.slots))
    sampling = SamplingParams(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)
    engine.start()

    def one_for(workload: str):
        async def one(i: int) -> int:
            images = [pages[i % len(pages)]] if workload == "page" else []
            request = await asyncio.to_thread(engine.make_request, PROMPT, images, sampling)  # off the event loop
            result = await engine.complete(request)
            return 200 if result.completion_tokens == args.max_tokens else "short"

        return one

    async def run(workload: str):
        await one_for(workload)(0)  # warm-up
        return await closed_loop(args.requests, args.concurrency, one_for(workload))

    out = {}
    for workload in ("page", "text"):
        latencies, wall, statuses = asyncio.run(run(workload))
        out[workload] = summary(latencies, wall, len(latencies) * args.max_tokens, statuses)
    engine.shutdown()
    return out


async def http_workload(base_url: str, urls: list[str], workload: str, args):
    import httpx

    async with httpx.AsyncClient(
        base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=args.concurrency + 4)
    ) as client:

        async def one(i: int) -> int:
            content = [{"type": "text", "text": PROMPT}]
            if workload == "page":
                content.insert(0, {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}})
            body = {
                "model": "infimm-hd",
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": content}],
            }
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] != args.max_tokens:
                return "short"
            return r.status_code

        await one(0)  # warm-up
        return await closed_loop(args.requests, args.concurrency, one)


def bench_asgi(checkpoint, pages: list[bytes], args) -> dict:
    import threading

    import torch
    import uvicorn

    from deployments.app import load_engine
    from deployments.config import ServeArgs
    from deployments.engine_server import EngineServer
    from deployments.frontend import Frontend, FrontendSettings, LocalModelClient, make_api
    from deployments.images import ImageFetcher, ImagePolicy

    torch.set_num_threads(args.threads)
    a = ServeArgs(checkpoint=str(checkpoint), device="cpu", max_slots=args.slots, metrics=False)
    server = EngineServer(load_engine(a), a.limits)
    policy = ImagePolicy(a.limits.max_image_bytes, a.window_config())
    api = make_api(Frontend(LocalModelClient(server), ImageFetcher(policy), FrontendSettings(limits=a.limits)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    urls = ["data:image/png;base64," + base64.b64encode(p).decode() for p in pages]
    out = {}
    try:
        for workload in ("page", "text"):
            latencies, wall, statuses = asyncio.run(http_workload(f"http://127.0.0.1:{port}", urls, workload, args))
            out[workload] = summary(latencies, wall, len(latencies) * args.max_tokens, statuses)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.shutdown()
    return out


def bench_http(checkpoint, pages: list[bytes], args) -> dict:
    import ray
    from ray import serve

    from deployments.app import compose
    from deployments.config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeArgs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        address="local",  # a private Ray, never a cluster `ray start` left on this machine
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": str(args.threads),
            }
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = compose(
        ServeArgs(checkpoint=str(checkpoint), device="cpu", max_slots=args.slots, metrics=True),
        {
            MODEL_DEPLOYMENT: {
                "num_replicas": 1,
                "max_ongoing_requests": 2 * args.slots,
                "max_queued_requests": -1,
                "ray_actor_options": {"num_cpus": args.threads, "num_gpus": 0},
            },
            INGRESS_DEPLOYMENT: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
        },
    )
    serve.run(app, name="bench", route_prefix="/")
    urls = ["data:image/png;base64," + base64.b64encode(p).decode() for p in pages]

    out = {}
    try:
        for workload in ("page", "text"):
            latencies, wall, statuses = asyncio.run(http_workload(f"http://127.0.0.1:{port}", urls, workload, args))
            out[workload] = summary(latencies, wall, len(latencies) * args.max_tokens, statuses)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def bench_payload(pages: list[bytes], repeats: int = 20) -> dict:
    """What crossing the handle costs per page request: pickling (protocol 5, as Ray does) a payload whose cut views
    are torch tensors (pickled in band through torch.save) vs the numpy wire form GenerationPayload uses (out of band,
    zero-copy into the object store)."""
    import pickle

    from deployments.engine_server import GenerationPayload
    from model.processor import ChatMessage
    from model.windows import prepare_image

    page = prepare_image(pages[0])
    payload = GenerationPayload("bench", [ChatMessage("user", [page, PROMPT])], max_tokens=8)

    def roundtrip(obj) -> tuple[float, int]:
        t0 = time.perf_counter()
        for _ in range(repeats):
            buffers: list = []
            data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            pickle.loads(data, buffers=buffers)
        return (time.perf_counter() - t0) / repeats * 1000, len(data)

    torch_ms, torch_bytes = roundtrip(page)  # the tensor as it was shipped before (inside the payload)
    wire_ms, wire_bytes = roundtrip(payload)
    return {
        "views": page.n_views,
        "view_bytes": page.views.numel(),
        "torch_tensor": {"ms": round(torch_ms, 3), "in_band_bytes": torch_bytes},
        "numpy_wire": {"ms": round(wire_ms, 3), "in_band_bytes": wire_bytes},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the tiny random checkpoint")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--pages", type=int, default=4, help="distinct pages (the feature cache hits on repeats)")
    p.add_argument("--size", type=int, default=896, help="page side in pixels (896 = 2x2 windows + thumbnail)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both sides)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from runtime.checkpoints import default_tiny_checkpoint

    checkpoint = args.checkpoint or default_tiny_checkpoint()
    pages = [document_page(args.size, args.size, seed=i) for i in range(args.pages)]
    payload = bench_payload(pages)
    engine = bench_engine(checkpoint, pages, args)
    asgi = bench_asgi(checkpoint, pages, args)
    http = bench_http(checkpoint, pages, args)
    result = {
        "benchmark": "serve",
        "model": "tiny-random" if not args.checkpoint else str(args.checkpoint),
        "device": "cpu",
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "slots": args.slots,
            "page_px": args.size,
            "distinct_pages": args.pages,
        },
        "payload_serialization": payload,
        "engine": engine,
        "asgi": asgi,
        "http": http,
        "http_vs_engine": {
            w: {
                "throughput_ratio": round(http[w]["requests_per_s"] / engine[w]["requests_per_s"], 3),
                "p50_overhead_s": round(http[w]["latency_p50_s"] - engine[w]["latency_p50_s"], 4),
                "p50_http_layer_s": round(asgi[w]["latency_p50_s"] - engine[w]["latency_p50_s"], 4),
                "p50_serve_hops_s": round(http[w]["latency_p50_s"] - asgi[w]["latency_p50_s"], 4),
            }
            for w in ("page", "text")
        },
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
