"""The HTTP layer without Ray: `make_api(Frontend(...))` around an in-process EngineServer (the real tiny engine),
served by uvicorn on 127.0.0.1 and called with the official `openai` client.

Here live the behaviours that need control over timing or the engine: request timeouts (504, aborted in the engine),
the engine-queue limit (503), http(s) image hosts on an allow-list, and no-auth mode. Metrics go to a private
prometheus_client registry so the counters can be read back.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.serve_helpers import data_url, image_message, noise_png, page_png, run_asgi, until, wait_for

MODEL = "infimm-hd"


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server on 127.0.0.1 with a page, redirects (same host, and to `localhost`, which is not on the
    allow-list), a 404 and an oversized image. `seen` records (path, Authorization header) of every request."""
    files = {"/page.png": page_png(600, 800), "/big.png": noise_png(400)}
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path in files:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(files[self.path])))
                self.end_headers()
                self.wfile.write(files[self.path])
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/page.png")
                self.end_headers()
            elif self.path == "/redirect-away":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/page.png")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(port=server.server_address[1], files=files, seen=seen)
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, image_host):
    """One engine (1 slot, at most 1 waiting) behind two frontends: `main` (generous timeout, http images allowed
    from 127.0.0.1) and `short` (2 s request timeout)."""
    import prometheus_client

    from deployments.app import load_engine
    from deployments.config import Limits, ServeArgs
    from deployments.engine_server import EngineServer
    from deployments.frontend import Frontend, FrontendSettings, LocalModelClient, make_api
    from deployments.images import ImageFetcher, ImagePolicy
    from runtime.metrics import Metrics

    registry = prometheus_client.CollectorRegistry()
    metrics = Metrics(frontend="serve", backend="prometheus", registry=registry)
    limits = Limits(max_image_bytes=300_000, max_tokens=900)
    args = ServeArgs(checkpoint=str(tiny_checkpoint), device="cpu", max_slots=1, limits=limits)
    server = EngineServer(load_engine(args, observer=metrics.engine_observer()), limits, max_waiting=1)
    client = LocalModelClient(server)

    def frontend(timeout: float, hosts: tuple[str, ...]) -> Frontend:
        policy = ImagePolicy(limits.max_image_bytes, args.window_config(), allowed_http_hosts=hosts)
        settings = FrontendSettings(model_name=MODEL, limits=limits, request_timeout_s=timeout, retry_after_s=3)
        return Frontend(client, ImageFetcher(policy), settings, metrics)

    with (
        run_asgi(make_api(frontend(120, ("127.0.0.1",))), free_port()) as main,
        run_asgi(make_api(frontend(2, ())), free_port()) as short,
    ):
        yield SimpleNamespace(
            main=main,
            short=short,
            server=server,
            registry=registry,
            image_host=image_host,
            client=openai.OpenAI(base_url=main + "/v1", api_key="unused", max_retries=0, timeout=120),
            short_client=openai.OpenAI(base_url=short + "/v1", api_key="unused", max_retries=0, timeout=60),
        )
    server.shutdown()


def metric(stack, name: str, **labels) -> float:
    return stack.registry.get_sample_value(name, {"frontend": "serve", **labels}) or 0.0


def engine_idle(stack) -> bool:
    s = stack.server.stats()
    return s["active"] == 0 and s["waiting"] == 0


def long_request(**extra) -> dict:
    """A page question that runs for many seconds on the CPU (800 tokens, each attending to the page's views)."""
    return {
        "model": MODEL,
        "messages": image_message(data_url(page_png(900, 1300)), "Transcribe."),
        "max_tokens": 800,
        "extra_body": {"ignore_eos": True},
        **extra,
    }


def test_no_api_key_configured_means_no_auth(stack):
    r = httpx.post(
        stack.main + "/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_models_retrieve_with_the_official_client(stack):
    m = stack.client.models.retrieve(MODEL)
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "infimm-hd")
    assert m.model_dump() == stack.client.models.list().data[0].model_dump()
    for other in ("gpt-4o", "org/infimm-hd"):  # ids with '/' reach the model route too, not the router's 404
        with pytest.raises(openai.NotFoundError) as e:
            stack.client.models.retrieve(other)
        assert (e.value.code, e.value.type, e.value.param) == ("model_not_found", "invalid_request_error", "model")
        assert repr(other) in e.value.message and MODEL in e.value.message, e.value.message


