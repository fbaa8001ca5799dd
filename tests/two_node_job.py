"""A batch job on a two-node local Ray cluster whose worker node is removed mid-job (run by test_pipeline_cluster.py).

    python -m tests.two_node_job CHECKPOINT WORKDIR RESULT_JSON [--replace]

Its own process and its own cluster (`ray.cluster_utils.Cluster`, both nodes on 127.0.0.1, no dashboard), never the
test session's Ray. Each node has 3 CPUs and each engine actor asks for 2, so the pool of 2 can only be placed one
actor per node. After the first result batch the worker node is killed (not drained): its actor, its decode tasks and
the blocks in its object store are lost. With --replace a fresh node joins after it, as an autoscaler would add one.
Writes what the test checks: the actors' nodes before the kill, the summary, every row's id/source/page/error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from runtime.local_ray import prepare_local_env

prepare_local_env()  # loopback only; before Ray is imported (every node of this cluster is 127.0.0.1)


def engine_actor_nodes() -> list[str]:
    """Node ids of the live engine actors (from the GCS: the state API needs the dashboard, which is off)."""
    from ray._private.state import actors

    live = [a for a in actors().values() if "GenerateStage" in a["ActorClassName"] and a["State"] == "ALIVE"]
    return sorted(a["Address"]["NodeID"] for a in live)


def start_cluster(node: dict, temp_dir: str, attempts: int = 3):
    """Head + one worker node. Ray gives a node 30 s to register, which a loaded machine can miss: try again.

    `Cluster` records its head in /tmp/ray/ray_current_cluster, where every `ray.init()` without an address on this
    machine would find it and connect to it instead of starting its own Ray (other test sessions included). This
    cluster is private: the record is neither written nor, at shutdown, deleted (the driver connects by address)."""
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None  # nor someone else's record deleted at the end

    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(
                initialize_head=True, head_node_args={**node, "include_dashboard": False, "temp_dir": temp_dir}
            )
            worker = cluster.add_node(**node)
            cluster.wait_for_nodes()
            return cluster, worker
        except Exception as e:  # noqa: BLE001 - "node timed out during startup" under load; retried, then raised
            print(f"cluster start attempt {attempt} failed: {e}", file=sys.stderr)
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("workdir")
    p.add_argument("result")
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(argv)

    from demo import samples
    from pipelines.job import run_job
    from tests.pipeline_helpers import config as job_config
    from tests.pipeline_helpers import read_rows, write_files

    work = Path(args.workdir)
    docs = write_files(work / "docs", {f"p{i:02d}.png": samples.png_page(i, (300, 400)) for i in range(16)})
    (docs / "long.pdf").write_bytes(samples.pdf_document(12, size=(200, 260)))
    out = work / "out"
    # A short temp dir: Ray's socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")
    node = dict(num_cpus=3, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below (cluster shutdown) on a kill
    cluster, worker = start_cluster(node, temp_dir)
    result: dict = {"nodes_before": [], "removed": None, "replaced": False}
    try:
        result["worker_node_id"] = worker.node_id

        seen = [0]

        def kill_the_worker_node(table):
            seen[0] += table.num_rows
            if result["removed"] is None:
                deadline = time.monotonic() + 180  # the second actor may still be loading the model
                while len(set(engine_actor_nodes())) < 2 and time.monotonic() < deadline:
                    time.sleep(0.5)
                result["nodes_before"] = engine_actor_nodes()
                result["rows_before_removal"] = seen[0]
                cluster.remove_node(worker, allow_graceful=False)
                result["removed"] = time.time()
                if args.replace:
                    cluster.add_node(**node)
                    result["replaced"] = True

        config = job_config(
            args.checkpoint,
            [docs],
            out,
            actors=(2, 2),
            cpus_per_actor=2.0,
            decode_cpus=0.5,
            pages_per_task=3,  # the PDF's pages spread over 4 decode tasks
        )
        summary = run_job(config, progress=False, on_batch=kill_the_worker_node, ray_address=cluster.address)
        result["summary_run"] = {k: v for k, v in summary["run"].items() if k != "timeline"}
        result["rows"] = [
            {k: r[k] for k in ("id", "source_uri", "page", "error_type", "error_message")} for r in read_rows(str(out))
        ]
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
