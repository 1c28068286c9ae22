"""``loratool combine``: the exact weighted sum of adapters, optionally cut to a lower rank."""

from __future__ import annotations

from typing import Any

import click

from .reduce_rank import RULES_HELP, finish, output_options, rule_options


@click.command("combine", epilog=RULES_HELP)
@click.argument("adapters", nargs=-1, required=True)
@output_options
@click.option(
    "--weight",
    "weights",
    type=float,
    multiple=True,
    metavar="W",
    help="Weight of each adapter, once per adapter in order (default: all 1). Negative subtracts.",
)
@rule_options
def command(
    adapters: tuple[str, ...],
    output: str,
    force: bool,
    as_json: bool,
    all_rows: bool,
    weights: tuple[float, ...],
    rules: dict[str, Any],
) -> None:
    """Write Σ w_i·ΔW_i of ADAPTERS (any format convert reads) as one adapter.

    Exact: per target the inputs' factors are concatenated, [w_1 s_1 B_1 | w_2 s_2 B_2 | …] against
    [A_1; A_2; …], so different ranks, alphas, rsLoRA flags and dtypes combine correctly. With a
    rank rule the QR core then keeps the best rank-k approximation of the sum. Targets present in
    only some inputs are kept. The result has scale 1 (alpha = rank) and the widest input dtype.

    Spec 1.1 parts: LoRA biases and bias deltas add with their weights (Σ w·s·b, Σ w·δ);
    a whole tensor (modules_to_save, trainable tokens) from one input at weight 1 is carried,
    and refused when two inputs replace the same tensor or at another weight; DoRA is refused
    (magnitudes do not add).
    """
    from .._io import check_output
    from ..errors import UsageError
    from ..lowrank import combine, make_rule
    from ..sources import open_adapter

    make_rule(**rules, required=False)
    if weights and len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} --weight for {len(adapters)} adapters",
            code="weights",
            hint="give --weight once per adapter, in the same order, or not at all (all 1)",
        )
    check_output(output, force=force)
    opened = [open_adapter(p) for p in adapters]
    result, report = combine(
        [o.adapter for o in opened], weights=list(weights) if weights else None, **rules
    )
    result.save(output, force=force)
    inputs = [
        {"path": p, "format": o.format, "weight": w}
        for p, o, w in zip(adapters, opened, weights or [1.0] * len(adapters), strict=True)
    ]
    finish(report, output, as_json, {"inputs": inputs}, all_rows=all_rows)
