"""Fuzzing the request parser and the HTTP layer: no body, however malformed, gets a 5xx.

The FastAPI app of the service runs in-process (httpx's ASGI transport, no Ray, no sockets) around the real tiny
engine, with limits small enough that a body which happens to be valid costs a few decode steps. Hypothesis draws
raw bytes, arbitrary JSON, and chat requests with every field set to hostile values (wrong types, huge numbers,
lone surrogates, odd image URLs). Bounded: a fixed number of examples, no deadline per example (a shared 2-core box).
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve_helpers import bomb_png, page_png

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
PNG = page_png(200, 260)
WEIRD = [
    None,
    True,
    0,
    -1,
    1,
    2**64,
    -(2**70),
    1e308,
    -0.0,
    0.5,
    3.7,
    "",
    "x",
    "\ud800",
    "a\udfffb",
    "<image></s>",
    [],
    [1, "a"],
    {},
    {"a": {"b": []}},
]
URLS = [
    "",
    "data:",
    "data:image/png;base64,",
    "data:image/png;base64,@@@",
    "data:text/html;base64,PGh0bWw+",
    "data:image/svg+xml;base64," + base64.b64encode(SVG).decode(),
    "data:image/png;base64," + base64.b64encode(PNG).decode(),
    "data:image/png;base64," + base64.b64encode(bomb_png(60000, 60000)).decode(),
    "data:image/png;base64," + base64.b64encode(PNG[:200]).decode(),  # truncated
    "s3://Bad_Bucket/k",
    "s3://pages/k.png",
    "s3://",
    "http://127.0.0.1:1/x.png",
    "file:///etc/passwd",
    "gopher://x",
    "\ud800",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
weird = st.sampled_from(WEIRD) | json_values
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40) | weird}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.sampled_from(URLS) | weird})}
    ),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), weird, max_size=3),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "robot"]) | weird},
    optional={"content": st.text(max_size=40) | st.lists(part, max_size=3) | weird, "name": weird},
)
FIELDS = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_tokens",
    "ignore_eos",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "unknown_field",
]
small_numbers = st.integers(-3, 6) | st.floats(-3, 3, allow_nan=False)
request = st.fixed_dictionaries(
    {"model": st.just("infimm-hd") | weird, "messages": st.lists(message, max_size=3) | weird},
    optional={f: weird | small_numbers for f in FIELDS},
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    request.map(lambda r: json.dumps(r).encode()),
    # the valid shape with exactly one field replaced
    st.tuples(st.sampled_from(FIELDS), weird | small_numbers).map(
        lambda kv: json.dumps(
            {"model": "infimm-hd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, kv[0]: kv[1]}
        ).encode()
    ),
)


@pytest.fixture(scope="module")
def fuzz_app(tiny_checkpoint):
    from deployments.app import load_engine
    from deployments.config import Limits, ServeArgs
    from deployments.engine_server import EngineServer
    from deployments.frontend import Frontend, FrontendSettings, LocalModelClient, make_api
    from deployments.images import ImageFetcher, ImagePolicy

    limits = Limits(max_tokens=4, default_max_tokens=2, max_request_bytes=2**20)
    args = ServeArgs(checkpoint=str(tiny_checkpoint), device="cpu", max_slots=4, limits=limits, metrics=False)
    server = EngineServer(load_engine(args), limits)
    policy = ImagePolicy(limits.max_image_bytes, args.window_config(), allowed_s3_prefixes=())
    frontend = Frontend(LocalModelClient(server), ImageFetcher(policy), FrontendSettings(limits=limits))
    yield make_api(frontend)
    server.shutdown()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
def test_no_body_gets_a_5xx(fuzz_app, body, content_type):
    async def send():
        transport = httpx.ASGITransport(app=fuzz_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz") as client:
            return await client.post("/v1/chat/completions", content=body, headers={"Content-Type": content_type})

    r = asyncio.run(send())
    assert r.status_code < 500, (r.status_code, r.text[:500], body[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["code"] and " at 0x" not in err["message"], err
    if content_type == "text/plain":
        assert r.status_code == 415, r.status_code
