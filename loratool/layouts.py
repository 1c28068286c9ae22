"""Image-model checkpoint layouts: diffusers module paths ⇄ the original SD single-file names.

A diffusers model folder (``unet/``, ``transformer/``) names its weights by module path
(``down_blocks.0.attentions.0.proj_in.weight``), and so do the adapters trained on it (PEFT,
diffusers, and kohya, whose ``lora_unet_…`` names are those paths with ``.`` → ``_``). The
original Stable Diffusion single-file checkpoint (``model.diffusion_model.…``, CompVis/LDM
layout, what A1111 and ComfyUI load) numbers the same modules differently::

    down_blocks.i.resnets.j            input_blocks.{n}.0         (in_layers / emb_layers / ...)
    down_blocks.i.attentions.j         input_blocks.{n}.1
    down_blocks.i.downsamplers.0.conv  input_blocks.{n}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1    middle_block.0 / 1 / 2
    up_blocks.i.resnets.j              output_blocks.{n}.0
    up_blocks.i.attentions.j           output_blocks.{n}.1
    up_blocks.i.upsamplers.0.conv      output_blocks.{n}.{1|2}.conv

``unet_aliases`` derives this map from the single file's own keys (the block numbering follows
from which blocks hold a down/upsampler, so no config is needed) and returns, for every UNet
weight, the diffusers key that names it; the text encoders keep transformers' names under a
prefix. The inverse of diffusers' ``convert_ldm_unet_checkpoint``, checked against it in
tests/test_image_models.py. No torch here: this is string work on header names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

UNET_PREFIX = "model.diffusion_model."
# Single-file text encoders (SD 1.x: one CLIP under cond_stage_model; SDXL: conditioner
# embedders, the first a transformers CLIP, the second open_clip's fused in_proj, left unmapped:
# a LoRA on q/k/v does not land on one slice of a fused weight by name alone).
TEXT_PREFIXES = {
    "cond_stage_model.transformer.": "text_encoder.",
    "conditioner.embedders.0.transformer.": "text_encoder.",
}
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")  # one index: middle_block.1.proj_in


def is_single_file_sd(keys: Iterable[str]) -> bool:
    """Whether a checkpoint's tensor names are the original SD single-file layout."""
    return any(k.startswith(UNET_PREFIX) for k in keys)


def _is_attention(rest: str) -> bool:
    return rest.startswith(("proj_in", "proj_out", "norm.", "transformer_blocks"))


def _block_table(unet_keys: list[str]) -> dict[tuple[str, int, int], str]:
    """(LDM group, block n, slot) → the diffusers module prefix it holds."""
    slots: dict[tuple[str, int], dict[int, str]] = {}
    for key in unet_keys:
        mid = _MIDDLE.match(key)
        if mid:
            slots.setdefault(("middle_block", int(mid.group(1))), {}).setdefault(0, mid.group(2))
        m = _BLOCK.match(key)
        if m:
            group, n, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            slots.setdefault((group, n), {}).setdefault(slot, rest)
    table: dict[tuple[str, int, int], str] = {}
    i = j = 0
    for n in sorted(n for g, n in slots if g == "input_blocks"):
        if n == 0:
            continue  # conv_in, in _TOP
        held = slots[("input_blocks", n)]
        if held.get(0, "").startswith("op."):
            table[("input_blocks", n, 0)] = f"down_blocks.{i}.downsamplers.0"
            i, j = i + 1, 0
            continue
        table[("input_blocks", n, 0)] = f"down_blocks.{i}.resnets.{j}"
        if 1 in held:
            table[("input_blocks", n, 1)] = f"down_blocks.{i}.attentions.{j}"
        j += 1
    resnet = 0
    for n in sorted(n for g, n in slots if g == "middle_block"):
        held = slots[("middle_block", n)]
        if _is_attention(held[0]):
            table[("middle_block", n, 0)] = "mid_block.attentions.0"
        else:
            table[("middle_block", n, 0)] = f"mid_block.resnets.{resnet}"
            resnet += 1
    i = j = 0
    for n in sorted(n for g, n in slots if g == "output_blocks"):
        held = slots[("output_blocks", n)]
        table[("output_blocks", n, 0)] = f"up_blocks.{i}.resnets.{j}"
        upsampled = False
        for slot in sorted(s for s in held if s > 0):
            if _is_attention(held[slot]):
                table[("output_blocks", n, slot)] = f"up_blocks.{i}.attentions.{j}"
            else:
                table[("output_blocks", n, slot)] = f"up_blocks.{i}.upsamplers.0"
                upsampled = True
        i, j = (i + 1, 0) if upsampled else (i, j + 1)
    return table


def _unet_key(key: str, table: dict[tuple[str, int, int], str]) -> str | None:
    """The diffusers name of one LDM UNet key (without ``model.diffusion_model.``)."""
    for ldm, diff in _TOP.items():
        if key.startswith(ldm + "."):
            return diff + key[len(ldm) :]
    mid = _MIDDLE.match(key)
    m = _BLOCK.match(key)
    if mid is not None:
        group, n, slot, rest = "middle_block", int(mid.group(1)), 0, mid.group(2)
    elif m is not None:
        group, n, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    else:
        return None
    prefix = table.get((group, n, slot))
    if prefix is None:
        return None
    if ".downsamplers." in prefix:
        return f"{prefix}.conv.{rest[len('op.') :]}" if rest.startswith("op.") else None
    if ".upsamplers." in prefix:
        return f"{prefix}.{rest}"  # conv.weight / conv.bias
    if ".resnets." in prefix:
        for ldm, diff in _RESNET.items():
            if rest.startswith(ldm + "."):
                return f"{prefix}.{diff}{rest[len(ldm) :]}"
        return None
    return f"{prefix}.{rest}"  # attention blocks keep diffusers' inner names


