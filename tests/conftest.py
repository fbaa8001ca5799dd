"""Session-wide fixtures: golden vectors, a tiny random checkpoint, one local Ray instance, one SeaweedFS server.

Everything binds 127.0.0.1. Ray is started once per session (lazily, only by tests that ask for it).
The tiny checkpoint's model and processor are loaded once per module that asks for them. Area-specific fixtures
live next to the tests that use them; their shared helpers in tests/*_helpers.py (a test module never imports another).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (before any `import ray`)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"  # the official code's golden vectors (see its README)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny RANDOM-weight checkpoint in the official layout (seed 0), built once per session."""
    from model.weights import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny checkpoint's model, loaded once per test module (so one module's engines cannot affect another's)."""
    from model import load_pretrained

    return load_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    """The tiny checkpoint's processor (tokenizer, prompt template, views), once per test module."""
    from model import Processor

    return Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def ray_session(ray_metrics_port, tmp_path_factory):
    """One local Ray instance for the whole session (4 logical CPUs on this 2-core machine, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a private Ray: never attach to a cluster some `ray start` left running
            num_cpus=4,
            include_dashboard=False,
            _metrics_export_port=ray_metrics_port,
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": 1000},  # metrics reach the exporter within ~1 s
            runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - best-effort teardown; Ray is shut down next either way
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the session; AWS_* variables point at it while it runs."""
    from demo.seaweed import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer on disk (base vocabulary 510, as the tiny and demo configs)."""
    from model.tokenizer import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(folder, base_vocab=510)
    return folder
