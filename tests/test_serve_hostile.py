"""The online service against clients that try to stall or bloat it: infra/serve.yaml's limits (20 MiB bodies) on
127.0.0.1 with the tiny checkpoint, CPU overrides and a short body timeout. Each test is bounded in count and time.

* an extreme-aspect PNG (30000 x 10, a few hundred bytes) costs the ingress and the replica little memory;
* a 12 MiB text message (under the body limit) is refused before tokenizing, and small requests keep answering;
* hundreds of sockets dribbling request bodies are cut off (408) while /health and a normal request are answered.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from tests.serve_helpers import (
    data_url,
    image_message,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    serve_replica_pids,
    tiny_serve_app,
)

APP = "hostile"
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def hostile_app(ray_session, tiny_checkpoint):
    args = {"body_timeout_s": BODY_TIMEOUT_S, "limits": {"default_max_tokens": 4}}
    with tiny_serve_app(tiny_checkpoint, APP, "/hostile", args) as app:
        yield app


def chat(app, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(app.base + "/v1/chat/completions", json=body, timeout=timeout)


def small_request(text: str = "Hi") -> dict:
    return {"model": "infimm-hd", "messages": [{"role": "user", "content": text}], "max_tokens": 2}


def test_extreme_aspect_png_costs_the_ingress_and_replica_little_memory(hostile_app):
    """A few hundred bytes of PNG whose padded square would be 30000^2 or 40000^2 pixels: the peak RSS of both
    replicas (VmHWM, reset before the requests, so a buffer allocated and freed in between still counts) grows by
    less than 300 MB."""
    pngs = {}
    for size in ((30000, 10), (10, 40000)):
        buf = io.BytesIO()
        Image.new("L", size, 255).save(buf, "PNG", optimize=True)
        pngs[size] = buf.getvalue()
        assert len(pngs[size]) < 2000, (size, len(pngs[size]))
    assert chat(hostile_app, small_request()).status_code == 200  # warm: both replicas loaded
    pids = {"ingress": serve_replica_pids("OpenAIIngress", APP), "model": serve_replica_pids("InfimmModel", APP)}
    pids = {name: only for name, (only,) in pids.items()}
    before = {}
    for name, pid in pids.items():
        reset_peak_rss(pid)
        before[name] = rss_bytes(pid)
    for size, png in pngs.items():
        message = image_message(data_url(png), "Read.")
        for _ in range(2):
            r = chat(hostile_app, {"model": "infimm-hd", "messages": message, "max_tokens": 2})
            assert r.status_code == 200, (size, r.text)
    growth = {name: peak_rss_bytes(pid) - before[name] for name, pid in pids.items()}
    print(f"30000x10 and 10x40000 PNGs x2 each: peak RSS growth {growth}")
    assert all(0 <= g < 300 * 2**20 for g in growth.values()), growth


def test_huge_text_is_refused_before_tokenizing_and_small_requests_keep_answering(hostile_app):
    huge = small_request("lorem ipsum " * (12 * 2**20 // 12))  # 12 MiB of text: under the 20 MiB body limit

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            url = hostile_app.base + "/v1/chat/completions"
            big = [asyncio.create_task(client.post(url, json=huge)) for _ in range(2)]
            small = [await client.post(url, json=small_request(f"Hello {i}")) for i in range(4)]
            ready = await client.get(hostile_app.base + "/ready")
            return [await t for t in big], small, ready

    big, small, ready = asyncio.run(main())
    for r in big:
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text[:300]
    assert [r.status_code for r in small] == [200] * 4, [r.text[:200] for r in small]
    assert ready.status_code == 200, ready.text


def test_slow_body_flood_is_cut_off_while_health_and_requests_answer(hostile_app):
    """400 sockets each promise a 1 MB body and send a byte every 0.5 s. Within the body timeout they are answered
    408; meanwhile /health and a chat request are answered. Bounded: about 3 x BODY_TIMEOUT_S."""
    n_sockets = 400
    head = (
        b"POST /hostile/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )

    async def slow_client(results: list):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", hostile_app.port)
        except OSError as e:
            results.append(f"connect: {e!r}")
            return
        try:
            writer.write(head + b'{"model": "infimm-hd", "messages": [')
            await writer.drain()
            loop = asyncio.get_running_loop()
            end = loop.time() + 3 * BODY_TIMEOUT_S
            while loop.time() < end:
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.5)
                except TimeoutError:
                    writer.write(b" ")
                    await writer.drain()
                    continue
                results.append(line.decode(errors="replace").strip() or "closed")
                return
            results.append("still open")
        except (ConnectionError, OSError) as e:
            results.append(f"reset: {type(e).__name__}")
        finally:
            writer.close()

    async def main():
        results: list = []
        flood = [asyncio.create_task(slow_client(results)) for _ in range(n_sockets)]
        await asyncio.sleep(1.0)  # the flood is in: every socket holds an open request
        async with httpx.AsyncClient(timeout=2 * BODY_TIMEOUT_S) as client:
            health = await client.get(hostile_app.base + "/health")
            answer = await client.post(hostile_app.base + "/v1/chat/completions", json=small_request())
        await asyncio.gather(*flood)
        return results, health, answer

    results, health, answer = asyncio.run(main())
    assert health.status_code == 200, health.text
    assert answer.status_code == 200, answer.text
    statuses = {r: results.count(r) for r in set(results)}
    print(f"{n_sockets} slow bodies: {statuses}")
    assert "still open" not in statuses, statuses  # none kept its place past the body timeout
    cut = sum(n for r, n in statuses.items() if r.split(" ")[1:2] == ["408"])
    assert cut >= n_sockets * 0.9, statuses