def unet_aliases(keys: Iterable[str]) -> dict[str, str]:
    """diffusers tensor name → single-file tensor name, for every UNet and text-encoder weight.

    UNet names come both bare (``down_blocks.0…``, as in a ``unet/`` folder) and with the
    component prefix ``unet.`` (as diffusers LoRA files name them); text-encoder names carry
    ``text_encoder.``. Keys that map nowhere (VAE, EMA copies, open_clip) are left out.
    """
    keys = list(keys)
    unet = [k[len(UNET_PREFIX) :] for k in keys if k.startswith(UNET_PREFIX)]
    table = _block_table(unet)
    out: dict[str, str] = {}
    for key in unet:
        diff = _unet_key(key, table)
        if diff is not None:
            out[diff] = UNET_PREFIX + key
            out["unet." + diff] = UNET_PREFIX + key
    for key in keys:
        for prefix, component in TEXT_PREFIXES.items():
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                out[component + rest] = key
                if rest.startswith("text_model."):  # transformers 5's CLIPTextModel drops it
                    out.setdefault(component + rest[len("text_model.") :], key)
    return out


def diffusers_unet_to_single(keys: Iterable[str]) -> dict[str, str]:
    """The inverse direction for a diffusers UNet's keys: diffusers key → single-file key.

    Builds the LDM block numbering from the diffusers structure (what the fixture writer and a
    diffusers → single-file export need); ``unet_aliases`` of the result maps back exactly.
    """
    keys = sorted(keys)
    blocks: dict[str, set[int]] = {}
    for key in keys:
        m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.", key)
        if m:
            blocks.setdefault(f"{m.group(1)}.{m.group(2)}", set()).add(int(m.group(4)))
    rev_top = {v: k for k, v in _TOP.items()}
    rev_res = {v: k for k, v in _RESNET.items()}
    out: dict[str, str] = {}
    n_down = 1 + max(
        (int(b.split(".")[1]) for b in blocks if b.startswith("down_blocks")), default=-1
    )
    per_down = {i: len(blocks.get(f"down_blocks.{i}", ())) for i in range(n_down)}

    def down_index(i: int, j: int) -> int:
        return 1 + sum(per_down[b] + 1 for b in range(i)) + j

    def up_index(i: int, j: int) -> int:
        return sum(len(blocks.get(f"up_blocks.{b}", ())) for b in range(i)) + j

    has_up_attn = {b for b in blocks if b.startswith("up_blocks")} & {
        ".".join(k.split(".")[:2]) for k in keys if ".attentions." in k and k.startswith("up_")
    }
    for key in keys:
        ldm: str | None = None
        for diff, old in rev_top.items():
            if key.startswith(diff + "."):
                ldm = old + key[len(diff) :]
        m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            side, i, what, j, rest = (
                m.group(1),
                int(m.group(2)),
                m.group(3),
                int(m.group(4)),
                m.group(5),
            )
            n = down_index(i, j) if side == "down_blocks" else up_index(i, j)
            group = "input_blocks" if side == "down_blocks" else "output_blocks"
            if what == "attentions":
                ldm = f"{group}.{n}.1.{rest}"
            else:
                inner = next(
                    (rev_res[d] + rest[len(d) :] for d in rev_res if rest.startswith(d + ".")), None
                )
                ldm = f"{group}.{n}.0.{inner}" if inner else None
        m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key)
        if m:
            i = int(m.group(1))
            ldm = f"input_blocks.{down_index(i, per_down[i])}.0.op.{m.group(2)}"
        m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key)
        if m:
            i = int(m.group(1))
            last = len(blocks.get(f"up_blocks.{i}", ())) - 1
            slot = 2 if f"up_blocks.{i}" in has_up_attn else 1
            ldm = f"output_blocks.{up_index(i, last)}.{slot}.{m.group(2)}"
        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            what, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if what == "attentions":
                ldm = f"middle_block.1.{rest}"
            else:
                inner = next(
                    (rev_res[d] + rest[len(d) :] for d in rev_res if rest.startswith(d + ".")), None
                )
                ldm = f"middle_block.{2 * j}.{inner}" if inner else None
        if ldm is not None:
            out[key] = UNET_PREFIX + ldm
    return out


# kohya prefixes (sd-scripts networks/lora*.py, LyCORIS' bare-model "lycoris_"), longest first.
KOHYA_PREFIXES = (
    "lora_transformer_",
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lycoris_",
    "lora_te_",
    "lora_",
)


def kohya_index(keys: Iterable[str], suffix: str = ".weight") -> dict[str, list[str]]:
    """underscored module path → the tensor keys (ending in ``suffix``) it stands for."""
    index: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(suffix):
            index.setdefault(key[: -len(suffix)].replace(".", "_"), []).append(key)
    return index


def kohya_key(name: str, index: dict[str, list[str]]) -> str | None:
    """The one key a kohya module name means in a checkpoint (exact underscored match after
    the kohya prefix); None for no match or an ambiguous one — never a guess."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            hits = index.get(name[len(prefix) :], [])
            return hits[0] if len(hits) == 1 else None
    return None
