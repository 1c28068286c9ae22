"""reduce-rank, combine and extract against the dense methods they replace, side by side.

Three comparisons, each timed in one run with the two sides alternating (so machine load hits
both alike), reporting medians, ratios and accuracy:

1. reduce-rank (QR core, batched) vs the dense method of kohya's resize_lora.py (form B·A, then
   ``torch.linalg.svd``; we give it ``full_matrices=False``, kohya's default True is slower still):
   a synthetic adapter of 4096×4096 targets at r=64 → 16, and a SmolLM2-135M-shaped all-linear
   adapter at r=16 → 4. Per-target time, ratio, and the top-k singular values of both.
2. combine vs PEFT ``add_weighted_adapter(combination_type="svd")``: error of each result against
   the true weighted sum Σ w_i·ΔW_i (and against the Eckart–Young optimum at that rank), and time.
   PEFT's new adapter copies its config from the first input, so the rsLoRA-first order is shown too.
3. extract vs a dense thin SVD of each module's difference (mergekit's method) at equal rank:
   time for the whole checkpoint pair, and the error ‖D − D_k‖_F/‖D‖_F of both.

All sides run fp32 on the CPU (or --device). Run: ``python benchmarks/lowrank.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loratool  # noqa: E402
from loratool import Adapter, Target  # noqa: E402
from loratool.lowrank import spectrum  # noqa: E402


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def row(*cells: object, widths: tuple[int, ...] = (34, 14, 14, 10)) -> str:
    return "  ".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, w) in enumerate(zip(cells, widths, strict=False))
    )


def synthetic_target(name: str, m: int, n: int, r: int, seed: int, alpha: float) -> Target:
    """Factors with a decaying spectrum, like a trained LoRA (σ_i ∝ 1/i)."""
    g = torch.Generator().manual_seed(seed)
    decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    A = torch.randn(r, n, generator=g) / math.sqrt(n)
    B = torch.randn(m, r, generator=g) * decay * 0.05
    return Target.from_factors(name, A, B, alpha=alpha)


def dense_reduce(t: Target, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kohya resize_lora.py's method: densify, full SVD, keep k (factors U·√S, √S·Vh)."""
    W = t.lora_B.float() @ t.lora_A.float() * t.scale
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k], S


# ---------------------------------------------------------------------------------------------


