"""The worker that owns the model: a bounded queue in, batches of mixed adapters out.

HTTP threads ``submit`` jobs; a full queue is refused at once (429) rather than held in memory.
One worker thread takes up to ``max_batch`` waiting jobs, runs them as one batch with each row's
own adapter (``MultiLora``: no swap between requests for different adapters) and pushes each
job's text deltas to its own event queue as tokens come. Stop strings are cut here, holding back
text that may be the start of one. Adapters are added and removed under the same lock as a
batch, so a batch never sees them change; the new adapter is opened and checked against the base
(shapes, kinds, fingerprint) before the lock is taken and anything changes. ``close`` stops new
work and lets the queued and in-flight jobs finish (Ctrl-C drains).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CompatibilityError, LoratoolError
from .generation import Row, TextStream, eos_ids_of, generate, pad_id_of
from .protocol import ApiError

if TYPE_CHECKING:
    from .base import Base
    from .batched import MultiLora

Event = tuple[str, Any]  # ("delta", str) | ("done", (finish_reason, tokens)) | ("error", ApiError)


@dataclass
class Job:
    row: Row
    stream: TextStream
    stop: list[str] = field(default_factory=list)
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    emitted: int = 0  # characters of stream.text already sent
    stopped: bool = False

    def push(self, token: int) -> bool:
        """Decode one token, send what is safe to send; False once a stop string appeared."""
        if self.cancelled.is_set():
            return False
        self.stream.push(token)
        text = self.stream.text
        cut = min(
            (i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self._send(text[:cut])
            self.stopped = True
            return False
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        self._send(text[: len(text) - hold])
        return True

    def finish(self) -> None:
        if not self.stopped and not self.cancelled.is_set():
            self._send(self.stream.text)

    def _send(self, upto: str) -> None:
        if len(upto) > self.emitted:
            self.events.put(("delta", upto[self.emitted :]))
            self.emitted = len(upto)


class Engine:
    """See the module docstring."""

    def __init__(
        self,
        base: Base,
        multi: MultiLora,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        max_adapters: int = 64,
        adapter_dirs: tuple[str, ...] = (),
        allow_hub: bool = False,
    ) -> None:
        self.base = base
        self.multi = multi
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.adapter_dirs = tuple(os.path.realpath(d) for d in adapter_dirs)
        self.allow_hub = allow_hub
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.eos = eos_ids_of(base.model, base.tokenizer)
        self.pad = pad_id_of(base.tokenizer, self.eos)
        self._thread = threading.Thread(target=self._loop, name="loratool-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.closing.is_set():
            raise ApiError(
                503, "the server is shutting down", code="shutting_down", type="server_error"
            )
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429,
                f"too many requests waiting ({self.queue.maxsize}); retry later",
                code="rate_limit_exceeded",
                type="requests",
            ) from None

    def close(self, timeout: float | None = None) -> None:
        """No new jobs; the queued and running ones finish. Returns when the worker is idle."""
        self.closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.closing.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        with self.lock:
            ready = []
            for job in batch:
                if job.row.adapter is not None and job.row.adapter not in self.multi.names:
                    job.events.put(
                        (
                            "error",
                            ApiError(
                                404,
                                f"the model '{job.row.adapter}' was unloaded",
                                code="model_not_found",
                            ),
                        )
                    )
                elif not job.cancelled.is_set():
                    ready.append(job)
            if not ready:
                return
            try:
                done = generate(
                    self.base.model,
                    [j.row for j in ready],
                    eos_ids=self.eos,
                    pad_id=self.pad,
                    on_token=lambda i, tok: ready[i].push(tok),
                    multi=self.multi,
                )
            except Exception as e:  # a bug, or out of memory: every job hears of it
                err = ApiError(
                    500,
                    f"generation failed: {type(e).__name__}: {e}",
                    code="internal_error",
                    type="server_error",
                )
                for job in ready:
                    job.events.put(("error", err))
                return
        for job, result in zip(ready, done, strict=True):
            job.finish()
            job.events.put(("done", (result.finish_reason, len(result.tokens))))

    # -- adapters at run time ------------------------------------------------------------------

    def _allowed(self, path: str) -> str:
        if path.startswith("hf://"):
            if not self.allow_hub:
                raise ApiError(
                    400,
                    "hf:// adapters are not allowed on this server",
                    code="path_not_allowed",
                    param="lora_path",
                )
            return path
        candidates = (
            [path] if os.path.isabs(path) else [os.path.join(d, path) for d in self.adapter_dirs]
        )
        for c in candidates:
            real = os.path.realpath(c)
            if any(real == d or real.startswith(d + os.sep) for d in self.adapter_dirs):
                if not os.path.exists(real):
                    raise ApiError(
                        404, f"no adapter at '{path}'", code="adapter_not_found", param="lora_path"
                    )
                return real
        raise ApiError(
            400,
            "lora_path is outside the directories this server loads from",
            code="path_not_allowed",
            param="lora_path",
        )

    def load_adapter(self, name: str, path: str) -> None:
        from .adapters import check_fits, check_name, resolve

        try:
            check_name(name)
        except LoratoolError as e:
            raise ApiError(400, e.message, code="invalid_value", param="lora_name") from None
        if name == self.base.name or name in self.multi.names:
            raise ApiError(400, f"the name '{name}' is taken", code="name_taken", param="lora_name")
        if len(self.multi.names) >= self.max_adapters:
            raise ApiError(
                400, f"at most {self.max_adapters} adapters may be loaded", code="too_many_adapters"
            )
        real = self._allowed(path)
        try:
            adapter = resolve(real)  # opened, and its tensors read, outside the lock
            check_fits(self.base.model, adapter, where=Path(real).name)
            for t in adapter.targets.values():
                _ = t.lora_A, t.lora_B
            with self.lock:
                self.multi.add(name, adapter)
        except CompatibilityError as e:
            raise ApiError(
                400,
                f"the adapter does not fit the base: {e}",
                code="incompatible_adapter",
                param="lora_path",
            ) from None
        except LoratoolError as e:
            raise ApiError(
                400,
                f"cannot load the adapter: {e}",
                code=e.code.replace("-", "_"),
                param="lora_path",
            ) from None

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.multi.names:
                raise ApiError(
                    404,
                    f"no adapter named '{name}' is loaded",
                    code="model_not_found",
                    param="lora_name",
                )
            self.multi.remove(name)
