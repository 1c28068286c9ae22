"""Benchmark: `loratool merge` against PEFT's merge_and_unload and against a plain copy.

Three whole processes per model, timed end to end: wall clock, CPU seconds (user + system) and
peak resident memory of that process alone (GNU ``/usr/bin/time``, so the benchmark's own memory
never leaks into a child's figure; ``os.wait4`` rusage where it is missing):

  loratool  python -m loratool merge BASE ADAPTER -o OUT --json            (streams, --device)
  peft      python -c: AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained
            + merge_and_unload + save_pretrained (the whole model in memory, fp32 ΔW for bf16)
  floor     cp -r BASE OUT, then python -c "import torch"   (the least any merge can cost)

Models: SmolLM2-135M (fp32, one file; fixtures/models.py) and synthetic sharded bf16 Llamas
(benchmarks/make_synthetic_llama.py): ``0.5b`` (8 layers) and ``1b`` (16 layers) share every
width, so loratool's memory should be the same for both while PEFT's doubles; ``3b`` (5.8 GB) is
for GPU runs (``--device cuda``), where the figure to watch is base GB per second against the
floor's plain read + write. Each gets a
random rank-16 adapter on all seven linear projections (alpha 32), saved both as a loratool file
and as a PEFT directory with the same factors. The sides alternate within each repeat (order
rotated between repeats) because the machine is shared: compare the ratios, not the seconds.

    python benchmarks/merge.py                      # smollm2 and 1b, 2 repeats
    python benchmarks/merge.py --models smollm2,0.5b,1b --repeats 3 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> make_synthetic_llama.py options; 0.5b and 1b share every width (only depth differs)
SYNTHETIC = {
    "0.5b": ["--layers", "8"],
    "1b": [],
    "3b": ["--hidden", "3072", "--layers", "28", "--heads", "24"],  # 2.9B, 5.8 GB: GPU runs
}

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
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (peft_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return ours, peft_dir


def base_for(name: str, work: Path, env: dict[str, str]) -> Path:
    if name == "smollm2":
        import models

        return models.smollm2()
    path = work / f"llama-{name}"
    if not path.exists():
        print(f"making {path} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "make_synthetic_llama.py"),
                str(path),
                *SYNTHETIC[name],
            ],
            check=True,
            env=env,
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


def bench(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    work: Path = args.workdir
    base = base_for(name, work, env)
    adapter, peft_dir = make_adapter(base, work)
    out = work / "out"
    py = sys.executable
    commands = {
        "loratool": [
            [
                py,
                "-m",
                "loratool",
                "merge",
                str(base),
                str(adapter),
                "-o",
                str(out),
                "--device",
                args.device,
                "--json",
            ]
        ],
        "peft": [[py, "-c", PEFT_SCRIPT, str(base), str(peft_dir), str(out)]],
        "floor": [["cp", "-r", str(base), str(out)], [py, "-c", "import torch"]],
    }
    sides = {k: Side(k) for k in commands}
    order = list(commands)
    checked = None
    for rep in range(args.repeats):
        for side in order[rep % 3 :] + order[: rep % 3]:
            shutil.rmtree(out, ignore_errors=True)
            runs = [run_process(argv, env, work) for argv in commands[side]]
            sides[side].runs.append(
                Run(sum(r.wall for r in runs), sum(r.cpu for r in runs), max(r.rss for r in runs))
            )
            if side == "loratool" and checked is None:
                shutil.rmtree(work / "out-loratool", ignore_errors=True)
                out.rename(work / "out-loratool")
            elif side == "peft" and checked is None and (work / "out-loratool").exists():
                checked = check_equal(work / "out-loratool", out)
            last = sides[side].runs[-1]
            print(
                f"  {name} {side}: {last.wall:.2f} s wall, {last.cpu:.2f} s CPU, "
                f"{last.rss / 1e9:.2f} GB",
                file=sys.stderr,
                flush=True,
            )
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "out-loratool", ignore_errors=True)
    nbytes = size_of(base)
    if not args.keep and name != "smollm2":
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(peft_dir, ignore_errors=True)
        adapter.unlink(missing_ok=True)
    return {"model": name, "bytes": nbytes, "sides": sides, "max_abs_diff_vs_peft": checked}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="smollm2,1b", help="comma list: smollm2, 0.5b, 1b, 3b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic bases for next time")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    results = []
    for name in args.models.split(","):
        results.append(bench(name.strip(), args, env))

    print(
        f"\nmerge, r=16 all-linear adapter, {args.repeats} alternating repeats, device "
        f"{args.device}; median wall and CPU (user+sys) seconds, max peak RSS. Both merges "
        "form ΔW in fp32 and round once to the weights' dtype."
    )
    head = f"{'model':<9}{'size':>8} | {'side':<9}{'wall s':>8}{'CPU s':>8}{'RSS GB':>8} | ratios"
    print(head)
    print("-" * (len(head) + 40))
    for r in results:
        s = r["sides"]
        assert isinstance(s, dict)
        lt, pf, fl = s["loratool"], s["peft"], s["floor"]
        size = f"{r['bytes'] / 1e9:.2f}GB" if r["bytes"] else ""
        notes = {
            "loratool": f"{pf.wall / lt.wall:.1f}x faster than PEFT (CPU {pf.cpu / lt.cpu:.1f}x) at "
            f"{lt.rss / pf.rss:.2f}x its RSS; {lt.wall / fl.wall:.2f}x the floor's wall",
            "peft": f"max |loratool-PEFT| layer 0: {r['max_abs_diff_vs_peft']:.3g}"
            if r["max_abs_diff_vs_peft"] is not None
            else "",
            "floor": f"base GB per wall second: floor {r['bytes'] / fl.wall / 1e9:.2f}, "
            f"loratool {r['bytes'] / lt.wall / 1e9:.2f}, PEFT {r['bytes'] / pf.wall / 1e9:.2f}",
        }
        for i, side in enumerate((lt, pf, fl)):
            print(
                f"{r['model'] if i == 0 else '':<9}{size if i == 0 else '':>8} | {side.name:<9}"
                f"{side.wall:>8.2f}{side.cpu:>8.2f}{side.rss / 1e9:>8.2f} | {notes[side.name]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
