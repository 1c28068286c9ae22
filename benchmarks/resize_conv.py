"""reduce-rank of an SDXL-shaped LoCon file against kohya's resize_lora.py algorithm, side by side.

The adapter has the real module shapes of the SDXL base UNet (diffusers'
``stabilityai/stable-diffusion-xl-base-1.0`` unet config, instantiated on the meta device: no
weights) with LoCon's targets — every Linear inside the transformer blocks at rank 32, every
ResNet, down- and upsampler Conv2d at rank 16 (3×3 and 1×1 kernels) — and random factors with a
decaying spectrum. Both sides reduce it to rank 16 (linear) / 8 (conv) in fp32 on the CPU:

- **kohya** (sd-scripts ``networks/resize_lora.py``, reimplemented here from its source as it
  runs): per module, form the dense ΔW = up @ down (a conv flattened to ``[out, in·kh·kw]``), run
  ``torch.linalg.svd`` on it (``full_matrices=True``, its default; the ``svd_lowrank`` branch it
  takes only when both sides exceed 2048, which no SDXL module does), keep U_k·diag(S_k) as up
  and Vh_k as down, alpha = scale·k.
- **loratool**: ``reduce_rank`` on the ``conv2d``/``linear`` targets its kohya reader makes (QR of
  both factors — a conv's A flattened to ``[r, in·kh·kw]`` —, SVD of the r×r core, batched by
  shape), the same rank-k truncation without ever forming ΔW.

Dense SVDs of the ~800 modules take tens of minutes on a laptop, so by default each distinct
(shape, rank) is timed once on both sides (the two alternating) and totals are Σ count × time;
``--full`` runs every module. The output: per shape class, time of both sides and the ratio, the
largest relative difference of the kept singular values, and the whole-file totals.

    python benchmarks/resize_conv.py [--full] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratool import Adapter, Target  # noqa: E402
from loratool.lowrank import reduce_rank  # noqa: E402

SDXL_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    layers_per_block=2,
    sample_size=128,
    in_channels=4,
    out_channels=4,
)
RANK, CONV_RANK = 32, 16  # the LoCon file
NEW_RANK, NEW_CONV_RANK = 16, 8  # kohya's --new_rank / --new_conv_rank


def sdxl_locon_modules() -> list[tuple[str, tuple[int, ...]]]:
    """(kohya name, weight shape) of LoCon's targets in the SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from torch import nn

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    out = []
    for name, module in unet.named_modules():
        conv_parent = any(p in name for p in (".resnets.", ".downsamplers.", ".upsamplers."))
        if (isinstance(module, nn.Linear) and ".attentions." in name) or (
            isinstance(module, nn.Conv2d) and conv_parent
        ):
            out.append((name, tuple(module.weight.shape)))
    return [("lora_unet_" + n.replace(".", "_"), s) for n, s in out]


def locon_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoCon state dict: lora_down/lora_up/alpha, σ_i ∝ 1/i in every module."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in sdxl_locon_modules():
        r = CONV_RANK if len(shape) == 4 else RANK
        out_f, fan_in = shape[0], math.prod(shape[1:])
        down = torch.randn(r, fan_in, generator=g) / math.sqrt(fan_in)
        up = torch.randn(out_f, r, generator=g) * (0.05 / torch.arange(1, r + 1))
        sd[name + ".lora_down.weight"] = down.reshape(r, *shape[1:])
        sd[name + ".lora_up.weight"] = up.reshape(out_f, r, *([1, 1] if len(shape) == 4 else []))
        sd[name + ".alpha"] = torch.tensor(float(r) / 2)
    return sd


# -- kohya's algorithm, as networks/resize_lora.py runs it (fixed rank, no dynamic method) -------


