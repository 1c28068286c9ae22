"""Disk full: every writer fails with one ``error[disk-full]`` (exit 7) and leaves nothing behind.

Two kinds of fault, so CI covers it with or without root:
- a real ENOSPC from a small tmpfs (mounted when the tests run as root, as CI does; skipped
  cleanly otherwise), filled to leave a chosen number of bytes free;
- EFBIG from ``RLIMIT_FSIZE`` in a subprocess (any user): every write past the limit fails,
  including those inside the safetensors Rust writer and the kernel's ``copy_file_range``;
- EDQUOT, injected by patching ``os.pwrite`` in-process.
Each case checks: the error and its code, no output, no temporary path or owner file, the free
space given back, and an output that existed before byte-for-byte as it was.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from faults import debris, make_adapter, skip_without, small_tmpfs, tree, used_bytes  # noqa: E402

import loratool  # noqa: E402
from loratool.errors import EXIT_DISK_FULL, DiskFullError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture(scope="module")
def adapter(tiny_sharded_llama_dir: Path, tmp_path_factory: Any) -> Path:
    return make_adapter(tiny_sharded_llama_dir, tmp_path_factory.mktemp("a") / "a.safetensors")


@pytest.fixture
def fs(tmp_path: Path) -> Any:
    with small_tmpfs(tmp_path / "fs", 1024) as mounted:
        skip_without(mounted)
        yield mounted


def fill(fs: Path, leave: int) -> None:
    """Fill ``fs`` so that about ``leave`` bytes stay free."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def assert_clean(fs: Path, out: Path, before_used: int, before: dict[str, bytes] | None) -> None:
    assert debris(fs) == [] and debris(out.parent) == []
    if before is None:
        assert not out.exists()
    else:
        assert tree(out) == before
    assert used_bytes(fs) <= before_used  # every temporary block given back


# -- a real ENOSPC on a small tmpfs -------------------------------------------------------------


@pytest.mark.parametrize("leave", [4096, 64 << 10, 160 << 10])  # early, mid, late in the merge
def test_merge_on_a_full_disk(
    tiny_sharded_llama_dir: Path, adapter: Path, fs: Path, leave: int
) -> None:
    fill(fs, leave)
    used = used_bytes(fs)
    out = fs / "merged"
    with pytest.raises(DiskFullError) as e:
        loratool.merge(tiny_sharded_llama_dir, [adapter], out)
    assert e.value.code == "disk-full" and e.value.exit_code == EXIT_DISK_FULL
    assert "no space left" in e.value.message and str(out) in e.value.message
    assert_clean(fs, out, used, None)


def test_forced_merge_on_a_full_disk_keeps_the_old_output(
    tiny_sharded_llama_dir: Path, adapter: Path, fs: Path
) -> None:
    out = fs / "merged"
    loratool.merge(tiny_sharded_llama_dir, [adapter], out, weights=[0.5])
    before = tree(out)
    fill(fs, 100 << 10)  # less than a second copy needs
    used = used_bytes(fs)
    with pytest.raises(DiskFullError):
        loratool.merge(tiny_sharded_llama_dir, [adapter], out, force=True)
    assert_clean(fs, out, used, before)


def test_single_file_merge_on_a_full_disk(tiny_llama_dir: Path, fs: Path, tmp_path: Path) -> None:
    a = make_adapter(tiny_llama_dir, tmp_path / "a.safetensors")
    fill(fs, 32 << 10)
    used = used_bytes(fs)
    out = fs / "merged.safetensors"
    with pytest.raises(DiskFullError):
        loratool.merge(tiny_llama_dir / "model.safetensors", [a], out)
    assert_clean(fs, out, used, None)


@pytest.mark.parametrize(
    ("to", "name"),
    [("loratool", "c.safetensors"), ("peft", "c-peft"), ("kohya", "c.kohya.safetensors")],
)
def test_convert_on_a_full_disk(adapter: Path, fs: Path, to: str, name: str) -> None:
    from loratool.convert import convert

    fill(fs, 2048)
    used = used_bytes(fs)
    out = fs / name
    with pytest.raises(DiskFullError):
        convert(adapter, out, to=to)
    assert_clean(fs, out, used, None)


