"""Block-by-block merging gives what whole-tensor merging gives; output space reserved up front."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from faults import debris  # noqa: E402
from test_merge import make_adapter, save  # noqa: E402

import loratool  # noqa: E402
from loratool.checkpoint import Checkpoint  # noqa: E402
from loratool.errors import DiskFullError  # noqa: E402
from loratool.merging import delta, pipeline  # noqa: E402
from loratool.stream import SafetensorsWriter, TensorSpec  # noqa: E402


def weights(path: Path) -> dict[str, bytes]:
    ckpt = Checkpoint(path)
    return {k: bytes(ckpt.read_bytes(k)) for k in ckpt.entries}


def same_records(x: Any, y: Any) -> None:
    """Two merges' reports agree per target: fidelity sums and round-trip counts."""
    for a, b in zip(x.targets, y.targets, strict=True):
        assert (a.key, a.delta_norm, a.applied_norm, a.error_norm) == (
            b.key,
            b.delta_norm,
            b.applied_norm,
            b.error_norm,
        )
        assert (a.roundtrip_off, a.roundtrip_max_ulp) == (b.roundtrip_off, b.roundtrip_max_ulp)


def merge_both(
    base: Path, adapter: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[Any, Any, list[str]]:
    """The same merge with every weight in blocks, and with none (whole tensors, in place)."""
    monkeypatch.setattr(delta, "_BLOCK", 300)  # many blocks per weight, a ragged last one
    monkeypatch.setattr(delta, "_FUSED_BLOCK", 300)  # the same where the product is fused
    seen: list[str] = []
    real = pipeline._blockwise

    def spy(job: Any, ctx: Any) -> bool:
        chosen = real(job, ctx)
        if chosen:
            seen.append(job.key)
        return chosen

    monkeypatch.setattr(pipeline, "_blockwise", spy)
    blocks = loratool.merge(base, [adapter], tmp / "blocks", **kw)
    monkeypatch.setattr(pipeline, "_blockwise", lambda job, ctx: False)
    whole = loratool.merge(base, [adapter], tmp / "whole", **kw)
    return blocks, whole, seen


@pytest.mark.parametrize("extra", [{}, {"dtype": "f32"}, {"reversible": True}])
def test_blocks_give_the_whole_tensor_merge(
    tiny_sharded_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, Any],
) -> None:
    """Same bytes, same fidelity sums, same round-trip counts, same sidecar."""
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    blocks, whole, seen = merge_both(tiny_sharded_llama_dir, a, tmp_path, monkeypatch, **extra)
    assert sorted(seen) == sorted(t.key for t in whole.targets)  # every weight went in blocks
    assert weights(tmp_path / "blocks") == weights(tmp_path / "whole")
    same_records(blocks, whole)
    if extra.get("reversible"):
        sb, sw = blocks.sidecar, whole.sidecar
        if sb is None or sw is None:  # written next to the output rather than returned
            sides = [sorted(p.name for p in (tmp_path / n).iterdir()) for n in ("blocks", "whole")]
            assert sides[0] == sides[1]
        else:
            assert sb.hashes == sw.hashes


def test_blocks_on_raw_bytes_are_the_tensor_blocks(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused pass on byte slices (``add_bytes``: a plain merge that keeps the dtype) writes
    and reports what the per-block tensor path (``add``) does."""
    if delta._kernel(torch.device("cpu"), torch.bfloat16, torch.bfloat16) is None:
        pytest.skip("the C pass was not built")
    monkeypatch.setattr(delta, "_BLOCK", 300)
    monkeypatch.setattr(delta, "_FUSED_BLOCK", 300)
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    calls: list[int] = []
    real = delta.DeltaBlocks.add_bytes

    def counted(self: Any, *args: Any) -> None:
        calls.append(1)
        real(self, *args)

    monkeypatch.setattr(delta.DeltaBlocks, "add_bytes", counted)
    raw = loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "raw")
    assert len(calls) > len(raw.targets)  # every weight, in many blocks
    init = delta.DeltaBlocks.__init__

    def tensor_views(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.raw = False  # the loop over tensor views

    monkeypatch.setattr(delta.DeltaBlocks, "__init__", tensor_views)
    calls.clear()
    views = loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "views")
    assert not calls and weights(tmp_path / "raw") == weights(tmp_path / "views")
    same_records(raw, views)


def test_block_merge_unmerges_back(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reversible merge made in blocks restores the base exactly (hashes verified)."""
    monkeypatch.setattr(delta, "_BLOCK", 300)
    monkeypatch.setattr(delta, "_FUSED_BLOCK", 300)
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "m", reversible=True)
    loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    assert weights(tmp_path / "u") == weights(tiny_sharded_llama_dir)


def test_block_merge_holds_no_weight_sized_buffers(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory does not grow with the largest weight: the whole-weight pools stay empty."""
    sizes: list[int] = []
    real = pipeline._Pool.__init__

    def spy(self: Any, n: int, nbytes: int, *, pin: bool) -> None:
        sizes.append(nbytes)
        real(self, n, nbytes, pin=pin)

    monkeypatch.setattr(pipeline._Pool, "__init__", spy)
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "m")
    assert sizes == [1, 1]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_reserving_the_output_fails_as_disk_full_before_compute(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """posix_fallocate's ENOSPC is the disk-full error, with nothing computed or left behind."""
    computed: list[str] = []
    real = pipeline._in_blocks

    def spy(w: Any, job: Any, *args: Any) -> None:
        computed.append(job.key)
        real(w, job, *args)

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pipeline, "_in_blocks", spy)
    monkeypatch.setattr(os, "posix_fallocate", full)
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    out = tmp_path / "out"
    with pytest.raises(DiskFullError):
        loratool.merge(tiny_sharded_llama_dir, [a], out)
    assert computed == [] and not out.exists() and debris(tmp_path) == []


def test_filesystems_without_fallocate_still_merge(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "ref")

    def unsupported(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "m")
    assert weights(tmp_path / "m") == weights(tmp_path / "ref")


def test_writer_parts_in_any_order_each_byte_once(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "U8", (10,)), TensorSpec("b", "U8", (4,))]
    w = SafetensorsWriter(tmp_path / "f.safetensors", specs)
    for offset, data in [(6, b"GHIJ"), (0, b"AB"), (4, b"EF"), (2, b"CD")]:
        w.write_part("a", offset, data)
    with pytest.raises(ValueError, match="written twice"):
        w.write_part("a", 3, b"x")
    w.write_part("b", 2, b"34")
    with pytest.raises(ValueError, match="written twice"):
        w.write_part("b", 1, b"xy")
    assert w.missing == ["b"]
    w.write_part("b", 0, b"12")
    assert w.read_back("a") == b"ABCDEFGHIJ"
    w.close()
    ckpt = Checkpoint(tmp_path / "f.safetensors")
    assert bytes(ckpt.read_bytes("a")) == b"ABCDEFGHIJ" and bytes(ckpt.read_bytes("b")) == b"1234"
