"""Draw an adapter's singular-value spectra (``inspect --plot``) with matplotlib, an optional extra.

Input is the ``inspect --json`` document with per-target ``singular_values`` (exact, from the QR
core). Two panels: σ_i per target on a log scale, and the cumulative energy Σ_{i≤k} σ_i²/Σσ² that
``reduce-rank --energy`` thresholds. Lines are coloured by module type (the last name component,
e.g. q_proj), so a 200-target adapter stays readable. matplotlib's object API and the Agg canvas
are used directly: no global backend switch, no display needed.
"""

from __future__ import annotations

import io
import itertools
import os
from typing import Any

from .errors import UsageError

_FORMATS = ("png", "svg", "pdf")
ENERGY_GUIDES = (0.9, 0.95, 0.99)


def plot_spectra(doc: dict[str, Any], path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write the spectra of ``doc``'s targets to ``path`` (.png, .svg or .pdf), atomically."""
    from ._io import atomic_write, check_output

    fmt = os.fspath(path).rsplit(".", 1)[-1].lower() if "." in os.fspath(path) else ""
    if fmt not in _FORMATS:
        raise UsageError(
            f"--plot writes {', '.join(_FORMATS)} files, not {os.fspath(path)!r}",
            code="plot-format",
            hint="name the file spectrum.png (or .svg, .pdf)",
        )
    check_output(path, force=force)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed",
            code="missing-extra",
            hint="pip install 'loratool[plot]'  (or: pip install matplotlib)",
        ) from None
    targets = doc.get("targets", [])
    if any("singular_values" not in t for t in targets):
        raise ValueError("plot_spectra needs the inspect document with stats (singular_values)")

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_sv, ax_en = fig.subplots(1, 2)
    kinds = sorted({t["name"].rsplit(".", 1)[-1] for t in targets})
    palette = itertools.cycle(
        [f"C{i}" for i in range(10)] + ["black", "grey", "olive", "teal", "navy", "maroon"]
    )
    colour = dict(zip(kinds, palette, strict=False))
    alpha = 1.0 if len(targets) <= 12 else max(0.15, 12 / len(targets))
    labelled: set[str] = set()
    zero = 0
    for t in targets:
        sv = [float(s) for s in t["singular_values"]]
        positive = [s for s in sv if s > 0.0]
        if not positive:
            zero += 1
            continue
        kind = t["name"].rsplit(".", 1)[-1]
        label = kind if kind not in labelled else None
        labelled.add(kind)
        ks = range(1, len(positive) + 1)
        ax_sv.plot(ks, positive, color=colour[kind], alpha=alpha, lw=1.2, label=label)
        total = sum(s * s for s in positive)
        energy = list(itertools.accumulate(s * s / total for s in positive))
        ax_en.plot(ks, energy, color=colour[kind], alpha=alpha, lw=1.2)
    ax_sv.set_yscale("log")
    ax_sv.set_xlabel("index i")
    ax_sv.set_ylabel(r"$\sigma_i$ of $\Delta W = s \cdot BA$")
    ax_sv.set_title("singular values")
    ax_sv.grid(True, which="both", alpha=0.3)
    if labelled:
        ax_sv.legend(fontsize="small", ncol=2 if len(labelled) > 6 else 1)
    for g in ENERGY_GUIDES:
        ax_en.axhline(g, color="grey", ls="--", lw=0.8)
        ax_en.annotate(f"{g:g}", (1.0, g), xycoords=("axes fraction", "data"), fontsize="x-small")
    ax_en.set_xlabel("rank k")
    ax_en.set_ylabel(r"$\sum_{i \leq k} \sigma_i^2 \,/\, \sum_i \sigma_i^2$")
    ax_en.set_ylim(0.0, 1.02)
    ax_en.set_title("retained energy (reduce-rank --energy)")
    ax_en.grid(True, alpha=0.3)
    name = os.path.basename(str(doc.get("path", "")))
    note = f", {zero} zero" if zero else ""
    fig.suptitle(f"{name}: {len(targets)} targets{note}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    atomic_write(path, [buf.getvalue()], force=force)
