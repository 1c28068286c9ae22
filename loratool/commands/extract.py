"""``loratool extract``: a LoRA from the difference of two checkpoints, module by module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click

from ..console import progress as progress_bar
from .reduce_rank import RULES_HELP, finish, output_options, rule_options


class _Bar:
    """Drives the console's progress wrapper from the library's (done, total, name) callback."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.it: Iterator[int] | None = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.it is None:
            # The wrapper advances when asked for the next item: prime it, then step once per
            # finished module; the last step runs it out, which closes the bar.
            self.it = progress_bar(range(total), total=total, label="extract", quiet=self.quiet)
            next(self.it, None)
        next(self.it, None)

    def close(self) -> None:
        if self.it is not None and hasattr(self.it, "close"):
            self.it.close()


@click.command("extract", epilog=RULES_HELP)
@click.argument("base", type=click.Path(exists=True))
@click.argument("finetuned", type=click.Path(exists=True))
@output_options
@rule_options
@click.option(
    "--targets",
    default=None,
    help="Comma-separated module-name suffixes (q_proj,v_proj), all-linear (every 2-D weight "
    "except embeddings and lm_head) or all-conv (every Conv2d weight). Default: all-linear, "
    "plus all-conv when the base has convolutions (image models).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run the SVDs (auto: cuda when available).",
)
@click.option(
    "--dtype",
    type=click.Choice(["f32", "f16", "bf16"]),
    default="f32",
    show_default=True,
    help="dtype of the written factors (the SVD always runs in f32).",
)
@click.option(
    "--svd",
    "method",
    type=click.Choice(["auto", "exact", "randomized"]),
    default="auto",
    show_default=True,
    help="auto: exact for min(in, out) ≤ 256, randomized range finder (4 power iterations) above.",
)
def command(
    base: str,
    finetuned: str,
    output: str,
    force: bool,
    as_json: bool,
    all_rows: bool,
    rules: dict[str, Any],
    targets: str | None,
    device: str,
    dtype: str,
    method: str,
) -> None:
    """Extract a LoRA whose ΔW per module is the truncated SVD of FINETUNED − BASE.

    Both are HF checkpoint folders (single or sharded safetensors) or .safetensors files, matched
    by tensor name and read one tensor at a time. Unchanged modules are skipped. The adapter is
    bound to BASE and has scale 1 (alpha = rank). It is plain LoRA: no DoRA magnitude, bias
    delta or whole tensor (spec 1.1) is extracted; biases that changed are named in the
    report's warnings, not carried.
    """
    from .._io import check_output
    from ..lowrank import extract, make_rule, resolve_device

    make_rule(**rules)
    resolve_device(device)
    check_output(output, force=force)
    bar = _Bar(quiet=as_json)
    try:
        result, report = extract(
            base,
            finetuned,
            **rules,
            targets=targets,
            device=device,
            dtype=dtype,
            method=method,
            progress=bar,
        )
    finally:
        bar.close()
    result.save(output, force=force)
    finish(
        report,
        output,
        as_json,
        {"base": base, "finetuned": finetuned, "device": resolve_device(device)},
        all_rows=all_rows,
    )
