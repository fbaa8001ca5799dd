"""Autoscaling of the model deployment under a load ramp, as an operator would watch it: replicas, requests in flight
and latency over time, drawn into a PNG and written as JSON.

    python benchmarks/autoscale.py [--out autoscale.json] [--png autoscale.png]

A local Ray (127.0.0.1) serves infra/serve.yaml with the tiny RANDOM checkpoint, CPU overrides and a small
`autoscaling_config` (min 1, max 2, target 1 ongoing request per replica, short delays) so that the whole story fits
in about two minutes: idle -> a ramp of clients (scale out) -> one slow client while the autoscaler removes the
extra replica (graceful shutdown: its requests in flight finish) -> idle (back to one replica). Every answer is
recorded with its status; during the ramp an answer is a 200 or a 503 with Retry-After. Prints JSON; never asserts
(the test in tests/test_serve_autoscale.py runs `ramp` with the same code and checks the story).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "InfimmModel"
# Small on purpose: scale out as soon as more than one request per replica is in flight, decide within seconds.
AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 6,
    "metrics_interval_s": 0.5,  # how often handles and replicas report ongoing requests (default 10 s)
    "look_back_period_s": 3,
}
# (seconds, concurrent clients, max_tokens per request): idle, ramp, one slow client while scaling in, idle
# (a new replica takes tens of seconds to start on a loaded 2-core box, hence the long ramp)
PHASES = [(4, 0, 0), (60, 6, 48), (25, 1, 160), (20, 0, 0)]


@dataclass
class Answer:
    start: float
    end: float
    status: int | str
    retry_after: str | None = None
    phase: int = 0


@dataclass
class Sample:
    t: float
    running: int
    starting: int
    stopping: int
    in_flight: int


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    phases: list[tuple[float, float, int, int]] = field(default_factory=list)  # (start, end, clients, max_tokens)


def replica_states(app_name: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or MODEL not in status.deployments:
        return {}
    return {str(k): v for k, v in status.deployments[MODEL].replica_states.items()}


async def ramp(base_url: str, app_name: str, phases=PHASES, interval_s: float = 0.5, settle_s: float = 60.0) -> Record:
    """Run the phases against base_url (the app's route prefix) and sample the replica count meanwhile. After the
    last phase keep sampling until one replica is left (at most settle_s more)."""
    import httpx

    rec = Record()
    t0 = time.monotonic()
    in_flight = 0
    phase_now = {"i": 0, "clients": 0, "tokens": 0}
    done = asyncio.Event()

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal in_flight
        while not done.is_set():
            if i >= phase_now["clients"]:
                await asyncio.sleep(0.1)
                continue
            body = {
                "model": "infimm-hd",
                "messages": [{"role": "user", "content": f"Client {i}: tell me about page {len(rec.answers)}."}],
                "max_tokens": phase_now["tokens"],
                "ignore_eos": True,
            }
            phase, start = phase_now["i"], time.monotonic() - t0
            in_flight += 1
            try:
                r = await http.post(base_url + "/v1/chat/completions", json=body)
                status, retry = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as e:
                status, retry = type(e).__name__, None
            finally:
                in_flight -= 1
            rec.answers.append(Answer(start, time.monotonic() - t0, status, retry, phase))
            if status == 503:
                await asyncio.sleep(float(retry or 1))

    async def sampler():
        while not done.is_set():
            states = await asyncio.to_thread(replica_states, app_name)
            rec.samples.append(
                Sample(
                    time.monotonic() - t0,
                    states.get("RUNNING", 0),
                    states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0),
                    states.get("STOPPING", 0),
                    in_flight,
                )
            )
            await asyncio.sleep(interval_s)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        n_clients = max(p[1] for p in phases)
        tasks = [asyncio.create_task(client(i, http)) for i in range(n_clients)]
        sampling = asyncio.create_task(sampler())
        for i, (seconds, clients, tokens) in enumerate(phases):
            start = time.monotonic() - t0
            phase_now.update(i=i, clients=clients, tokens=tokens)
            await asyncio.sleep(seconds)
            rec.phases.append((start, time.monotonic() - t0, clients, tokens))
        phase_now.update(clients=0)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            last = rec.samples[-1] if rec.samples else None
            if last and last.running == 1 and not last.starting and not last.stopping and not in_flight:
                break
            await asyncio.sleep(interval_s)
        done.set()
        await asyncio.gather(*tasks, sampling)
    return rec


def summarize(rec: Record) -> dict:
    by_status: dict[str, int] = {}
    for a in rec.answers:
        by_status[str(a.status)] = by_status.get(str(a.status), 0) + 1
    ok = sorted(a.end - a.start for a in rec.answers if a.status == 200)
    return {
        "answers": len(rec.answers),
        "by_status": by_status,
        "503_without_retry_after": sum(a.status == 503 and not a.retry_after for a in rec.answers),
        "max_running_replicas": max((s.running for s in rec.samples), default=0),
        "final_running_replicas": rec.samples[-1].running if rec.samples else 0,
        "latency_p50_s": round(ok[len(ok) // 2], 3) if ok else None,
        "latency_max_s": round(ok[-1], 3) if ok else None,
        "duration_s": round(rec.samples[-1].t, 1) if rec.samples else 0,
    }


def draw(rec: Record, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in rec.samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 6.4), sharex=True, dpi=90)
    ax1.step(t, [s.running for s in rec.samples], where="post", label="running", color="tab:blue")
    ax1.step(t, [s.starting for s in rec.samples], where="post", label="starting", color="tab:green", ls="--")
    ax1.step(t, [s.stopping for s in rec.samples], where="post", label="stopping (draining)", color="tab:red", ls=":")
    ax1.set_ylabel(f"{MODEL}\nreplicas")
    ax1.set_yticks(range(0, AUTOSCALING["max_replicas"] + 2))
    ax1.legend(loc="upper right", fontsize=8)
    ax2.plot(t, [s.in_flight for s in rec.samples], color="tab:purple", label="requests in flight")
    running = [max(s.running, 1) * AUTOSCALING["target_ongoing_requests"] for s in rec.samples]
    ax2.step(t, running, where="post", color="grey", ls="--", label="target x running replicas")
    ax2.set_ylabel("ongoing")
    ax2.legend(loc="upper right", fontsize=8)
    ok = [a for a in rec.answers if a.status == 200]
    busy = [a for a in rec.answers if a.status == 503]
    ax3.scatter([a.end for a in ok], [a.end - a.start for a in ok], s=6, color="tab:blue", label="200")
    if busy:
        ax3.scatter(
            [a.end for a in busy], [a.end - a.start for a in busy], s=14, color="tab:red", marker="x", label="503"
        )
    ax3.set_ylabel("latency (s)")
    ax3.set_xlabel("time (s)")
    ax3.legend(loc="upper right", fontsize=8)
    for ax in (ax1, ax2, ax3):
        for start, *_ in rec.phases:
            ax.axvline(start, color="lightgrey", lw=0.8)
    for start, end, clients, tokens in rec.phases:
        label = f"{clients} clients" + (f" x {tokens} tok" if clients else "")
        ax1.text((start + end) / 2, AUTOSCALING["max_replicas"] + 1.3, label, ha="center", fontsize=7, color="dimgrey")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def deploy(checkpoint: str, route_prefix: str, name: str, autoscaling: dict | None = None):
    """infra/serve.yaml with CPU overrides and the small autoscaling config, on the Serve already started."""
    from ray import serve

    from deployments.app import application_from_config
    from deployments.config import load_serve_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    app, _, _, _ = application_from_config(
        load_serve_config(os.path.join(root, "infra", "serve.yaml")),
        args={"checkpoint": checkpoint, "max_slots": 2, "max_seq_len": 512, "limits": {"default_max_tokens": 16}},
        deployments={
            MODEL: {
                "max_ongoing_requests": 4,
                "max_queued_requests": 8,
                "autoscaling_config": autoscaling or AUTOSCALING,
                "graceful_shutdown_wait_loop_s": 0.5,
                "graceful_shutdown_timeout_s": 60,
                "health_check_period_s": 2,
                "ray_actor_options": {"num_gpus": 0, "num_cpus": 1},
            },
            "OpenAIIngress": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                "ray_actor_options": {"num_cpus": 0.5},
            },
        },
    )
    serve.run(app, name=name, route_prefix=route_prefix)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON file (also printed)")
    p.add_argument("--png", default="autoscale.png")
    args = p.parse_args(argv)

    from runtime.local_ray import prepare_local_env

    env = prepare_local_env()
    import socket

    import ray
    from ray import serve

    from benchmarks.common import emit, environment
    from runtime.checkpoints import default_tiny_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(str(default_tiny_checkpoint()), "/", "autoscale")
        rec = asyncio.run(ramp(f"http://127.0.0.1:{port}", "autoscale"))
    finally:
        serve.shutdown()
        ray.shutdown()
    draw(rec, args.png, "InfiMM-HD online: autoscaling under a load ramp (tiny model, 2-core CPU box)")
    result = {
        "benchmark": "autoscale",
        "autoscaling_config": AUTOSCALING,
        "phases": [{"seconds": s, "clients": c, "max_tokens": t} for s, c, t in PHASES],
        "summary": summarize(rec),
        "samples": [asdict(s) for s in rec.samples],
        "answers": [asdict(a) for a in rec.answers],
        "png": args.png,
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
