"""Online-service pieces that need neither Ray running nor a model: Serve config, request parsing, image URLs, CLI."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest

from deployments.config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeArgs, load_serve_config
from deployments.images import ImageFetcher, ImagePolicy, decode_data_url
from deployments.schemas import APIError, parse_request
from model.windows import WindowConfig
from tests.conftest import ROOT

SERVE_YAML = ROOT / "infra" / "serve.yaml"


def test_serve_yaml_is_a_serve_config_for_this_app():
    config = load_serve_config(SERVE_YAML)  # Serve's own schema (what `serve deploy` validates)
    assert config["http_options"]["host"] == "0.0.0.0"  # cluster config; the CLI and tests bind 127.0.0.1
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    args = ServeArgs.model_validate(app["args"])  # every key is a known field
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    model = deployments[MODEL_DEPLOYMENT]
    assert model["ray_actor_options"]["num_gpus"] == 1
    auto = model["autoscaling_config"]
    assert {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"} <= set(
        auto
    )
    assert auto["min_replicas"] <= auto["max_replicas"]
    for d in deployments.values():
        assert d["max_ongoing_requests"] >= 1 and d["max_queued_requests"] >= 1
        assert d["backpressure_config"] == {"status_code": 503, "retry_after_s": args.retry_after_s}
    # a replica holds at least its engine's slots, and the autoscaling target is reachable below the cap
    assert model["max_ongoing_requests"] >= args.max_slots
    assert auto["target_ongoing_requests"] <= model["max_ongoing_requests"]
    # one engine, one truth: pages are cut as the batch pipeline cuts them
    assert args.window_config().max_windows == WindowConfig().max_windows
    assert args.limits.max_windows >= args.window_config().max_windows + 1, "one full page must fit"


def test_serve_args_refuse_unknown_keys():
    with pytest.raises(ValueError, match="max_slot"):
        ServeArgs.model_validate({"max_slot": 4})
    with pytest.raises(ValueError, match="max_image_byte"):
        ServeArgs.model_validate({"limits": {"max_image_byte": 4}})


def test_the_replica_engine_gets_the_feature_cache_cap_of_the_serve_args(tiny_checkpoint):
    from deployments.app import load_engine

    engine = load_engine(ServeArgs(checkpoint=str(tiny_checkpoint), device="cpu", max_slots=1, feature_cache_mb=3))
    try:
        assert engine.features.max_bytes == 3 * 2**20
    finally:
        engine.close()
    with pytest.raises(ValueError, match="feature_cache_mb"):
        ServeArgs(feature_cache_mb=-1)


def test_application_from_the_yaml_builds_with_overrides():
    from ray.serve import Application

    from deployments.app import application_from_config

    app, name, prefix, http = application_from_config(
        load_serve_config(SERVE_YAML), {"max_slots": 2}, {MODEL_DEPLOYMENT: {"ray_actor_options": {"num_gpus": 0}}}
    )
    assert isinstance(app, Application) and (name, prefix) == ("infimm-hd", "/")
    assert http["port"] == 8000
    with pytest.raises(ValueError, match="unknown deployments"):
        application_from_config(load_serve_config(SERVE_YAML), {}, {"Typo": {}})


# ---- request parsing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param, code",
    [
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages[0].content[0].image_url",
            "invalid_request",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
            "messages[0].content[0].image_url.url",
            "invalid_request",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "function", "content": "x"}]}',
            "messages[1].role",
            "invalid_role",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p", "invalid_request"),
    ],
    ids=["no_image_url", "no_url", "function_role", "top_p_zero"],
)
def test_parse_errors_name_the_field(body, param, code):
    with pytest.raises(APIError) as e:
        parse_request(body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert e.value.message.startswith(param)


def test_string_content_and_parts_parse_the_same():
    a = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    b = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}')
    assert a.messages == b.messages
    assert parse_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "END"}'
    ).stop_list == ["END"]


# ---- request -> SamplingParams --------------------------------------------------------------------------------------
def test_a_request_without_sampling_fields_samples_as_the_engine_default():
    from model.sampling import SamplingParams

    req = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert req.sampling_params() == SamplingParams()  # greedy: the batch pipeline's setting


def test_each_sampling_field_of_the_request_reaches_sampling_params():
    """Alone (with what it needs), every sampling field of the request changes the SamplingParams the ingress builds:
    none is dropped on the way, whether copied by name or renamed (max_tokens, min_tokens, response_format)."""
    from deployments.schemas import SHARED_SAMPLING_FIELDS
    from tests.serve_helpers import SAMPLING_BODY

    assert SHARED_SAMPLING_FIELDS <= set(SAMPLING_BODY), sorted(SHARED_SAMPLING_FIELDS - set(SAMPLING_BODY))
    needs = {"top_logprobs": {"logprobs": True}}

    def sampling(fields: dict):
        return parse_request(_body(**fields)).sampling_params()

    for name, value in [*SAMPLING_BODY.items(), ("max_completion_tokens", 5), ("stop", "END")]:
        base = needs.get(name, {})
        assert sampling(base | {name: value}) != sampling(base), name


def test_sampling_values_the_schema_lets_through_are_400_naming_the_parameter():
    for fields, param in [
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"logit_bias": {"7": 1, "07": 2}}, "logit_bias"),  # the same token id twice
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}, "response_format"),
    ]:
        req = parse_request(_body(**fields))
        with pytest.raises(APIError) as e:
            req.sampling_params()
        assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_request", param), e.value.message


# ---- image URLs ------------------------------------------------------------------------------------------------------
def test_data_urls():
    raw = bytes(range(256)) * 10
    b64 = base64.b64encode(raw).decode()
    assert decode_data_url("data:image/png;base64," + b64, 10_000) == raw
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks are fine
    assert decode_data_url("data:image/jpeg;base64," + wrapped, 10_000) == raw
    for url, status, code in [
        ("data:image/png;base64," + b64, 413, "image_too_large"),  # limit below 2560 bytes (checked before decoding)
        ("data:text/html;base64," + b64, 400, "invalid_image_url"),
        ("data:image/png;base64", 400, "invalid_image_url"),
        ("data:image/png;base64,abc$", 400, "invalid_base64"),
    ]:
        with pytest.raises(APIError) as e:
            decode_data_url(url, 2000 if status == 413 else 10_000)
        assert (e.value.status, e.value.code) == (status, code), url


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://docs.example.com/a.png", True),
        ("https://DOCS.example.com/a.png", True),
        ("http://127.0.0.1:8080/a.png", True),  # host:port entry
        ("http://127.0.0.1:9090/a.png", False),
        ("https://docs.example.com.evil.net/a.png", False),
        ("https://docs.example.com@evil.net/a.png", False),  # userinfo trick: the host is evil.net
        ("https://user@docs.example.com/a.png", False),  # credentials are never sent on: refused, not stripped
        ("https://evil.net\\@docs.example.com/a.png", False),  # urllib reads docs.example.com, httpx evil.net
        ("https://docs\uff0eexample\uff0ecom/a.png", False),  # fullwidth dots (IDNA maps them to '.')
        ("https://docs.example.com:443/a.png", True),  # the default port, written out
        ("https://evil.net/?u=docs.example.com", False),
    ],
)
def test_http_allow_list_matches_hosts_exactly(url, allowed):
    fetcher = ImageFetcher(ImagePolicy(1000, WindowConfig(), allowed_http_hosts=("docs.example.com", "127.0.0.1:8080")))
    assert fetcher.host_allowed(url) is allowed


# ---- CLI -------------------------------------------------------------------------------------------------------------
def test_cli_registers_serve_with_loopback_defaults():
    from cli.main import build_parser
    from deployments.cli import plan

    args = build_parser().parse_args(["serve", "--checkpoint", "/tmp/ckpt", "--port", "8123"])
    assert args.func.__module__ == "deployments.cli"
    assert (args.host, args.port) == ("127.0.0.1", 8123)
    _, name, prefix, http = plan(args, gpus=0)
    assert (name, prefix, http) == ("infimm-hd", "/", {"host": "127.0.0.1", "port": 8123})
    args = build_parser().parse_args(["serve", "--config", str(SERVE_YAML), "--port", "8124"])
    _, _, _, http = plan(args, gpus=0)
    assert http["host"] == "127.0.0.1" and http["port"] == 8124 and http["request_timeout_s"] == 360


# ---- S3 allow-list ---------------------------------------------------------------------------------------------------
def _s3_fetcher(*prefixes: str) -> ImageFetcher:
    return ImageFetcher(ImagePolicy(1000, WindowConfig(), allowed_s3_prefixes=prefixes))


def test_s3_is_refused_until_the_operator_lists_prefixes():
    with pytest.raises(APIError) as e:
        _s3_fetcher().s3_location("s3://pages/a.png")
    assert e.value.status == 400 and "allowed_s3_prefixes" in e.value.message, e.value.message


@pytest.mark.parametrize(
    "url, outcome",
    [
        ("s3://pages/a.png", ("pages", "a.png")),  # a whole bucket
        ("s3://scans/2024/q1/p.png", ("scans", "2024/q1/p.png")),  # under a prefix
        ("s3://scans/2023/p.png", "image_not_allowed"),  # same bucket, other prefix
        ("s3://scans/2024", "image_not_allowed"),  # the prefix is not a match for a shorter key
        ("s3://other/a.png", "image_not_allowed"),
        ("s3://Bad_Bucket/a.png", "invalid_image_url"),  # invalid names never reach S3 (it would answer 5xx)
        ("s3://ab/a.png", "invalid_image_url"),
        ("s3://a..b/a.png", "invalid_image_url"),
        ("s3://192.168.0.1/a.png", "invalid_image_url"),
        ("s3://pages/", "invalid_image_url"),
        ("s3://pages/" + "k" * 1100, "invalid_image_url"),
    ],
)
def test_s3_allow_list(url, outcome):
    fetcher = _s3_fetcher("pages", "s3://scans/2024/")
    if isinstance(outcome, tuple):
        assert fetcher.s3_location(url) == outcome
    else:
        with pytest.raises(APIError) as e:
            fetcher.s3_location(url)
        assert (e.value.status, e.value.code) == (400, outcome), e.value.message


def test_serve_args_check_the_s3_prefixes():
    assert ServeArgs.model_validate({"allowed_s3_prefixes": ["pages", "scans/2024/"]}).allowed_s3_prefixes
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        ServeArgs.model_validate({"allowed_s3_prefixes": ["Pages_2024"]})


def test_missing_and_forbidden_objects_get_one_answer():
    """S3 answers NoSuchKey, NoSuchBucket and AccessDenied differently; the client sees one answer (Stubber: S3
    access policies cannot be set up on the local SeaweedFS)."""
    from botocore.stub import Stubber

    fetcher = _s3_fetcher("pages")
    client = fetcher._s3_client()
    answers = []
    for code, status in [("NoSuchKey", 404), ("NoSuchBucket", 404), ("AccessDenied", 403)]:
        with Stubber(client) as stub:
            stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
            with pytest.raises(APIError) as e:
                fetcher._s3_get("pages", "a.png")
        answers.append((e.value.status, e.value.code, e.value.message))
    assert len(set(answers)) == 1, answers
    assert answers[0][:2] == (400, "image_not_found")


# ---- request hardening -----------------------------------------------------------------------------------------------
def _body(**extra) -> bytes:
    import json

    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "invalid_json"),  # lone surrogate
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\udc00"}]}', "invalid_json"),
        (b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),  # deeply nested
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
        (_body(seed=2**70), "invalid_request"),
        (_body(n=1000), "invalid_request"),
    ],
    ids=["lone_high_surrogate", "lone_low_surrogate", "nested_100k", "nan", "seed_overflow", "n_huge"],
)
def test_hostile_bodies_are_400(raw, code):
    with pytest.raises(APIError) as e:
        parse_request(raw)
    assert (e.value.status, e.value.code) == (400, code), e.value.message


def test_a_valid_surrogate_pair_is_fine():
    req = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}')
    assert req.messages[0].parts()[0].text == "smile \U0001f600"


def test_unknown_fields_are_refused_and_bookkeeping_fields_accepted():
    from deployments.frontend import HONOURED

    assert parse_request(_body(user="u1", metadata={"a": "b"}, store=False)).unsupported(HONOURED) is None
    assert parse_request(_body(n=1, tool_choice="none", presence_penalty=0)).unsupported(HONOURED) is None
    param, message = parse_request(_body(temprature=0.5)).unsupported(HONOURED)
    assert param == "temprature" and "unknown parameter" in message
    param, message = parse_request(_body(tools=[{"type": "function"}])).unsupported(HONOURED)
    assert param == "tools" and "tool calling is not supported" in message


def test_image_errors_carry_no_object_addresses():
    from deployments.images import image_error
    from model.windows import ImageError, open_image

    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    with pytest.raises(ImageError) as e:
        open_image(svg)
    err = image_error(e.value)
    assert err.status == 400 and " at 0x" not in err.message and "0x" not in err.message, err.message


# ---- clients that leave ----------------------------------------------------------------------------------------------
class _EndlessModel:
    """A ModelClient whose stream never ends (or fails after its first event, with `fail`); counts closed streams."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.closed = 0

    async def complete(self, payload):
        raise AssertionError("only streams here")

    async def stream(self, payload):
        try:
            yield {"event": "delta", "text": "a"}
            if self.fail:
                raise RuntimeError("a real bug")
            while True:
                await asyncio.sleep(0.005)
                yield {"event": "delta", "text": "b"}
        finally:
            self.closed += 1

    async def stats(self):
        return {}


