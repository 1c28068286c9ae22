"""Benchmark: switching adapters on a loaded model, and batches that mix adapters per row.

1. Switch time, adapter a ↔ adapter b on a model already in memory (median of repeats):
     ours unmerged   HotSwap(model).activate(name): LoraLayers built at load, swapped in place
     ours merged     HotSwap(model, merged=True).activate(name): exact unmerge of the last one
                     (base restored bit for bit from in-memory corrections), then merge
     peft load+set   PeftModel.load_adapter(dir, new name) + set_adapter(name): the usual way
                     to change adapters in PEFT (reads the file each time)
     peft set        set_adapter(name) between adapters PEFT already holds (unmerged)
     fresh merge     loratool.merge(base, [adapter], out): a new merged checkpoint on disk
   Models: SmolLM2-135M (fixtures/models.py) and a synthetic sharded bf16 Llama of ~0.85B
   parameters (benchmarks/make_synthetic_llama.py --layers 13); random rank-16 adapters on all
   seven projections, alpha 32, saved as loratool files and PEFT directories with the same factors.
2. Mixed-batch throughput (SmolLM2, or --throughput-model 0.85b): 8 requests per batch, greedy, the same prompts and token
   counts, with every row on one adapter, or the rows spread over 2 or 8 adapters (``MultiLora``:
   a per-row gather of the stacked factors), and the bare base for reference.

The machine is shared: the sides alternate within each repeat; compare the ratios, not seconds.
On an oversubscribed CPU run it with OMP_NUM_THREADS=1 (every side then gets one thread; ours
merged always uses one on the CPU, serving/inplace.py says why): with 2 OpenMP threads at load
10 on 2 cores each parallel region waits on a descheduled thread, and every side is several
times slower (measured: one SmolLM2 merged switch 20 s instead of 1 s, the throughput part
25 minutes instead of 2).

    python benchmarks/serve.py                          # both parts, smollm2 and 0.85b
    python benchmarks/serve.py --models smollm2 --repeats 5 --device cuda
    python benchmarks/serve.py --models "" --throughput-model 0.85b --new-tokens 12  # batches only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SYNTHETIC = {"0.85b": ["--layers", "13"]}  # the 1b widths, 13 of its 16 layers


def base_for(name: str, work: Path) -> Path:
    if name == "smollm2":
        import models

        return models.smollm2()
    path = work / f"llama-{name}"
    if not path.exists():
        print(f"making {path} ...", file=sys.stderr, flush=True)
        script = ROOT / "benchmarks" / "make_synthetic_llama.py"
        subprocess.run([sys.executable, str(script), str(path), *SYNTHETIC[name]], check=True)
    return path


def make_adapter(base: Path, work: Path, seed: int) -> tuple[Path, Path]:
    """A random r=16 adapter on every projection of ``base``: a loratool file and a PEFT dir."""
    import torch
    from safetensors.torch import save_file

    from loratool.adapter import Adapter, Target
    from loratool.checkpoint import Checkpoint

    ours, peft_dir = work / f"{base.name}-{seed}.safetensors", work / f"{base.name}-{seed}-peft"
    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for key in sorted(ckpt.entries):
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in PROJECTIONS and key.endswith(".weight"):
            out_f, in_f = ckpt.shape(key)
            a = torch.randn(16, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, 16, generator=gen) * 0.01
            targets.append(Target.from_factors(module, a, b, alpha=32.0))
    Adapter.from_targets(targets).save(ours, force=True)
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
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    return ours, peft_dir


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """``with Clock(device) as c: ...`` then ``c.seconds`` (CUDA work waited for both ends)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Clock:
        _sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t


