"""Batch through running replicas: rows go to a running InfiMM-HD Serve app's OpenAI endpoint instead of engine actors.

Teams that already serve the model want their batch work to use those replicas rather than load another copy on other
GPUs (olmOCR's `--server`). The client speaks HTTP to `/v1/chat/completions` of our app (deployments/), not a
DeploymentHandle to its model deployment:
* pipelines/ may not import deployments/ (tests/test_layout.py), and the handle takes deployments' own payload type;
* the HTTP endpoint is the app's public contract, with its backpressure already defined: a saturated replica (the
  proxy's or the ingress's queue full, or the engine's `max_waiting`) answers 503 with Retry-After;
* the same client works against replicas in another Ray cluster, behind a load balancer, with an API key.
The price is that images travel as `data:` URLs and the ingress cuts their windows again (the original bytes are sent
when the row gave an encoded single-page image; other images and PDF pages are PNG-encoded by the CPU stage).

Retries: 503, 429, connection failures and timeouts are retried with exponential backoff and jitter (at least the
server's Retry-After) for up to `retry_seconds`; they never become error rows. Past the budget the stage raises
`ServerUnavailable` (the Dataset fails: a full cluster is no answer about a row). A 400/413/422 is the server's verdict
on the row (`invalid_request` row with its message); other answers are `generation_error` rows.
"""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 503)
REFUSED_STATUS = (400, 413, 422)
# SamplingParams names (what the Prepare stage checked) -> the OpenAI request's
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class ServerUnavailable(RuntimeError):
    """The replicas stayed saturated or unreachable past the retry budget."""


class Refused(ValueError):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class ServerSettings:
    base_url: str  # the app's OpenAI base, e.g. http://serve-head:8000/v1
    model: str = "infimm-hd"
    api_key: str | None = field(default=None, repr=False)  # bearer token when the app has one
    requests_in_flight: int = 8  # per client worker: enough to fill the replicas' batches, bounded by their queues
    retry_seconds: float = 600.0  # how long one request keeps retrying 503 / connection failures
    timeout_s: float = 600.0  # one HTTP request, first byte to last token
    max_backoff_s: float = 30.0

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"server base_url must be http(s)://host:port/v1, got {self.base_url!r}")
        if self.requests_in_flight < 1 or self.retry_seconds < 0:
            raise ValueError("requests_in_flight must be >= 1 and retry_seconds >= 0")


class ServerClient:
    """One chat completion at a time per call; thread-safe (one httpx.Client)."""

    def __init__(self, settings: ServerSettings):
        import httpx

        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.http = httpx.Client(base_url=settings.base_url.rstrip("/"), headers=headers, timeout=settings.timeout_s)
        self.retries = 0  # retried attempts (503s, connection failures), over this client's life

    def complete(self, body: dict) -> tuple[dict, int]:
        """(the response JSON, attempts). Raises Refused for the server's verdict on the row, ServerUnavailable past
        the retry budget."""
        import httpx

        s = self.settings
        deadline = time.monotonic() + s.retry_seconds
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            wait = None
            try:
                r = self.http.post("/chat/completions", json={"model": s.model, **body})
            except (httpx.TransportError, httpx.TimeoutException) as e:  # replica restarting, proxy down
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.json(), attempt
                message = _error_message(r)
                if r.status_code in REFUSED_STATUS:
                    raise Refused("invalid_request", f"the server refused the request ({r.status_code}): {message}")
                if r.status_code not in RETRY_STATUS:
                    raise Refused("generation_error", f"the server answered {r.status_code}: {message}")
                problem = f"{r.status_code}: {message}"
                wait = _retry_after(r)
            if time.monotonic() >= deadline:
                raise ServerUnavailable(
                    f"{s.base_url}: still {problem} after {attempt} attempts over {s.retry_seconds:.0f}s; the "
                    "replicas are saturated or down (raise retry_seconds, or add replicas)"
                )
            self.retries += 1
            pause = max(wait or 0.0, delay * random.uniform(0.5, 1.0))
            log.debug("attempt %d: %s; retrying in %.1fs", attempt, problem, pause)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic()) + 0.01))
            delay = min(delay * 2, s.max_backoff_s)

    def close(self) -> None:
        self.http.close()


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - Serve's own 503 is plain text
        return r.text[:500]


