"""Batch through running replicas (pipelines/replicas.py): the retrying client against a scripted server, then the
Dataset processor against our real Serve app on 127.0.0.1 whose model deployment is kept saturated."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.replicas import Refused, ServerClient, ServerSettings, ServerUnavailable, openai_body

from . import processor_helpers
from .conftest import free_port
from .processor_helpers import QUESTION, kind_rows, make_request, settings

page_kinds = pytest.fixture(scope="module", name="pages")(processor_helpers.make_pages)
engine_alone = pytest.fixture(scope="module", name="reference")(processor_helpers.make_reference)

ANSWER = {
    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
}


@contextmanager
def scripted_server(script: list[tuple[int, dict | str]]):
    """An HTTP server on 127.0.0.1 answering each POST with the next (status, body) of `script` (the last repeats)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = script[min(len(seen) - 1, len(script) - 1)]
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_saturated_server_is_retried_and_a_refusal_is_the_rows_answer():
    busy = (503, "Service Unavailable")  # Serve's own plain-text 503 (proxy queue full)
    overloaded = (503, {"error": {"message": "all model replicas are at capacity; retry later"}})
    with scripted_server([busy, overloaded, (200, ANSWER)]) as (url, seen):
        out, attempts = ServerClient(ServerSettings(url, retry_seconds=30)).complete({"messages": []})
    assert (out, attempts, len(seen)) == (ANSWER, 3, 3)
    assert seen[0]["model"] == "infimm-hd"

    with scripted_server([(400, {"error": {"message": "max_tokens must be >= 1"}})]) as (url, _):
        with pytest.raises(Refused, match=r"refused the request \(400\): max_tokens must be >= 1") as e:
            ServerClient(ServerSettings(url)).complete({"messages": []})
    assert e.value.error_type == "invalid_request"

    with scripted_server([busy]) as (url, seen):
        with pytest.raises(ServerUnavailable, match="still 503"):
            ServerClient(ServerSettings(url, retry_seconds=0.3, max_backoff_s=0.05)).complete({"messages": []})
    assert len(seen) >= 2


def test_openai_body_from_prepared_rows():
    turns = [{"role": "user", "parts": [{"image": 0}, "Read."]}]
    body = openai_body(turns, ["data:image/png;base64,AA=="], {"max_new_tokens": 3, "stop": ("x",)})
    assert body == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "text", "text": "Read."},
                ],
            }
        ],
        "max_tokens": 3,
        "stop": ["x"],
    }


