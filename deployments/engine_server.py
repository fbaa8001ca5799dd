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

import asyncio
import dataclasses
import logging
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from model.engine import Engine, Request, Result
from model.processor import ChatMessage
from model.sampling import SamplingParams
from model.windows import PageViews

from .config import Limits
from .schemas import APIError, invalid_value

log = logging.getLogger(__name__)


@dataclass
class GenerationPayload:
    """A chat request the ingress has checked: images are already PageViews, the sampling settings one SamplingParams
    (`ChatCompletionRequest.sampling_params`). What depends on the prompt's length is resolved by `EngineServer.build`:
    `sampling.max_new_tokens` and `min_new_tokens` there become the answer's real bounds."""

    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: limits.default_max_tokens, capped by the room left in the context
    ignore_eos: bool = False  # min_new_tokens = max_tokens: the stop tokens never end the answer early
    n: int = 1  # choices; they share the page encoding (Engine.fork)

    # Across the Ray handle the cut views travel as numpy uint8 arrays, which Ray passes out of band (zero-copy through
    # the object store); a torch tensor would be pickled in band through torch.save (~4 ms per MB on this machine).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["messages"] = [(m.role, [_to_wire(x) for x in m.parts]) for m in self.messages]
        return state

    def __setstate__(self, state: dict) -> None:
        state["messages"] = [ChatMessage(role, [_from_wire(x) for x in parts]) for role, parts in state["messages"]]
        self.__dict__.update(state)


def _to_wire(part):
    if isinstance(part, PageViews):
        return ("page", part.views.numpy(), part.rows, part.cols, part.width, part.height, part.key)
    return part


def _from_wire(part):
    if isinstance(part, tuple) and part and part[0] == "page":
        _, views, rows, cols, width, height, key = part
        with warnings.catch_warnings():  # the object store's buffer is read-only; nothing writes to the views
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(views)
        return PageViews(tensor, rows, cols, width, height, key)
    return part


class EngineServer:
    def __init__(
        self, engine: Engine, limits: Limits = Limits(), max_waiting: int | None = None, retry_after_s: int = 1
    ):
        self.engine = engine
        self.limits = limits
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        # Tokenizing runs here, off the replica's event loop (which every request and health check shares); two
        # threads bound how much CPU tokenizing can take from the engine loop.
        self._tokenize = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        vocab = engine.processor.tokenizer.get_vocab()
        self.max_chars_per_token = max(len(piece) for piece in vocab)  # no token covers more characters of text
        engine.start()

    # ---- requests ----------------------------------------------------------------------------------------------------
    def build(self, p: GenerationPayload) -> Request:
        """Tokenize and check; raises APIError. Mirrors the batch pipeline's `engine.make_request` path."""
        e, lim = self.engine, self.limits
        chars = sum(len(x) for m in p.messages for x in m.parts if isinstance(x, str))
        if chars > lim.max_prompt_tokens * self.max_chars_per_token:  # certainly too long: do not tokenize it
            raise APIError(
                400,
                f"prompt of {chars} characters is over the {lim.max_prompt_tokens}-token limit (max_prompt_tokens)",
                "prompt_too_long",
                param="messages",
            )
        try:
            req = e.make_chat_request(p.messages, p.sampling, p.request_id)
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
        try:  # only the lengths change; every other setting reaches the engine as the ingress built it
            req.sampling = dataclasses.replace(
                req.sampling,
                max_new_tokens=new,
                min_new_tokens=new if p.ignore_eos else min(req.sampling.min_new_tokens, new),
            )
            e.validate(req)  # once per request: the engine sees the stamp and does not check it again when queued
        except ValueError as err:
            raise invalid_value(err) from None
        if self.max_waiting is not None and e.stats()["waiting"] >= self.max_waiting:
            raise APIError(
                503,
                f"the model is at capacity ({self.max_waiting} requests already queued); retry later",
                "engine_queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return req

    async def build_async(self, p: GenerationPayload) -> Request:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, self.build, p)

    async def complete(self, p: GenerationPayload) -> dict:
        try:
            req = await self.build_async(p)
        except APIError as err:
            return err.to_event()
        choices = self.engine.fork(req, p.n) if p.n > 1 else [req]
        # cancelling this (timeout, disconnect) cancels every choice's engine.complete, which aborts it
        return _end(list(await asyncio.gather(*(self.engine.complete(r) for r in choices))))

    async def stream(self, p: GenerationPayload) -> AsyncIterator[dict]:
        try:
            req = await self.build_async(p)
        except APIError as err:
            yield err.to_event()
            return
        yield {"event": "start", "prompt_tokens": len(req.prompt_ids)}
        deltas = self.engine.stream(req)
        try:
            async for delta in deltas:
                if delta.text or delta.logprobs:  # logprobs of tokens whose text is held back come with them
                    yield {"event": "delta", "text": delta.text, "logprobs": _logprobs(delta.logprobs)}
                if delta.result is not None:
                    yield _end([delta.result])
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
        self._tokenize.shutdown(wait=False, cancel_futures=True)


def _logprobs(entries) -> list[dict] | None:
    return None if entries is None else [dataclasses.asdict(x) for x in entries]


def _end(results: list[Result]) -> dict:
    """The choices of one request (n of them) -> the end event; any failed choice fails the request."""
    for r in results:
        if r.finish_reason not in ("stop", "length"):  # "error": a failed engine step; "abort": we never see our own
            return APIError(
                500, f"generation failed ({r.finish_reason}); see the replica log", "engine_error"
            ).to_event()
    first = results[0]
    return {
        "event": "end",
        "text": first.text,
        "finish_reason": first.finish_reason,
        "choices": [
            {"text": r.text, "finish_reason": r.finish_reason, "logprobs": _logprobs(r.logprobs)} for r in results
        ],
        "prompt_tokens": first.prompt_tokens,  # the prompt is counted once, as OpenAI does for n > 1
        "completion_tokens": sum(r.completion_tokens for r in results),
    }
