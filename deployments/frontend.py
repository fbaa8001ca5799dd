"""The HTTP layer: OpenAI-compatible routes over a `ModelClient`, with auth, limits, timeouts and backpressure answers.

No Ray here. `make_api(Frontend(...))` is the FastAPI app; the Serve ingress builds it around a client that calls
the model deployment through a DeploymentHandle (app.py), tests build it around an in-process `EngineServer`.

    POST /v1/chat/completions    chat with text and image_url parts; stream=true answers server-sent events
    GET  /v1/models              the one served model
    GET  /v1/models/{id}         that model (404 model_not_found for any other id)
    GET  /health                 liveness of this ingress (no model call)
    GET  /ready                  readiness: the model deployment answers and its engine loop runs (503 otherwise)

Every error is the OpenAI body {"error": {message, type, param, code}}; 503s carry Retry-After; a request that runs past
`request_timeout_s` is aborted in the engine and answered 504 (or, once streaming, with an error event). A client that
goes away (a dropped stream, a closed connection) is a normal event: its generation is aborted, it is counted in
`infimm_client_disconnects` and logged in one line at info, never as an unhandled error; real errors keep their
traceback.

Bounded work before the expensive part: only `application/json` bodies (415 otherwise: a browser page cannot post one
without a CORS preflight); the body must arrive within `body_timeout_s` (408), so clients that dribble bytes free
their place; text over `max_prompt_tokens x max_chars_per_token` characters is refused before anything tokenizes it;
JSON parsing of large bodies and all image work run in worker threads, never on the event loop `/health` shares.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.processor import ChatMessage
from model.sampling import SamplingParams

from .config import Limits
from .engine_server import EngineServer, GenerationPayload
from .images import ImageFetcher
from .schemas import (
    APIError,
    ChatCompletionRequest,
    ImagePart,
    TextPart,
    chunk_body,
    completion_body,
    parse_request,
    sse,
    usage,
)

log = logging.getLogger(__name__)


# Fields of schemas.REFUSED that the model side honours (the rest are refused with a 400 naming them).
HONOURED: frozenset[str] = frozenset(
    {
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
    }
)
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit
PARSE_INLINE_BYTES = 64 * 1024  # bodies up to this are parsed on the event loop (~0.1 ms); larger ones in a thread
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection": what the access logs show for those


class ModelClient(Protocol):
    async def complete(self, payload: GenerationPayload) -> dict: ...
    def stream(self, payload: GenerationPayload) -> AsyncIterator[dict]: ...
    async def stats(self) -> dict: ...


class LocalModelClient:
    """A ModelClient over an in-process EngineServer (tests, benchmarks)."""

    def __init__(self, server: EngineServer):
        self.server = server

    async def complete(self, payload: GenerationPayload) -> dict:
        return await self.server.complete(payload)

    def stream(self, payload: GenerationPayload) -> AsyncIterator[dict]:
        return self.server.stream(payload)

    async def stats(self) -> dict:
        return self.server.stats()


@dataclass
class FrontendSettings:
    model_name: str = "infimm-hd"
    limits: Limits = Limits()
    api_key: str | None = None
    request_timeout_s: float = 300.0
    body_timeout_s: float = 10.0
    retry_after_s: int = 1
    ready_timeout_s: float = 5.0


class _NoMetrics:
    def inc(self, *a, **k) -> None: ...
    def set(self, *a, **k) -> None: ...
    def rejected(self, *a, **k) -> None: ...


class Frontend:
    """`disconnect_errors`: exceptions that mean the client went away, besides Starlette's ClientDisconnect and a
    cancelled task; the Serve ingress adds Ray's TaskCancelledError (its ASGI `receive` raises it once the proxy drops
    the request, and a model call cancelled with its parent request raises it too)."""

    def __init__(
        self,
        client: ModelClient,
        fetcher: ImageFetcher,
        settings: FrontendSettings,
        metrics=None,
        disconnect_errors: tuple[type[Exception], ...] = (),
    ):
        self.client = client
        self.fetcher = fetcher
        self.settings = settings
        self.metrics = metrics or _NoMetrics()
        self.disconnect_errors = (ClientDisconnect, *disconnect_errors)
        self.ongoing = 0
        self.buffered = 0  # bytes of request bodies being read or parsed right now

    # ---- helpers -----------------------------------------------------------------------------------------------------
    def error_response(self, err: APIError) -> JSONResponse:
        headers = dict(err.headers)
        if err.status == 503:
            headers.setdefault("Retry-After", str(self.settings.retry_after_s))
        if err.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key", "invalid_api_key")

    @staticmethod
    def check_content_type(request: Request) -> None:
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise APIError(
                415,
                f"request body must be application/json (Content-Type: {media_type or 'missing'})",
                "unsupported_media_type",
            )

    async def read_body(self, request: Request) -> bytes:
        """The body, within max_request_bytes (413) and body_timeout_s (408: a slow or stalled client is cut off,
        freeing its place for others; Serve's proxy has no body timeout of its own)."""
        limit = self.settings.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"request body is {declared} bytes, over the {limit}-byte limit (max_request_bytes)",
                "request_too_large",
            )
        body = bytearray()
        chunks = request.stream()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout_s
        budget = self.settings.limits.max_buffered_bytes
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    break
                body += chunk
                self.buffered += len(chunk)
                if len(body) > limit:
                    raise APIError(
                        413, f"request body is over the {limit}-byte limit (max_request_bytes)", "request_too_large"
                    )
                if self.buffered > budget:
                    raise APIError(
                        503, "this replica holds too many request bodies right now; retry later", "overloaded"
                    )
        except TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {self.settings.body_timeout_s:g} s (body_timeout_s)",
                "body_timeout",
                headers={"Connection": "close"},
            ) from None
        finally:
            self.buffered -= len(body)
            await chunks.aclose()
        return bytes(body)

    @staticmethod
    async def parse(raw: bytes) -> ChatCompletionRequest:
        if len(raw) <= PARSE_INLINE_BYTES:
            return parse_request(raw)
        return await asyncio.to_thread(parse_request, raw)  # ~15 ms per MB: not on the loop others share

    def _set_ongoing(self, delta: int) -> None:
        self.ongoing += delta
        self.metrics.set("infimm_ongoing_requests", self.ongoing)

    def client_gone(self, request_id: str, when: str) -> None:
        """A client that left: counted and logged in one line (no traceback: nothing failed here)."""
        self.metrics.inc("infimm_client_disconnects")
        log.info("request %s: the client went away %s; its generation is aborted", request_id, when)

    # ---- request -> payload ------------------------------------------------------------------------------------------
    def check_request(self, req: ChatCompletionRequest) -> None:
        lim = self.settings.limits
        if req.model != self.settings.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {self.settings.model_name!r}",
                "model_not_found",
                param="model",
            )
        bad = req.unsupported(HONOURED)
        if bad:
            raise APIError(400, bad[1], "unsupported_parameter", param=bad[0])
        self.check_sampling(req)
        chars = sum(len(p.text) for m in req.messages for p in m.parts() if isinstance(p, TextPart))
        max_chars = lim.max_prompt_tokens * lim.max_chars_per_token
        if chars > max_chars:  # certainly over max_prompt_tokens: no token covers more than max_chars_per_token
            raise APIError(
                400,
                f"the messages hold {chars} characters of text, more than {lim.max_prompt_tokens} tokens can hold "
                f"(max_prompt_tokens x {lim.max_chars_per_token} characters); shorten the prompt",
                "prompt_too_long",
                param="messages",
            )
        want = req.requested_max_tokens
        if want is not None and want > lim.max_tokens:
            raise APIError(
                400,
                f"max_tokens {want} is over this server's limit of {lim.max_tokens}",
                "max_tokens_too_large",
                param="max_tokens",
            )
        bound = lim.max_tokens if want is None else want  # without max_tokens: the most a client may ask for
        if req.min_tokens and req.min_tokens > bound:
            over = f"max_tokens ({want})" if want is not None else f"this server's max_tokens limit ({bound})"
            raise APIError(
                400,
                f"min_tokens {req.min_tokens} is over {over}; an answer is never longer than max_tokens, "
                "so lower min_tokens",
                "invalid_request",
                param="min_tokens",
            )
        stops = req.stop_list
        if len(stops) > lim.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop takes up to {lim.max_stop} non-empty strings", "invalid_stop", param="stop")
        n_images = 0
        for i, m in enumerate(req.messages):
            imgs = sum(isinstance(p, ImagePart) for p in m.parts())
            if imgs and m.role != "user":
                raise APIError(
                    400,
                    f"messages[{i}] ({m.role}) has an image; images belong in user messages",
                    "invalid_request",
                    param=f"messages[{i}].content",
                )
            n_images += imgs
        if n_images > lim.max_images:
            raise APIError(
                400,
                f"request has {n_images} images, over the limit of {lim.max_images} (max_images)",
                "too_many_images",
                param="messages",
            )

    @staticmethod
    def check_sampling(req: ChatCompletionRequest) -> None:
        """What pydantic's field types cannot say about the sampling fields (their ranges it checks already)."""
        if req.n > 1 and req.stream:
            raise APIError(
                400, "n > 1 cannot be streamed by this server; use stream=false", "invalid_request", param="n"
            )
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "invalid_request", param="top_logprobs")
        bias = req.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS or any(not (k.isascii() and k.isdigit()) for k in bias):
            raise APIError(
                400,
                f"logit_bias maps up to {MAX_LOGIT_BIAS} token ids (strings of digits) to biases in [-100, 100]",
                "invalid_request",
                param="logit_bias",
            )
        kind = req.response_format_type
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(
                400,
                f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                "invalid_request",
                param="response_format",
            )
        if kind == "json_schema":
            spec = (req.response_format or {}).get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(
                    400,
                    "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                    "invalid_request",
                    param="response_format",
                )

    @staticmethod
    async def sampling(req: ChatCompletionRequest) -> SamplingParams:
        """The request's SamplingParams, checked before any image is fetched; a JSON schema is compiled in a worker
        thread (a large one takes milliseconds, and /health shares this event loop)."""
        if req.json_schema is None:
            return req.sampling_params()
        return await asyncio.to_thread(req.sampling_params)

    async def build_payload(self, req: ChatCompletionRequest, request_id: str) -> GenerationPayload:
        sampling = await self.sampling(req)
        urls = [p.image_url.url for m in req.messages for p in m.parts() if isinstance(p, ImagePart)]
        loaded = await asyncio.gather(*(self.fetcher.load(u) for u in urls), return_exceptions=True)
        for x in loaded:
            if isinstance(x, BaseException):
                raise x
        views = sum(p.n_views for p in loaded)
        limit = self.settings.limits.max_windows
        if views > limit:
            raise APIError(
                400,
                f"the request's images make {views} 448x448 views (windows + thumbnails), over the "
                f"limit of {limit} (max_windows); send fewer or smaller pages",
                "too_many_windows",
                param="messages",
            )
        pages = iter(loaded)
        messages = []
        for m in req.messages:
            parts = [next(pages) if isinstance(p, ImagePart) else p.text for p in m.parts()]
            messages.append(ChatMessage("system" if m.role == "developer" else m.role, parts))
        return GenerationPayload(
            request_id, messages, sampling, max_tokens=req.requested_max_tokens, ignore_eos=req.ignore_eos, n=req.n
        )

    # ---- routes ------------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        request_id = uuid.uuid4().hex
        self._set_ongoing(+1)
        handed_to_stream = False
        try:
            self.check_auth(request)
            self.check_content_type(request)
            req = await self.parse(await self.read_body(request))
            self.check_request(req)
            payload = await _within(self.build_payload(req, request_id), deadline, loop)
            if req.stream:
                stream = self.client.stream(payload)
                try:
                    first = await _within(anext(stream), deadline, loop)
                except BaseException:
                    await stream.aclose()
                    raise
                if first["event"] == "error":
                    await stream.aclose()
                    raise APIError.from_event(first)
                include_usage = bool(req.stream_options and req.stream_options.include_usage)

                async def close(client_gone: bool) -> None:  # after the response, however it ended
                    await _aclose(stream)
                    self._set_ongoing(-1)
                    if client_gone:
                        self.client_gone(request_id, "during its stream")

                handed_to_stream = True
                return _ClosingStreamingResponse(
                    self._sse(stream, request_id, include_usage, deadline),
                    close,
                    self.disconnect_errors,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            ev = await _within(self.client.complete(payload), deadline, loop)
            if ev["event"] == "error":
                raise APIError.from_event(ev)
            return JSONResponse(
                completion_body(
                    request_id, self.settings.model_name, ev["choices"], ev["prompt_tokens"], ev["completion_tokens"]
                )
            )
        except APIError as err:
            self.metrics.rejected(err.code)
            if err.status >= 500:
                log.warning("request %s: %d %s", request_id, err.status, err.message)
            return self.error_response(err)
        except asyncio.CancelledError:  # Serve cancels the request's task when its client disconnects
            self.client_gone(request_id, "before its answer")
            raise
        except self.disconnect_errors:  # reading the body, or a model call cancelled with this request
            self.client_gone(request_id, "before its answer")
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; it keeps the server's own logs quiet
        finally:
            if not handed_to_stream:
                self._set_ongoing(-1)

    async def _sse(
        self, stream: AsyncIterator[dict], request_id: str, include_usage: bool, deadline: float
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        name, created = self.settings.model_name, int(time.time())
        try:
            yield sse(chunk_body(request_id, name, created, {"role": "assistant", "content": ""}))
            while True:
                try:
                    ev = await _within(anext(stream), deadline, loop)
                except StopAsyncIteration:
                    ev = APIError(500, "the model stream ended without a result", "engine_error").to_event()
                if ev["event"] == "delta":
                    yield sse(
                        chunk_body(request_id, name, created, {"content": ev["text"]}, logprobs=ev.get("logprobs"))
                    )
                elif ev["event"] == "end":
                    yield sse(chunk_body(request_id, name, created, {}, ev["finish_reason"]))
                    if include_usage:
                        yield sse(
                            chunk_body(
                                request_id,
                                name,
                                created,
                                None,
                                usage_=usage(ev["prompt_tokens"], ev["completion_tokens"]),
                            )
                        )
                    yield sse("[DONE]")
                    return
                elif ev["event"] == "error":
                    raise APIError.from_event(ev)
        except APIError as err:  # headers are gone: report in the stream, as OpenAI does
            self.metrics.rejected(err.code)
            log.warning("stream %s: %d %s", request_id, err.status, err.message)
            yield sse(err.body())
        finally:
            await _aclose(stream)

    def model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "infimm-hd"}

    async def models(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except APIError as err:
            self.metrics.rejected(err.code)
            return self.error_response(err)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request, model_id: str) -> Response:
        """One model by id (the OpenAI client's `models.retrieve`); ids may hold '/' (`org/name`), so the route takes
        the rest of the path."""
        try:
            self.check_auth(request)
            if model_id != self.settings.model_name:
                raise APIError(
                    404,
                    f"model {model_id!r} does not exist; this server serves {self.settings.model_name!r}",
                    "model_not_found",
                    param="model",
                )
        except APIError as err:
            self.metrics.rejected(err.code)
            return self.error_response(err)
        return JSONResponse(self.model_card())

    async def ready(self) -> Response:
        try:
            stats = await asyncio.wait_for(self.client.stats(), self.settings.ready_timeout_s)
        except APIError as err:
            return self.error_response(APIError(503, f"model not ready: {err.message}", "not_ready"))
        except Exception as e:  # noqa: BLE001 - timeout, replica gone: any failure means not ready
            return self.error_response(APIError(503, f"model not ready: {type(e).__name__}: {e}", "not_ready"))
        if not stats.get("alive", True):
            return self.error_response(APIError(503, "model not ready: engine loop is not running", "not_ready"))
        return JSONResponse(
            {"status": "ready", "model": self.settings.model_name, "engine": stats, "ongoing_requests": self.ongoing}
        )


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close(client_gone)` once it is done, also when the client left before the body
    started (then Starlette never iterates the body, and nothing else would close the model stream).

    The client is gone when the body did not run to its end and nothing failed: Starlette saw `http.disconnect` and
    cancelled the body quietly, the task was cancelled (Serve), or `receive`/`send` raised one of `disconnect_errors`,
    which end the response here instead of reaching the unhandled-error handler."""

    def __init__(self, content, on_close, disconnect_errors: tuple[type[Exception], ...], **kwargs):
        super().__init__(self._until_end(content), **kwargs)
        self._on_close = on_close
        self._disconnect_errors = disconnect_errors
        self._body_ended = False

    async def _until_end(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self._body_ended = True

    async def __call__(self, scope, receive, send) -> None:
        failed = False
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            raise
        except self._disconnect_errors:
            pass
        except BaseException:
            failed = True
            raise
        finally:
            await self._on_close(not failed and not self._body_ended)


async def _aclose(stream) -> None:
    try:
        await stream.aclose()
    except RuntimeError:  # still running in a task being cancelled; it closes itself when that task ends
        pass


async def _within(awaitable, deadline: float, loop: asyncio.AbstractEventLoop):
    """Await with what is left of the request's time; past it, cancel (which aborts in the engine) and answer 504."""
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - loop.time()))
    except TimeoutError:
        raise APIError(
            504,
            "the request timed out before the model finished; it was aborted. Lower max_tokens or retry later",
            "timeout",
        ) from None


def make_api(frontend: Frontend) -> FastAPI:
    api = FastAPI(title="InfiMM-HD", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return frontend.error_response(  # exc.headers: Starlette's `Allow` on a 405
            APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code, headers=exc.headers)
        )

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return frontend.error_response(APIError(500, "internal error; see the server log", "internal_error"))

    api.add_api_route("/v1/chat/completions", frontend.chat_completions, methods=["POST"])
    api.add_api_route("/v1/models", frontend.models, methods=["GET"])
    api.add_api_route("/v1/models/{model_id:path}", frontend.model, methods=["GET"])
    api.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])
    api.add_api_route("/ready", frontend.ready, methods=["GET"])
    return api
