"""The streaming pipeline: worker threads (and a reader thread) over the shards, bounded memory.

On the CPU each low-rank weight is one worker's job, done a cache-sized block of rows at a
time (``compute.compute_in_blocks``): ``pread`` a block, merge it in place, ``pwrite`` it at its
planned offset (one page-cache writer at a time), so memory holds a few blocks per worker,
whatever the size of the weights, the shards or the model. Untouched tensors go file to file
(``copy_file_range``). Jobs that need whole tensors (DoRA and other dense terms, sidecar
corrections, CUDA) take the other road: a reader thread ``pread``s them ahead into reusable
buffers (pinned on CUDA, where it also uploads them on its own stream), and a worker computes
and writes each; that costs a few copies of the largest such weight (workers + 1; 2 × workers
+ 1 where the dtype changes or on CUDA). Nothing is memory-mapped.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import ALL_DTYPES, Checkpoint
from ..errors import FormatError
from ..stream import SafetensorsWriter, TensorSpec, aligned_order, byte_view
from .compute import Context, Outcome, compute_in_blocks, compute_job, sha256_of
from .delta import DeltaResult, check_finite
from .dense import needs_dense
from .plan import Job, job_nbytes
from .report import ProgressEvent
from .vocab import shard_names_of

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for our CPU work: the reader and writer threads use the other cores,
    and OpenMP regions over small blocks collapse when a shared machine is oversubscribed
    (measured here: 10× slower with 2 threads at load 8 on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the streaming loop: its blocks make and drop
    thousands of tensors and arrays (freed by reference counting; none is in a cycle), and each
    allocation burst set off a collection walking every object of the process (measured with
    perf: 6% of a 0.85B merge's CPU). Restored afterwards, if it was on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Pool:
    """A fixed set of byte buffers (pinned for CUDA); ``get`` blocks, which bounds memory.

    ``close`` wakes every waiter with an error, so a failure anywhere cannot leave a thread
    waiting for a buffer that will never come back.
    """

    def __init__(self, n: int, nbytes: int, *, pin: bool) -> None:
        import torch

        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._closed = threading.Event()
        for _ in range(n):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def get(self) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if self._closed.is_set():
                    raise RuntimeError("buffer pool closed") from None

    def close(self) -> None:
        self._closed.set()

    def put(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def _view(buf: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    from ..checkpoint import torch_dtype_of

    n = math.prod(shape) * ALL_DTYPES[dtype]
    return buf[:n].view(torch_dtype_of(dtype)).view(shape)


@no_gc()
def stream_files(
    base: Checkpoint,
    jobs: dict[str, Job],
    tmp: Path,
    ctx: Context,
    outcome: Outcome,
    metadata_for: Callable[[Path], dict[str, str]],
    out_name: Callable[[Path], str],
    *,
    reserve: int = 0,
) -> dict[str, int]:
    """Write every shard of ``base`` into ``tmp`` with ``jobs`` applied; returns bytes per shard.

    A reader thread ``pread``s targeted weights ahead (on CUDA it also uploads them, on its own
    stream, so uploads overlap compute); worker threads apply the delta and ``pwrite`` the result
    at its planned offset, or copy untouched tensors file to file. Each worker runs single-threaded
    torch ops on its own tensor: parallel without fine-grained OpenMP synchronisation. Buffers
    come from fixed pools, which bounds memory at a few copies of the largest targeted weight.
    The cyclic collector is paused throughout (``no_gc``).
    """
    import torch

    cuda = ctx.device == "cuda"
    workers = _workers()
    shard_names = shard_names_of(base, jobs)
    order = [name for shard in base.shards for name in shard_names[shard]]
    blockwise = {n for n in order if jobs[n].targeted and _blockwise(jobs[n], ctx)}
    targeted = [n for n in order if jobs[n].targeted and n not in blockwise]
    queued = threading.BoundedSemaphore(2 * workers)  # blockwise jobs submitted, not yet done
    biggest_in = max((job_nbytes(jobs[n], jobs[n].in_dtype) for n in targeted), default=1)
    biggest_out = max(
        (job_nbytes(jobs[n], jobs[n].out_dtype, out=True) for n in targeted), default=1
    )
    in_pool = _Pool(workers + 1, biggest_in, pin=cuda)
    out_pool = _Pool(workers, biggest_out, pin=cuda)
    upload = torch.cuda.Stream() if cuda else None

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        buf = in_pool.get()
        size = job_nbytes(jobs[name], jobs[name].in_dtype)
        base.read_into(jobs[name].read_key, byte_view(buf[:size]))
        digest = hashlib.sha256(byte_view(buf[:size])).hexdigest() if ctx.hash_in else None
        W = _view(buf, jobs[name].in_dtype, jobs[name].shape)
        if upload is None:
            return W, buf, digest
        with torch.cuda.stream(upload):
            Wd = W.to(ctx.device, non_blocking=True)
        upload.synchronize()  # only this thread waits; the pinned buffer is free again
        in_pool.put(buf)
        return Wd, None, digest

    def process(
        w: SafetensorsWriter,
        job: Job,
        W: torch.Tensor,
        buf: torch.Tensor | None,
        obuf: torch.Tensor | None,
    ) -> None:
        try:
            if obuf is None:  # in place, over the weight just read (apply_delta allows it)
                out = W
                _in_place(job, W, ctx, outcome, base)
            elif cuda:
                out = _view(obuf, job.out_dtype, job.out_shape)
                stream = _thread_stream()
                with torch.cuda.stream(stream):
                    od = torch.empty(job.out_shape, dtype=out.dtype, device=ctx.device)
                    compute_job(job, W, od, ctx, outcome)
                    out.copy_(od, non_blocking=True)
                stream.synchronize()  # this worker waits for its download; the other computes
            else:
                out = _view(obuf, job.out_dtype, job.out_shape)
                compute_job(job, W, out, ctx, outcome)
            if buf is not None and obuf is not None:
                in_pool.put(buf)
                buf = None
            with _WRITE:
                w.write(job.key, out)
            if ctx.hash_out:
                outcome.hashes[job.key] = sha256_of(out)
        finally:
            if buf is not None:
                in_pool.put(buf)
            if obuf is not None:
                out_pool.put(obuf)

    reader = ThreadPoolExecutor(1, thread_name_prefix="loratool-read")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="loratool-merge")
    fds = {shard: os.open(shard, os.O_RDONLY) for shard in base.shards}
    reads: deque[Future[tuple[torch.Tensor, torch.Tensor | None, str | None]]] = deque()
    upcoming = iter(targeted)

    def read_ahead() -> None:
        while len(reads) < 2:
            name = next(upcoming, None)
            if name is None:
                return
            reads.append(reader.submit(read, name))

    sizes: dict[str, int] = {}
    open_shards: deque[tuple[SafetensorsWriter, list[Future[None]]]] = deque()
    try:
        read_ahead()
        for si, shard in enumerate(base.shards):
            names = shard_names[shard]
            specs = aligned_order(
                [TensorSpec(n, jobs[n].out_dtype, jobs[n].out_shape) for n in names]
            )
            fname = out_name(shard)
            w = SafetensorsWriter(tmp / fname, specs, metadata_for(shard), reserve=reserve)
            total, done = w.size - len(w.head), 0
            tasks: list[Future[None]] = []
            open_shards.append((w, tasks))
            for name in names:
                job = jobs[name]
                if name in blockwise:
                    queued.acquire()  # bounds the queue, so progress follows the work
                    tasks.append(pool.submit(_in_blocks, w, job, base, ctx, outcome, queued))
                elif job.targeted:
                    W, buf, digest = reads.popleft().result()
                    read_ahead()
                    if digest is not None:
                        outcome.hashes[name] = digest
                    # An output buffer where the dtype changes or the result comes back from
                    # the GPU (blocks while every worker is busy: bounded memory); else in place.
                    inplace = not cuda and job.out_dtype == job.in_dtype and not job.reshaped
                    obuf = None if inplace else out_pool.get()
                    tasks.append(pool.submit(process, w, job, W, buf, obuf))
                    del W, buf
                elif job.out_dtype == job.in_dtype:
                    e = base.entries[job.read_key]
                    tasks.append(
                        pool.submit(_copy, w, name, fds[shard], e.data_start + e.info.begin)
                    )
                else:
                    tasks.append(pool.submit(_cast, w, base, name, job))
                done += job_nbytes(job, job.out_dtype, out=True)
                if ctx.progress is not None:
                    ctx.progress(ProgressEvent(fname, si, len(base.shards), done, total, name))
                while len(open_shards) > 1 and all(t.done() for t in open_shards[0][1]):
                    _finish(*open_shards.popleft())  # an earlier shard, fully submitted
            sizes[fname] = w.size
        while open_shards:
            _finish(*open_shards.popleft())
    finally:
        in_pool.close()
        out_pool.close()
        pool.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        for (
            w,
            _tasks,
        ) in open_shards:  # after an error: an open fd would pin a deleted file's blocks
            w.abort()
        for fd in fds.values():
            os.close(fd)
    return sizes


def _finish(w: SafetensorsWriter, tasks: list[Future[None]]) -> None:
    try:
        for t in tasks:
            t.result()  # re-raises a worker's error
    except BaseException:
        w.abort()  # popped from open_shards already: nobody else will close it
        raise
    w.close()


def _blockwise(job: Job, ctx: Context) -> bool:
    """Whether a job streams block by block (``_in_blocks``): CPU low-rank jobs without sidecar
    corrections (those come with ``hash_out``); dense ones need whole tensors, CUDA big ones."""
    return ctx.device == "cpu" and not ctx.hash_out and not needs_dense(job)


def _in_blocks(
    w: SafetensorsWriter,
    job: Job,
    base: Checkpoint,
    ctx: Context,
    outcome: Outcome,
    queued: threading.BoundedSemaphore,
) -> None:
    """``compute_in_blocks`` from ``base``'s file into ``w``'s, one page-cache writer at a time."""

    fd = -1  # the base's shard, opened once per weight (not per block)

    def read(view: memoryview, offset: int) -> None:
        base.read_into(job.read_key, view, offset=offset, fd=fd)

    def write(offset: int, block: torch.Tensor | memoryview) -> None:
        with _WRITE:
            w.write_part(job.key, offset, block)

    def reread() -> tuple[torch.Tensor, bytes]:
        return base.read(job.read_key), w.read_back(job.key)

    try:
        fd = os.open(base.shard_of(job.read_key), os.O_RDONLY)
        compute_in_blocks(job, read, write, reread, ctx, outcome)
    finally:
        if fd >= 0:
            os.close(fd)
        queued.release()


def _workers() -> int:
    """Compute threads: one per usable core, at least 2 (so I/O overlaps) and at most 4 (each
    holds two weight-sized buffers; memory-bound work gains little from more)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    return max(2, min(cores, 4))


