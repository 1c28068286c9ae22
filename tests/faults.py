"""Helpers for the fault tests: a small adapter for a base, debris listing, a small tmpfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def make_adapter(
    base: Path, out: Path, *, suffixes: tuple[str, ...] = ("q_proj", "v_proj")
) -> Path:
    """Random rank-4 factors for the ``suffixes`` weights of ``base``, saved at ``out``."""
    import torch

    from loratool.adapter import Adapter, Target
    from loratool.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(0)
    targets = []
    for key in sorted(ckpt.entries):
        if key.endswith(tuple(f"{s}.weight" for s in suffixes)):
            out_f, in_f = ckpt.shape(key)
            a = torch.randn(4, in_f, generator=gen) * 0.05
            b = torch.randn(out_f, 4, generator=gen) * 0.05
            targets.append(Target.from_factors(key.removesuffix(".weight"), a, b, alpha=8.0))
    Adapter.from_targets(targets).save(out)
    return out


def debris(folder: Path) -> list[str]:
    """Our temporaries and owner files in ``folder`` (recursively for dirs we write into)."""
    if not folder.exists():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if ".loratool-" in p.name or p.name.startswith(".loratool.")
    )


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) by relative name, with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kb: int) -> Iterator[Path | None]:
    """A tmpfs of ``size_kb`` at ``where``, or None where mounting is not allowed (not root)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0777", "tmpfs", str(where)],
        capture_output=True,
        timeout=30,
    )
    if r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def skip_without(fs: Any) -> None:
    import pytest

    if fs is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests still run")