def test_http_image_from_an_allowed_host(stack):
    url = f"http://127.0.0.1:{stack.image_host.port}/page.png"
    via_http = stack.client.chat.completions.create(model=MODEL, messages=image_message(url, "Read."), max_tokens=8)
    via_data = stack.client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(stack.image_host.files["/page.png"]), "Read."), max_tokens=8
    )
    assert via_http.choices[0].message.content == via_data.choices[0].message.content


@pytest.mark.parametrize(
    "path, host, status, code",
    [
        ("/page.png", "localhost", 400, "image_host_not_allowed"),  # same server, but not the allowed name
        ("/redirect", "127.0.0.1", 400, "image_fetch_failed"),  # redirects are not followed, even on the same host
        ("/redirect-away", "127.0.0.1", 400, "image_fetch_failed"),  # ... so none reaches a host off the allow-list
        ("/nothing.png", "127.0.0.1", 400, "image_not_found"),
        ("/big.png", "127.0.0.1", 413, "image_too_large"),
    ],
)
def test_http_image_refusals(stack, path, host, status, code):
    url = f"http://{host}:{stack.image_host.port}{path}"
    stack.image_host.seen.clear()
    with pytest.raises(openai.APIStatusError) as e:
        stack.client.chat.completions.create(model=MODEL, messages=image_message(url, "Read."), max_tokens=4)
    assert (e.value.status_code, e.value.code) == (status, code), e.value.message
    if "redirect" in path:
        assert "does not follow redirects" in e.value.message, e.value.message
        assert [p for p, _ in stack.image_host.seen] == [path], "the redirect's target must not be fetched"


@pytest.mark.parametrize(
    "template, why",
    [
        ("http://user:s3cret@127.0.0.1:{port}/page.png", "user part"),  # httpx would send it as Basic credentials
        ("http://127.0.0.1@localhost:{port}/page.png", "user part"),  # an allowed name in front of another host
        ("http://localhost@127.0.0.1:{port}/page.png", "user part"),
        ("http://localhost\\@127.0.0.1:{port}/page.png", "backslash"),  # urllib and httpx split this differently
        ("http://127.0.0.1:{port}\\@localhost/page.png", "backslash"),
        ("http://127\uff0e0\uff0e0\uff0e1:{port}/page.png", "ASCII"),  # fullwidth dots: IDNA maps them to '.'
        ("http://localhost\t@127.0.0.1:{port}/page.png", "whitespace"),  # urllib drops tabs, so '@' decides
    ],
)
def test_http_image_urls_that_hide_a_host_or_credentials_are_refused(stack, template, why):
    url = template.format(port=stack.image_host.port)
    stack.image_host.seen.clear()
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.chat.completions.create(model=MODEL, messages=image_message(url, "Read."), max_tokens=4)
    assert e.value.code == "invalid_image_url" and why in e.value.message, e.value.message
    assert "s3cret" not in e.value.message
    assert stack.image_host.seen == [], "nothing may be fetched for a refused URL"


def test_timeout_answers_504_and_aborts_the_generation(stack):
    before = metric(stack, "infimm_requests_total", finish_reason="abort")
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        stack.short_client.chat.completions.create(**long_request())
    assert e.value.status_code == 504 and e.value.code == "timeout", e.value.message
    assert time.monotonic() - t0 < 60, "the timeout must answer, not hang"
    wait_for(lambda: engine_idle(stack), 30, 0.1, "engine idle after the timeout")
    assert metric(stack, "infimm_requests_total", finish_reason="abort") == before + 1
    assert metric(stack, "infimm_rejected_requests_total", reason="timeout") >= 1


def test_stream_timeout_ends_with_an_error_event_and_aborts(stack):
    before = metric(stack, "infimm_requests_total", finish_reason="abort")
    stream = stack.short_client.chat.completions.create(**long_request(stream=True))  # headers came: a 200
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
    assert "timed out" in str(e.value.message)
    assert got and got[0].choices[0].delta.role == "assistant"
    wait_for(lambda: engine_idle(stack), 30, 0.1, "engine idle after the stream timeout")
    assert metric(stack, "infimm_requests_total", finish_reason="abort") == before + 1


