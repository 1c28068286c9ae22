"""A loopback Hub (tests/hub_server.py) whose file downloads misbehave on request.

``FaultyHub.break_file(kind, path, ...)`` makes answers for ``/resolve/.../PATH`` misbehave:

- ``"stall"``: send the headers and ``after`` bytes of the body, then nothing for ``seconds``
  (past the client's timeout), then close;
- ``"stall-headers"``: accept the request and answer nothing for ``seconds`` (any route: the
  pattern is matched against ``"METHOD /path"``, so ``/api/...`` calls can stall too);
- ``"drop"``: send the headers (the full Content-Length) and ``after`` bytes, then close;
- ``"short"``: a complete answer whose Content-Length and body stop after ``after`` bytes,
  while X-Linked-Size still names the whole file (a truncated object behind a CDN);
- ``"size"``: announce ``size + delta`` bytes in X-Linked-Size (the body is the real file);
- ``"etag"``: name another sha256 in the ETag and X-Linked-Etag (the body is the real file);
- ``"flip"``: send the real headers and the body with one bit flipped (damage in flight);
- ``"redirect"``: 302 to the same URL, for ever (a redirect loop).

Each fault applies to the methods given (GET by default) ``times`` times (None: for ever).
Everything else behaves as HubServer does; the base server's own knobs still work.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from hub_server import HubServer, _Dropped, _Handler

KINDS = ("stall", "stall-headers", "drop", "short", "size", "etag", "flip", "redirect")


@dataclass
class FileFault:
    kind: str
    pattern: re.Pattern[str]
    methods: tuple[str, ...]
    times: int | None
    after: int
    seconds: float
    delta: int


class FaultyHub(HubServer):
    """HubServer plus ``break_file``; ``stop()`` also wakes every stalled answer."""

    def __init__(self, *, upload_mode: str = "lfs") -> None:
        super().__init__(upload_mode=upload_mode)
        self.file_faults: list[FileFault] = []
        self.released = threading.Event()

    def start(self, port: int = 0) -> FaultyHub:
        handler = type("FaultyHandler", (_FaultyHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        super().stop()

    def break_file(
        self,
        kind: str,
        pattern: str,
        *,
        methods: tuple[str, ...] = ("GET",),
        times: int | None = None,
        after: int = 100,
        seconds: float = 30.0,
        delta: int = 0,
    ) -> None:
        assert kind in KINDS, kind
        with self.lock:
            self.file_faults.append(
                FileFault(kind, re.compile(pattern), methods, times, after, seconds, delta)
            )

    def clear_faults(self) -> None:
        super().clear_faults()
        with self.lock:
            self.file_faults.clear()

    def take(self, method: str, path: str, *, resolve: bool) -> FileFault | None:
        """The first fault for this request (its count used up by one), or None."""
        with self.lock:
            for f in self.file_faults:
                if (f.kind == "stall-headers") is resolve:
                    continue  # stall-headers is taken before routing, the others in _resolve
                if method not in f.methods or (f.times is not None and f.times <= 0):
                    continue
                if not f.pattern.search(f"{method} {path}"):
                    continue
                if f.times is not None:
                    f.times -= 1
                return f
        return None


class _FaultyHandler(_Handler):
    hub: FaultyHub

    def _route(self, method: str, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        f = self.hub.take(method, raw_path.split("?", 1)[0], resolve=False)
        if f is not None:  # stall-headers: say nothing, then hang up
            self.hub.released.wait(f.seconds)
            raise _Dropped
        return super()._route(method, raw_path)

    def _resolve(
        self, method: str, repo_id: str, rev: str, path: str
    ) -> tuple[int, dict[str, str], bytes]:
        status, headers, data = super()._resolve(method, repo_id, rev, path)
        f = self.hub.take(method, self.path.split("?", 1)[0], resolve=True)
        if f is None:
            return status, headers, data
        if f.kind == "redirect":
            return 302, {"Location": self.path, "X-Repo-Commit": headers["X-Repo-Commit"]}, b""
        if f.kind == "size":
            size = int(headers.get("X-Linked-Size", len(data))) + f.delta
            headers["X-Linked-Size"] = str(size)
            return status, headers, data
        if f.kind == "etag":
            other = hashlib.sha256(b"not this file" + data).hexdigest()
            headers["ETag"] = headers["X-Linked-Etag"] = f'"{other}"'
            return status, headers, data
        if f.kind == "flip":
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x01
            return status, headers, bytes(flipped)
        if f.kind == "short":
            cut = data[: f.after]
            headers["Content-Length"] = str(len(cut))
            return status, headers, cut
        # stall / drop: the real headers, part of the body, then silence or a hang-up.
        self._partial(status, headers, data[: f.after])
        if f.kind == "stall":
            self.hub.released.wait(f.seconds)
        raise _Dropped

    def _partial(self, status: int, headers: dict[str, Any], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
