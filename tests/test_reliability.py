"""Crash leftovers: SIGKILL at each step of an atomic write, then a second run cleans up and works.

Each kill point runs the real command in a subprocess whose chosen function (``os.pwrite``,
``os.fsync``, ``os.replace``, ``safetensors.torch.save_file``...) SIGKILLs the process on its
n-th call, before or after doing its work: no hook exists in loratool itself. A second run beside
the debris must then succeed, leave no temporary path and no owner file, and never lose an output
that existed before the killed run. A writer that is still alive is never cleaned up after: a
second writer of the same output is refused instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from loratool import leftovers
from loratool._io import atomic_dir, atomic_write
from loratool.errors import OutputBusyError, OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds per subprocess: a hang fails the test instead of stalling CI

# Runs ``code`` after making the n-th call of ``target`` SIGKILL the process ("before" the call
# does anything, or "after" it returned).
HARNESS = """
import importlib, json, os, signal, sys
spec = json.loads(sys.argv[1])
mod_name, _, attr_path = spec["target"].partition(":")
owner = importlib.import_module(mod_name)
*parents, attr = attr_path.split(".")
for p in parents:
    owner = getattr(owner, p)
orig = getattr(owner, attr)
calls = [0]
def wrapper(*a, **k):
    calls[0] += 1
    if calls[0] == spec["n"] and spec["when"] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    r = orig(*a, **k)
    if calls[0] == spec["n"] and spec["when"] == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return r
setattr(owner, attr, staticmethod(wrapper) if isinstance(owner, type) else wrapper)
exec(spec["code"])
"""


def run_killed(target: str, n: int, when: str, code: str) -> subprocess.CompletedProcess[bytes]:
    spec = json.dumps({"target": target, "n": n, "when": when, "code": textwrap.dedent(code)})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", HARNESS, spec],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )


def debris(folder: Path) -> list[str]:
    """Our temporaries and owner files in ``folder``."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if ".loratool-" in p.name or p.name.startswith(".loratool.")
    )


# -- the owner lock, without torch --------------------------------------------------------------


def test_live_writer_is_refused_and_its_temp_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("first")
        with pytest.raises(OutputBusyError) as e, atomic_dir(out):
            pass
        assert e.value.code == "output-busy" and f"pid {os.getpid()}" in e.value.message
        with pytest.raises(OutputBusyError):
            atomic_write(out, [b"x"])
        assert tmp.exists() and (tmp / "f").read_text() == "first"
    assert (out / "f").read_text() == "first" and debris(tmp_path) == []


def test_dead_owner_leftovers_are_swept_by_any_writer_beside_them(tmp_path: Path) -> None:
    # A writer killed before its owner file had content, and one killed after: both are dead
    # (nothing holds their lock), so a writer of an unrelated output in the folder cleans up.
    for name, doc in (("a", ""), ("b", json.dumps({"pid": 1, "command": "merge"}))):
        leftovers.owner_path(tmp_path / name).write_text(doc)
        t = leftovers.temp_name(tmp_path / name)
        t.mkdir()
        (t / "model.safetensors").write_bytes(b"\0" * 1000)
        leftovers.temp_name(tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".c.abcdefgh.tmp").mkdir()  # not our pattern: never touched
    atomic_write(tmp_path / "new", [b"ok"])
    assert debris(tmp_path) == [] and (tmp_path / ".c.abcdefgh.tmp").exists()
    assert (tmp_path / "new").read_bytes() == b"ok"


def test_moved_aside_output_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    aside = leftovers.temp_name(out, "old")
    aside.mkdir()
    (aside / "x").mkdir()
    (aside / "x" / "weights").write_text("previous")
    leftovers.owner_path(out).write_text("{}")
    with pytest.raises(OutputExistsError):  # the old output is back, so no --force: refused
        atomic_write(out, [b"new"])
    assert (out / "weights").read_text() == "previous" and debris(tmp_path) == []


