"""reduce_rank: the best rank-k approximation of every target of one adapter."""

from __future__ import annotations

from typing import Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, Target, alpha_for
from .core import CoreJob, factors32, solve
from .report import LowRankReport, report_row, source_entry, with_operation
from .rules import RuleArgs, check_rule_keys, make_rule


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
    kinds.check_plain(targets, "reduce-rank")  # spec 1.1 parts: refused, never dropped
    jobs = []
    for t in targets:
        a, b = factors32(t, adapter.path)
        s = t.scale
        jobs.append(CoreJob(t.name, b, a, s, s, abs(s) * float(b.norm()) * float(a.norm())))
    solved = solve(jobs, rule, device=device)

    report = LowRankReport("reduce-rank", rule)
    new: dict[str, Target] = {}
    for t in targets:
        r = solved[t.name]
        dt = torch_dtype(t.dtype)
        new[t.name] = Target.from_factors(
            t.name,
            r.A.to(dt),
            r.B.to(dt),
            alpha=alpha_for(t.scale, r.k, t.scale_rule),
            scale_rule=t.scale_rule,
            kind=t.kind,
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
                method="qr-core",
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
