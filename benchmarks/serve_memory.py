"""Memory of the online service under sustained mixed traffic: RSS of the ingress and the model replica per round.

    python benchmarks/serve_memory.py [--rounds 12] [--out serve_memory.json]

A local Ray (127.0.0.1) serves infra/serve.yaml with the tiny RANDOM checkpoint and CPU overrides. Each round sends
the same mix, concurrently: page requests (each round new pages, so the feature cache keeps filling until it is at
its byte cap and starts evicting), text requests, and streams that the client drops after two chunks (the
generation is aborted in the engine). After each round the RSS of both replica processes is read from /proc, with
its parts (RssAnon: the heap; RssShmem: object-store pages the process has touched, which count in its RSS although
they are shared memory that the object store reuses).
With `--feature-cache-mb` small, the cache reaches its cap within the run and evicts from then on; each round also
records the cache's bytes and evictions (from /ready), so the replica's RSS can be read less what the cache holds.
Prints JSON: per-round RSS and its growth, and the growth over the second half of the rounds (what "levels off"
means: after warm-up and the feature cache filling, later rounds should add little). Never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import document_page, emit, environment, rss_bytes, rss_parts, serve_replica_pids  # noqa: E402

APP = "memory"


async def one_round(base: str, r: int, pages: int, texts: int, dropped: int, size: int) -> dict:
    import httpx

    urls = [
        "data:image/png;base64," + base64.b64encode(document_page(size, size, seed=r * pages + i)).decode()
        for i in range(pages)
    ]
    statuses: dict[str, int] = {}

    def count(key) -> None:
        statuses[str(key)] = statuses.get(str(key), 0) + 1

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def page(url: str):
            body = {
                "model": "infimm-hd",
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "Read."},
                        ],
                    }
                ],
            }
            count((await client.post("/v1/chat/completions", json=body)).status_code)

        async def text(i: int):
            body = {"model": "infimm-hd", "max_tokens": 16, "messages": [{"role": "user", "content": f"Text {r}.{i}"}]}
            count((await client.post("/v1/chat/completions", json=body)).status_code)

        async def dropped_stream(i: int):
            body = {
                "model": "infimm-hd",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
                "messages": [{"role": "user", "content": f"Stream {r}.{i}"}],
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                n = 0
                async for _ in resp.aiter_lines():
                    n += 1
                    if n >= 4:  # two events (each a data line and a blank line): then the client goes away
                        break
            count("dropped_stream")

        await asyncio.gather(
            *(page(u) for u in urls), *(text(i) for i in range(texts)), *(dropped_stream(i) for i in range(dropped))
        )
    return statuses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--pages", type=int, default=6, help="page requests per round (new pages every round)")
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--dropped", type=int, default=4, help="streams dropped by the client after two chunks")
    p.add_argument("--size", type=int, default=896)
    p.add_argument(
        "--feature-cache-mb",
        type=int,
        default=1024,
        help="the model replica's feature cache cap (serve arg feature_cache_mb); small: it fills within the run",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from runtime.local_ray import prepare_local_env

    env = prepare_local_env()
    import httpx
    import ray
    from ray import serve

    from deployments.app import application_from_config
    from deployments.config import load_serve_config
    from runtime.checkpoints import default_tiny_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    rounds = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app, _, _, _ = application_from_config(
            load_serve_config(os.path.join(root, "infra", "serve.yaml")),
            args={
                "checkpoint": str(default_tiny_checkpoint()),
                "max_slots": 4,
                "max_seq_len": 512,
                "feature_cache_mb": args.feature_cache_mb,
            },
            deployments={
                "InfimmModel": {
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_gpus": 0, "num_cpus": 1},
                },
                "OpenAIIngress": {
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0.5},
                },
            },
        )
        serve.run(app, name=APP, route_prefix="/")
        (ingress,) = serve_replica_pids("OpenAIIngress", APP)
        (model,) = serve_replica_pids("InfimmModel", APP)
        base = f"http://127.0.0.1:{port}"
        start = {"ingress_mb": rss_bytes(ingress) / 2**20, "model_mb": rss_bytes(model) / 2**20}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            statuses = asyncio.run(one_round(base, r, args.pages, args.texts, args.dropped, args.size))
            time.sleep(1.0)  # aborted streams leave the engine
            engine = httpx.get(base + "/ready", timeout=30).json()["engine"]
            rounds.append(
                {
                    "round": r,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "statuses": statuses,
                    "ingress_mb": round(rss_bytes(ingress) / 2**20, 1),
                    "model_mb": round(rss_bytes(model) / 2**20, 1),
                    "ingress_parts_mb": {k: round(v / 2**20, 1) for k, v in rss_parts(ingress).items()},
                    "model_parts_mb": {k: round(v / 2**20, 1) for k, v in rss_parts(model).items()},
                    "feature_cache_mb": round(engine["feature_cache_bytes"] / 2**20, 1),
                    "feature_cache_evictions": engine["feature_cache_evictions"],
                }
            )
            print(rounds[-1], file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    half = len(rounds) // 2
    result = {
        "benchmark": "serve_memory",
        "workload": vars(args),
        "rss_after_start_mb": {k: round(v, 1) for k, v in start.items()},
        "rounds": rounds,
        "growth_mb": {
            k: {
                "first_round": round(rounds[0][k] - start[k], 1),
                "whole_run": round(rounds[-1][k] - start[k], 1),
                "second_half": round(rounds[-1][k] - rounds[half][k], 1),
            }
            for k in ("ingress_mb", "model_mb")
        },
        # the replica's RSS less what its feature cache holds: the part that must not grow once warmed up
        "model_less_feature_cache_mb": [round(r["model_mb"] - r["feature_cache_mb"], 1) for r in rounds],
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