def switch_times(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratool import load, merge
    from loratool.serving.hotswap import HotSwap

    base = base_for(name, work)
    (a, pa), (b, pb) = make_adapter(base, work, 1), make_adapter(base, work, 2)

    def fresh() -> Any:
        m = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(args.device)
        return m.eval()

    times: dict[str, list[float]] = {
        k: [] for k in ("ours unmerged", "ours merged", "peft load+set", "peft set", "fresh merge")
    }
    adapters = {"a": load(a), "b": load(b)}
    unmerged, merged = HotSwap(fresh()), HotSwap(fresh(), merged=True)
    for swap in (unmerged, merged):
        for k, v in adapters.items():
            swap.load(k, v)
        swap.activate("a")
    peft = PeftModel.from_pretrained(fresh(), str(pa), adapter_name="a")
    peft.load_adapter(str(pb), adapter_name="b")
    corrections = 0
    with torch.no_grad():
        for i in range(args.repeats):
            target = "b" if i % 2 == 0 else "a"
            with Clock(args.device) as c:
                unmerged.activate(target)
            times["ours unmerged"].append(c.seconds)
            with Clock(args.device) as c:
                report = merged.activate(target)
            times["ours merged"].append(c.seconds)
            corrections = max(corrections, report.corrections)
            with Clock(args.device) as c:
                peft.set_adapter(target)
            times["peft set"].append(c.seconds)
            with Clock(args.device) as c:
                peft.load_adapter(str(pb if target == "b" else pa), adapter_name=f"x{i}")
                peft.set_adapter(f"x{i}")
            times["peft load+set"].append(c.seconds)
            peft.set_adapter(target)
            peft.delete_adapter(f"x{i}")
            if i < args.merge_repeats:
                out = work / f"merged-{name}"
                shutil.rmtree(out, ignore_errors=True)
                with Clock(args.device) as c:
                    merge(base, [b], out, device=args.device)
                times["fresh merge"].append(c.seconds)
                shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    params = sum(p.numel() for p in merged.model.parameters())
    return {"model": name, "params": params, "seconds": med, "corrections": corrections}


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from loratool import load
    from loratool.serving.base import encode_text, load_base
    from loratool.serving.batched import MultiLora
    from loratool.serving.generation import Row, Sampling, generate

    model_dir = base_for(args.throughput_model, work)
    if not (model_dir / "tokenizer_config.json").exists():
        # the synthetic model has no tokenizer: SmolLM2's (49k ids, inside its vocabulary) will do
        for f in base_for("smollm2", work).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, model_dir / f.name)
    b = load_base(str(model_dir), device=args.device)
    multi = MultiLora(b.model)
    for k in range(8):
        multi.add(f"a{k}", load(make_adapter(model_dir, work, 10 + k)[0]))
    prompts = [
        encode_text(b.tokenizer, f"Write a short note number {i} about the sea.")
        for i in range(args.batch)
    ]
    mixes: dict[str, list[str | None]] = {
        "base": [None] * args.batch,
        "1 adapter": ["a0"] * args.batch,
        "2 adapters": [f"a{i % 2}" for i in range(args.batch)],
        "8 adapters": [f"a{i % 8}" for i in range(args.batch)],
    }
    no_eos: set[int] = set()  # every row makes exactly --new-tokens tokens
    rates: dict[str, list[float]] = {k: [] for k in mixes}
    for rep in range(args.repeats):
        order = list(mixes)[rep % len(mixes) :] + list(mixes)[: rep % len(mixes)]
        for k in order:
            rows = [
                Row(p, Sampling(max_new_tokens=args.new_tokens), n)
                for p, n in zip(prompts, mixes[k], strict=True)
            ]
            with torch.no_grad(), Clock(args.device) as c:
                generate(b.model, rows, eos_ids=no_eos, pad_id=0, multi=multi)
            s = c.seconds
            rates[k].append(args.batch * args.new_tokens / s)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"batch": args.batch, "new_tokens": args.new_tokens, "tokens_per_s": med}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,0.85b")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--merge-repeats", type=int, default=1, help="fresh merges per model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, help="scratch folder kept between runs")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--throughput-model", default="smollm2", help="smollm2 or 0.85b")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="loratool-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": args.device, "switch": []}
    for name in filter(None, args.models.split(",")):  # --models "": throughput only
        r = switch_times(name, args, work)
        results["switch"].append(r)
        s = r["seconds"]
        print(
            f"\nswitch a↔b on {name} ({r['params'] / 1e6:.0f}M params, {args.device}); "
            f"merged kept {r['corrections']} corrections"
        )
        for k, v in s.items():
            print(
                f"  {k:15s} {v * 1e3:10.2f} ms   ×{v / s['ours unmerged']:9.1f} ours unmerged"
                f"   ×{v / s['ours merged']:7.2f} ours merged"
            )
    if not args.skip_throughput:
        t = throughput(args, work)
        results["throughput"] = t
        rates = t["tokens_per_s"]
        print(
            f"\nmixed batches on {args.throughput_model}: "
            f"{t['batch']} rows × {t['new_tokens']} new tokens"
        )
        for k, v in rates.items():
            print(f"  {k:11s} {v:8.1f} tokens/s   ×{v / rates['1 adapter']:.2f} of 1 adapter")
    print(json.dumps(results, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