def test_adapter_save_over_an_existing_file_on_a_full_disk(adapter: Path, fs: Path) -> None:
    from loratool.format import load

    out = fs / "copy.safetensors"
    out.write_bytes(b"previous contents")
    fill(fs, 2048)
    used = used_bytes(fs)
    with pytest.raises(DiskFullError):
        load(adapter).save(out, force=True)
    assert_clean(fs, out, used, {"copy.safetensors": b"previous contents"})


def test_train_checkpoint_on_a_full_disk_keeps_the_previous_one(adapter: Path, fs: Path) -> None:
    from loratool.format import load
    from loratool.training import state

    a = load(adapter)
    kw: dict[str, Any] = {
        "adapter": a,
        "optimizer": {"m": torch.zeros(1000)},
        "rng": {"cpu": torch.get_rng_state()},
        "state": {},
        "keep": 3,
    }
    root = fs / "ckpt"
    state.save(root, step=1, **kw)
    before = tree(root / "step-00000001")
    fill(fs, 8192)
    used = used_bytes(fs)
    with pytest.raises(DiskFullError):
        state.save(root, step=2, **kw)
    assert [p.name for p in state.list_checkpoints(root)] == ["step-00000001"]
    assert tree(root / "step-00000001") == before and debris(root) == []
    assert used_bytes(fs) <= used


def test_cli_reports_disk_full_once(tiny_sharded_llama_dir: Path, adapter: Path, fs: Path) -> None:
    from click.testing import CliRunner

    from loratool.cli import cli

    fill(fs, 64 << 10)
    out = fs / "merged"
    r = CliRunner().invoke(
        cli, ["merge", str(tiny_sharded_llama_dir), str(adapter), "-o", str(out)]
    )
    assert r.exit_code == EXIT_DISK_FULL, r.output
    assert r.stderr.startswith("error[disk-full]: no space left on the device while writing")
    assert r.stderr.count("error[") == 1 and "Traceback" not in r.stderr
    assert not out.exists() and debris(fs) == []


# -- EFBIG from RLIMIT_FSIZE, any user ----------------------------------------------------------

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from loratool.cli import main
main(sys.argv[1:])
"""


def run_limited(limit: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIMITED.format(limit=limit)), *argv],
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    ("command", "limit"),
    [
        ("merge", 30_000),  # a shard larger than the limit
        ("convert-peft", 4_000),
        ("convert-kohya", 4_000),
        ("convert-loratool", 4_000),
    ],
)
def test_file_size_limit_is_disk_full(
    tiny_sharded_llama_dir: Path, adapter: Path, tmp_path: Path, command: str, limit: int
) -> None:
    out = tmp_path / "out"
    if command == "merge":
        argv = ["merge", str(tiny_sharded_llama_dir), str(adapter), "-o", str(out)]
    else:
        to = command.split("-")[1]
        out = tmp_path / ("out" if to == "peft" else "out.safetensors")
        argv = ["convert", str(adapter), "-o", str(out), "--to", to]
    r = run_limited(limit, *argv)
    assert r.returncode == EXIT_DISK_FULL, r.stderr[-2000:]
    assert r.stderr.startswith("error[disk-full]: file too large"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and debris(tmp_path) == []


# -- EDQUOT, injected ---------------------------------------------------------------------------


def test_quota_exceeded_is_disk_full(
    tiny_sharded_llama_dir: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    real = os.pwrite

    def pwrite(fd: int, data: Any, pos: int) -> int:
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "merged"
    with pytest.raises(DiskFullError) as e:
        loratool.merge(tiny_sharded_llama_dir, [adapter], out)
    assert "quota" in e.value.message and not out.exists() and debris(tmp_path) == []
