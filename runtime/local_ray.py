"""The environment of a Ray this process starts for itself on one machine (never of a cluster it joins).

`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps a local Ray on loopback, but in Ray's `services.get_node_ip_address` it
also makes a process without a node report 127.0.0.1: a driver on a multi-host cluster would advertise an address the
other hosts cannot reach. So it is set only by `prepare_local_env()`, called right before starting a local Ray, and
never put into a job or a Serve application that runs on someone else's cluster.
"""

from __future__ import annotations

import os

LOCAL_ENV = {
    # loopback only; Ray reads it once, when a process imports it (ray._private.ray_constants.ENABLE_RAY_CLUSTER)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",  # the Rust tokenizer's threads fight the engine for the cores after a fork
}


def prepare_local_env() -> dict[str, str]:
    """Set the local-Ray variables in this process (where not set already) before `import ray`; returns them, for a
    local `ray.init(runtime_env={"env_vars": ...})`."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in LOCAL_ENV}
