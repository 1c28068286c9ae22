"""``loratool convert``: any adapter loratool reads → loratool, PEFT, kohya or GGUF."""

from __future__ import annotations

import click

from ..console import emit_json, human_bytes, info


@click.command("convert")
@click.argument("src")
@click.option(
    "-o",
    "--output",
    "dst",
    required=True,
    help="Where to write: a file (loratool, kohya, gguf, diffusers) or a folder (peft).",
)
@click.option(
    "--to",
    "to",
    type=click.Choice(["loratool", "peft", "kohya", "gguf", "diffusers"]),
    default="loratool",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--dtype",
    type=click.Choice(["f32", "f16", "bf16"]),
    help="Cast the factors (rounded once from the stored values). Default: keep them.",
)
@click.option(
    "--base",
    help="Base model folder: check the adapter fits it before writing, map kohya names to its "
    "modules, and bind the output to it (needed for --to gguf).",
)
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read old pickled weights (adapter_model.bin, kohya .pt/.ckpt) with a restricted "
    "unpickler that accepts only tensors and plain containers. Default: refuse them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def command(
    src: str,
    dst: str,
    to: str,
    dtype: str | None,
    base: str | None,
    force: bool,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Convert the adapter at SRC and write it to DST.

    SRC is a loratool file, a PEFT folder (adapter_config.json + adapter_model.safetensors, or a
    Hub cache layout), a kohya LoRA file or a diffusers LoRA file; its format is detected.
    Every scale is kept exactly: PEFT's rank/alpha patterns and rsLoRA, kohya's per-module
    alpha, and llama.cpp's single alpha with each module's scale folded into lora_b.
    """
    from ..convert import convert

    report = convert(
        src, dst, to=to, dtype=dtype, base=base, force=force, allow_pickle=allow_pickle
    )
    if as_json:
        emit_json(report)
        return
    for note in report["notes"]:
        info(f"note: {note}")
    info(
        f"{report['source_format']} → {report['to']}: {report['targets']} targets, "
        f"{report['parameters']:,} parameters ({', '.join(report['dtypes'])}), "
        f"{human_bytes(report['output_bytes'])} written to {report['output']} "
        f"in {report['seconds']:.2f} s"
    )
    if report["base"]:
        info(f"bound to {report['base']['hub_id'] or report['base']['path']}")
