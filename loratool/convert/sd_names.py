"""Image-model module names: kohya ``lora_unet_…``/``lora_te…`` ⇄ diffusers paths, SD and Flux.

kohya names a module ``<prefix><path with '.' → '_'>``; for SD 1.x/2.x and SDXL the path is
diffusers' (``lora_unet_down_blocks_0_attentions_0_proj_in``), the prefix says the component:

| prefix | component | |
|---|---|---|
| ``lora_unet_`` | ``unet`` or ``transformer`` | the denoiser of every family kohya trains |
| ``lora_te_``, ``lora_te1_`` | ``text_encoder`` | SD's CLIP, SDXL's first CLIP |
| ``lora_te2_`` / ``lora_te3_`` | ``text_encoder_2`` / ``_3`` | SDXL's OpenCLIP-G, SD3's T5 |
| ``lora_transformer_`` | ``transformer`` | diffusers' own kohya export |

Underscoring is not injective (``transformer_blocks``), so names are resolved against the base's
own module list, never guessed: ``resolve`` matches the underscored path exactly (or a unique
module whose path ends with it, or which it ends with: transformers 5 drops CLIP's
``text_model.``). Flux LoRAs from kohya (``networks/lora_flux.py``) use Black Forest Labs'
original names, where q, k and v are one fused ``qkv`` Linear; ``FLUX_BFL`` maps each to the
diffusers modules whose rows it holds, in order, and ``flux_split`` gives the row split (a LoRA
on a fused weight is exactly one LoRA per part: the same A, B cut by rows).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import CompatibilityError

# kohya prefix → the diffusers components it can mean, in the order tried.
PREFIX_COMPONENTS: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("unet", "transformer"),
    "lora_transformer_": ("transformer",),
    "lora_te1_": ("text_encoder",),
    "lora_te2_": ("text_encoder_2",),
    "lora_te3_": ("text_encoder_3",),
    "lora_te_": ("text_encoder",),
    "lycoris_": ("unet", "transformer"),  # LyCORIS' create_lycoris on a bare model
}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# Black Forest Labs' Flux module → the diffusers modules its output rows hold, in order.
# "{h}" parts are hidden-size rows each; proj_mlp takes the rest (mlp_ratio · hidden).
FLUX_BFL: dict[str, tuple[str, ...]] = {
    r"double_blocks\.(\d+)\.img_attn\.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    r"double_blocks\.(\d+)\.txt_attn\.qkv": (
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
    ),
    r"double_blocks\.(\d+)\.img_attn\.proj": ("attn.to_out.0",),
    r"double_blocks\.(\d+)\.txt_attn\.proj": ("attn.to_add_out",),
    r"double_blocks\.(\d+)\.img_mlp\.0": ("ff.net.0.proj",),
    r"double_blocks\.(\d+)\.img_mlp\.2": ("ff.net.2",),
    r"double_blocks\.(\d+)\.txt_mlp\.0": ("ff_context.net.0.proj",),
    r"double_blocks\.(\d+)\.txt_mlp\.2": ("ff_context.net.2",),
    r"double_blocks\.(\d+)\.img_mod\.lin": ("norm1.linear",),
    r"double_blocks\.(\d+)\.txt_mod\.lin": ("norm1_context.linear",),
    r"single_blocks\.(\d+)\.linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    r"single_blocks\.(\d+)\.linear2": ("proj_out",),
    r"single_blocks\.(\d+)\.modulation\.lin": ("norm.linear",),
}
_FLUX_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def pipeline_components(root: str | os.PathLike[str]) -> dict[str, Path]:
    """A diffusers pipeline folder's model components that hold weights, by name."""
    p = Path(root)
    names: Iterable[str] = COMPONENTS
    index = p / "model_index.json"
    if index.is_file():
        try:
            doc = json.loads(index.read_text())
        except ValueError:
            doc = {}
        if isinstance(doc, dict):
            names = [k for k, v in doc.items() if isinstance(v, list) and not k.startswith("_")]
    return {n: p / n for n in names if (p / n / "config.json").is_file()}


def is_pipeline(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "model_index.json").is_file() and bool(pipeline_components(p))


