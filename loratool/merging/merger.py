"""``merge``: weighted adapters added to a checkpoint (streamed to disk) or to a state dict."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..stream import rewrite_metadata
from .compute import Context, Outcome, memory_loop
from .inputs import MemoryCheckpoint, digest_inputs, open_inputs, resolve_device
from .output import check_paths, copy_other_files, output_dest, shard_namer, write_layout
from .pipeline import one_thread, stream_files
from .plan import check_reversible_dtypes, dtype_rule, module_names, plan_jobs
from .provenance import read_records, record_id, roundtrip_stats, shard_metadata_with, tool_version
from .report import MergeReport, Progress, add_warnings
from .sidecar import Sidecar, Spool, encode_corrections, sidecar_file_name, write_sidecar_file

if TYPE_CHECKING:
    import torch


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

    with one_thread():
        return _merge(
            base,
            adapters,
            out,
            weights=weights,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            progress=progress,
        )


def _merge(
    base: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None,
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
    progress: Progress | None,
) -> MergeReport:
    import torch

    started = time.perf_counter()
    if isinstance(base, Mapping):
        if out is not None:
            raise UsageError("a state-dict merge returns its result; out must be None")
        return _merge_memory(
            base,
            adapters,
            weights=weights,
            dtype=dtype,
            device=device,
            reversible=reversible,
            force=force,
            started=started,
        )
    if out is None:
        raise UsageError("no output path", hint="pass -o OUT")
    base_path, out_path = Path(base), Path(out)
    check_paths(base_path, out_path, force=force)
    rule = dtype_rule(dtype)
    dev = resolve_device(device)
    ckpt = Checkpoint(base_path)
    inputs = open_inputs(adapters, weights)
    jobs = plan_jobs(ckpt, inputs, sign=1.0, out_dtype=rule, force=force)
    if reversible:
        check_reversible_dtypes(jobs)
    digest_inputs(inputs)
    changes = {k: j.in_dtype for k, j in jobs.items() if j.out_dtype != j.in_dtype}
    previous = read_records(ckpt)
    add_format = not any("format" in m for m in ckpt.shard_metadata.values())
    sidecar_name = (
        sidecar_file_name(out_path if not ckpt.is_dir else None, len(previous) + 1)
        if reversible
        else None
    )
    record: dict[str, Any] = {
        "op": "merge",
        "tool": f"loratool {tool_version()}",
        "adapters": [i.entry() for i in inputs],
        "dtype": dtype,
        "dtype_changes": changes,
        "product": _product(dev, reversible),
        "reversible": sidecar_name,
        "format_added": add_format,
    }
    record["id"] = record_id(record)
    records = [*previous, record]
    names = module_names(inputs)
    ctx = Context(
        dev,
        record["product"] == "fp64",
        names,
        roundtrip=True,
        collect=reversible,
        hash_in=reversible,
        hash_out=False,
        corrections=lambda key: None,
        progress=progress,
        where=str(base_path),
    )

    def metadata(shard: Path) -> dict[str, str]:
        return shard_metadata_with(ckpt.shard_metadata[shard], records, add_format=add_format)

    outcome = Outcome()
    namer = shard_namer(ckpt, out_path)
    report = MergeReport(
        "merge",
        str(base_path),
        str(out_path),
        record["adapters"],
        dtype,
        dev,
        [],
        record,
        sidecar_name=sidecar_name,
    )
    with (
        torch.inference_mode(),
        output_dest(out_path, directory=ckpt.is_dir, force=force) as dest,
    ):
        spool_dir = dest if ckpt.is_dir else out_path.parent
        if reversible:
            fd, spool_path = tempfile.mkstemp(
                prefix=f".{out_path.name}.", suffix=".spool", dir=spool_dir
            )
            os.close(fd)
            os.unlink(spool_path)
            outcome.spool = Spool(Path(spool_path))
        try:
            sizes = stream_files(ckpt, jobs, dest, ctx, outcome, metadata, namer, reserve=512)
            record["roundtrip"] = roundtrip_stats(outcome.reports)
            for shard in ckpt.shards:  # the final record, with the round-trip counts
                rewrite_metadata(dest / namer(shard), metadata(shard))
            if outcome.spool is not None and sidecar_name is not None:
                sidecar = Sidecar({}, outcome.hashes, record["id"])
                target = dest / sidecar_name if ckpt.is_dir else out_path.parent / sidecar_name
                report.sidecar_bytes = write_sidecar_file(
                    outcome.spool, target, sidecar.metadata(), force=force
                )
        finally:
            if outcome.spool is not None:
                outcome.spool.close()
        if ckpt.is_dir:
            write_layout(ckpt, dest, jobs)
            report.copied_files, report.skipped_files = copy_other_files(ckpt, dest, set())
    report.targets = [outcome.reports[k] for k in sorted(outcome.reports)]
    report.shards = list(sizes)
    report.base_bytes = sum(os.path.getsize(s) for s in ckpt.shards)
    report.out_bytes = sum(sizes.values())
    report.seconds = time.perf_counter() - started
    add_warnings(report)
    return report


def _merge_memory(
    state: Mapping[str, torch.Tensor],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    *,
    weights: Sequence[float] | None,
    dtype: str,
    device: str,
    reversible: bool,
    force: bool,
    started: float,
) -> MergeReport:
    import torch

    rule = dtype_rule(dtype)
    dev = resolve_device(device)
    ckpt = MemoryCheckpoint(state)
    inputs = open_inputs(adapters, weights)
    jobs = plan_jobs(ckpt, inputs, sign=1.0, out_dtype=rule, force=force)
    if reversible:
        check_reversible_dtypes(jobs)
    digest_inputs(inputs)
    record: dict[str, Any] = {
        "op": "merge",
        "tool": f"loratool {tool_version()}",
        "adapters": [i.entry() for i in inputs],
        "dtype": dtype,
        "dtype_changes": {k: j.in_dtype for k, j in jobs.items() if j.out_dtype != j.in_dtype},
        "product": _product(dev, reversible),
        "reversible": "memory" if reversible else None,
    }
    record["id"] = record_id(record)
    ctx = Context(
        dev,
        record["product"] == "fp64",
        module_names(inputs),
        roundtrip=True,
        collect=reversible,
        hash_in=reversible,
        hash_out=False,
        corrections=lambda key: None,
        progress=None,
        where="<state dict>",
    )
    outcome = Outcome()
    with torch.inference_mode():
        result = memory_loop(ckpt, jobs, ctx, outcome)
    record["roundtrip"] = roundtrip_stats(outcome.reports)
    report = MergeReport(
        "merge",
        "<state dict>",
        None,
        record["adapters"],
        dtype,
        dev,
        [outcome.reports[k] for k in sorted(outcome.reports)],
        record,
        state_dict=result,
    )
    if reversible:
        tensors: dict[str, torch.Tensor] = {}
        for key, idx, val in outcome.sidecar_parts:
            tensors.update(encode_corrections(key, idx, val))
        report.sidecar = Sidecar(tensors, outcome.hashes, record["id"])
        report.sidecar_name = "memory"
        report.sidecar_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    report.base_bytes = sum(t.numel() * t.element_size() for t in state.values())
    report.seconds = time.perf_counter() - started
    add_warnings(report)
    return report


def _product(device: str, reversible: bool) -> str:
    """The precision of ΔW's matrix product, recorded so unmerge repeats it exactly.

    fp64 (rounded once to fp32: the correctly rounded ΔW on any BLAS, device or thread count) on
    CUDA — where it is free and sidesteps TF32 — and whenever a sidecar must match bit for bit
    across devices; a plain fp32 product on the CPU otherwise, where fp64 costs about 2×.
    """
    return "fp64" if reversible or device == "cuda" else "fp32"
