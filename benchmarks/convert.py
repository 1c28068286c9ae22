"""convert vs PEFT's own save, side by side, on a SmolLM2-135M r=16 all-linear adapter.

Two comparisons, each side run alternately so machine load hits both alike:

1. in one process, writing an adapter that is already in memory: PEFT's
   ``PeftModel.save_pretrained`` against ``loratool.convert.convert`` from a PEFT folder (which
   also reads it) to each output format;
2. whole processes, as a user runs them: re-saving a PEFT adapter with PEFT (load the base,
   ``PeftModel.from_pretrained``, ``save_pretrained`` — PEFT cannot touch an adapter without
   its base) against ``loratool convert`` (which reads only the adapter).

Then the output sizes. Times are medians; ratios are loratool / PEFT.

    python benchmarks/convert.py [--reps 5] [--procs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def weights_size(path: Path) -> int:
    return size(path / "adapter_model.safetensors") if path.is_dir() else size(path)


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def alternate(sides: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


PEFT_RESAVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
PeftModel.from_pretrained(base, sys.argv[2]).save_pretrained(sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="in-process repetitions per side")
    parser.add_argument("--procs", type=int, default=3, help="whole-process repetitions per side")
    args = parser.parse_args()

    import models
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratool.convert import convert

    torch.manual_seed(0)
    base = models.smollm2()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    tmp = Path(tempfile.mkdtemp(prefix="loratool-bench-convert-"))
    try:
        src = tmp / "peft"
        model.save_pretrained(src)
        lt = tmp / "a.safetensors"
        convert(src, lt)
        outs = {
            "PEFT save_pretrained": tmp / "o_peft_save",
            "convert peft→loratool": tmp / "o.safetensors",
            "convert loratool→peft": tmp / "o_peft",
            "convert loratool→kohya": tmp / "o_kohya.safetensors",
            "convert loratool→gguf": tmp / "o.gguf",
        }

        def peft_save() -> None:
            clear(outs["PEFT save_pretrained"])
            model.save_pretrained(outs["PEFT save_pretrained"])

        def job(source: Path, name: str, **kw: object) -> Callable[[], None]:
            def go() -> None:
                convert(source, outs[name], force=True, **kw)  # type: ignore[arg-type]

            return go

        sides: dict[str, Callable[[], None]] = {
            "PEFT save_pretrained": peft_save,
            "convert peft→loratool": job(src, "convert peft→loratool"),
            "convert loratool→peft": job(lt, "convert loratool→peft", to="peft"),
            "convert loratool→kohya": job(lt, "convert loratool→kohya", to="kohya"),
            "convert loratool→gguf": job(lt, "convert loratool→gguf", to="gguf", base=base),
        }
        times = alternate(sides, args.reps)
        ref = statistics.median(times["PEFT save_pretrained"])
        params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        print(f"\nSmolLM2-135M, r=16 all-linear (210 modules, {params:,} parameters, fp32)")
        print(f"torch threads: {torch.get_num_threads()}; {args.reps} reps, alternating\n")
        print("1. writing the adapter, in one process")
        print(f"{'side':<26}{'median s':>10}{'min s':>9}{'vs PEFT':>9}{'weights bytes':>15}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"{name:<26}{med:>10.3f}{min(ts):>9.3f}{med / ref:>8.2f}x"
                f"{weights_size(outs[name]):>15,}"
            )

        print("\n2. whole processes: re-save a PEFT adapter (PEFT needs its base loaded)")
        py = sys.executable
        cmds = {
            "PEFT load+save": [py, "-c", PEFT_RESAVE, str(base), str(src), str(tmp / "p_out")],
            "loratool convert →peft": [
                py, "-m", "loratool", "convert", str(src), "-o", str(tmp / "l_out"), "--to",
                "peft", "--force",
            ],
            "loratool convert →loratool": [
                py, "-m", "loratool", "convert", str(src), "-o", str(tmp / "l.safetensors"),
                "--force",
            ],
        }  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def run(cmd: list[str]) -> Callable[[], None]:
            def go() -> None:
                clear(tmp / "p_out")
                subprocess.run(cmd, check=True, env=env, capture_output=True)

            return go

        ptimes = alternate({k: run(v) for k, v in cmds.items()}, args.procs)
        pref = statistics.median(ptimes["PEFT load+save"])
        print(f"{'side':<28}{'median s':>10}{'min s':>9}{'vs PEFT':>9}")
        for name, ts in ptimes.items():
            med = statistics.median(ts)
            print(f"{name:<28}{med:>10.2f}{min(ts):>9.2f}{med / pref:>8.2f}x")

        print("\n3. output size (whole output: PEFT folder incl. config + README)")
        convert(lt, tmp / "bf16.safetensors", dtype="bf16")
        convert(lt, tmp / "bf16.gguf", to="gguf", base=base, dtype="bf16")
        sizes = {
            "PEFT save_pretrained (f32)": size(outs["PEFT save_pretrained"]),
            "loratool (f32)": size(outs["convert peft→loratool"]),
            "loratool→peft (f32)": size(outs["convert loratool→peft"]),
            "kohya (f32)": size(outs["convert loratool→kohya"]),
            "gguf (f32)": size(outs["convert loratool→gguf"]),
            "loratool (bf16)": size(tmp / "bf16.safetensors"),
            "gguf (bf16)": size(tmp / "bf16.gguf"),
        }
        psize = sizes["PEFT save_pretrained (f32)"]
        print(f"{'output':<28}{'bytes':>14}{'vs PEFT':>9}")
        for name, n in sizes.items():
            print(f"{name:<28}{n:>14,}{n / psize:>8.3f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
