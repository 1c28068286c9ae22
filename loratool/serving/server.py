"""The HTTP layer: OpenAI's routes on the stdlib ``ThreadingHTTPServer``, answers as OpenAI's.

Routes: ``GET /v1/models``, ``POST /v1/completions`` and ``/v1/chat/completions`` (whole, or as
server-sent events with ``stream``), ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(vLLM's names and bodies, ``{"lora_name", "lora_path"}``), ``GET /health``. ``model`` names the base
or a loaded adapter. Every refusal is OpenAI's JSON error body: 400 malformed or invalid, 401 a
missing or wrong API key, 404 an unknown model or route, 413 a body or prompt over the limits,
429 a full queue or too many connections. Each response closes its connection, so that the
drain on Ctrl-C waits for requests, not for idle keep-alive sockets.
"""

from __future__ import annotations

import hmac
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import LoratoolError
from .base import encode_chat, encode_text
from .engine import Engine, Event, Job
from .generation import Row, TextStream
from .protocol import (
    ApiError,
    Request,
    chunk,
    model_list,
    new_id,
    parse,
    response,
    usage,
    usage_chunk,
)


@dataclass
class Limits:
    max_body: int = 1 << 20  # bytes of a request body
    max_prompt_tokens: int = 4096
    max_connections: int = 64
    timeout: float = 600.0  # seconds a request may wait for its answer


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handlers: the drain
    block_on_close = True

    def __init__(
        self, address: tuple[str, int], engine: Engine, *, api_key: str | None, limits: Limits
    ) -> None:
        super().__init__(address, Handler)
        self.engine = engine
        self.api_key = api_key
        self.limits = limits
        self.created = int(time.time())
        self.connections = threading.BoundedSemaphore(limits.max_connections)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request
    server_version = "loratool"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the command reports; a library handler does not print

    # -- plumbing ------------------------------------------------------------------------------

    def _send_json(self, status: int, doc: Any) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(400, "a Content-Length header is required", code="invalid_request")
        if int(length) > self.server.limits.max_body:
            self._discard(int(length))
            raise ApiError(
                413,
                f"the request body is over {self.server.limits.max_body} bytes",
                code="request_too_large",
            )
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(
                400, f"the request body is not valid JSON: {e}", code="invalid_json"
            ) from None

    def _discard(self, length: int) -> None:
        """Read and drop a body over the limit (up to 16×), so the client reads our 413 rather
        than a reset; past that the connection is closed on it."""
        if length > 16 * self.server.limits.max_body:
            return
        while length > 0:
            got = self.rfile.read(min(length, 1 << 16))
            if not got:
                return
            length -= len(got)

    def _authorised(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or incorrect API key", code="invalid_api_key")

    def _dispatch(self, method: str) -> None:
        if not self.server.connections.acquire(blocking=False):
            self._error(
                ApiError(429, "too many connections", code="rate_limit_exceeded", type="requests")
            )
            return
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health" and method == "GET":
                self._send_json(200, {"status": "ok"})
                return
            routes = {
                ("GET", "/v1/models"): self._models,
                ("POST", "/v1/completions"): lambda: self._generate("completion"),
                ("POST", "/v1/chat/completions"): lambda: self._generate("chat"),
                ("POST", "/v1/load_lora_adapter"): self._load,
                ("POST", "/v1/unload_lora_adapter"): self._unload,
            }
            route = routes.get((method, path))
            if route is None:
                raise ApiError(404, f"no route {method} {path}", code="not_found")
            self._authorised()
            route()
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        finally:
            self.server.connections.release()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- routes --------------------------------------------------------------------------------

    def _models(self) -> None:
        eng = self.server.engine
        self._send_json(200, model_list(eng.base.name, eng.multi.names, self.server.created))

    def _names(self) -> tuple[str, str | None]:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str):
            raise ApiError(400, "'lora_name' is required", code="invalid_value", param="lora_name")
        path = body.get("lora_path")
        if path is not None and not isinstance(path, str):
            raise ApiError(
                400, "'lora_path' must be a string", code="invalid_value", param="lora_path"
            )
        return body["lora_name"], path

    def _load(self) -> None:
        name, path = self._names()
        if not path:
            raise ApiError(400, "'lora_path' is required", code="invalid_value", param="lora_path")
        self.server.engine.load_adapter(name, path)
        self._send_json(200, {"object": "lora_adapter", "id": name, "status": "loaded"})

    def _unload(self) -> None:
        name, _ = self._names()
        self.server.engine.unload_adapter(name)
        self._send_json(200, {"object": "lora_adapter", "id": name, "status": "unloaded"})

    def _generate(self, kind: str) -> None:
        eng, limits = self.server.engine, self.server.limits
        base = eng.base
        req = parse(kind, self._body(), max_tokens_limit=base.max_positions)
        if req.model != base.name and req.model not in eng.multi.names:
            raise ApiError(
                404,
                f"the model '{req.model}' does not exist",
                code="model_not_found",
                param="model",
            )
        try:
            ids = (
                encode_text(base.tokenizer, req.prompt or "")
                if req.messages is None
                else encode_chat(base.tokenizer, req.messages)
            )
        except LoratoolError as e:
            raise ApiError(400, e.message, code=e.code.replace("-", "_")) from None
        room = base.max_positions - len(ids)
        wanted = req.sampling.max_new_tokens
        if (
            len(ids) > limits.max_prompt_tokens
            or room < 1
            or (kind == "completion" and wanted > room)
        ):
            raise ApiError(
                413,
                f"the prompt has {len(ids)} tokens; the limit is "
                f"{min(limits.max_prompt_tokens, base.max_positions - 1)} and the "
                f"context {base.max_positions} with the tokens asked for",
                code="context_length_exceeded",
                param="messages" if req.messages else "prompt",
            )
        sampling = replace(req.sampling, max_new_tokens=min(wanted, room))
        adapter = None if req.model == base.name else req.model
        job = Job(Row(ids, sampling, adapter), TextStream(base.tokenizer), req.stop)
        eng.submit(job)
        rid = new_id(kind)
        try:
            if req.stream:
                self._stream(job, req, rid, len(ids))
            else:
                parts: list[str] = []
                finish, n = self._collect(self._events(job), parts.append)
                self._send_json(200, response(req, rid, "".join(parts), finish, usage(len(ids), n)))
        finally:
            job.cancelled.set()  # a client gone mid-answer frees its row at the next token

    def _events(self, job: Job) -> Iterator[Event]:
        deadline = time.monotonic() + self.server.limits.timeout
        while True:
            try:
                yield job.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ApiError(
                    500, "the answer took too long", code="timeout", type="server_error"
                ) from None

    @staticmethod
    def _collect(events: Iterator[Event], on_delta: Callable[[str], None]) -> tuple[str, int]:
        for kind, value in events:
            if kind == "delta":
                on_delta(value)
            elif kind == "error":
                raise value
            else:
                finish, n = value
                return str(finish), int(n)
        raise AssertionError("the event stream ended without a result")

    def _stream(self, job: Job, req: Request, rid: str, prompt_tokens: int) -> None:
        events = self._events(job)
        first = next(events)
        if first[0] == "error":
            raise first[1]  # before the 200: an ordinary error response
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(doc: Any) -> None:
            self.wfile.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
            self.wfile.flush()

        if req.kind == "chat":
            send(chunk(req, rid, "", None, first=True))
        try:
            finish, n = self._collect(
                itertools.chain([first], events), lambda d: send(chunk(req, rid, d, None))
            )
            send(chunk(req, rid, None if req.kind == "chat" else "", finish))
            if req.include_usage:
                send(usage_chunk(req, rid, usage(prompt_tokens, n)))
        except ApiError as e:
            send(e.body())  # mid-stream: the status is sent already; OpenAI's error event
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
