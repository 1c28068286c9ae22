"""Peak memory of one QLoRA training step against the bf16 step and PEFT + bitsandbytes QLoRA.

Each configuration runs in a fresh process (peak RSS is per process): load the base, put rank-16
LoRA on all linear layers, run two optimizer steps on one row of 256 tokens under bf16 autocast,
and report the base's bytes in memory, the RSS after loading and the process's peak RSS.

    python benchmarks/train_qlora.py MODEL_DIR [MODEL_DIR ...] [--anchors DIR]

``--anchors`` names a folder holding bitsandbytes (``pip install --no-deps --target DIR
bitsandbytes``), kept off the venv because PEFT imports it whenever it is importable.
Numbers are RSS on a shared machine: read them as ratios, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
mode, model_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
t0 = time.perf_counter()
if mode == "peft-bnb":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg,
        dtype=torch.bfloat16, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
else:
    from loratool import lora
    if mode == "qlora":
        from loratool.quant import load_quantized
        model, _ = load_quantized(model_dir, dtype=torch.bfloat16, scheme="nf4")
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    lora.inject(model, targets="all-linear", rank=16, alpha=32)
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
loaded = rss()
load_s = time.perf_counter() - t0
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (1, 256))
step_s = []
for _ in range(2):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    step_s.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"mode": mode, "base_bytes": base, "rss_loaded": loaded, "peak_rss": peak,
    "load_s": round(load_s, 1), "step_s": round(step_s[-1], 2), "loss": float(loss)}))
"""


def run(mode: str, model: Path, anchors: str | None) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if mode == "peft-bnb":
        env["PYTHONPATH"] += os.pathsep + str(anchors)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if r.returncode != 0:
        return {"mode": mode, "error": r.stderr.strip().splitlines()[-1][:300]}
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--anchors", help="folder with bitsandbytes installed (--target)")
    args = ap.parse_args()
    for model in args.models:
        modes = ["bf16", "qlora"] + (["peft-bnb"] if args.anchors else [])
        rows = {m: run(m, model, args.anchors) for m in modes}
        print(f"\n{model.name}")
        print(f"  {'':10} {'base MB':>9} {'RSS loaded':>11} {'peak RSS':>9} {'step s':>7}")
        for m, r in rows.items():
            if "error" in r:
                print(f"  {m:10} failed: {r['error']}")
                continue
            mb = [int(r[k]) / 2**20 for k in ("base_bytes", "rss_loaded", "peak_rss")]  # type: ignore[call-overload]
            print(f"  {m:10} {mb[0]:9.0f} {mb[1]:11.0f} {mb[2]:9.0f} {r['step_s']:>7}")
        dense, q = rows["bf16"], rows["qlora"]
        if "error" not in dense and "error" not in q:
            ratios = {
                k: int(q[k]) / int(dense[k])  # type: ignore[call-overload]
                for k in ("base_bytes", "rss_loaded", "peak_rss")
            }
            shown = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            print(f"  qlora / bf16: {shown}")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