def _retry_after(r) -> float | None:
    try:
        return float(r.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def openai_body(turns: list[dict], urls: list[str], sampling: dict) -> dict:
    """The Prepare stage's messages (parts: text or {"image": i}) and SamplingParams kwargs -> an OpenAI request."""
    messages = []
    for t in turns:
        content = [
            {"type": "text", "text": p}
            if isinstance(p, str)
            else {"type": "image_url", "image_url": {"url": urls[p["image"]]}}
            for p in t["parts"]
        ]
        messages.append({"role": t["role"], "content": content})
    body = {"messages": messages}
    for k, v in sampling.items():
        body[OPENAI_NAMES.get(k, k)] = list(v) if isinstance(v, tuple) else v
    return body


class ServerStage:
    """Ray Data stage: rows prepared for a server (pipelines/processor.py, Prepare with `server`) -> answer columns.
    The rows of a batch are sent `requests_in_flight` at a time; a client lives as long as its worker."""

    def __init__(self, settings: ServerSettings, continue_on_error: bool = True):
        self.settings = settings
        self.continue_on_error = continue_on_error
        self.client = ServerClient(settings)

    def answers(self, turns_json: list, urls: list, sampling_json: list, errors: list) -> list[dict]:
        def one(i: int) -> dict:
            if errors[i]:
                return {}
            body = openai_body(json.loads(turns_json[i]), urls[i] or [], json.loads(sampling_json[i]))
            t0 = time.perf_counter()
            try:
                out, attempts = self.client.complete(body)
            except Refused as e:
                if not self.continue_on_error:
                    raise ValueError(f"{e.error_type}: {e}") from None
                return {"error_type": e.error_type, "error_message": str(e)[:2000]}
            choice, usage = out["choices"][0], out.get("usage") or {}
            return {
                "generated_text": choice["message"]["content"],
                "finish_reason": choice.get("finish_reason"),
                "num_input_tokens": usage.get("prompt_tokens"),
                "num_generated_tokens": usage.get("completion_tokens"),
                "time_taken_llm": time.perf_counter() - t0,  # retries and queueing included
                "attempts": attempts,
            }

        with ThreadPoolExecutor(self.settings.requests_in_flight) as pool:
            return list(pool.map(one, range(len(turns_json))))

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


class ServerPagesStage:
    """The batch job's engine stage for running replicas: decoded pages (DECODED_SCHEMA, with `image_url`) -> OUTPUT
    rows, as GenerateStage writes them. One greedy attempt per row: the repetition guard and its temperature ladder
    are engine features the OpenAI endpoint does not expose (a loop ends at max_tokens, finish_reason "length")."""

    def __init__(self, settings: ServerSettings, generate):  # generate: pipelines.generate.GenerateConfig
        self.settings = settings
        self.generate = generate
        self.model_name = generate.model_name or generate.checkpoint.rstrip("/").rsplit("/", 1)[-1]
        self.client = ServerClient(settings)

    def body(self, prompt: str, url: str) -> dict:
        g = self.generate
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": g.max_new_tokens, "temperature": 0}
        if g.repetition_penalty != 1.0:
            body["repetition_penalty"] = g.repetition_penalty
        if g.no_repeat_ngram_size:
            body["no_repeat_ngram_size"] = g.no_repeat_ngram_size
        return body

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .rows import OUTPUT_SCHEMA, error_fields, row_id

        out, pending = [], []
        for page in batch.to_pylist():
            base = {k: page[k] for k in ("source_uri", "page", "width", "height", "grid_rows", "grid_cols", "pdf_text")}
            rows = [
                {**base, "model": self.model_name, "id": row_id(page["doc"], page["page"], p), "prompt": p}
                for p in page["prompts"]
            ]
            out += rows
            for r in rows:
                if page["error_type"]:
                    r.update(error_type=page["error_type"], error_message=page["error_message"])
                elif page.get("text_source") == "pdf_text":
                    r.update(text=page["pdf_text"], text_source="pdf_text", attempts=0)
                else:
                    pending.append((r, page["image_url"]))

        def one(item):
            r, url = item
            t0 = time.perf_counter()
            try:
                answer, _ = self.client.complete(self.body(r["prompt"], url))
            except Refused as e:
                r.update(error_fields(e.error_type, str(e)), attempts=1, attempt_finish_reasons=["error"])
                r["attempt_temperatures"] = [0.0]
                return
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            r.update(
                text=choice["message"]["content"],
                text_source="model",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                generate_ms=(time.perf_counter() - t0) * 1e3,  # the HTTP call: queueing and 503 retries included
                attempts=1,
                attempt_finish_reasons=[choice.get("finish_reason")],
                attempt_temperatures=[0.0],
            )

        with ThreadPoolExecutor(self.settings.requests_in_flight) as pool:
            list(pool.map(one, pending))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
