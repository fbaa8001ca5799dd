"""The online service on Ray Serve, end to end: infra/serve.yaml deployed on 127.0.0.1 with the tiny checkpoint
(CPU overrides on top), talked to with the official `openai` client.

One Serve app for the module (Ray for the session). Limits are lowered so each one is cheap to hit.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.serve_helpers import (
    bomb_png,
    data_url,
    image_message,
    noise_png,
    page_png,
    serve_replica_pids,
    tiny_serve_app,
    until,
    wait_for,
)

API_KEY = "sk-test-" + uuid.uuid4().hex[:12]
MODEL = "infimm-hd"
LIMITS = {
    "max_request_bytes": 2_000_000,
    "max_image_bytes": 300_000,
    "max_images": 4,
    "max_megapixels": 40,
    "max_windows": 34,
    "max_prompt_tokens": 900,
    "max_tokens": 900,
    "default_max_tokens": 16,
}
MODEL_ONGOING, MODEL_QUEUED = 4, 4  # small so that backpressure is cheap to reach


@pytest.fixture(scope="module")
def serve_app(ray_session, s3_server, tiny_checkpoint):
    args = {
        "api_key": API_KEY,
        "s3_endpoint_url": s3_server.endpoint,
        "allowed_s3_prefixes": ["serve-pages/docs/", "serve-gone"],
        "request_timeout_s": 120,
        "limits": LIMITS,
    }
    model = {"max_ongoing_requests": MODEL_ONGOING, "max_queued_requests": MODEL_QUEUED}
    s3_env = {"runtime_env": {"env_vars": s3_server.env()}}  # credentials for boto3 inside the ingress replica
    ingress = {"max_ongoing_requests": 32, "max_queued_requests": 16, "ray_actor_options": s3_env}
    with tiny_serve_app(tiny_checkpoint, args=args, model=model, ingress=ingress) as app:
        assert app.http["host"] == "0.0.0.0", "infra/serve.yaml is the cluster config (the RayService embeds it)"
        client = openai.OpenAI(base_url=app.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        yield SimpleNamespace(base=app.base, name=app.name, client=client)


@pytest.fixture(scope="module")
def direct_engine(tiny_checkpoint):
    """The batch pipeline's way: one Engine, default EngineConfig and WindowConfig, in this process."""
    from model.engine import Engine

    return Engine.from_pretrained(tiny_checkpoint, device="cpu")


def post(app, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    if isinstance(body, (bytes, str)):
        return httpx.post(app.base + "/v1/chat/completions", content=body, headers=headers, timeout=60, **kw)
    return httpx.post(app.base + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def text_request(text: str = "Say something.", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


# ---- routes ----------------------------------------------------------------------------------------------------------
def test_health_ready_and_models(serve_app):
    assert httpx.get(serve_app.base + "/health").json() == {"status": "ok"}
    ready = httpx.get(serve_app.base + "/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["engine"]["slots"] == 2 and ready.json()["engine"]["alive"] is True
    assert [m.id for m in serve_app.client.models.list().data] == [MODEL]
    assert serve_app.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        serve_app.client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found", e.value.message


# ---- answers ---------------------------------------------------------------------------------------------------------
def test_page_answer_equals_the_engine_run_directly(serve_app, direct_engine):
    """One engine, one truth: the HTTP answer for a PNG page + prompt (greedy) is the batch pipeline's answer."""
    from model.sampling import SamplingParams

    png, prompt, n = page_png(), "Transcribe the text of this page.", 12
    r = serve_app.client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(png), prompt), max_tokens=n, temperature=0
    )
    want = direct_engine.generate([direct_engine.make_request(prompt, [png], SamplingParams(max_new_tokens=n))])[0]
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_stream_deltas_concatenate_to_the_non_streamed_text(serve_app):
    msgs = image_message(data_url(page_png(500, 700)), "What is the total?")
    full = serve_app.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20)
    chunks = list(
        serve_app.client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "expected the answer in several deltas"
    assert "".join(pieces) == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_s3_image_from_seaweedfs(serve_app, s3_server):
    png = page_png(700, 500, "Shipping note\nBox 3 of 7")
    s3_server.create_bucket("serve-pages")
    s3_server.client().put_object(Bucket="serve-pages", Key="docs/note 1.png", Body=png)
    prompt = "Which box is this?"
    via_s3 = serve_app.client.chat.completions.create(
        model=MODEL, messages=image_message("s3://serve-pages/docs/note 1.png", prompt), max_tokens=10
    )
    via_data = serve_app.client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(png), prompt), max_tokens=10
    )
    assert via_s3.choices[0].message.content == via_data.choices[0].message.content
    assert via_s3.usage.prompt_tokens == via_data.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:  # a missing image is the client's problem, said clearly
        serve_app.client.chat.completions.create(
            model=MODEL, messages=image_message("s3://serve-pages/docs/missing.png", prompt), max_tokens=4
        )
    assert e.value.code == "image_not_found" and "missing.png" in e.value.message
    missing_key = e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # a missing bucket: the same answer (no probing)
        serve_app.client.chat.completions.create(
            model=MODEL, messages=image_message("s3://serve-gone/docs/missing.png", prompt), max_tokens=4
        )
    assert e.value.code == "image_not_found"
    assert e.value.message.replace("serve-gone", "serve-pages") == missing_key


