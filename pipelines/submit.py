"""Run the batch job on a Ray cluster through the Ray Jobs API: `infimm-hd batch submit|status|logs|stop`.

The job's code travels as the `working_dir` runtime env (this checkout, minus tests data and build output); its
entrypoint is the same `batch run` command line. Inputs, output and `--checkpoint` are read *on the cluster*, so use
s3:// URIs (or paths that exist on its nodes).

Ray 2.60 turns token authentication on for clusters started where a token exists (`~/.ray/auth_token`): the dashboard
then answers 401 to clients that send no token. We send `Authorization: Bearer <token>` from, in Ray's own order,
RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; a cluster without authentication ignores it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "tests/data",
    "out",
    "runs",
    "checkpoints",
    ".venv",
    "build",
    "dist",
]
# Forwarded when set here: where the object store is, not who we are. Credentials go only with an explicit --env.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def auth_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return JobSubmissionClient(address, headers=headers)


def runtime_env(extra_env: dict[str, str]) -> dict:
    # Never the loopback-only RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (runtime/local_ray.py): the job runs on a cluster.
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env.update(extra_env)
    if (ROOT / "pyproject.toml").exists():  # a source checkout: ship it whole (the entrypoint runs `-m cli`)
        return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    import model
    import pipelines

    return {"py_modules": [os.path.dirname(model.__file__), os.path.dirname(pipelines.__file__)], "env_vars": env}


def parse_env(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE`, or `KEY` to copy this shell's value."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            if key not in os.environ:
                raise ValueError(f"--env {key}: not set in this shell; use --env {key}=VALUE")
            value = os.environ[key]
        out[key] = value
    return out


def submit(
    address: str, run_args: list[str], extra_env: dict[str, str] | None = None, submission_id: str | None = None
) -> str:
    import shlex

    entrypoint = "python -m cli batch run " + " ".join(shlex.quote(a) for a in run_args)
    job_id = client(address).submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env(extra_env or {}),
        submission_id=submission_id,
        metadata={"app": "infimm-hd-batch"},
    )
    log.info("submitted %s to %s: %s", job_id, address, entrypoint)
    return job_id


def wait(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def status(address: str, job_id: str) -> dict:
    info = client(address).get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status).rsplit(".", 1)[-1],
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


async def follow(address: str, job_id: str):
    async for lines in client(address).tail_job_logs(job_id):
        yield lines


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
