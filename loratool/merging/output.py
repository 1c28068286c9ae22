"""The output on disk: an atomic destination, shard names, index.json, the other files copied."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .._io import atomic_dir, atomic_file_in_dir, check_output
from ..checkpoint import Checkpoint
from ..errors import UsageError
from ..stream import write_index
from .plan import Job, job_nbytes

# Weight files of other formats beside the safetensors: copying them would ship unmerged weights.
STALE_WEIGHTS = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".safetensors",
)


def check_paths(base: Path, out: Path, *, force: bool) -> None:
    check_output(out, force=force)
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents or o in b.parents:
        raise UsageError(
            f"output '{out}' overlaps the input '{base}'",
            code="output-overlaps",
            hint="write to a new path next to it",
        )


@contextlib.contextmanager
def output_dest(out: Path, *, directory: bool, force: bool) -> Iterator[Path]:
    """A temp sibling directory renamed to ``out``; for a single-file base, a temp dir whose one
    file is renamed to ``out`` (both owned and cleaned up by ``_io``)."""
    if directory:
        with atomic_dir(out, force=force) as tmp:
            yield tmp
    else:
        with atomic_file_in_dir(out, force=force) as tmp:
            yield tmp


def shard_namer(ckpt: Checkpoint, out: Path) -> Callable[[Path], str]:
    """Output file name per shard: the shard's own name, or ``out``'s for a single-file base."""
    if ckpt.is_dir:
        return lambda shard: shard.name
    return lambda shard: out.name


def write_layout(ckpt: Checkpoint, dest: Path, jobs: Mapping[str, Job]) -> None:
    """index.json for a sharded base: the same weight map, ``total_size`` of the new data."""
    if ckpt.index is None:
        return
    total = sum(job_nbytes(j, j.out_dtype, out=True) for j in jobs.values())
    meta = ckpt.index.get("metadata")
    weight_map = ckpt.index.get("weight_map")
    assert isinstance(weight_map, dict)
    new = {j.key: weight_map[j.source] for j in jobs.values() if j.source in weight_map}
    weight_map = {**weight_map, **new}  # an untied lm_head: in its embedding's shard
    write_index(
        dest, weight_map, total_size=total, metadata=meta if isinstance(meta, dict) else None
    )


def copy_other_files(base: Checkpoint, dest: Path, skip: set[str]) -> tuple[list[str], list[str]]:
    """Copy config, tokenizer and the like; leave weights of other formats (they'd be stale)."""
    copied: list[str] = []
    skipped: list[str] = []
    if not base.is_dir:
        return copied, skipped
    for f in base.other_files():
        rel = f.relative_to(base.path)
        if any(p.startswith(".") for p in rel.parts[:-1]):  # .git/, .cache/ (download state)
            continue
        r = rel.as_posix()
        if r in skip:
            continue
        if f.name.lower().endswith(STALE_WEIGHTS) and not f.name.startswith("loratool-reversible"):
            skipped.append(r)
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        copied.append(r)
    return copied, skipped
