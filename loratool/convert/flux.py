"""kohya Flux LoRAs onto a diffusers Flux transformer: Black Forest Labs' fused layers, split.

kohya's ``networks/lora_flux.py`` names modules after BFL's original Flux code
(``lora_unet_double_blocks_0_img_attn_qkv``), where one Linear computes q, k and v (and, in the
single-stream blocks, the MLP input too). diffusers' ``FluxTransformer2DModel`` has one Linear
per part (``transformer_blocks.0.attn.to_q`` …). A LoRA on the fused weight is exactly one LoRA
per part: ΔW's rows split, so each part keeps A and takes its rows of B, at the same rank and
scale (``sd_names.FLUX_BFL`` says which rows go where). diffusers' own converter
(``_convert_kohya_flux_lora_to_diffusers``) does the same. LoHa/LoKr on a fused layer are
refused: a Kronecker product does not split by rows.
"""

from __future__ import annotations

from ..adapter import Adapter, Target
from ..checkpoint import Checkpoint
from ..errors import CompatibilityError
from . import sd_names


def _hidden(ckpt: Checkpoint) -> int | None:
    key = ckpt.resolve("transformer_blocks.0.attn.to_q")
    return None if key is None else int(ckpt.shape(key)[0])


def split_bfl(adapter: Adapter, ckpt: Checkpoint, notes: list[str], prefix: str = "") -> Adapter:
    """``adapter`` with every BFL-named Flux target replaced by its diffusers parts (named
    ``prefix`` + module path: ``transformer.`` against a pipeline folder)."""
    hidden = _hidden(ckpt)
    if hidden is None:
        return adapter
    out: dict[str, Target] = {}
    split = 0
    for name, t in adapter.targets.items():
        bfl = sd_names.flux_bfl_name(name)
        parts = sd_names.flux_parts(bfl) if bfl else None
        if parts is None:
            out[name] = t
            continue
        if t.kind != "linear" or t.features:
            raise CompatibilityError(
                f"kohya Flux module '{name}' is {t.kind}: only LoRA on BFL's fused layers "
                "splits exactly into diffusers' modules",
                code="unsupported-kind",
                where=str(ckpt.path),
            )
        rows = sd_names.flux_split(parts, t.out_features, hidden)
        b, start = t.lora_B, 0
        for part, n in zip(parts, rows, strict=True):
            out[prefix + part] = Target.from_factors(
                prefix + part,
                t.lora_A,
                b[start : start + n].contiguous(),
                alpha=t.alpha,
                scale_rule=t.scale_rule,
            )
            start += n
        split += 1
    if not split:
        return adapter
    notes.append(f"split {split} BFL Flux modules (fused qkv / linear1) into diffusers' layers")
    return Adapter(
        targets=dict(sorted(out.items())),
        base=adapter.base,
        provenance=adapter.provenance,
        metadata=adapter.metadata,
        path=adapter.path,
    )


def _bfl_of(path: str) -> tuple[str, tuple[str, ...], str] | None:
    """(BFL module, its diffusers parts, this path's part) for a diffusers Flux block path."""
    import re

    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m is None:
        return None
    kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
    for pattern, parts in sd_names.FLUX_BFL.items():
        if pattern.startswith(kind) and m.group(3) in parts:
            return pattern.replace(r"(\d+)", m.group(2)).replace("\\.", "."), parts, m.group(3)
    return None


def fuse_bfl(adapter: Adapter, notes: list[str]) -> Adapter:
    """The way back for ``convert --to kohya``: diffusers Flux targets under BFL's kohya names.

    The parts of one fused layer (q, k, v; in the single blocks also proj_mlp) become one LoRA
    of rank Σr: A = [A_q; A_k; A_v], B = blockdiag(s_q·B_q, s_k·B_k, s_v·B_v), alpha = Σr
    (scale 1) — exactly the sum of the parts' updates in BFL's row order; the scales move into
    B (one rounding). Used only when every target is a plain Linear LoRA on a Flux block layer
    and each fused layer has all its parts; otherwise the diffusers names stay (and a note).
    """
    import torch

    found: dict[str, tuple[tuple[str, ...], dict[str, Target]]] = {}
    for name, t in adapter.targets.items():
        hit = _bfl_of(name.removeprefix("transformer."))
        if hit is None or t.kind != "linear" or t.features:
            if found or hit is not None:
                notes.append("Flux modules keep their diffusers names (not all are BFL layers)")
            return adapter
        bfl, parts, part = hit
        found.setdefault(bfl, (parts, {}))[1][part] = t
    if any(set(parts) != set(members) for parts, members in found.values()):
        notes.append("Flux modules keep their diffusers names (a fused layer lacks a part)")
        return adapter
    out: dict[str, Target] = {}
    for bfl, (names, members) in sorted(found.items()):
        kohya = "lora_unet_" + bfl.replace(".", "_")
        ts = [members[p] for p in names]
        if len(ts) == 1:
            out[kohya] = ts[0].replace(name=kohya)
            continue
        total = sum(t.rank for t in ts)
        B = torch.zeros(sum(t.out_features for t in ts), total, dtype=torch.float64)
        r0 = c0 = 0
        for t in ts:
            B[r0 : r0 + t.out_features, c0 : c0 + t.rank] = t.lora_B.double() * t.scale
            r0, c0 = r0 + t.out_features, c0 + t.rank
        A = torch.cat([t.lora_A for t in ts])
        out[kohya] = Target.from_factors(kohya, A, B.to(A.dtype), alpha=float(total))
    notes.append(f"{len(found)} Flux modules under BFL's kohya names (q/k/v fused exactly)")
    return Adapter(
        targets=out,
        base=adapter.base,
        provenance=adapter.provenance,
        metadata=adapter.metadata,
        path=adapter.path,
    )
