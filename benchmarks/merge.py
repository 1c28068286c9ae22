"""Benchmark: `loratool merge` against PEFT's merge_and_unload and against a plain copy.

Three whole processes per model, timed end to end: wall clock, CPU seconds (user + system) and
peak resident memory of that process alone (GNU ``/usr/bin/time``, so the benchmark's own memory
never leaks into a child's figure; ``os.wait4`` rusage where it is missing):

  loratool  python -m loratool merge BASE ADAPTER -o OUT --json            (streams, --device)
  peft      python -c: AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained
            + merge_and_unload + save_pretrained (the whole model in memory, fp32 ΔW for bf16)
  floor     cp -r BASE OUT, then python -c "import torch"   (the least any merge can cost)
  floor-sync  the same, then an fsync of every file copied  (the least a durable merge can cost:
            loratool fsyncs its output before the rename; on a slow disk that is most of its wall)

Models: SmolLM2-135M (fp32, one file; fixtures/models.py) and synthetic sharded bf16 Llamas
(benchmarks/make_synthetic_llama.py), built once into the benchmark cache (``.cache/bench/``,
ignored by git) and reused: ``0.85b`` (13 layers, 1.7 GB in 5 shards: the issue's model),
``0.5b`` (8 layers) and ``1b`` (16) share every width, so loratool's memory should be the same
for all while PEFT's grows; ``3b`` (5.8 GB) is for GPU runs; ``7b`` is Llama-2-7B-shaped
(hidden 4096, intermediate 11008, 32 layers, untied, 13.5 GB in 3 shards), built only when
named (it needs ~45 GB free while the sides run, and PEFT needs the whole model in RAM). Each
gets a random rank-16 adapter on all seven linear projections (alpha 32), saved both as a
loratool file and as a PEFT directory with the same factors. The sides alternate within each
repeat (order rotated between repeats) because the machine is shared: compare the ratios, not
the seconds, and read the load average printed before and after.

After the timed runs, one more loratool merge runs in-process with each phase's thread CPU time
(user + system of the thread that ran it, ``time.thread_time``) summed over every call: what
the CPU went to, against the floor's copy.

    python benchmarks/merge.py                      # smollm2 and 0.85b, 2 repeats
    python benchmarks/merge.py --models 0.85b --repeats 3
    python benchmarks/merge.py --models 7b --repeats 1 --sides loratool,floor
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> make_synthetic_llama.py options; 0.5b and 1b share every width (only depth differs)
SYNTHETIC = {
    "0.85b": ["--layers", "13", "--shard-size", "400MB"],  # 0.86B, 1.7 GB in 5 shards
    "0.5b": ["--layers", "8"],
    "1b": [],
    "3b": ["--hidden", "3072", "--layers", "28", "--heads", "24"],  # 2.9B, 5.8 GB: GPU runs
    "7b": [  # Llama-2-7B's shapes: 6.7B parameters, 13.5 GB
        *("--hidden", "4096", "--intermediate", "11008", "--layers", "32"),
        *("--heads", "32", "--kv-heads", "32", "--untied", "--shard-size", "5GB"),
    ],
}
CACHE = ROOT / ".cache" / "bench"  # synthetic bases and adapters, built once (ignored by git)

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True)
model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


@dataclass
class Run:
    wall: float
    cpu: float  # user + system seconds
    rss: int  # bytes


@dataclass
class Side:
    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def rss(self) -> int:
        return max(r.rss for r in self.runs)


GNU_TIME = Path("/usr/bin/time").exists()


def run_process(argv: list[str], env: dict[str, str], scratch: Path) -> Run:
    """Run one process to completion: its wall time, CPU time and its own peak RSS."""
    report = scratch / "time.txt"
    cmd = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(report), *argv] if GNU_TIME else argv
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")  # drain before waiting: no pipe stall
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({proc.returncode}):\n{err[-3000:]}")
    if GNU_TIME:
        e, u, s, m = report.read_text().split()[-4:]
        return Run(float(e), float(u) + float(s), int(m) * 1024)
    # Without GNU time: this child's rusage (its pre-exec fork shares our pages: an upper bound)
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def make_adapter(base: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random r=16 all-linear adapter for ``base``: a loratool file and a PEFT directory."""
    import torch

    from loratool.adapter import Adapter, Target
    from loratool.checkpoint import Checkpoint

    ours, peft_dir = work / f"{base.name}-r16.safetensors", work / f"{base.name}-r16-peft"
    if ours.exists() and (peft_dir / "adapter_model.safetensors").exists():
        return ours, peft_dir
    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for key in sorted(ckpt.entries):
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in PROJECTIONS and key.endswith(".weight"):
            out_f, in_f = ckpt.shape(key)
            a = torch.randn(16, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, 16, generator=gen) * 0.01  # ΔW std ≈ 2e-2 · W's: realistic
            targets.append(Target.from_factors(module, a, b, alpha=32.0))
    adapter = Adapter.from_targets(targets)
    adapter.save(ours, force=True)
    from safetensors.torch import save_file

    peft_dir.mkdir(exist_ok=True)
    tensors = {}
    for t in targets:
        tensors[f"base_model.model.{t.name}.lora_A.weight"] = t.lora_A.contiguous()
        tensors[f"base_model.model.{t.name}.lora_B.weight"] = t.lora_B.contiguous()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(PROJECTIONS),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
    }  # fmt: skip
    (peft_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return ours, peft_dir


def base_for(name: str, env: dict[str, str]) -> Path:
    if name == "smollm2":
        import models

        return models.smollm2()
    if name not in SYNTHETIC:
        raise SystemExit(f"unknown model {name!r}: smollm2, {', '.join(SYNTHETIC)}")
    path = CACHE / f"llama-{name}"
    if not path.exists():  # built once; atomic, so an interrupted build leaves nothing behind
        print(f"making {path} (once) ...", file=sys.stderr, flush=True)
        script = ROOT / "benchmarks" / "make_synthetic_llama.py"
        subprocess.run(
            [sys.executable, str(script), str(path), *SYNTHETIC[name]], check=True, env=env
        )
    return path


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_equal(ours: Path, peft_out: Path) -> float:
    """Max |loratool − PEFT| over the merged projections of the first layer (a sanity check)."""
    from loratool.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(peft_out)
    worst = 0.0
    for key in a.entries:
        if ".layers.0." in key and key.removesuffix(".weight").rsplit(".", 1)[-1] in PROJECTIONS:
            worst = max(worst, float((a.read(key).float() - b.read(key).float()).abs().max()))
    return worst


# The durable floor's second step: loratool's output is fsynced before it is renamed into place
# (an atomic write survives a crash), which on a slow disk costs more wall than the copy; this
# is the very fsync loratool's atomic_dir runs.
SYNC_SCRIPT = """
import sys
from pathlib import Path
import torch
from loratool._io import _fsync_tree
_fsync_tree(Path(sys.argv[1]))
"""


# -- per-phase CPU of one in-process merge ------------------------------------------------------

PHASES = (  # (module, attribute, phase): each call's thread CPU time is added to its phase
    ("loratool.merging.merger", "prepare", "check + plan + adapter digests"),
    ("loratool.merging.compute", "delta_factors", "ΔW factors (load, scale, stack)"),
    ("loratool.merging.compute", "apply_delta", "W + L·R, round, fidelity sums (total)"),
    ("loratool.merging.delta", "misses", "  of which round-trip compare"),
    ("loratool.checkpoint:Checkpoint", "read_into", "read targeted weights (pread)"),
    ("loratool.merging.delta:DeltaBlocks", "add", "W + L·R, round, fidelity sums (blocks)"),
    ("loratool.merging.delta:DeltaBlocks", "add_bytes", "W + L·R, round, fidelity sums (blocks)"),
    ("loratool.stream:SafetensorsWriter", "write", "write merged weights (pwrite)"),
    ("loratool.stream:SafetensorsWriter", "write_part", "write merged blocks (pwrite)"),
    ("loratool.stream:SafetensorsWriter", "copy_from", "copy untouched (copy_file_range)"),
    ("loratool.merging.merger", "rewrite_metadata", "final record into shard headers"),
    ("loratool._io", "_fsync_tree", "fsync of the output"),
)


def phase_profile(base: str, adapter: str, out: str) -> None:
    """Run one merge here, summing each phase's thread CPU; print a JSON document."""
    started = time.process_time()
    import torch  # noqa: F401  (timed: the floor pays it too)

    import loratool

    imported = time.process_time() - started
    acc: dict[str, float] = {}
    lock = threading.Lock()
    for where, attr, phase in PHASES:
        mod_name, _, cls = where.partition(":")
        owner = importlib.import_module(mod_name)
        if cls:
            owner = getattr(owner, cls)
        fn = getattr(owner, attr, None)
        if fn is None:  # renamed since: leave the phase out rather than fail
            continue

        def timed(*a: object, _fn: object = fn, _phase: str = phase, **k: object) -> object:
            t0 = time.thread_time()
            try:
                return _fn(*a, **k)  # type: ignore[operator]
            finally:
                with lock:
                    acc[_phase] = acc.get(_phase, 0.0) + time.thread_time() - t0

        setattr(owner, attr, timed)
    shutil.rmtree(out, ignore_errors=True)
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    loratool.merge(base, [adapter], out, device="cpu")
    total = time.process_time() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(out, ignore_errors=True)
    user, system = ru.ru_utime - ru0.ru_utime, ru.ru_stime - ru0.ru_stime
    doc = {"import": imported, "merge": total, "user": user, "system": system, "phases": acc}
    print(json.dumps(doc))


def phases_of(base: Path, adapter: Path, out: Path, env: dict[str, str]) -> dict[str, object]:
    argv = [sys.executable, __file__, "--phase-profile", str(base), str(adapter), str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase profile failed:\n{done.stderr[-3000:]}")
    doc: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return doc


# -- the side-by-side run ------------------------------------------------------------------------


def bench(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    base = base_for(name, env)
    adapter, peft_dir = make_adapter(base, CACHE if name != "smollm2" else args.workdir)
    out = args.workdir / "out"
    py = sys.executable
    merge_cmd = [py, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out)]
    commands = {
        "loratool": [[*merge_cmd, "--device", args.device, "--json"]],
        "peft": [[py, "-c", PEFT_SCRIPT, str(base), str(peft_dir), str(out)]],
        "floor": [["cp", "-r", str(base), str(out)], [py, "-c", "import torch"]],
        "floor-sync": [["cp", "-r", str(base), str(out)], [py, "-c", SYNC_SCRIPT, str(out)]],
    }
    commands = {k: v for k, v in commands.items() if k in args.sides}
    sides = {k: Side(k) for k in commands}
    order = list(commands)
    checked = None
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        for side in order[rep % len(order) :] + order[: rep % len(order)]:
            shutil.rmtree(out, ignore_errors=True)
            runs = [run_process(argv, env, args.workdir) for argv in commands[side]]
            sides[side].runs.append(
                Run(sum(r.wall for r in runs), sum(r.cpu for r in runs), max(r.rss for r in runs))
            )
            if side == "loratool" and checked is None and "peft" in sides:
                shutil.rmtree(args.workdir / "out-loratool", ignore_errors=True)
                out.rename(args.workdir / "out-loratool")
            elif side == "peft" and checked is None and (args.workdir / "out-loratool").exists():
                checked = check_equal(args.workdir / "out-loratool", out)
                shutil.rmtree(args.workdir / "out-loratool", ignore_errors=True)
            last = sides[side].runs[-1]
            print(
                f"  {name} {side}: {last.wall:.2f} s wall, {last.cpu:.2f} s CPU, "
                f"{last.rss / 1e9:.2f} GB",
                file=sys.stderr,
                flush=True,
            )
    load_after = os.getloadavg()
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.workdir / "out-loratool", ignore_errors=True)
    phases = None
    if args.device == "cpu" and "loratool" in sides and not args.no_phases:
        phases = phases_of(base, adapter, out, env)
    return {
        "model": name,
        "bytes": size_of(base),
        "sides": sides,
        "max_abs_diff_vs_peft": checked,
        "load": (load_before, load_after),
        "phases": phases,
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_result(r: dict[str, object], args: argparse.Namespace) -> None:
    s = r["sides"]
    assert isinstance(s, dict)
    nbytes = r["bytes"]
    assert isinstance(nbytes, int)
    loads = r["load"]
    assert isinstance(loads, tuple)
    print(
        f"\n{r['model']}: {nbytes / 1e9:.2f} GB base, r=16 all-linear adapter, "
        f"{args.repeats} alternating repeats, device {args.device}; median wall and CPU "
        f"(user+sys) seconds, max peak RSS of each whole process"
    )
    load = ["/".join(f"{x:.1f}" for x in la) for la in loads]
    print(f"load average (1/5/15 min) before {load[0]}, after {load[1]} on {os.cpu_count()} cores")
    print(f"{'side':<10}{'wall s':>8}{'CPU s':>8}{'RSS GB':>8}")
    for side in s.values():
        print(f"{side.name:<10}{side.wall:>8.2f}{side.cpu:>8.2f}{side.rss / 1e9:>8.2f}")
    lt, pf, fl, fs = s.get("loratool"), s.get("peft"), s.get("floor"), s.get("floor-sync")
    if lt is not None and pf is not None:
        print(
            f"loratool vs PEFT : {_ratio(pf.wall, lt.wall)} faster wall (goal >= 3.5x), "
            f"{_ratio(pf.cpu, lt.cpu)} less CPU, {_ratio(lt.rss, pf.rss)} its peak RSS "
            f"(goal <= 0.2x)"
        )
        if r["max_abs_diff_vs_peft"] is not None:
            print(
                f"  max |loratool - PEFT| over layer 0's projections: {r['max_abs_diff_vs_peft']:.3g}"
            )
    if lt is not None and fl is not None:
        print(
            f"loratool vs floor: {_ratio(lt.wall, fl.wall)} its wall, {_ratio(lt.cpu, fl.cpu)} "
            f"its CPU (goals <= 1.5x both)"
        )
    if lt is not None and fs is not None:
        print(
            f"loratool vs floor-sync (a durable copy, as loratool's output is): "
            f"{_ratio(lt.wall, fs.wall)} its wall, {_ratio(lt.cpu, fs.cpu)} its CPU"
        )
    ph = r["phases"]
    if isinstance(ph, dict):
        print(
            f"loratool per phase (one in-process merge, thread CPU s): import torch + loratool "
            f"{ph['import']:.2f}, merge {ph['merge']:.2f} (user {ph['user']:.2f} + system "
            f"{ph['system']:.2f})"
        )
        phases = ph["phases"]
        named = sum(v for k, v in phases.items() if not k.startswith(" "))
        for k in dict.fromkeys(p for _, _, p in PHASES if p in phases):  # one line a phase
            v = phases[k]
            print(f"  {k:<44}{v:>7.2f}  {v / ph['merge']:>5.0%}")
        rest = ph["merge"] - named
        print(
            f"  {'rest (threads, queues, report, other files)':<44}{rest:>7.2f}  {rest / ph['merge']:>5.0%}"
        )


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--phase-profile":
        phase_profile(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", default="smollm2,0.85b", help=f"comma list: smollm2, {', '.join(SYNTHETIC)}"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument(
        "--sides", default="loratool,peft,floor,floor-sync", help="comma list of sides to run"
    )
    ap.add_argument("--no-phases", action="store_true", help="skip the per-phase profile")
    ap.add_argument(
        "--workdir", type=Path, default=CACHE, help="where outputs go (same disk as the bases)"
    )
    args = ap.parse_args(argv)
    args.sides = [x.strip() for x in args.sides.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    for name in args.models.split(","):
        print_result(bench(name.strip(), args, env), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
