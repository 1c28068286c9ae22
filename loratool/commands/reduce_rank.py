"""``loratool reduce-rank``: shrink every target to its best rank-k approximation, exactly.

Also holds what the three low-rank commands share: the rank-rule options and the report table.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from ..console import emit_json, human_bytes, warn
from ..lowrank.rules import RULE_KEYS  # no torch: the rules are plain Python

if TYPE_CHECKING:
    from ..lowrank import LowRankReport, TargetReport

F = TypeVar("F", bound=Callable[..., Any])

RULES_HELP = (
    "Rank rules (give exactly one): --rank K keeps K; --energy F keeps the smallest k with "
    "Σσ²(≤k)/Σσ² ≥ F; --sv-fro P the smallest k with sqrt(Σσ²(≤k))/‖ΔW‖_F ≥ P; --sv-cumulative P "
    "the smallest k with Σσ(≤k)/Σσ ≥ P; --sv-ratio P keeps σ ≥ σ_max/P. A threshold met within "
    "1e-6 relative counts as met. --max-rank/--min-rank clamp the dynamic rules; no rank ever "
    "exceeds min(in, out) or the input's rank. A zero target (ΔW = 0, e.g. B right after "
    "initialisation) is kept with zero factors at rank K under --rank, else max(1, --min-rank)."
)


def rule_options(f: F) -> F:
    """The rank-rule options shared by reduce-rank, combine and extract, passed as ``rules``.

    The command receives one ``rules`` dict (keyword arguments of ``make_rule`` and of the
    operations) instead of seven parameters.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rules = {key: kwargs.pop(key) for key in RULE_KEYS}
        return f(*args, rules=rules, **kwargs)

    options = [
        click.option("--rank", "rank", type=int, metavar="K", help="Keep exactly K components."),
        click.option(
            "--energy", type=float, metavar="F", help="Keep the fraction F of Σσ² (0 < F ≤ 1)."
        ),
        click.option("--sv-ratio", type=float, metavar="P", help="Keep σ ≥ σ_max / P (P ≥ 1)."),
        click.option("--sv-cumulative", type=float, metavar="P", help="Keep the fraction P of Σσ."),
        click.option("--sv-fro", type=float, metavar="P", help="Keep the fraction P of ‖ΔW‖_F."),
        click.option("--max-rank", type=int, metavar="K", help="Upper bound for a dynamic rule."),
        click.option("--min-rank", type=int, metavar="K", help="Lower bound for a dynamic rule."),
    ]
    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return cast(F, decorated)


def output_options(f: F) -> F:
    """-o OUT, --force, --json, --all."""
    f = click.option(
        "--all",
        "all_rows",
        is_flag=True,
        help=f"List every target in the table (default: at most {TABLE_ROWS}, those that keep the "
        "least energy; --json always has every target).",
    )(f)
    f = click.option(
        "--json", "as_json", is_flag=True, help="Print the report as one JSON document on stdout."
    )(f)
    f = click.option("--force", is_flag=True, help="Replace the output if it exists.")(f)
    f = click.option(
        "-o",
        "--output",
        "output",
        required=True,
        type=click.Path(dir_okay=False),
        help="Where to write the adapter (.safetensors, loratool format).",
    )(f)
    return f


TABLE_ROWS = 20  # a longer table shows the rows that keep the least energy, unless --all


def table_rows(report: LowRankReport, *, all_rows: bool) -> list[TargetReport]:
    """The targets the table lists, in natural order: every one, or the ``TABLE_ROWS`` that keep
    the least energy (ties: the first in natural order) when there are more and not ``all_rows``."""
    from ..naturalsort import natural_key

    rows = report.targets
    if not all_rows and len(rows) > TABLE_ROWS:
        rows = sorted(rows, key=lambda t: (t.retained_energy, natural_key(t.name)))[:TABLE_ROWS]
    return sorted(rows, key=lambda t: natural_key(t.name))