def _ingress(model):
    """make_api around `model` as the Serve ingress builds it (Ray's TaskCancelledError means a client left), and a
    function reading the disconnect counter."""
    import prometheus_client
    from ray.exceptions import TaskCancelledError

    from deployments.frontend import Frontend, FrontendSettings, make_api
    from runtime.metrics import Metrics

    registry = prometheus_client.CollectorRegistry()
    metrics = Metrics(frontend="serve", backend="prometheus", registry=registry)
    fetcher = ImageFetcher(ImagePolicy(1000, WindowConfig()))
    frontend = Frontend(model, fetcher, FrontendSettings(), metrics, disconnect_errors=(TaskCancelledError,))
    gone = lambda: registry.get_sample_value("infimm_client_disconnects_total", {"frontend": "serve"}) or 0.0  # noqa: E731
    return make_api(frontend), gone


STREAM_BODY = b'{"model": "infimm-hd", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'


def _call(app, body: bytes, then, more_body: bool = False) -> list[dict]:
    """One POST /v1/chat/completions through the ASGI app as Serve's replica drives it (spec 2.1: Starlette listens
    for the disconnect while it streams): `body` first, then `await then(sent)` answers every later `receive`.
    Returns the messages sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": more_body}
        return await then(sent)

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return sent


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "unhandled" in r.getMessage()]


def test_a_dropped_stream_is_counted_and_logged_in_one_line_without_a_traceback(caplog):
    """Serve's ASGI `receive` raises Ray's TaskCancelledError once the proxy has dropped a disconnected client's
    request; that reached the unhandled-error handler and logged a traceback an operator would page on."""
    from ray.exceptions import TaskCancelledError

    async def proxy_dropped_the_request(sent):
        while sum(m["type"] == "http.response.body" for m in sent) < 3:  # a few chunks reached the client
            await asyncio.sleep(0.005)
        raise TaskCancelledError()

    model = _EndlessModel()
    app, gone = _ingress(model)
    with caplog.at_level(logging.DEBUG):
        sent = _call(app, STREAM_BODY, proxy_dropped_the_request)
    assert sent[0]["status"] == 200 and len(sent) >= 4
    assert gone() == 1 and model.closed == 1  # counted once; the model stream closed (that aborts in the engine)
    assert _tracebacks(caplog) == []
    assert [r.levelname for r in caplog.records if "went away" in r.getMessage()] == ["INFO"]


@pytest.mark.parametrize("how", ["http.disconnect", "TaskCancelledError"])
def test_a_client_gone_while_sending_its_body_is_counted_without_a_traceback(caplog, how):
    from ray.exceptions import TaskCancelledError

    async def left(sent):
        if how == "TaskCancelledError":
            raise TaskCancelledError()
        return {"type": "http.disconnect"}  # Starlette raises ClientDisconnect

    app, gone = _ingress(_EndlessModel())
    with caplog.at_level(logging.DEBUG):
        sent = _call(app, b'{"model": "infimm-hd", ', left, more_body=True)
    assert gone() == 1 and sent[0]["status"] == 499
    assert _tracebacks(caplog) == []


def test_a_real_error_in_a_stream_still_logs_its_traceback(caplog):
    async def stays(sent):
        await asyncio.sleep(3600)

    model = _EndlessModel(fail=True)
    app, gone = _ingress(model)
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="a real bug"):
        _call(app, STREAM_BODY, stays)
    assert gone() == 0 and model.closed == 1
    assert any(r.exc_info and "unhandled error" in r.getMessage() for r in caplog.records), _tracebacks(caplog)


def test_replicas_fix_glibcs_malloc_thresholds():
    """deployments.app.level_malloc, which both deployments call first in their constructors: on this glibc machine
    every mallopt setting is accepted. The soak that shows RSS levelling off: benchmarks/serve_memory.py
    (docs/operating.md)."""
    from deployments import app

    assert app.level_malloc() is True, "mallopt refused a setting"