def bench_reduce(
    label: str, targets: list[Target], k: int, dense_n: int, reps: int, device: str
) -> None:
    adapter = Adapter.from_targets(targets)
    loratool.reduce_rank(Adapter.from_targets(targets[:1]), rank=k, device=device)  # warm-up
    ours: list[float] = []
    dense: list[float] = []
    dense_sv: dict[str, torch.Tensor] = {}
    out: Adapter | None = None
    step = max(1, len(targets) // dense_n)
    sample = targets[::step][:dense_n]
    for _ in range(reps):
        dt, (out, _) = timed(lambda: loratool.reduce_rank(adapter, rank=k, device=device))
        ours.append(dt / len(targets))
        for t in sample:
            dt, (_, _, S) = timed(lambda t=t: dense_reduce(t, k))
            dense.append(dt)
            dense_sv[t.name] = S
    assert out is not None
    worst = 0.0
    for name, S in dense_sv.items():
        got = torch.tensor(spectrum(out.targets[name]).singular_values, dtype=torch.float64)
        worst = max(worst, float(((got - S[:k].double()).abs() / S[:k].double()).max()))
    d, o = statistics.median(dense), statistics.median(ours)
    print(
        f"\n[reduce-rank] {label}: {len(targets)} targets, r={targets[0].rank} → {k}, fp32, {device}"
    )
    print(row("side", "per target", "whole adapter", "ratio"))
    print(
        row(
            "dense B·A + torch.linalg.svd", f"{d * 1e3:.1f} ms", f"{d * len(targets):.2f} s", "1.0×"
        )
    )
    print(
        row(
            "loratool QR core (batched)",
            f"{o * 1e3:.2f} ms",
            f"{o * len(targets):.3f} s",
            f"{d / o:.0f}×",
        )
    )
    print(f"  top-{k} singular values, max relative difference vs dense: {worst:.2e} "
          f"({len(dense_sv)} targets compared)")  # fmt: skip


# ---------------------------------------------------------------------------------------------


class _Stack(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(n, m, bias=False) for m, n in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        return x


def bench_combine(shapes: list[tuple[int, int]], k: int, reps: int) -> None:
    from peft import LoraConfig, get_peft_model

    weights = [0.7, -0.4]
    specs = {
        "std": dict(r=16, lora_alpha=32, use_rslora=False),
        "rs": dict(r=8, lora_alpha=16, use_rslora=True),
    }
    for order in (("std", "rs"), ("rs", "std")):
        torch.manual_seed(0)
        model = get_peft_model(
            _Stack(shapes),
            LoraConfig(target_modules=["0", "1", "2", "3", "4", "5", "6", "7"][: len(shapes)],
                       **specs[order[0]]),  # type: ignore[arg-type]
            adapter_name=order[0],
        )  # fmt: skip
        model.add_adapter(
            order[1],
            LoraConfig(target_modules=["0", "1", "2", "3", "4", "5", "6", "7"][: len(shapes)],
                       **specs[order[1]]),  # type: ignore[arg-type]
        )  # fmt: skip
        layers = [model.base_model.model.layers[i] for i in range(len(shapes))]
        with torch.no_grad():
            for layer in layers:
                for name in order:
                    layer.lora_A[name].weight.normal_(0, 0.02)
                    layer.lora_B[name].weight.normal_(0, 0.02)
        with torch.no_grad():
            truth = [
                sum(
                    w * layer.get_delta_weight(a).double()
                    for w, a in zip(weights, order, strict=True)
                )
                for layer in layers
            ]
        optimum = []
        for t in truth:
            s = torch.linalg.svdvals(t)
            optimum.append(float(s[k:].norm() / s.norm()))

        def ours_adapter(name: str, layers: list[Any] = layers) -> Adapter:
            ts = []
            for i, layer in enumerate(layers):
                cfg = specs[name]
                ts.append(
                    Target.from_factors(
                        f"layers.{i}",
                        layer.lora_A[name].weight.detach().clone(),
                        layer.lora_B[name].weight.detach().clone(),
                        alpha=float(cfg["lora_alpha"]),  # type: ignore[arg-type]
                        scale_rule="rslora" if cfg["use_rslora"] else "standard",
                    )
                )
            return Adapter.from_targets(ts)

        inputs = [ours_adapter(a) for a in order]
        loratool.combine(inputs, weights=weights, rank=k)  # warm-up (first-call costs)
        t_peft: list[float] = []
        t_ours: list[float] = []
        for rep in range(reps):
            out_name = f"svd{rep}"
            dt, _ = timed(
                lambda m=model, o=order, out_name=out_name: m.add_weighted_adapter(
                    list(o), weights, out_name, combination_type="svd", svd_rank=k
                )
            )
            t_peft.append(dt)
            dt, (ours, _) = timed(
                lambda inputs=inputs: loratool.combine(inputs, weights=weights, rank=k)
            )
            t_ours.append(dt)
        with torch.no_grad():
            deltas = [layer.get_delta_weight(out_name).double() for layer in layers]
        err_peft = [float((dw - t).norm() / t.norm()) for dw, t in zip(deltas, truth, strict=True)]
        err_ours = [
            float((ours.targets[f"layers.{i}"].delta(torch.float64) - t).norm() / t.norm())
            for i, t in enumerate(truth)
        ]
        p, o = statistics.median(t_peft), statistics.median(t_ours)
        first = "standard" if order[0] == "std" else "rsLoRA"
        print(f"\n[combine] 0.7·(r=16, α=32) − 0.4·(r=8, α=16, rsLoRA) → rank {k}, "
              f"{len(shapes)} modules {shapes[0][0]}×{shapes[0][1]}…, {first} adapter first")  # fmt: skip
        print(row("side", "time", "max rel. error", "vs optimum"))
        print(row("optimum (Eckart–Young)", "", f"{max(optimum):.3e}", "1.000"))
        ratio_p = max(e / o_ for e, o_ in zip(err_peft, optimum, strict=True))
        ratio_o = max(e / o_ for e, o_ in zip(err_ours, optimum, strict=True))
        print(
            row(
                "PEFT add_weighted_adapter(svd)",
                f"{p:.3f} s",
                f"{max(err_peft):.3e}",
                f"{ratio_p:.3f}",
            )
        )
        print(
            row("loratool combine --rank", f"{o:.4f} s", f"{max(err_ours):.3e}", f"{ratio_o:.3f}")
        )
        print(f"  time ratio PEFT / loratool: {p / o:.0f}×")
    # exact sum at full rank: PEFT's cat is exact too; its svd type at svd_rank = Σr is not needed


# ---------------------------------------------------------------------------------------------


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def bench_extract(hidden: int, inter: int, layers: int, k: int, reps: int, device: str) -> None:
    from loratool.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden // 4, hidden),
        "self_attn.v_proj": (hidden // 4, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (m, n) in shapes.items():
            key = f"model.layers.{i}.{name}.weight"
            w = torch.randn(m, n, generator=g) * 0.02
            # a fine-tuning delta: a decaying low-rank part plus small full-rank noise
            r = 64
            u = torch.randn(m, r, generator=g) / math.sqrt(m)
            v = torch.randn(r, n, generator=g) / math.sqrt(n)
            s = 1e-2 / torch.arange(1, r + 1, dtype=torch.float32) ** 0.7
            d = (u * s) @ v + torch.randn(m, n, generator=g) * 2e-6
            base[key], ft[key] = w, w + d
    with tempfile.TemporaryDirectory() as tmp:
        b, f = _write(Path(tmp) / "base", base), _write(Path(tmp) / "ft", ft)
        del base, ft
        bc, fc = Checkpoint(b), Checkpoint(f)
        keys = sorted(bc.entries)

        def dense() -> dict[str, float]:
            errs = {}
            for key in keys:
                D = fc.read(key).float() - bc.read(key).float()
                U, S, Vh = torch.linalg.svd(D, full_matrices=False)
                Dk = (U[:, :k] * S[:k]) @ Vh[:k]
                errs[key[: -len(".weight")]] = float((D - Dk).norm() / D.norm())
            return errs

        t_ours: list[float] = []
        t_dense: list[float] = []
        for _ in range(reps):
            dt, (_, report) = timed(lambda: loratool.extract(bc, fc, rank=k, device=device))
            t_ours.append(dt)
            dt, errs = timed(dense)
            t_dense.append(dt)
        ratios = [r.relative_error / errs[r.name] for r in report.targets]
        d, o = statistics.median(t_dense), statistics.median(t_ours)
        print(f"\n[extract] {layers} Llama-shaped layer(s), hidden {hidden}, intermediate {inter}: "
              f"{len(keys)} modules, rank {k}, fp32, {device}; methods "
              f"{sorted({r.method for r in report.targets})}")  # fmt: skip
        print(row("side", "time", "mean rel. error", "ratio"))
        print(
            row(
                "dense thin SVD per module",
                f"{d:.2f} s",
                f"{statistics.mean(errs.values()):.4e}",
                "1.0×",
            )
        )
        print(row("loratool extract", f"{o:.2f} s",
                  f"{statistics.mean(r.relative_error for r in report.targets):.4e}", f"{d / o:.1f}×"))  # fmt: skip
        print(
            f"  error ours / dense optimum per module: min {min(ratios):.5f}, max {max(ratios):.5f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--only", choices=["reduce", "combine", "extract"], action="append")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    only = set(args.only or ["reduce", "combine", "extract"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if "reduce" in only:
        big = 1024 if args.quick else 4096
        ts = [
            synthetic_target(f"model.layers.{i}.q_proj", big, big, 64, i, 64.0) for i in range(16)
        ]
        bench_reduce(
            f"{big}×{big}", ts, 16, dense_n=1 if args.quick else 2, reps=reps, device=args.device
        )
        smol = {
            "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
            "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
            "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536),
        }  # fmt: skip
        n_layers = 4 if args.quick else 30
        ts = [
            synthetic_target(f"model.layers.{i}.{name}", m, n, 16, 100 * i + j, 32.0)
            for i in range(n_layers)
            for j, (name, (m, n)) in enumerate(smol.items())
        ]
        bench_reduce(
            "SmolLM2-135M all-linear", ts, 4, dense_n=len(ts), reps=reps, device=args.device
        )
    if "combine" in only:
        dim = 1024 if args.quick else 2048
        bench_combine([(dim, dim)] * 4, k=8, reps=reps)
    if "extract" in only:
        if args.quick:
            bench_extract(512, 1408, 1, 16, 1, args.device)
        else:
            bench_extract(2048, 5632, 1, 16, reps, args.device)
            bench_extract(2048, 5632, 1, 64, 1, args.device)


if __name__ == "__main__":
    main()
