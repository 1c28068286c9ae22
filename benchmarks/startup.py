"""Start-up cost of `loratool inspect` against `import torch` and `import peft`, side by side.

Whole processes, alternating in one run so machine load hits every side alike; reports medians and
ratios. Run: `python benchmarks/startup.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fixtures" / "valid" / "mixed.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    exe = shutil.which("loratool") or f"{sys.executable} -m loratool"
    sides = {
        "loratool inspect": [*exe.split(), "inspect", str(ADAPTER)],
        "loratool inspect --json": [*exe.split(), "inspect", str(ADAPTER), "--json"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import peft'": [sys.executable, "-c", "import peft"],
        "python -c 'pass' (floor)": [sys.executable, "-c", "pass"],
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for cmd in sides.values():  # warm the page cache once
        subprocess.run(cmd, capture_output=True, check=True)
    for _ in range(args.runs):
        for name, cmd in sides.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    torch_s = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<28} {'median s':>9} {'vs import torch':>16}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<28} {m:>9.3f} {m / torch_s:>15.2f}x")


if __name__ == "__main__":
    main()
