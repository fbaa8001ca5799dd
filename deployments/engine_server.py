"""The model side of the service: owns one `Engine`, turns checked chat payloads into engine requests, runs them.

Plain Python (no Ray, no HTTP) so it runs the same inside the Serve model deployment and in-process in tests. Many
callers share the engine's background loop, so concurrent requests share GPU steps (continuous batching).

Answers are events (plain dicts) rather than exceptions, because they cross a Ray handle:
    {"event": "start", "prompt_tokens": n}              streaming only, once the request is accepted
    {"event": "delta", "text": "..."}                   streaming only
    {"event": "end", "text", "finish_reason", "prompt_tokens", "completion_tokens"}
    {"event": "error", "status", "message", "code", ...} (see schemas.APIError)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.engine import Engine, Request, Result
from model.processor import ChatMessage
from model.sampling import SamplingParams

from .config import Limits
from .schemas import APIError

log = logging.getLogger(__name__)


@dataclass
class GenerationPayload:
    """A chat request the ingress has checked: images are already PageViews, sampling fields validated."""

    request_id: str
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: limits.default_max_tokens, capped by the room left in the context
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    ignore_eos: bool = False  # min_tokens = max_tokens: the stop tokens never end the answer early


class EngineServer:
    def __init__(
        self, engine: Engine, limits: Limits = Limits(), max_waiting: int | None = None, retry_after_s: int = 1
    ):
        self.engine = engine
        self.limits = limits
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        engine.start()

    # ---- requests ----------------------------------------------------------------------------------------------------
    def build(self, p: GenerationPayload) -> Request:
        """Tokenize and check; raises APIError. Mirrors the batch pipeline's `engine.make_request` path."""
        e, lim = self.engine, self.limits
        try:
            req = e.make_chat_request(p.messages, SamplingParams(max_new_tokens=1), p.request_id)
        except ValueError as err:  # e.g. an unknown role
            raise APIError(400, str(err), "invalid_request", param="messages") from None
        n = len(req.prompt_ids)
        if n > lim.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt is {n} tokens, over the {lim.max_prompt_tokens}-token limit (max_prompt_tokens)",
                "prompt_too_long",
                param="messages",
            )
        context = e.config.max_seq_len
        if p.max_tokens is None:
            new = min(lim.default_max_tokens, context - n)
        else:
            new = p.max_tokens
        if new < 1 or n + new > context:
            raise APIError(
                400,
                f"prompt of {n} tokens + max_tokens {max(new, 1)} is over this model's {context}-token "
                "context; shorten the prompt or lower max_tokens",
                "context_length_exceeded",
                param="max_tokens" if p.max_tokens else "messages",
            )
        req.sampling = SamplingParams(
            max_new_tokens=new,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            stop=tuple(p.stop),
            min_new_tokens=new if p.ignore_eos else min(p.min_tokens, new),
        )
        try:
            e.validate(req)
        except ValueError as err:
            raise APIError(400, str(err), "invalid_request", param="messages") from None
        if self.max_waiting is not None and e.stats()["waiting"] >= self.max_waiting:
            raise APIError(
                503,
                f"the model is at capacity ({self.max_waiting} requests already queued); retry later",
                "engine_queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return req

    async def complete(self, p: GenerationPayload) -> dict:
        try:
            req = self.build(p)
        except APIError as err:
            return err.to_event()
        return _end(await self.engine.complete(req))

    async def stream(self, p: GenerationPayload) -> AsyncIterator[dict]:
        try:
            req = self.build(p)
        except APIError as err:
            yield err.to_event()
            return
        yield {"event": "start", "prompt_tokens": len(req.prompt_ids)}
        deltas = self.engine.stream(req)
        try:
            async for delta in deltas:
                if delta.text:
                    yield {"event": "delta", "text": delta.text}
                if delta.result is not None:
                    yield _end(delta.result)
        finally:  # a consumer that stops early (disconnect, timeout) closes us at a yield: abort in the engine now
            await deltas.aclose()

    # ---- state -------------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {**self.engine.stats(), "max_seq_len": self.engine.config.max_seq_len, "alive": self.alive()}

    def alive(self) -> bool:
        # The loop thread dying means no request will ever finish (it is started in __init__).
        return self.engine.alive

    def check_health(self) -> None:
        if not self.alive():
            raise RuntimeError("the engine loop thread is not running")

    def shutdown(self) -> None:
        self.engine.shutdown()


def _end(r: Result) -> dict:
    if r.finish_reason not in ("stop", "length"):  # "error": a failed engine step; "abort": we never see our own
        return APIError(500, f"generation failed ({r.finish_reason}); see the replica log", "engine_error").to_event()
    return {
        "event": "end",
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
    }