def underscored_index(modules: Iterable[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for m in modules:
        index.setdefault(m.replace(".", "_"), []).append(m)
    return index


def _strip_component(kohya: str, components: Iterable[str]) -> list[tuple[str, str]]:
    """(component, underscored rest) pairs a kohya name can stand for."""
    out = []
    for prefix in sorted(PREFIX_COMPONENTS, key=len, reverse=True):
        if kohya.startswith(prefix):
            rest = kohya[len(prefix) :]
            out += [(c, rest) for c in PREFIX_COMPONENTS[prefix] if c in components]
            break
    return out


def resolve(
    kohya: str, indexes: Mapping[str, Mapping[str, list[str]]], *, where: str
) -> tuple[str, str]:
    """``(component, module path)`` of a kohya name, from each component's underscored index.

    ``indexes`` maps a component name (``""`` for a base that is one model folder, tried for
    every prefix) to ``underscored_index`` of its modules. Exactly one module must match.
    """
    candidates = _strip_component(kohya, [c for c in indexes if c])
    if "" in indexes:
        for prefix in sorted(PREFIX_COMPONENTS, key=len, reverse=True):
            if kohya.startswith(prefix):
                candidates.append(("", kohya[len(prefix) :]))
                break
    for exact in (True, False):
        hits: set[tuple[str, str]] = set()
        for component, rest in candidates:
            index = indexes[component]
            if exact:
                hits |= {(component, m) for m in index.get(rest, [])}
            else:
                hits |= {
                    (component, m)
                    for u, ms in index.items()
                    if u.endswith("_" + rest) or rest.endswith("_" + u)
                    for m in ms
                }
        if len(hits) > 1:
            shown = ", ".join(f"{c}.{m}" if c else m for c, m in sorted(hits)[:4])
            raise CompatibilityError(
                f"kohya module '{kohya}' matches several base modules: {shown}",
                code="ambiguous-module",
                where=where,
            )
        if hits:
            return hits.pop()
    comps = ", ".join(c for c in indexes if c) or "the base folder"
    raise CompatibilityError(
        f"kohya module '{kohya}' matches no weight in {comps}",
        code="missing-module",
        where=where,
        hint="for lora_te… modules pass the pipeline folder (with text_encoder/), not unet/",
    )


def flux_parts(bfl: str) -> tuple[str, ...] | None:
    """The diffusers module paths a BFL Flux module (dotted, no ``.weight``) maps onto."""
    for pattern, parts in FLUX_BFL.items():
        m = re.fullmatch(pattern, bfl)
        if m:
            block = _FLUX_BLOCKS[bfl.split(".", 1)[0]]
            return tuple(f"{block}.{m.group(1)}.{p}" for p in parts)
    return None


def flux_bfl_name(kohya: str) -> str | None:
    """``lora_unet_double_blocks_0_img_attn_qkv`` → ``double_blocks.0.img_attn.qkv`` (or None)."""
    m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+)", kohya)
    if m is None:
        return None
    tail = m.group(3)
    for pattern in FLUX_BFL:
        leaf = pattern.split(r"(\d+)\.", 1)[1].replace("\\.", ".")
        if tail == leaf.replace(".", "_"):
            return f"{m.group(1)}_blocks.{m.group(2)}.{leaf}"
    return None


def flux_split(parts: tuple[str, ...], out_features: int, hidden: int) -> list[int]:
    """Row counts of each part of a fused Flux Linear (q, k, v are ``hidden`` rows each)."""
    if len(parts) == 1:
        return [out_features]
    rows = [hidden] * 3
    if len(parts) == 4:  # single blocks: q, k, v, then the MLP input
        rows.append(out_features - 3 * hidden)
    if sum(rows) != out_features or rows[-1] <= 0:
        raise CompatibilityError(
            f"a fused Flux layer of {out_features} rows does not split into {len(parts)} "
            f"parts of hidden size {hidden}",
            code="shape-mismatch",
        )
    return rows


IMAGE_PREFIXES = ("unet.", "transformer.", "lora_unet_", "lora_te", "lycoris_")


def is_image_adapter(targets: Iterable[object]) -> bool:
    """Whether an adapter's targets are an image model's (diffusers names or image kinds)."""
    from .. import constants as C

    for t in targets:
        if getattr(t, "kind", None) in C.KINDS_IMAGE:
            return True
        if str(getattr(t, "name", "")).startswith(IMAGE_PREFIXES):
            return True
    return False