def test_a_dropped_stream_is_aborted_counted_and_logged_without_a_traceback(stack, caplog):
    """The official client closes a stream after a few chunks: the generation is aborted, the disconnect counted and
    logged in one line at info, and nothing is logged as an error."""
    gone = metric(stack, "infimm_client_disconnects_total")
    aborted = metric(stack, "infimm_requests_total", finish_reason="abort")
    with caplog.at_level(logging.DEBUG):
        stream = stack.client.chat.completions.create(**long_request(stream=True))
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # mid-answer: the connection is dropped
        wait_for(lambda: engine_idle(stack), 60, 0.1, "engine idle after the dropped stream")
        wait_for(lambda: metric(stack, "infimm_client_disconnects_total") == gone + 1, 30, 0.1, "disconnect counted")
    assert metric(stack, "infimm_requests_total", finish_reason="abort") == aborted + 1
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []
    assert [r.levelname for r in caplog.records if "went away" in r.getMessage()] == ["INFO"]


def test_full_engine_queue_answers_503_with_retry_after(stack):
    """1 slot busy + 1 request waiting = the engine's max_waiting: the next request is refused, not queued."""

    async def main():
        client = openai.AsyncOpenAI(base_url=stack.main + "/v1", api_key="unused", max_retries=0, timeout=120)
        tasks = []

        async def hold():
            async for _ in await client.chat.completions.create(**long_request(stream=True)):
                pass

        try:
            tasks.append(asyncio.create_task(hold()))
            await until(lambda: stack.server.stats()["active"] == 1, "first request in its slot")
            tasks.append(asyncio.create_task(hold()))
            await until(lambda: stack.server.stats()["waiting"] == 1, "second request waiting")
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(
                    stack.main + "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
                )
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "engine_queue_full"
            assert not any(t.done() for t in tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    asyncio.run(main())
    wait_for(lambda: engine_idle(stack), 30, 0.1, "engine idle after the clients left")


def test_rejections_are_counted_and_the_ongoing_gauge_returns_to_zero(stack):
    before = metric(stack, "infimm_rejected_requests_total", reason="invalid_json")
    r = httpx.post(stack.main + "/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert metric(stack, "infimm_rejected_requests_total", reason="invalid_json") == before + 1
    assert metric(stack, "infimm_ongoing_requests") == 0


def test_model_side_refuses_huge_text_without_tokenizing(stack, monkeypatch):
    """Behind an ingress that lets it through, the model replica still bounds the text by its vocabulary's longest
    piece before the tokenizer sees it."""
    from deployments.engine_server import GenerationPayload
    from deployments.schemas import APIError
    from model.processor import ChatMessage

    server = stack.server
    calls = []
    monkeypatch.setattr(server.engine, "make_chat_request", lambda *a, **k: calls.append(a))
    n = server.limits.max_prompt_tokens * server.max_chars_per_token + 1
    payload = GenerationPayload("big", [ChatMessage("user", ["x" * n])], max_tokens=2)
    with pytest.raises(APIError) as e:
        server.build(payload)
    assert e.value.code == "prompt_too_long" and not calls, e.value.message
    event = asyncio.run(server.complete(payload))  # the async path answers the same, from its worker thread
    assert event["event"] == "error" and event["code"] == "prompt_too_long", event


def test_payload_crosses_processes_as_numpy(stack):
    """The cut views are pickled out of band (numpy buffers), not through torch.save, and arrive equal."""
    import pickle

    from deployments.engine_server import GenerationPayload
    from model.processor import ChatMessage
    from model.windows import prepare_image

    page = prepare_image(page_png(600, 800))
    payload = GenerationPayload("p", [ChatMessage("user", [page, "Read."])], max_tokens=2)
    buffers = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    assert len(data) < 10_000 and len(buffers) == 1, (len(data), len(buffers))  # the views travel out of band
    back = pickle.loads(data, buffers=buffers)
    got = back.messages[0].parts[0]
    assert got.views.dtype == page.views.dtype and bool((got.views == page.views).all())
    assert (got.rows, got.cols, got.key) == (page.rows, page.cols, page.key)


# ---- sampling parameters (model/sampling.py), through the official client ------------------------------------------
def _chat(stack, **kw):
    return stack.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], **kw
    )


