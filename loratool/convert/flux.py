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
