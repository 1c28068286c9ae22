"""``merge``: weighted adapters added to a checkpoint (streamed to disk) or to a state dict."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..stream import rewrite_metadata
from .compute import Context, Outcome
from .output import shard_namer
from .pipeline import one_thread, stream_files
from .prepare import Prepared, finish, in_memory, prepare, written
from .provenance import read_records, record_id, roundtrip_stats, shard_metadata_with, tool_version
from .report import MergeReport, Progress, add_warnings
from .sidecar import Sidecar, Spool, encode_corrections, sidecar_file_name, write_sidecar_file
from .vocab import config_changes, write_config

if TYPE_CHECKING:
    import torch


@one_thread()  # one intra-op thread for the whole call (see pipeline.one_thread)
def merge(
    base: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    dtype: str = "keep",
    device: str = "auto",
    reversible: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge ``adapters`` (weighted) into ``base`` and write the result to ``out``.

    ``base`` is a checkpoint directory, a ``.safetensors`` file, or a state dict; for a state dict
    nothing is written and the merged tensors come back in ``report.state_dict`` (untouched
    tensors are the input's own objects), and ``reversible`` puts the sidecar in
    ``report.sidecar``. Every compatibility check runs before anything is written; ``force``
    accepts a differing base fingerprint and replaces an existing ``out``.
    """
    started = time.perf_counter()
    p = prepare(
        "merge",
        base,
        adapters,
        out,
        weights=weights,
        dtype=dtype,
        device=device,
        reversible=reversible,
        force=force,
    )
    ckpt, jobs = p.ckpt, p.jobs
    previous = [] if p.memory else read_records(ckpt)
    sidecar_name: str | None = None
    if reversible:
        single = p.out if not p.memory and not ckpt.is_dir else None
        sidecar_name = "memory" if p.memory else sidecar_file_name(single, len(previous) + 1)
    record: dict[str, Any] = {
        "op": "merge",
        "tool": f"loratool {tool_version()}",
        "adapters": [i.entry() for i in p.inputs],
        "dtype": dtype,
        "dtype_changes": {k: j.in_dtype for k, j in jobs.items() if j.out_dtype != j.in_dtype},
        "product": _product(p.device, reversible),
        "reversible": sidecar_name,
    }
    if not p.memory:  # a state dict has no shard metadata to add "format" to
        record["format_added"] = not any("format" in m for m in ckpt.shard_metadata.values())
    record["id"] = record_id(record)
    ctx = p.context(
        precise=record["product"] == "fp64",
        progress=progress,
        roundtrip=True,
        collect=reversible,
        hash_in=reversible,
    )
    outcome = Outcome()
    report = MergeReport(
        "merge",
        p.where,
        None if p.out is None else str(p.out),
        record["adapters"],
        dtype,
        p.device,
        [],
        record,
        sidecar_name=sidecar_name,
    )
    sizes = None
    if p.memory:
        report.state_dict = in_memory(p, jobs, ctx, outcome)
        record["roundtrip"] = roundtrip_stats(outcome.reports)
        if reversible:
            tensors: dict[str, torch.Tensor] = {}
            for key, idx, val in outcome.sidecar_parts:
                tensors.update(encode_corrections(key, idx, val))
            report.sidecar = Sidecar(tensors, outcome.hashes, record["id"])
            report.sidecar_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        sizes = _write(p, [*previous, record], ctx, outcome, report)
    finish(report, p, outcome, sizes)
    report.seconds = time.perf_counter() - started
    add_warnings(report)
    return report


def _write(
    p: Prepared,
    records: list[dict[str, Any]],
    ctx: Context,
    outcome: Outcome,
    report: MergeReport,
) -> dict[str, int]:
    """Stream the merged shards to disk, then the final record (with the round-trip counts) into
    their metadata and, for a reversible merge, the sidecar; the last record is this merge's."""
    ckpt, out_path, record = p.ckpt, p.out, records[-1]
    assert out_path is not None
    add_format = bool(record["format_added"])
    sidecar_name = record["reversible"]

    def metadata(shard: Path) -> dict[str, str]:
        return shard_metadata_with(ckpt.shard_metadata[shard], records, add_format=add_format)

    namer = shard_namer(ckpt, out_path)
    changes = config_changes(p.jobs)  # a grown vocabulary, an untied head (vocab.py)
    skip = {"config.json"} if changes and ckpt.is_dir else set()
    with written(p, p.jobs, report, skip=skip) as dest:
        if skip:
            write_config(ckpt, dest, changes)
        if sidecar_name is not None:
            # In the output's temp dir, so a killed merge's spool goes with it (_io, leftovers).
            fd, spool_path = tempfile.mkstemp(prefix=".", suffix=".spool", dir=dest)
            os.close(fd)
            os.unlink(spool_path)
            outcome.spool = Spool(Path(spool_path))
        try:
            sizes = stream_files(ckpt, p.jobs, dest, ctx, outcome, metadata, namer, reserve=512)
            record["roundtrip"] = roundtrip_stats(outcome.reports)
            for shard in ckpt.shards:  # the final record, with the round-trip counts
                rewrite_metadata(dest / namer(shard), metadata(shard))
            if outcome.spool is not None and sidecar_name is not None:
                sidecar = Sidecar({}, outcome.hashes, record["id"])
                target = dest / sidecar_name if ckpt.is_dir else out_path.parent / sidecar_name
                report.sidecar_bytes = write_sidecar_file(
                    outcome.spool, target, sidecar.metadata(), force=p.force
                )
        finally:
            if outcome.spool is not None:
                outcome.spool.close()
    return sizes


def _product(device: str, reversible: bool) -> str:
    """The precision of ΔW's matrix product, recorded so unmerge repeats it exactly.

    fp64 (rounded once to fp32: the correctly rounded ΔW on any BLAS, device or thread count) on
    CUDA — where it is free and sidesteps TF32 — and whenever a sidecar must match bit for bit
    across devices; a plain fp32 product on the CPU otherwise, where fp64 costs about 2×.
    """
    return "fp64" if reversible or device == "cuda" else "fp32"