def test_s3_outside_the_allow_list_is_refused_without_reading(serve_app, s3_server):
    """The server's S3 credentials reach every bucket here; only the listed prefixes are read for clients."""
    s3_server.create_bucket("serve-private")
    s3_server.client().put_object(Bucket="serve-private", Key="secret.png", Body=page_png(300, 300))
    s3_server.client().put_object(Bucket="serve-pages", Key="other/p.png", Body=page_png(300, 300))
    for url in ("s3://serve-private/secret.png", "s3://serve-pages/other/p.png"):
        r = post(serve_app, _image_req(url))
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_allowed", r.text
    r = post(serve_app, _image_req("s3://Serve_Pages/docs/x.png"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image_url", r.text


def test_sampling_parameters_are_honoured(serve_app):
    c = serve_app.client
    greedy = c.chat.completions.create(**text_request("Tell me a story.", max_tokens=24))
    text = greedy.choices[0].message.content
    # stop: the answer is cut before the first occurrence of the stop string, finish_reason "stop"
    stop = next(ch for ch in text[3:] if ch.strip() and ch != "\ufffd")
    cut = c.chat.completions.create(**text_request("Tell me a story.", max_tokens=24, stop=[stop]))
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # seed: the same seed gives the same sample
    a, b = (
        c.chat.completions.create(
            **text_request("Tell me a story.", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
        )
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b
    # ignore_eos (extension): exactly max_tokens
    exact = c.chat.completions.create(**text_request("Hi", max_tokens=40), extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 40 and exact.choices[0].finish_reason == "length"


# ---- client errors ---------------------------------------------------------------------------------------------------
def _png_of(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, "PNG")
    return buf.getvalue()


def _image_req(url: str, **extra) -> dict:
    return {"model": MODEL, "messages": image_message(url, "Read it."), "max_tokens": 4, **extra}


def _tokens(tiny_checkpoint, n: int) -> tuple[str, int]:
    """A user text whose rendered prompt is just under n tokens (counted with the served tokenizer), and its count."""
    from model.processor import ChatMessage, Processor

    proc = Processor.from_pretrained(tiny_checkpoint)
    count = lambda t: len(proc.encode(proc.render([ChatMessage("user", [t])])))  # noqa: E731
    text = ""
    while count(text + "alpha beta ") <= n:
        text += "alpha beta "
    return text, count(text)


ERROR_CASES = {
    # name: (request body, expected status, expected code)
    "malformed_json": (b'{"model": "infimm-hd", "messages": [', 400, "invalid_json"),
    "not_an_object": (b"[1, 2]", 400, "invalid_request"),
    "wrong_role": (text_request() | {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_role"),
    "tool_role": (text_request() | {"messages": [{"role": "tool", "content": "hi"}]}, 400, "invalid_role"),
    "no_messages": (text_request() | {"messages": []}, 400, "invalid_request"),
    "missing_image": (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "invalid_request",
    ),
    "empty_image_url": (_image_req(""), 400, "invalid_request"),
    "unknown_part_type": (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
        "invalid_request",
    ),
    "file_scheme": (_image_req("file:///etc/passwd"), 400, "unsupported_image_url"),
    "ftp_scheme": (_image_req("ftp://example.com/page.png"), 400, "unsupported_image_url"),
    "http_off_by_default": (_image_req("http://127.0.0.1:9/page.png"), 400, "unsupported_image_url"),
    "bad_base64": (_image_req("data:image/png;base64,iVBORw0KGgo@@@not-base64@@@"), 400, "invalid_base64"),
    "not_base64_data_url": (_image_req("data:image/png,rawbytes"), 400, "invalid_image_url"),
    "not_an_image": (_image_req(data_url(b"this is plain text, not a picture")), 400, "invalid_image"),
    "oversized_image": (_image_req(data_url(noise_png(400))), 413, "image_too_large"),
    "decompression_bomb": (_image_req(data_url(bomb_png(60000, 60000))), 400, "image_too_many_pixels"),
    "over_megapixels": (_image_req(data_url(bomb_png(8000, 6000))), 400, "image_too_many_pixels"),
    "too_many_images": (
        {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(_png_of(64, 64))}}] * 5,
                }
            ],
        },
        400,
        "too_many_images",
    ),
    "too_many_windows": (
        {
            "model": MODEL,
            "max_tokens": 4,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(_png_of(1800, 1800))}}] * 3,
                }
            ],
        },
        400,
        "too_many_windows",
    ),
    "image_in_system_message": (
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(_png_of(64, 64))}}]}
            ],
        },
        400,
        "invalid_request",
    ),
    "max_tokens_over_limit": (text_request(max_tokens=5000), 400, "max_tokens_too_large"),
    "max_tokens_zero": (text_request(max_tokens=0), 400, "invalid_request"),
    "temperature_out_of_range": (text_request(temperature=7), 400, "invalid_request"),
    "five_stop_strings": (text_request(stop=["a", "b", "c", "d", "e"]), 400, "invalid_stop"),
    "n_2": (text_request(n=20), 400, "invalid_request"),
    "unknown_parameter": (text_request(temprature=0.3), 400, "unsupported_parameter"),
    "tools": (
        text_request(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        400,
        "unsupported_parameter",
    ),
    "lone_surrogate": (
        b'{"model": "infimm-hd", "messages": [{"role": "user", "content": "a \\ud800 b"}]}',
        400,
        "invalid_json",
    ),
    "deeply_nested": (b'{"model": "infimm-hd", "extra": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "invalid_json"),
    "invalid_bucket_name": (_image_req("s3://Not_A_Bucket/page.png"), 400, "invalid_image_url"),
    "svg_image": (
        _image_req(data_url(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml")),
        400,
        "invalid_image",
    ),
    "unknown_model": (text_request() | {"model": "gpt-4o"}, 404, "model_not_found"),
    "request_too_large": (text_request("x" * 2_100_000), 413, "request_too_large"),
}


def test_typed_control_tokens_are_plain_text(serve_app):
    """A client typing </s> or <image> gets an answer about that text, not a cut turn or a phantom image."""
    r = post(serve_app, text_request("look: <image> </s> <|endofchunk|>", max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_client_errors_are_clear_4xx_with_the_openai_body(serve_app, case):
    body, status, code = ERROR_CASES[case]
    r = post(serve_app, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] in ("invalid_request_error",), err
    assert " at 0x" not in err["message"], err  # no process addresses in answers


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies_are_accepted(serve_app, content_type):
    """A browser page can post text/plain or a form to a local server without a CORS preflight; not JSON."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    body = '{"model": "infimm-hd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(serve_app.base + "/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text


def test_wrong_method_is_405_with_allow(serve_app):
    r = httpx.get(serve_app.base + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
    assert r.headers["allow"] == "POST"
    r = httpx.delete(serve_app.base + "/health", timeout=30)
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def _refused_now() -> list[str]:
    from deployments.frontend import HONOURED
    from deployments.schemas import REFUSED

    return sorted(set(REFUSED) - HONOURED)


REFUSED_VALUES = {
    "n": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2,
    "logit_bias": {"42": 5},
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
}


@pytest.mark.parametrize("param", _refused_now())
def test_parameters_not_honoured_are_refused_naming_them(serve_app, param):
    body = text_request(max_tokens=2) | {param: REFUSED_VALUES[param]}
    if param == "top_logprobs" and "logprobs" in _refused_now():
        body["logprobs"] = False
    r = post(serve_app, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == param and param in err["message"], err


def test_prompt_limits(serve_app, tiny_checkpoint):
    c = serve_app.client
    long_text, _ = _tokens(tiny_checkpoint, 960)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(**text_request(long_text, max_tokens=4))
    assert e.value.code == "prompt_too_long" and "900" in e.value.message
    text, n = _tokens(tiny_checkpoint, 850)
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, prompt + max_tokens does not
        c.chat.completions.create(**text_request(text, max_tokens=1024 - n + 1))
    assert e.value.code == "context_length_exceeded"
    ok = c.chat.completions.create(**text_request(text, max_tokens=1024 - n))
    assert ok.usage.prompt_tokens == n


def test_api_key_is_required_when_configured(serve_app):
    assert post(serve_app, text_request(max_tokens=2), key=None).status_code == 401
    r = post(serve_app, text_request(max_tokens=2), key="sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serve_app.base + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(serve_app.base + "/health").status_code == 200  # probes need no key
    assert post(serve_app, text_request(max_tokens=2)).status_code == 200


def test_unknown_route_is_an_openai_404(serve_app):
    r = httpx.get(serve_app.base + "/v1/completions")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---- backpressure ----------------------------------------------------------------------------------------------------
def _async_client(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=app.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def scrape(port: int, wanted: set[str] = frozenset()):
    """Samples from Ray's Prometheus export port once every name in `wanted` is there (else None)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    return samples if wanted <= {s.name for s in samples} else None


def _count(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _finish_reasons(port: int) -> dict[str, float]:
    """Finished generations by finish reason, as the model replica exported them."""
    out: dict[str, float] = collections.Counter()
    for s in scrape(port) or []:
        if s.name == "ray_infimm_requests_total":
            out[s.labels.get("finish_reason")] += s.value
    return dict(out)


def test_full_model_queue_answers_503_with_retry_after_and_disconnects_abort(serve_app, ray_metrics_port):
    """Fill the model replica (max_ongoing_requests) with long streams, then the ingress's queue for it
    (max_queued_requests); the next request is refused at once with 503 + Retry-After. Closing the streams aborts
    their generations in the engine, and only them: identical held requests once made the engine's abort raise and
    fail all of them as "error" (tests/test_engine_abort.py)."""
    model_pids = serve_replica_pids("InfimmModel", serve_app.name)
    before = _finish_reasons(ray_metrics_port)

    async def main():
        client = _async_client(serve_app)
        page = data_url(page_png(900, 1300))  # 7 views to attend to at every decode step: slow enough to hold
        started: list = []

        async def hold():
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=image_message(page, "Transcribe."),
                max_tokens=800,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            started.append(stream)
            async for _ in stream:
                pass

        # Serve counts every request not yet assigned to a replica as queued, so arrive in two waves: a burst of
        # 2 x MODEL_QUEUED would be partly refused before the replica took its share.
        running = [asyncio.create_task(hold()) for _ in range(MODEL_ONGOING)]
        queued: list[asyncio.Task] = []
        try:
            await until(lambda: len(started) == MODEL_ONGOING, f"{MODEL_ONGOING} streams start")
            for _ in range(MODEL_QUEUED):
                queued.append(asyncio.create_task(hold()))
                await asyncio.sleep(0.1)

            async def queued_in_ingress() -> bool:  # they reach the ingress's handle queue (the replica is full)
                samples = await asyncio.to_thread(scrape, ray_metrics_port)
                n = _count(
                    samples, "ray_serve_deployment_queued_queries", application=serve_app.name, deployment="InfimmModel"
                )
                return n >= MODEL_QUEUED

            await until(queued_in_ingress, f"{MODEL_QUEUED} requests queued for the model replica", 60, 0.5)
            assert len(started) == MODEL_ONGOING and not any(t.done() for t in running + queued), [
                t.exception() for t in running + queued if t.done()
            ]
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(
                    serve_app.base + "/v1/chat/completions",
                    json=text_request(max_tokens=2),
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            assert not any(t.done() for t in running), "a held stream ended before the probe: holders too short"
        finally:
            for t in running + queued:
                t.cancel()
            await asyncio.gather(*running, *queued, return_exceptions=True)
            await client.close()

    asyncio.run(main())

    def idle():
        r = httpx.get(serve_app.base + "/ready", timeout=30)
        return r.status_code == 200 and r.json()["engine"]["active"] == 0 and r.json()["engine"]["waiting"] == 0

    wait_for(idle, 60, 0.5, "engine idle after the clients went away")

    # the held generations were aborted in the engine (not run to their 800 tokens, not failed)
    def settled():
        now = _finish_reasons(ray_metrics_port)
        return now if now.get("abort", 0) > before.get("abort", 0) else None

    try:
        wait_for(settled, 60, 2.0, "aborted requests in the metrics")
    except AssertionError:
        now = _finish_reasons(ray_metrics_port)
        pids = serve_replica_pids("InfimmModel", serve_app.name)
        raise AssertionError(
            "no abort recorded for the cancelled streams: "
            + ("the model replica restarted" if pids != model_pids else "same model replica")
            + f" ({model_pids} -> {pids}); requests by finish reason before {before}, after {now}"
            + ("" if now else " (ray_infimm_requests_total not exported)")
        ) from None
    now = _finish_reasons(ray_metrics_port)
    assert now.get("error", 0) == before.get("error", 0), f"generations failed instead of aborting: {before} -> {now}"


def test_64_clients_twice_get_200_or_503_with_retry_after(serve_app):
    """Bounded load: 64 concurrent clients x 2 requests. Every answer is a 200 or a 503 with Retry-After; the
    replicas stay healthy and serve afterwards."""
    from ray import serve

    async def client_task(client, i):
        out = []
        for j in range(2):
            try:
                r = await client.chat.completions.create(**text_request(f"Client {i} request {j}.", max_tokens=4))
                out.append((200, r.choices[0].message.content is not None))
            except openai.APIStatusError as e:
                out.append((e.status_code, e.response.headers.get("retry-after"), e.code or "serve-proxy"))
            except openai.APIConnectionError as e:
                out.append(("connection", repr(e)))
        return out

    async def main():
        client = _async_client(serve_app)
        try:
            return [x for xs in await asyncio.gather(*(client_task(client, i) for i in range(64))) for x in xs]
        finally:
            await client.close()

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == 128
    bad = [r for r in results if not (r == (200, True) or (r[0] == 503 and r[1] and int(r[1]) >= 1))]
    assert not bad, f"answers other than 200 / 503+Retry-After: {bad[:5]}"
    n200 = sum(r[0] == 200 for r in results)
    assert n200 >= 1
    by_source = collections.Counter(r[2] for r in results if r[0] == 503)  # our "overloaded" or Serve's proxy queue
    print(f"64x2 in {time.monotonic() - t0:.1f}s: {n200} x 200, 503s: {dict(by_source)}")
    assert httpx.get(serve_app.base + "/ready", timeout=30).status_code == 200
    status = serve.status().applications[serve_app.name]
    assert status.status == "RUNNING"
    assert {d: s.status for d, s in status.deployments.items()} == {
        "InfimmModel": "HEALTHY",
        "OpenAIIngress": "HEALTHY",
    }
    assert serve_app.client.chat.completions.create(**text_request(max_tokens=3)).usage.completion_tokens >= 1


def _ray_log_count(text: str) -> int:
    """Occurrences of `text` in this Ray session's log files (replica logs and worker stdout/stderr)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(f.read_bytes().count(text.encode()) for f in logs.rglob("*") if f.is_file())


def test_dropped_streams_are_counted_and_not_logged_as_errors(serve_app, ray_metrics_port):
    """Clients that close their streams mid-answer: counted in ray_infimm_client_disconnects_total, never logged as
    "unhandled error" with a TaskCancelledError traceback (Serve's ASGI receive raises it once the proxy has dropped
    the request). The one info line per disconnect does not reach the replica logs: Ray leaves the root logger at
    WARNING there."""
    unhandled, cancelled = _ray_log_count("unhandled error"), _ray_log_count("TaskCancelledError")
    before = _count(scrape(ray_metrics_port) or [], "ray_infimm_client_disconnects_total")

    async def drop(n_chunks: int):
        client = _async_client(serve_app)
        try:
            stream = await client.chat.completions.create(
                **text_request(max_tokens=400, stream=True, extra_body={"ignore_eos": True})
            )
            i = 0
            async for _ in stream:
                i += 1
                if i == n_chunks:
                    break
            await stream.close()
        finally:
            await client.close()

    async def main():
        await asyncio.gather(drop(2), drop(5), drop(9))

    asyncio.run(main())
    counted = lambda: _count(scrape(ray_metrics_port) or [], "ray_infimm_client_disconnects_total") >= before + 3  # noqa: E731
    wait_for(counted, 60, 1.0, "three disconnects in the metrics")
    assert (_ray_log_count("unhandled error"), _ray_log_count("TaskCancelledError")) == (unhandled, cancelled)


# ---- metrics ---------------------------------------------------------------------------------------------------------
def test_serve_and_infimm_metrics_in_prometheus_text(serve_app, ray_metrics_port):
    """Serve's built-in metrics and ours (runtime/metrics.py) come out of Ray's metrics export port."""
    post(serve_app, b"{not json")  # at least one rejection, one success
    serve_app.client.chat.completions.create(**text_request(max_tokens=3))
    wanted = {
        "ray_serve_num_http_requests_total",
        "ray_serve_deployment_request_counter_total",
        "ray_infimm_requests_total",
        "ray_infimm_rejected_requests_total",
        "ray_infimm_ongoing_requests",
        "ray_infimm_prompt_tokens_total",
        "ray_infimm_decode_step_seconds_bucket",
        "ray_infimm_request_latency_seconds_bucket",
    }

    def ready():
        samples = scrape(ray_metrics_port, wanted)
        return (
            samples
            if samples and _count(samples, "ray_infimm_rejected_requests_total", reason="invalid_json")
            else None
        )

    samples = wait_for(ready, 60, 2.0, "metrics exported")
    assert _count(samples, "ray_infimm_requests_total", frontend="serve", finish_reason="length") >= 1
    assert _count(samples, "ray_serve_num_http_requests_total") >= 1