def kohya_resize_module(
    down: torch.Tensor, up: torch.Tensor, alpha: float, new_rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """merge_conv/merge_linear, then extract_conv/extract_linear and rank_resize."""
    old_rank = down.shape[0]
    scale = alpha / old_rank
    conv = down.dim() == 4
    out_size = up.shape[0]
    weight = up.reshape(out_size, -1) @ down.reshape(old_rank, -1)  # merge_*: the dense ΔW/scale
    if conv:
        weight = weight.reshape(out_size, *down.shape[1:]).reshape(out_size, -1)
    m, n = weight.shape
    if m > 2048 and n > 2048:  # svd_lowrank_niter=2 (never taken in SDXL)
        U, S, V = torch.svd_lowrank(weight, q=min(2 * new_rank, m, n), niter=2)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(weight)
    k = min(new_rank, old_rank) if S[0] > 1e-6 else 1  # rank_resize: cap at rank, zero → 1
    new_alpha = float(scale * k)
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if conv:
        return Vh.reshape(k, *down.shape[1:]), U.reshape(out_size, k, 1, 1), new_alpha, S[:k]
    return Vh.reshape(k, n), U.reshape(out_size, k), new_alpha, S[:k]


# -- loratool --------------------------------------------------------------------------------------


def as_adapter(sd: dict[str, torch.Tensor], names: list[str]) -> Adapter:
    """The LoCon modules as loratool targets, as its kohya reader makes them: conv2d for the
    convolutions (A [r, in, kh, kw], B [out, r, 1, 1]), linear for the rest."""
    targets = []
    for name in names:
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        alpha = float(sd[name + ".alpha"])
        if down.dim() == 4:
            r, n_in = down.shape[:2]
            targets.append(
                Target(
                    name,
                    rank=r,
                    alpha=alpha,
                    in_features=n_in,
                    out_features=up.shape[0],
                    kind="conv2d",
                    fields={"kernel": tuple(down.shape[2:])},
                    lora_A=down,
                    lora_B=up,
                )
            )
        else:
            targets.append(Target.from_factors(name, down, up, alpha=alpha))
    return Adapter.from_targets(targets)


def loratool_resize(sd: dict[str, torch.Tensor], names: list[str], new_rank: int) -> Any:
    reduced, report = reduce_rank(as_adapter(sd, names), rank=new_rank)
    return reduced, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="time every module, not one per shape")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sd = locon_file()
    modules = sdxl_locon_modules()
    classes: dict[tuple[int, ...], list[str]] = {}
    for name, shape in modules:
        classes.setdefault(shape, []).append(name)
    counts = Counter({shape: len(v) for shape, v in classes.items()})
    print(
        f"SDXL LoCon: {len(modules)} modules ({sum(len(s) == 4 for _, s in modules)} conv), "
        f"{len(classes)} shapes; rank {RANK}/{CONV_RANK} → {NEW_RANK}/{NEW_CONV_RANK}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    total_k = total_l = 0.0
    worst = 0.0
    print(f"{'shape':<24}{'count':>6}{'kohya s':>11}{'loratool s':>12}{'ratio':>9}{'max dσ/σ':>11}")
    for shape, names in sorted(classes.items(), key=lambda kv: -math.prod(kv[0])):
        timed = names if args.full else names[:1]
        new_rank = NEW_CONV_RANK if len(shape) == 4 else NEW_RANK
        # loratool first, then kohya, per class: load hits both alike.
        t0 = time.perf_counter()
        reduced, _ = loratool_resize(sd, timed, new_rank)
        t_l = time.perf_counter() - t0
        t0 = time.perf_counter()
        diffs = []
        for name in timed:
            _, _, alpha_k, s_k = kohya_resize_module(
                sd[name + ".lora_down.weight"],
                sd[name + ".lora_up.weight"],
                float(sd[name + ".alpha"]),
                new_rank,
            )
            t = reduced.targets[name]
            d = t.delta(torch.float64)
            ours = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
            theirs = s_k.double() * (alpha_k / new_rank)
            diffs.append(float(((ours[:new_rank] - theirs).abs() / theirs[0]).max()))
            if abs(alpha_k - t.alpha) > 1e-6 * abs(alpha_k):
                raise SystemExit(f"{name}: alpha {t.alpha} vs kohya {alpha_k}")
        t_k = time.perf_counter() - t0
        scale = 1 if args.full else counts[shape]
        total_k += t_k * scale
        total_l += t_l * scale
        worst = max(worst, *diffs)
        print(
            f"{list(shape)!s:<24}{counts[shape]:>6}{t_k / len(timed):>11.4f}"
            f"{t_l / len(timed):>12.4f}{t_k / t_l:>9.1f}{max(diffs):>11.1e}"
        )
    how = "every module timed" if args.full else "one module per shape × count"
    print(
        f"whole file ({how}): kohya {total_k:.1f} s, loratool {total_l:.2f} s, "
        f"ratio {total_k / total_l:.0f}×; largest kept-σ difference {worst:.1e} of σ_1"
    )
    # The real loratool run batches every module of one shape: the whole file at once.
    t0 = time.perf_counter()
    loratool_resize(sd, [n for n, s in modules if len(s) == 2], NEW_RANK)
    loratool_resize(sd, [n for n, s in modules if len(s) == 4], NEW_CONV_RANK)
    print(f"loratool reduce_rank on the whole file (two calls): {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
