"""reduce_rank: the best rank-k approximation of every target of one adapter."""

from __future__ import annotations

from typing import Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, Target, alpha_for
from .core import CoreJob, factors32, solve
from .report import LowRankReport, report_row, source_entry, with_operation
from .rules import RuleArgs, check_rule_keys, make_rule
from .shapes import DENSE_KINDS, dense_factors, lora_like


def _image(t: Target) -> bool:
    """Targets reduce-rank handles beyond 1.0's: plain conv2d, LoHa and LoKr."""
    return (t.kind == C.KIND_CONV2D and not t.features) or t.kind in DENSE_KINDS


def reduce_rank(
    adapter: Adapter,
    *,
    device: str = "cpu",
    **rules: Unpack[RuleArgs],
) -> tuple[Adapter, LowRankReport]:
    """The best rank-k approximation of every target, k chosen by exactly one rule.

    Each target keeps its kind, scale rule, effective scale and dtype; alpha becomes
    ``alpha_for(scale, k, rule)``. The base binding, provenance (plus an ``operations`` entry)
    and unknown metadata are kept.
    """
    check_rule_keys("reduce_rank", dict(rules))
    rule = make_rule(**rules)
    assert rule is not None
    from ..format import iter_targets, torch_dtype

    targets = list(iter_targets(adapter))
    # spec 1.1 parts are refused, never dropped; plain conv2d is exact through its factors and
    # LoHa/LoKr become LoRA of the same ΔW (lowrank/shapes.py)
    kinds.check_plain([t for t in targets if not _image(t)], "reduce-rank")
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
