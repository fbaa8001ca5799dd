"""OpenAI chat-completions wire format (the subset this service speaks) and the OpenAI error body.

Request fields follow https://platform.openai.com/docs/api-reference/chat/create. Every field is honoured or refused
with a 400 naming it, never silently dropped: `REFUSED` lists what a model side may not do (a field sent with its
neutral value, like `n: 1` or `tool_choice: "none"`, is accepted; `frontend.HONOURED` names those the engine does:
penalties, logit_bias, logprobs, n, response_format), unknown fields are refused too, except the bookkeeping
fields in `IGNORED` (`user`, `metadata`, ...) that change nothing about the answer. `top_k`, `min_tokens` and
`ignore_eos` are extensions with vLLM's meaning (send them through the client's `extra_body`). Without `temperature`
the answer is greedy (the batch pipeline's setting).

The sampling fields become one `SamplingParams` here (`ChatCompletionRequest.sampling_params`), which travels to the
engine as it is; a request field named as a `SamplingParams` field is copied by name, so a new sampling knob is a field
of `ChatCompletionRequest`, a field of `SamplingParams` and its use in the sampler, nothing in between.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.sampling import JSON_OBJECT, SamplingParams

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An answer other than 200, rendered as the OpenAI error body {"error": {message, type, param, code}}.

    `code` is a short stable tag; it is also the `reason` tag of the rejected-requests metric, so keep the set small.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _default_type(status)
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_event(self) -> dict:  # how the model deployment reports it across a handle
        return {
            "event": "error",
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "type": self.type,
            "param": self.param,
        }

    @classmethod
    def from_event(cls, ev: dict, headers: dict[str, str] | None = None) -> APIError:
        return cls(ev["status"], ev["message"], ev["code"], ev.get("type"), ev.get("param"), headers)


def _default_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


# ---- request ---------------------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted and ignored: every page is cut the same way


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: list[ContentPart] = Field(default_factory=list)  # a plain string arrives as one text part
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_content(cls, content):
        if content is None:
            return []
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not supported; use one of {', '.join(ROLES)}")
        return role

    def parts(self) -> list[TextPart | ImagePart]:
        return list(self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Accepted, and changing nothing about the answer: request bookkeeping other servers keep for billing or caching.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by `unsupported` (IGNORED or refused by name)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)  # extension (as vLLM): stop tokens are ignored until this many
    ignore_eos: bool = False  # extension (as vLLM): generate exactly max_tokens (benchmarks, load tests)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what a torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # extension (as vLLM / HF); 1 = off
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64)  # extension (as HF); 0 = off
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # accepted: it means nothing without `tools`, which are refused
    functions: list | None = None
    function_call: str | dict | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def response_format_type(self) -> str:
        return str((self.response_format or {}).get("type", "text"))

    @property
    def json_schema(self) -> dict | str | None:
        kind = self.response_format_type
        if kind == "json_object":
            return JSON_OBJECT
        if kind == "json_schema":
            return self.response_format["json_schema"]["schema"]
        return None

    def sampling_params(self) -> SamplingParams:
        """The request's sampling settings as the engine takes them, checked (APIError 400 naming the parameter).

        Fields named as in SamplingParams are copied as sent, an absent one (None) keeping SamplingParams' default
        (temperature 0: greedy, the batch pipeline's setting); only the fields the client knows by another name or
        shape are spelled out below. The lengths are the client's: what depends on the prompt's length (no max_tokens,
        ignore_eos, min_tokens over the room left) is resolved by EngineServer.build once the prompt is tokenized.
        """
        given = {name: getattr(self, name) for name in SHARED_SAMPLING_FIELDS if getattr(self, name) is not None}
        given |= {
            "max_new_tokens": self.requested_max_tokens,
            "min_new_tokens": self.min_tokens,
            "stop": tuple(self.stop_list),
            "json_schema": self.json_schema,
        }
        try:
            return SamplingParams(**{k: v for k, v in given.items() if v is not None})
        except ValueError as err:
            raise invalid_value(err) from None

    def unsupported(self, honoured: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """(param, message) for the first field this server cannot honour, or None.

        `honoured` names the fields of REFUSED that the model side implements (see frontend.HONOURED)."""
        for name in sorted(self.model_extra or {}):
            if name not in IGNORED:
                return name, f"unknown parameter {name!r}; this server does not implement it"
        for name, (neutral, why) in REFUSED.items():
            if name in honoured:
                continue
            value = getattr(self, name)
            if value is not None and not neutral(value):
                return name, f"{name} is not supported by this server: {why}"
        return None


# Request fields that are SamplingParams fields of the same name and meaning: `sampling_params` copies them by name.
SHARED_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) & frozenset(
    ChatCompletionRequest.model_fields
)
# SamplingParams / Engine.validate messages start with the field they are about; the client knows these by other names.
_CLIENT_NAMES = {"json_schema": "response_format", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def invalid_value(err: ValueError) -> APIError:
    """A value SamplingParams or Engine.validate refused -> 400 naming the request's parameter."""
    m = re.match(r"[a-z_]+", str(err))
    name = m.group() if m else ""
    param = "messages" if name in ("prompt", "empty", "") else _CLIENT_NAMES.get(name, name)
    return APIError(400, str(err), "invalid_request", param=param)


def _is(*values):
    return lambda v: v in values


# field -> (value that means "off", why it is refused). Fields a model side honours are skipped (see `unsupported`).
REFUSED = {
    "n": (_is(1), "only one choice per request (n=1)"),
    "presence_penalty": (_is(0), "penalties are not implemented by this engine"),
    "frequency_penalty": (_is(0), "penalties are not implemented by this engine"),
    "repetition_penalty": (_is(1), "penalties are not implemented by this engine"),
    "no_repeat_ngram_size": (_is(0), "n-gram bans are not implemented by this engine"),
    "logit_bias": (lambda v: not v, "logit_bias is not implemented by this engine"),
    "logprobs": (_is(False), "logprobs are not implemented by this engine"),
    "top_logprobs": (_is(0), "logprobs are not implemented by this engine"),
    "response_format": (
        lambda v: v.get("type", "text") == "text",
        "constrained (JSON) output is not implemented by this engine; ask for JSON in the prompt",
    ),
    "tools": (lambda v: not v, "tool calling is not supported by InfiMM-HD (a page reader with no tool-call format)"),
    "tool_choice": (_is("none"), "tool calling is not supported by InfiMM-HD"),
    "functions": (lambda v: not v, "function calling is not supported by InfiMM-HD"),
    "function_call": (_is("none"), "function calling is not supported by InfiMM-HD"),
}

MAX_JSON_DEPTH = 32  # a chat request nests about 6 deep; deeper is refused before anything walks it
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe a lone surrogate


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Body bytes -> request, or APIError(400) naming the first problem."""
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(
            400, f"request body nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}", "invalid_json"
        )
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_request")
    if _SURROGATE_ESCAPE.search(raw):  # json.loads joins valid pairs; only a lone half survives as a str
        where = _lone_surrogate(obj)
        if where is not None:
            raise APIError(
                400,
                f"{where or 'body'}: text contains a lone UTF-16 surrogate (not valid Unicode)",
                "invalid_json",
                param=where or None,
            )
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        code = "invalid_role" if param.endswith(".role") else "invalid_request"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"{param}: {msg}{more}", code, param=param) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings (no recursion, no objects built; ~10 ns per byte)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the brackets it has
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def _lone_surrogate(obj) -> str | None:
    """Path of the first string (value or key) that is not valid Unicode, or None; iterative (depth is bounded
    already, but a walk must not be the thing that recurses)."""
    stack = [("", obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            if not _encodable(x):
                return path
        elif isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                if not _encodable(k):
                    return path or "body"
                stack.append((sub, v))
        elif isinstance(x, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(x))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _param(loc: tuple) -> str:
    """pydantic's error location -> `messages[0].content[1].image_url.url`."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "content" and isinstance(loc[i - 1], int) and part in ("text", "image_url"):
            continue  # the discriminated union's tag, not a field the client wrote
        else:
            out += ("." if out else "") + str(part)
    return out


# ---- response --------------------------------------------------------------------------------------------------------
def completion_body(
    request_id: str,
    model: str,
    choices: list[dict],
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
) -> dict:
    """choices: [{"text", "finish_reason", "logprobs" (a list of token entries, or None)}], one per `n`."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": logprobs_body(c.get("logprobs")),
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def logprobs_body(entries: list[dict] | None) -> dict | None:
    """Engine logprob entries -> OpenAI's `logprobs` object ({"content": [...], "refusal": None})."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e["token"],
                "logprob": _finite(e["logprob"]),
                "bytes": e["bytes"],
                "top_logprobs": [
                    {"token": t["token"], "logprob": _finite(t["logprob"]), "bytes": t["bytes"]}
                    for t in e.get("top_logprobs", [])
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _finite(x: float) -> float:
    return x if x > -9999.0 else -9999.0  # OpenAI's floor for "impossible"; JSON has no -inf


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk_body(
    request_id: str,
    model: str,
    created: int,
    delta: dict | None = None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
    logprobs: list[dict] | None = None,
) -> dict:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": logprobs_body(logprobs), "finish_reason": finish_reason}]
    )
    body = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
