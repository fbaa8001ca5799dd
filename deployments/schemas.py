"""OpenAI chat-completions wire format (the subset this service speaks) and the OpenAI error body.

Request fields follow https://platform.openai.com/docs/api-reference/chat/create. Unknown fields are ignored (clients
send things like `user` or `metadata`); fields we cannot honour (`n` > 1, tools, logprobs) are refused with a 400
rather than silently dropped. `top_k`, `min_tokens` and `ignore_eos` are extensions with vLLM's meaning (send them
through the client's `extra_body`). Without `temperature` the answer is greedy (the batch pipeline's setting).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    tools: list | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field we cannot honour, or None."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tools are not supported"
        return None


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Body bytes -> request, or APIError(400) naming the first problem."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_request")
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        code = "invalid_role" if param.endswith(".role") else "invalid_request"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(400, f"{param}: {msg}{more}", code, param=param) from None


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
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
) -> dict:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


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
) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
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
