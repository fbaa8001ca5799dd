"""Where a batch job runs: connecting to Ray, and fitting the job's actor pool and decode tasks onto the cluster.

`resolve_resources` fills in what depends on the cluster and refuses a job that can never be placed, before anything
is written; `placement_problem` is the check itself, on plain node dicts (tests call it without Ray).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace

from runtime.local_ray import prepare_local_env

from .config import JobConfig

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Use the Ray this process already has; else connect to `address` / RAY_ADDRESS (a cluster, or the driver of a
    submitted job); else start a private local one. Never auto-attach to some other local cluster."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray's variables go into this process before `import ray` (Ray reads the loopback setting at import);
    # a driver joining a cluster never gets them.
    local_env = None if address else prepare_local_env()
    import ray

    if address:  # no runtime_env here: a submitted job's own (working_dir, env_vars) must not be contradicted
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": local_env})


def resolve_resources(config: JobConfig) -> JobConfig:
    """Fill in what depends on the cluster (GPUs per actor when not given; on the CPU the engine's device and
    threads) and refuse a pool that can never be placed on it (ValueError, with the numbers), unless
    `wait_for_resources` (an autoscaling cluster, e.g. KubeRay scaling its GPU group from 0, adds nodes on demand):
    then only a warning."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = config.gpus_per_actor
    if gpus is None:  # what the cluster has right now; autoscaling clusters should pass --gpus-per-actor
        have = sum(n.get("GPU", 0) for n in nodes)
        gpus = 1.0 if have > 0 else 0.0
        log.info("--gpus-per-actor not given: %s (the cluster has %s GPUs now)", gpus, have)
    config = replace(config, gpus_per_actor=gpus)
    problem = placement_problem(config, nodes)
    if problem and not config.wait_for_resources:
        raise ValueError(f"{problem}; lower --actors MIN, --cpus-per-actor or --decode-cpus, or --wait-for-resources")
    if problem:
        log.warning("%s: waiting for the cluster to grow (--wait-for-resources)", problem)
    if gpus != 0:
        return config
    threads = config.generate.torch_threads or max(1, int(config.cpus_per_actor))
    return replace(config, generate=replace(config.generate, device="cpu", torch_threads=threads))


def placement_problem(config: JobConfig, nodes: list[dict]) -> str | None:
    """None when the engine pool's MIN actors and then one split task (1 CPU) and one decode task fit on these nodes
    (their total resources, first fit: one actor or task runs on one node), else what does not fit, with the numbers.
    Ray Data starts the MIN actors before it decodes anything, so a job whose tasks have no room left waits forever."""
    lo = config.actors[0]
    actor = {"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor or 0.0}
    decode = {"CPU": config.decode_cpus, "memory": float(config.decode_memory)}
    free = [{k: float(n.get(k, 0)) for k in ("CPU", "GPU", "memory")} for n in nodes]

    def place(ask: dict) -> bool:
        for node in free:
            if all(node[k] >= v for k, v in ask.items()):
                for k, v in ask.items():
                    node[k] -= v
                return True
        return False

    placed = 0
    while placed < lo and place(actor):
        placed += 1
    after_actors = [dict(n) for n in free]
    splits = placed == lo and place({"CPU": 1.0})  # the split task (Ray's default ask), short, before any decode
    free[:] = after_actors
    decodes = placed == lo and place(decode)
    if splits and decodes:
        return None
    total = {k: sum(float(n.get(k, 0)) for n in nodes) for k in ("CPU", "GPU", "memory")}
    need_cpu = lo * actor["CPU"] + decode["CPU"]
    need_gpu = lo * actor["GPU"]
    return (
        f"the cluster cannot run this job: {lo} engine actor(s) x ({actor['CPU']:g} CPU, {actor['GPU']:g} GPU) + one "
        f"decode task ({decode['CPU']:g} CPU, {decode['memory'] / 2**20:.0f} MiB) need {need_cpu:g} CPUs and "
        f"{need_gpu:g} GPUs; its {len(nodes)} node(s) have {total['CPU']:g} CPUs, {total['GPU']:g} GPUs, "
        f"{total['memory'] / 2**30:.1f} GiB (placed {placed} of {lo} actors"
        + (")" if placed < lo else ", no room for a decode task)" if splits else ", no free CPU for the split task)")
    )


def cpu_engine_args(gpus_per_actor: float | None) -> dict:
    """Ray options for engine actors on the CPU, which share cores with the decode tasks. OpenMP's default is to
    spin-wait between parallel regions, burning the cycles decoding needs; passive waiting gave the CPU pipeline
    0.71-0.79 of the bare loop's pages/s instead of 0.55 (benchmarks/pipeline.py, 2 cores). It must be in the
    environment before torch loads."""
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}} if gpus_per_actor == 0 else {}
