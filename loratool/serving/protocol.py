"""OpenAI's request and response shapes: bodies validated into plain data, answers built back.

Only what a text model can honour is accepted: ``n`` is 1, no ``logprobs``, no tools; anything
else of the wrong type is a 400 naming the field (``param``), as OpenAI answers. Defaults are
OpenAI's (``temperature`` 1, ``top_p`` 1; ``max_tokens`` 16 for completions), so a client gets
what it would elsewhere; send ``temperature: 0`` for greedy decoding.
Errors carry OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .generation import Sampling

MAX_STOP = 4  # OpenAI's limit on stop sequences
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "suffix", "best_of", "logit_bias")


class ApiError(Exception):
    """An HTTP error answered with OpenAI's JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class Request:
    """A validated completion or chat request."""

    kind: str  # "completion" or "chat"
    model: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    sampling: Sampling
    stream: bool
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise bad(f"'{key}' must be a number in [{lo:g}, {hi:g}]", key)
    return float(value)


def _int(body: dict[str, Any], key: str, default: int | None, lo: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise bad(f"'{key}' must be an integer of at least {lo}", key)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return list(stops)


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise bad("only text content parts are supported", f"messages[{i}].content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
    return {"role": message["role"], "content": content}


def parse(kind: str, body: Any, *, max_tokens_limit: int) -> Request:
    """Validate a ``/v1/completions`` (``kind`` "completion") or chat body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required", "model", code="missing_model")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}):
            raise bad(f"'{key}' is not supported by this server", key, code="unsupported")
    if _int(body, "n", 1, 1) != 1:
        raise bad("only n=1 is supported", "n", code="unsupported")
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    if kind == "completion":
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str):
            raise bad("'prompt' must be a string (one prompt per request)", "prompt")
        prompt = raw
        default_max: int | None = 16  # OpenAI's default for completions
        max_key = "max_tokens"
    else:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise bad("'messages' must be a non-empty list", "messages")
        messages = [_content(m, i) for i, m in enumerate(raw)]
        default_max = None  # up to the context length, as OpenAI
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, max_key, default_max, 1)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad(f"'{max_key}' may be at most {max_tokens_limit}", max_key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    seed = _int(body, "seed", None, -(2**63))
    sampling = Sampling(
        max_new_tokens=max_tokens if max_tokens is not None else max_tokens_limit,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        seed=None if seed is None else seed % 2**63,
    )
    return Request(
        kind,
        model,
        prompt,
        messages,
        sampling,
        stream,
        _stop(body),
        bool(options.get("include_usage")),
    )


# -- responses ------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(req: Request, rid: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    """The whole answer of a request that does not stream."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.kind == "completion":
        choice["text"] = text
        obj = "text_completion"
    else:
        choice["message"] = {"role": "assistant", "content": text}
        obj = "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "choices": [choice],
        "usage": use,
    }


def chunk(
    req: Request, rid: str, text: str | None, finish: str | None, *, first: bool = False
) -> dict[str, Any]:
    """One server-sent event of a streamed answer."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.kind == "completion":
        choice["text"] = text or ""
        obj = "text_completion"
    else:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        obj = "chat.completion.chunk"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "choices": [choice],
    }


def usage_chunk(req: Request, rid: str, use: dict[str, int]) -> dict[str, Any]:
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": req.model,
        "choices": [],
        "usage": use,
    }


def model_list(base: str, adapters: list[str], created: int) -> dict[str, Any]:
    """``/v1/models``: the base, then each adapter with the base as its parent (as vLLM)."""
    data = [
        {
            "id": base,
            "object": "model",
            "created": created,
            "owned_by": "loratool",
            "root": base,
            "parent": None,
        }
    ]
    data += [
        {
            "id": a,
            "object": "model",
            "created": created,
            "owned_by": "loratool",
            "root": a,
            "parent": base,
        }
        for a in adapters
    ]
    return {"object": "list", "data": data}