def test_logprobs_have_the_openai_shape(stack):
    r = _chat(stack, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list) and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6  # greedy: the chosen token is the best one
    assert _chat(stack, max_tokens=3).choices[0].logprobs is None
    chunks = list(_chat(stack, max_tokens=6, logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_n_choices_are_distinct_when_sampling_and_share_the_usage(stack):
    r = _chat(stack, max_tokens=12, n=2, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 24
    one = _chat(stack, max_tokens=12, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert one.choices[0].message.content == r.choices[0].message.content  # choice 0 is the n=1 answer
    with pytest.raises(openai.BadRequestError) as e:
        _chat(stack, max_tokens=2, n=2, stream=True)
    assert e.value.body["param"] == "n"


def test_penalties_and_bias_change_the_output_of_a_rigged_model(stack):
    """logit_bias rigs the tiny model into repeating one token; the penalties then break the repetition."""
    rigged = _chat(stack, max_tokens=12, logit_bias={"300": 20}, logprobs=True, extra_body={"ignore_eos": True})
    ids = {e.token for e in rigged.choices[0].logprobs.content}
    assert len(ids) == 1, ids  # the bias wins every step
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        body = {"max_tokens": 12, "logit_bias": {"300": 2}, "logprobs": True, **penalty}
        plain = _chat(stack, **{k: v for k, v in body.items() if k not in penalty}, extra_body={"ignore_eos": True})
        pen = _chat(stack, **body, extra_body={"ignore_eos": True})
        assert pen.choices[0].message.content != plain.choices[0].message.content, penalty
    rep = _chat(stack, max_tokens=12, logit_bias={"300": 2}, extra_body={"ignore_eos": True, "repetition_penalty": 8})
    plain = _chat(stack, max_tokens=12, logit_bias={"300": 2}, extra_body={"ignore_eos": True})
    assert rep.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize(
    "kw, over",
    [
        ({"max_tokens": 4, "extra_body": {"min_tokens": 10**9}}, "max_tokens (4)"),
        ({"max_completion_tokens": 4, "extra_body": {"min_tokens": 5}}, "max_tokens (4)"),
        ({"extra_body": {"min_tokens": 901}}, "limit (900)"),  # no max_tokens: bounded by the server's limit
    ],
)
def test_min_tokens_over_max_tokens_is_400(stack, kw, over):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(stack, **kw)
    assert e.value.body["param"] == "min_tokens" and over in e.value.message, e.value.message
    r = _chat(stack, max_tokens=3, extra_body={"min_tokens": 3})  # equal is fine: exactly that many tokens
    assert r.usage.completion_tokens == 3


def test_response_format_json_schema_is_honoured(stack):
    import json

    schema = {
        "type": "object",
        "properties": {"paid": {"type": "boolean"}},
        "required": ["paid"],
        "additionalProperties": False,
    }
    r = _chat(
        stack, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content) in ({"paid": True}, {"paid": False})
    obj = _chat(stack, max_tokens=200, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # a random model may fill max_tokens inside a string
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        _chat(stack, max_tokens=4, response_format={"type": "json_schema", "json_schema": {"name": "s"}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logit_bias": {"100000": 5}}, "logit_bias"),  # outside the vocabulary
        ({"logit_bias": {"abc": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_bad_sampling_values_are_400_naming_the_parameter(stack, extra, param):
    r = httpx.post(
        stack.main + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_every_sampling_field_of_the_request_reaches_the_engine(stack, monkeypatch):
    """The SamplingParams the ingress builds crosses the handle (pickled) and is what the engine's Request holds, field
    by field: a field lost on the way would be back at its default."""
    import dataclasses
    import pickle

    from deployments.schemas import SHARED_SAMPLING_FIELDS
    from model.sampling import SamplingParams
    from tests.serve_helpers import SAMPLING_BODY

    server, seen = stack.server, []
    build = server.build
    monkeypatch.setattr(server, "build", lambda p: seen.append((p, build(p))) or seen[-1][1])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **SAMPLING_BODY}
    r = httpx.post(stack.main + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ((payload, request),) = seen
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    sent = {n for n in names if getattr(payload.sampling, n) != getattr(SamplingParams(), n)}
    client_names = SHARED_SAMPLING_FIELDS | {"max_new_tokens", "min_new_tokens", "json_schema"}
    assert client_names <= sent, f"SAMPLING_BODY leaves {sorted(client_names - sent)} at the default"
    wire = pickle.loads(pickle.dumps(payload, protocol=5))  # how it crosses the Ray handle
    for n in names:
        assert getattr(request.sampling, n) == getattr(wire.sampling, n) == getattr(payload.sampling, n), n


def test_the_engine_checks_a_request_once(stack, monkeypatch):
    """EngineServer.build validates (to answer a 400); queueing the request's n choices finds the stamp and does not
    check again."""
    engine = stack.server.engine
    validate, worked = engine.validate, []

    def counting(request):
        before = request.validated
        validate(request)
        worked.append(request.validated is not before)  # a new stamp: the checks ran

    monkeypatch.setattr(engine, "validate", counting)
    r = _chat(stack, max_tokens=2, n=2, temperature=1.0, seed=3)
    assert len(r.choices) == 2
    assert sorted(worked) == [False, False, True], worked