def _sv(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def render_report(report: LowRankReport, output: str, *, all_rows: bool = False) -> None:
    """The per-target table (natural order; cut to the worst rows unless ``all_rows``) and a
    one-line summary, on stderr (people's output)."""
    from rich.console import Console
    from rich.table import Table

    # Off a terminal rich would assume 80 columns and cut the module names.
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    extract = report.operation == "extract"
    table = Table(show_edge=False, pad_edge=False)
    for col in ("target", "rank", "retained energy", "largest dropped σ", "σ_max"):
        table.add_column(col, justify="left" if col == "target" else "right")
    if extract:
        table.add_column("svd", justify="left")
    rows = table_rows(report, all_rows=all_rows)
    for t in rows:
        rank = f"{t.old_rank} → {t.new_rank}"
        cells = [
            t.name,
            rank,
            "zero target" if t.zero else f"{t.retained_energy:.6f}",
            _sv(t.largest_dropped_sv),
            _sv(t.sv_max),
        ]
        if extract:
            cells.append(t.method)
        table.add_row(*cells)
    console.print(table)
    if len(rows) < len(report.targets):
        console.print(
            f"… {len(report.targets) - len(rows)} more rows (shown: the {len(rows)} that keep the "
            "least energy); --all to see every row",
            markup=False,
            highlight=False,
        )
    for s in report.skipped:
        console.print(f"skipped {s['name']}: {s['reason']}", markup=False, highlight=False)
    for w in report.warnings:
        warn(w)
    before, after = report.bytes_before, report.bytes_after
    pct = 100.0 * (1.0 - after / before) if before else 0.0
    console.print(
        f"{len(report.targets)} targets, {report.params_before:,} → {report.params_after:,} "
        f"parameters, {human_bytes(before)} → {human_bytes(after)} of tensors ({pct:.1f}% smaller), "
        f"min retained energy {report.min_retained_energy:.6f}; wrote {output}",
        markup=False,
        highlight=False,
    )


def finish(
    report: LowRankReport,
    output: str,
    as_json: bool,
    extra: dict[str, Any],
    *,
    all_rows: bool = False,
) -> None:
    """The report: one JSON document (every target) on stdout, or the table on stderr."""
    if as_json:
        emit_json({"output": output, **extra, **report.to_json()})
    else:
        render_report(report, output, all_rows=all_rows)


@click.command("reduce-rank", epilog=RULES_HELP)
@click.argument("adapter")
@output_options
@rule_options
@click.option(
    "--base",
    type=click.Path(exists=True),
    help="The base model: DoRA targets then also report the relative error of their whole "
    "update (m ⊙ V/‖V‖ − W), not only of the low-rank part.",
)
def command(
    adapter: str,
    output: str,
    force: bool,
    as_json: bool,
    all_rows: bool,
    rules: dict[str, Any],
    base: str | None,
) -> None:
    """Keep the top-k singular triplets of every target of ADAPTER (any format convert reads).

    Exact: QR of both factors and an SVD of the r×r core, never the dense B·A. Each target keeps
    its scale rule and effective scale (alpha is rescaled for the new rank) and its dtype.

    Spec 1.1 parts: DoRA's magnitude, a LoRA bias and a bias delta are kept as they are and only
    the low-rank part is reduced (DoRA: with --base the whole update's error is reported too);
    whole tensors (modules_to_save, trainable tokens, bias deltas) are carried unchanged.
    """
    from .._io import check_output
    from ..lowrank import make_rule, reduce_rank
    from ..sources import open_adapter

    make_rule(**rules)  # flag mistakes before reading anything
    check_output(output, force=force)
    opened = open_adapter(adapter)
    result, report = reduce_rank(opened.adapter, base=base, **rules)
    result.save(output, force=force)
    extra = {"input": adapter, "input_format": opened.format}
    finish(report, output, as_json, extra, all_rows=all_rows)