@pytest.fixture(scope="module")
def saturated_app(ray_session, tiny_checkpoint):
    """Our Serve app (ingress + model) on 127.0.0.1, the model deployment taking 1 request and queueing 1: more
    concurrent requests than that are answered 503 by the ingress."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import compose
    from deployments.config import ServeArgs

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port
    args = ServeArgs(
        checkpoint=str(tiny_checkpoint),
        device="cpu",
        max_slots=2,
        max_seq_len=1024,
        max_windows_per_image=4,
        metrics=False,
    )
    options = {
        "InfimmModel": {
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "num_replicas": 1,
            "ray_actor_options": {"num_gpus": 0, "num_cpus": 1},
        },
        "OpenAIIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    }
    serve.run(compose(args, options), name="replicas-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.delete("replicas-test")


def test_processor_through_running_replicas(ray_session, saturated_app, tiny_checkpoint, pages, reference):
    import ray

    from pipelines.processor import build_processor

    kinds, ref = pages
    items = kind_rows(kinds) + [
        {"id": "undecodable", "image": b"\x89PNG\r\n\x1a\n not really", "page": None},
        {"id": "too_long", "image": kinds["bytes"], "page": None, "question": "word " * 1200},
    ]

    def preprocess(row):
        req = make_request(row)
        if row.get("question"):
            req["messages"][0]["content"][1]["text"] = row["question"]
        return req

    server = ServerSettings(saturated_app, requests_in_flight=6, retry_seconds=120)
    config = settings(tiny_checkpoint, server=server, batch_size=16)
    processor = build_processor(config, preprocess=preprocess, postprocess=lambda row: dict(row, post=True))
    got = {r["id"]: r for r in processor(ray.data.from_items(items)).take_all()}
    assert sorted(got) == sorted(i["id"] for i in items)  # every row exactly once
    for name in kinds:
        want = reference(ref[name])
        assert got[name]["error_type"] is None, (name, got[name]["error_message"])
        assert (got[name]["generated_text"], got[name]["num_generated_tokens"]) == (want.text, want.completion_tokens)
        assert got[name]["num_input_tokens"] == want.prompt_tokens, name
        assert got[name]["post"] is True
    assert sum(got[n]["attempts"] for n in kinds) > len(kinds), "no 503 was met: the replica was not saturated"
    assert got["undecodable"]["error_type"] == "decode_error"  # found by the CPU stage, never sent
    assert got["too_long"]["error_type"] == "invalid_request"  # the server's verdict
    assert "refused the request (400)" in got["too_long"]["error_message"]
    assert got["too_long"]["messages"][0]["content"][1]["text"] != QUESTION


def test_batch_job_through_running_replicas(ray_session, saturated_app, tiny_checkpoint, tmp_path):
    """The document job with `server`: the same rows as the actor-pool job, every page once, and a rerun resumes."""
    from demo.samples import pdf_document, png_page
    from pipelines.job import run_job

    from .pipeline_helpers import by_page, config, read_rows, write_files

    folder = write_files(
        tmp_path / "docs",
        {f"p{i}.png": png_page(i, (500, 640)) for i in range(4)}
        | {"two.pdf": pdf_document(2, size=(500, 640)), "broken.png": b"\x89PNG\r\n\x1a\n broken"},
    )
    server = ServerSettings(saturated_app, requests_in_flight=4, retry_seconds=120)
    actors = config(tiny_checkpoint, [folder], tmp_path / "actors")
    replicas = config(tiny_checkpoint, [folder], tmp_path / "replicas", server=server)
    run_job(actors, progress=False)
    summary = run_job(replicas, progress=False)
    want, got = by_page(read_rows(actors.output)), by_page(read_rows(replicas.output))  # one row per page: asserted
    assert sorted(got) == sorted(want) and len(got) == 7
    for key, row in got.items():
        assert (row["id"], row["text"], row["error_type"]) == (
            want[key]["id"],
            want[key]["text"],
            want[key]["error_type"],
        ), key
        assert row["completion_tokens"] == want[key]["completion_tokens"], key
    assert got[("broken.png", 0, got_prompt(got))]["error_type"] == "decode_error"
    assert summary["run"]["rows"] == 7
    again = run_job(replicas, progress=False)  # resume: everything is done, nothing is asked again
    assert again["run"]["rows"] == 0 and again["run"]["rows_already_done"] == 7
    assert len(read_rows(replicas.output)) == 7


def got_prompt(rows: dict) -> str:
    return next(iter(rows))[2]


def test_batch_run_server_flags(tiny_checkpoint, monkeypatch):
    import argparse

    from pipelines.cli import add_run_options, job_config

    monkeypatch.setenv("INFIMM_API_KEY", "k")
    p = argparse.ArgumentParser()
    add_run_options(p)
    base = ["--input", "x", "--output", "/tmp/o", "--checkpoint", str(tiny_checkpoint)]
    assert job_config(p.parse_args(base)).server is None
    server = job_config(
        p.parse_args(base + ["--server", "http://127.0.0.1:8000/v1", "--server-retry-seconds", "5"])
    ).server
    assert (server.base_url, server.api_key, server.retry_seconds, server.model) == (
        "http://127.0.0.1:8000/v1",
        "k",
        5.0,
        "infimm-hd",
    )
    with pytest.raises(ValueError, match="http"):
        job_config(p.parse_args(base + ["--server", "127.0.0.1:8000"]))
