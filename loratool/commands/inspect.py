"""``loratool inspect``: a summary and per-target table, or one JSON document with ``--json``."""

from __future__ import annotations

from typing import Any

import click

from ..console import emit_json, human_bytes, stdout_console
from ..naturalsort import natural_key

TABLE_ROWS = 24  # a long table is cut to this many rows plus a summary line, unless --all


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option(
    "--stats", is_flag=True, help="Add exact ‖ΔW‖ and effective rank per target (reads tensors)."
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Write singular-value spectra to a PNG (needs matplotlib).",
)
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help=f"List every target (default: the first {TABLE_ROWS} in natural order; --json always has every target).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read old pickled weights (adapter_model.bin, .pt, .ckpt) with a restricted unpickler "
    "that accepts only tensors and plain containers.",
)
def command(
    path: str,
    as_json: bool,
    stats: bool,
    plot: str | None,
    force: bool,
    show_all: bool,
    allow_pickle: bool,
) -> None:
    """Summarise the adapter at PATH (a loratool file or any format `convert` reads)."""
    from ..inspect import describe

    if allow_pickle:
        from ..convert.pickled import staged

        with staged(path) as safe:  # a temporary safetensors twin, read like any other file
            doc = describe(safe, stats=stats or plot is not None)
        doc["path"] = path
    else:
        doc = describe(path, stats=stats or plot is not None)
    if plot:
        from ..plot import plot_spectra

        plot_spectra(doc, plot, force=force)
    if as_json:
        emit_json(doc)
    else:
        _render(doc, stats, show_all=show_all)


def _fmt_alpha(x: float) -> str:
    return f"{x:g}"


def _features_cell(t: dict[str, Any]) -> str:
    """DoRA, biases, or what a whole-tensor target replaces (spec 1.1)."""
    if t["features"]:
        return ", ".join(t["features"])
    if "indices" in t:
        return f"{len(t['indices'])} token rows"
    parts = t.get("parts", {})
    if "lora_A" in parts or not parts:
        return ""
    grown = f" (grows from {t['base_rows']} rows)" if "base_rows" in t else ""
    return ", ".join(parts) + grown


def _render(doc: dict[str, Any], stats: bool, *, show_all: bool = False) -> None:
    from rich.table import Table

    console = stdout_console()
    base = doc["base_model"]
    version = f" v{doc['format_version']}" if doc["format_version"] else ""
    console.print(f"[bold]{doc['path']}[/bold]  ({doc['source_format']}{version})")
    rows = [
        (
            "base model",
            f"{base['hub_id'] or '(no hub id)'}"
            + (f" @ {base['revision']}" if base["revision"] else ""),
        ),
        ("fingerprint", base["fingerprint"]),
        ("targets", str(doc["num_targets"])),
        ("parameters", f"{doc['total_params']:,}"),
        ("dtype", ", ".join(doc["dtypes"])),
        ("file size", f"{human_bytes(doc['file_bytes'])} ({doc['file_bytes']:,} bytes)"),
    ]
    integrity = doc["integrity"]
    if integrity.get("sha256"):
        state = {True: "verified", False: "MISMATCH"}.get(
            integrity.get("ok"), "recorded, not checked (run verify)"
        )
        rows.append(("integrity", f"sha256 {integrity['sha256'][:16]}… {state}"))
    if doc["provenance"]:
        rows.append(("provenance", ", ".join(sorted(doc["provenance"]))))
    if doc.get("requires"):
        rows.append(("requires", ", ".join(doc["requires"])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"  {key:<{width}}  {value}", markup=False)

    table = Table(show_edge=False, pad_edge=False)
    for col in ("target", "kind", "rank", "alpha", "scale", "in", "out", "dtype"):
        table.add_column(col, justify="left" if col in ("target", "kind", "dtype") else "right")
    extras = any(t["features"] or "parts" in t for t in doc["targets"])
    if extras:
        table.add_column("features", justify="left")
    if stats:
        table.add_column("‖ΔW‖", justify="right")
        table.add_column("eff. rank", justify="right")
    rows_all = sorted(doc["targets"], key=lambda t: natural_key(t["name"]))
    shown = rows_all if show_all or len(rows_all) <= TABLE_ROWS else rows_all[:TABLE_ROWS]
    for t in shown:
        scale = f"{t['scale']:.4g}" + (" (rs)" if t["scale_rule"] == "rslora" else "")
        # image kinds (LoHa, LoKr) have a rank and an alpha without lora_A (spec §3.8)
        lowrank = "parts" not in t or "lora_A" in t["parts"] or t["kind"] in ("loha", "lokr")
        cells = [
            t["name"],
            t["kind"],
            str(t["rank"]) if lowrank else "—",
            _fmt_alpha(t["alpha"]) if lowrank else "—",
            scale if lowrank else "—",
            str(t["in_features"]),
            str(t["out_features"]),
            t["dtype"],
        ]
        if extras:
            cells.append(_features_cell(t))
        if stats:
            cells += (
                [f"{t['delta_norm']:.4g}", f"{t['effective_rank']:.2f} ({t['numerical_rank']})"]
                if "delta_norm" in t
                else ["—", "—"]
            )
        table.add_row(*cells)
    console.print(table)
    if len(shown) < len(rows_all):
        rest = rows_all[len(shown) :]
        kinds = sorted({t["kind"] for t in rest})
        ranks = sorted({t["rank"] for t in rest})
        console.print(
            f"  … {len(rest)} more targets ({', '.join(kinds)}; rank "
            f"{'/'.join(str(r) for r in ranks)}); --all to see every row",
            markup=False,
        )