_local = threading.local()  # per worker thread: its CUDA stream (_thread_stream)


def _thread_stream() -> Any:
    """This worker thread's own CUDA stream (created once)."""
    import torch

    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream()
    return stream


def _in_place(job: Job, W: torch.Tensor, ctx: Context, outcome: Outcome, base: Checkpoint) -> None:
    """``compute_job`` with the result written over ``W`` (no second weight-sized buffer).

    Only telling a NaN/Inf in the base from an overflow needs the original weight once it is
    overwritten: that rare refusal reads it again from the base file.
    """
    try:
        compute_job(job, W, W, ctx, outcome)
    except FormatError as e:
        if e.code != "non-finite":
            raise
        check_finite(job, base.read(job.read_key), W, DeltaResult([math.nan] * 3), ctx.where)
        raise


# One writer into the page cache at a time: two threads writing one file contend for its inode
# lock, and the kernel's lock spins on the other core (measured: twice the system CPU of the
# writes with 2 workers, against one). Compute still overlaps: a worker waits here, not spins.
_WRITE = threading.Lock()


def _copy(w: SafetensorsWriter, name: str, fd: int, pos: int) -> None:
    """An untouched tensor, file to file in the kernel (no decode, no user memory)."""
    with _WRITE:
        w.copy_from(name, fd, pos)


def _cast(w: SafetensorsWriter, base: Checkpoint, name: str, job: Job) -> None:
    """Copy an untouched tensor into another float dtype, a few MB at a time."""
    import torch

    from ..checkpoint import torch_dtype_of

    size_in, size_out = ALL_DTYPES[job.in_dtype], ALL_DTYPES[job.out_dtype]
    n = math.prod(job.shape)
    chunk = max(1, (8 << 20) // size_in)
    buf = bytearray(min(n, chunk) * size_in)
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        view = memoryview(buf)[: k * size_in]
        base.read_into(job.read_key, view, offset=start * size_in)
        x = torch.frombuffer(view, dtype=torch_dtype_of(job.in_dtype))
        y = x.to(torch_dtype_of(job.out_dtype))
        with _WRITE:
            w.write_part(name, start * size_out, y)
