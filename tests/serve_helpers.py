"""Helpers for the online-service tests: test images, an in-process server and a tiny Serve app on 127.0.0.1, bounded
polling."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from types import SimpleNamespace

from PIL import Image, ImageDraw


def page_png(width: int = 640, height: int = 820, text: str = "Invoice 42\nTotal: 17.50 EUR") -> bytes:
    """A small document-like page (white, a few lines of text and rules)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(text.splitlines() * 3):
        d.text((40, 40 + 60 * i), line, fill="black")
        d.line((40, 70 + 60 * i, width - 40, 70 + 60 * i), fill=(90, 90, 90), width=2)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """Incompressible PNG of about 3 * side^2 bytes (for byte limits)."""
    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A few hundred bytes whose header declares width x height pixels (a decompression bomb: 3.6 GP by default).

    The IDAT stream inflates to the first rows only; a decoder that trusted the header would allocate gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(url: str, prompt: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


# One value, other than SamplingParams' default, for every request field that sets a SamplingParams field (the client's
# names). Requests and SamplingParams share most names: tests fail for a shared field that has no value here.
SAMPLING_BODY = {
    "max_tokens": 6,
    "min_tokens": 2,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "seed": 7,
    "stop": ["\n\n"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repetition_penalty": 1.2,
    "no_repeat_ngram_size": 3,
    "logit_bias": {"300": 1.5},
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
}


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll until predicate() is truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last: {last!r})")


@contextmanager
def run_asgi(app, port: int):
    """Serve an ASGI app with uvicorn on 127.0.0.1:port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.05, "uvicorn start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def tiny_serve_app(checkpoint, name=None, route_prefix=None, args=None, model=None, ingress=None):
    """infra/serve.yaml's app on `checkpoint` with one CPU replica of the model (2 slots) and one of the ingress, run on
    a Serve whose proxy binds 127.0.0.1 (started here, or the one another test module started); deleted afterwards.

    `args` go on top of the app's args, `model` / `ingress` on top of each deployment's options (their
    `ray_actor_options` merged key by key); `name` and `route_prefix` default to the config's. Yields base (the URL
    with the route prefix), name, port and http (the config's http_options: the cluster's, never used here)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import application_from_config
    from deployments.config import load_serve_config

    from .conftest import ROOT, free_port

    def options(base: dict, extra: dict | None) -> dict:
        extra = dict(extra or {})
        actor = {**base.pop("ray_actor_options"), **extra.pop("ray_actor_options", {})}
        return {**base, **extra, "ray_actor_options": actor}

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port  # ours, or that of a Serve another test module started
    assert _get_global_client().http_config.host == "127.0.0.1", "tests bind loopback only"
    app, config_name, config_prefix, http = application_from_config(
        load_serve_config(ROOT / "infra" / "serve.yaml"),
        args={"checkpoint": str(checkpoint), "max_slots": 2, "max_seq_len": 1024, **(args or {})},
        deployments={
            "InfimmModel": options(
                {
                    "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_gpus": 0, "num_cpus": 1},
                },
                model,
            ),
            "OpenAIIngress": options(
                {
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                    "ray_actor_options": {"num_cpus": 0.5},
                },
                ingress,
            ),
        },
    )
    name, route_prefix = name or config_name, route_prefix or config_prefix
    serve.run(app, name=name, route_prefix=route_prefix)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    try:
        yield SimpleNamespace(base=base, name=name, port=port, http=http)
    finally:
        serve.delete(name)


async def until(cond, what: str, timeout: float = 60.0, interval: float = 0.05) -> None:
    """Poll `cond()` from async test code, bounded; fail with `what` if it never holds. `cond` may be a coroutine
    function (for checks that do I/O: they must not block the event loop the test's clients run on)."""
    deadline = time.monotonic() + timeout
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f}s"
        await asyncio.sleep(interval)


# Process helpers live with the benchmarks (which measure RSS the same way); re-exported for the tests.
from benchmarks.common import (  # noqa: E402, F401
    cmdline,
    live_pids,
    peak_rss_bytes,
    port_free,
    process_tree,
    reset_peak_rss,
    rss_bytes,
    serve_replica_pids,
)