def test_similar_names_are_not_confused(tmp_path: Path) -> None:
    # Temporaries of output "x.loratool-abc" must not look like temporaries of "x".
    other = leftovers.temp_name(tmp_path / "x.loratool-abc")
    other.mkdir()
    with leftovers.claim(tmp_path / "x.loratool-abc"):
        other2 = leftovers.temp_name(tmp_path / "x.loratool-abc")
        other2.mkdir()
        atomic_write(tmp_path / "x", [b"1"])
        assert other2.exists()
    assert not other.exists()  # it was the claimed output's own dead leftover


# -- kill points in real commands ---------------------------------------------------------------

MERGE = """
from loratool.cli import main
main(["merge", {base!r}, {adapter!r}, "-o", {out!r}, "--device", "cpu"] + {extra!r})
"""


@pytest.fixture(scope="module")
def merge_inputs(tiny_sharded_llama_dir: Path, tmp_path_factory: Any) -> tuple[Path, Path, Path]:
    """The base, an adapter for it, and the reference merge output to compare with."""
    torch = pytest.importorskip("torch")
    import loratool
    from loratool.adapter import Adapter, Target
    from loratool.checkpoint import Checkpoint

    d = tmp_path_factory.mktemp("merge")
    ckpt = Checkpoint(tiny_sharded_llama_dir)
    gen = torch.Generator().manual_seed(0)
    targets = []
    for key in sorted(ckpt.entries):
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            out_f, in_f = ckpt.shape(key)
            a = torch.randn(4, in_f, generator=gen) * 0.05
            b = torch.randn(out_f, 4, generator=gen) * 0.05
            targets.append(Target.from_factors(key.removesuffix(".weight"), a, b, alpha=8.0))
    adapter = d / "a.safetensors"
    Adapter.from_targets(targets).save(adapter)
    ref = d / "ref"
    loratool.merge(tiny_sharded_llama_dir, [adapter], ref)
    return tiny_sharded_llama_dir, adapter, ref


def weights(path: Path) -> dict[str, bytes]:
    from loratool.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    return {k: bytes(ckpt.read_bytes(k)) for k in ckpt.entries}


# (function, n-th call, before/after, whether --force replaces an existing output)
MERGE_KILLS = [
    ("os:pwrite", 3, "before", False),  # first shard, mid-tensors
    ("os:pwrite", 7, "after", False),  # a later shard
    ("os:copy_file_range", 12, "before", False),  # copying untouched tensors of a later shard
    ("os:fsync", 2, "before", False),  # everything written, syncing
    ("os:replace", 1, "before", False),  # synced, about to rename in
    ("os:replace", 1, "after", True),  # the old output moved aside, the new not yet in
    ("os:replace", 2, "after", True),  # the new output in, the old not yet removed
]


@pytest.mark.parametrize(("target", "n", "when", "force"), MERGE_KILLS)
def test_killed_merge_then_second_run(
    merge_inputs: tuple[Path, Path, Path],
    tmp_path: Path,
    target: str,
    n: int,
    when: str,
    force: bool,
) -> None:
    import loratool

    base, adapter, ref = merge_inputs
    out = tmp_path / "out"
    if force:  # an existing output that the killed run replaces
        loratool.merge(base, [adapter], out, weights=[0.5])
    code = MERGE.format(
        base=str(base), adapter=str(adapter), out=str(out), extra=["--force"] if force else []
    )
    proc = run_killed(target, n, when, code)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert debris(tmp_path), "the kill left nothing to clean up: the kill point is not reached"
    if not force:
        assert not out.exists()
    loratool.merge(base, [adapter], out, force=True)  # the second run
    assert debris(tmp_path) == []
    assert weights(out) == weights(ref)


