"""reduce_rank: the best rank-k approximation of every target of one adapter."""

from __future__ import annotations

import os
from typing import Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, Target, alpha_for
from .core import CoreJob, factors32, solve
from .report import LowRankReport, report_row, source_entry, with_operation
from .rules import RuleArgs, check_rule_keys, make_rule
from .shapes import DENSE_KINDS, dense_factors, lora_like

WHOLE = (C.KIND_FULL, C.KIND_TOKENS, C.KIND_BIAS)  # carried unchanged (spec §3.7)
KEPT = frozenset(C.FEATURES)  # features kept beside the reduced factors


def _kept(t: Target) -> bool:
    """A 1.0-kind LoRA target whose only 1.1 parts are features reduce-rank keeps."""
    return t.kind in C.KINDS_10 and bool(t.features) and set(t.features) <= KEPT


def dora_update_error(old: Target, new: Target, base: str | os.PathLike[str]) -> float:
    """‖W'_new − W'_old‖_F / ‖W'_old − W‖_F for DoRA's merged weight W' = m ⊙ V/‖V‖ (fp64)."""
    import torch

    from ..checkpoint import Checkpoint
    from ..kinds.features import dora_merge, lowrank_delta

    ckpt = Checkpoint(base)
    key = ckpt.resolve(old.name)
    if key is None:
        from ..errors import CompatibilityError

        raise CompatibilityError(f"the base has no weight for '{old.name}'", code="missing-module")
    W = ckpt.read(key).to(torch.float64)
    kind = kinds.get(old.kind)
    merged = [
        dora_merge(kind, t, W, kind.to_stored(lowrank_delta(t, torch.float64, "cpu")), 1.0)
        for t in (old, new)
    ]
    whole = float((merged[0] - W).norm())
    return float((merged[1] - merged[0]).norm()) / whole if whole else 0.0


def _image(t: Target) -> bool:
    """Targets reduce-rank handles beyond 1.0's: plain conv2d, LoHa and LoKr."""
    return (t.kind == C.KIND_CONV2D and not t.features) or t.kind in DENSE_KINDS


def reduce_rank(
    adapter: Adapter,
    *,
    device: str = "cpu",
    base: str | os.PathLike[str] | None = None,
    **rules: Unpack[RuleArgs],
) -> tuple[Adapter, LowRankReport]:
    """The best rank-k approximation of every target, k chosen by exactly one rule.

    Each target keeps its kind, scale rule, effective scale and dtype; alpha becomes
    ``alpha_for(scale, k, rule)``. The base binding, provenance (plus an ``operations`` entry)
    and unknown metadata are kept. Spec 1.1 (§3.7): a target's features are kept as they are
    (DoRA's magnitude, a ``lora_bias``, which the unchanged scale keeps exact, a bias delta) and
    only its low-rank part is reduced; whole tensors (``full``, ``tokens``, ``bias``) are carried
    unchanged. DoRA's whole update ``m ⊙ V/‖V‖ − W`` depends on the base: with ``base`` (a
    checkpoint) each DoRA row also reports that update's relative error (``update_error``).
    """
    check_rule_keys("reduce_rank", dict(rules))
    rule = make_rule(**rules)
    assert rule is not None
    from ..format import iter_targets, torch_dtype

    everything = list(iter_targets(adapter))
    carried = [t for t in everything if t.kind in WHOLE]
    targets = [t for t in everything if t.kind not in WHOLE]
    # other parts are refused, never dropped; plain conv2d is exact through its factors and
    # LoHa/LoKr become LoRA of the same ΔW (lowrank/shapes.py); features ride along (KEPT)
    kinds.check_plain([t for t in targets if not _image(t) and not _kept(t)], "reduce-rank")
    jobs = []
    for t in targets:
        if t.kind in DENSE_KINDS:
            a, b = dense_factors(t)
            jobs.append(CoreJob(t.name, b, a, 1.0, 1.0, float(b.norm()) * float(a.norm())))
            continue
        a, b = factors32(t, adapter.path)
        s = t.scale
        jobs.append(CoreJob(t.name, b, a, s, s, abs(s) * float(b.norm()) * float(a.norm())))
    solved = solve(jobs, rule, device=device)

    report = LowRankReport("reduce-rank", rule)
    new: dict[str, Target] = {}
    for t in targets:
        r = solved[t.name]
        dt = torch_dtype(t.dtype)
        dense = t.kind in DENSE_KINDS  # a LoRA of the same ΔW: scale 1, alpha = k
        new[t.name] = lora_like(
            t,
            r.A,
            r.B,
            alpha=float(r.k) if dense else alpha_for(t.scale, r.k, t.scale_rule),
            scale_rule=C.SCALE_STANDARD if dense else t.scale_rule,
            dtype=dt,
        )
        if t.features:  # the same scale, so every feature's tensor keeps its meaning
            extra = {p: t.part(p) for p in t.parts() if p not in (C.PART_A, C.PART_B)}
            new[t.name] = new[t.name].replace(features=t.features, tensors=extra)
        size = C.DTYPE_SIZES[t.dtype]
        report.targets.append(
            report_row(
                t.name,
                r.sv,
                r.k,
                old_rank=t.rank,
                m=t.out_features,
                n=t.in_features,
                bytes_in=t.num_params * size,
                bytes_out=size,
                params_before=t.num_params,
                zero=r.zero,
                method="dense-svd" if t.kind in DENSE_KINDS else "qr-core",
            )
        )
        if r.zero:
            report.warnings.append(
                f"target '{t.name}' is zero (ΔW = 0): kept at rank {r.k} with zero factors"
            )
        if C.FEATURE_DORA in t.features:
            row = report.targets[-1]
            if base is None:
                report.warnings.append(
                    f"target '{t.name}' is DoRA: its magnitude is kept and the error shown is the "
                    "low-rank part's; pass the base for the whole update's"
                )
            else:
                row.update_error = dora_update_error(t, new[t.name], base)
    for t in carried:
        new[t.name] = t
    if carried:
        report.warnings.append(
            f"{len(carried)} whole-tensor targets ({', '.join(sorted({t.kind for t in carried}))})"
            " carried unchanged"
        )
    provenance = with_operation(
        adapter.provenance,
        {"operation": "reduce-rank", "rule": rule.to_json(), "input": source_entry(adapter)},
    )
    out = Adapter(
        targets=new,
        base=adapter.binding(),
        provenance=provenance,
        metadata=dict(adapter.metadata),
    )
    return out, report