def test_killed_forced_merge_restores_the_old_output(
    merge_inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A kill between "move old aside" and "rename new in": the next writer puts the old back."""
    import loratool

    base, adapter, _ref = merge_inputs
    out = tmp_path / "out"
    loratool.merge(base, [adapter], out, weights=[0.5])
    before = weights(out)
    code = MERGE.format(base=str(base), adapter=str(adapter), out=str(out), extra=["--force"])
    proc = run_killed("os:replace", 1, "after", code)
    assert proc.returncode == -9 and not out.exists()
    with pytest.raises(OutputExistsError):  # no --force: the restored old output is kept
        loratool.merge(base, [adapter], out)
    assert weights(out) == before and debris(tmp_path) == []


ADAPTER_SAVE = """
from loratool.format import load
load({src!r}).save({out!r})
"""


@pytest.mark.parametrize(
    ("target", "n", "when"), [("os:fsync", 1, "before"), ("os:replace", 1, "before")]
)
def test_killed_adapter_write_then_second_run(
    merge_inputs: tuple[Path, Path, Path], tmp_path: Path, target: str, n: int, when: str
) -> None:
    from loratool.format import load

    _base, adapter, _ref = merge_inputs
    out = tmp_path / "copy.safetensors"
    proc = run_killed(target, n, when, ADAPTER_SAVE.format(src=str(adapter), out=str(out)))
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists() and debris(tmp_path)
    load(adapter).save(out)
    assert debris(tmp_path) == [] and out.read_bytes() == adapter.read_bytes()


CHECKPOINT_SAVE = """
import torch
from pathlib import Path
from loratool.format import load
from loratool.training import state
a = load({src!r})
opt = {{"step": torch.zeros(1)}}
rng = {{"cpu": torch.get_rng_state()}}
state.save(Path({root!r}), step=7, adapter=a, optimizer=opt, rng=rng, state={{}}, keep=2)
"""


@pytest.mark.parametrize(
    ("target", "n", "when"),
    [("safetensors.torch:save_file", 1, "after"), ("os:replace", 1, "before")],
)
def test_killed_train_checkpoint_then_second_run(
    merge_inputs: tuple[Path, Path, Path], tmp_path: Path, target: str, n: int, when: str
) -> None:
    pytest.importorskip("torch")
    from loratool.training import state

    _base, adapter, _ref = merge_inputs
    root = tmp_path / "ckpt"
    code = CHECKPOINT_SAVE.format(src=str(adapter), root=str(root))
    proc = run_killed(target, n, when, code)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert state.list_checkpoints(root) == [] and debris(root)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert [p.name for p in state.list_checkpoints(root)] == ["step-00000007"]
    assert debris(root) == []


HOLD = """
import sys
from loratool._io import atomic_dir
with atomic_dir({out!r}) as tmp:
    (tmp / "model.safetensors").write_bytes(b"held")
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_concurrent_merge_of_the_same_output_is_refused(
    merge_inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import loratool

    base, adapter, _ref = merge_inputs
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD.format(out=str(out)))],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        with pytest.raises(OutputBusyError) as e:
            loratool.merge(base, [adapter], out)
        assert f"pid {holder.pid}" in e.value.message
        with pytest.raises(OutputBusyError):
            loratool.merge(base, [adapter], out, force=True)
        assert [p for p in debris(tmp_path) if p.endswith(".tmp")]  # the live temp is kept
    finally:
        holder.communicate(b"\n", timeout=TIMEOUT)
    assert holder.returncode == 0 and (out / "model.safetensors").read_bytes() == b"held"
    assert debris(tmp_path) == []


def test_two_cli_merges_at_once_never_corrupt_the_output(
    merge_inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, ref = merge_inputs
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out)]
    procs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=TIMEOUT), p.communicate()[1].decode()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0, results
    # The other one either lost the race for the lock or found the finished output.
    assert codes[1] == 0 or any(
        "error[output-busy]" in err or "error[output-exists]" in err for _, err in results
    ), results
    assert weights(out) == weights(ref) and debris(tmp_path) == []
