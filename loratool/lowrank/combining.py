"""combine: the exact weighted sum of adapters, target by target, optionally truncated."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, BaseBinding, Target
from ..errors import CompatibilityError, UsageError
from .core import CoreJob, factors32, solve
from .report import LowRankReport, report_row, source_entry
from .rules import RuleArgs, check_rule_keys, make_rule
from .shapes import fan_in, lora_like


def _widest_dtype(names: Iterable[str]) -> str:
    kinds = set(names)
    if len(kinds) == 1:
        return kinds.pop()
    return "F32"  # any F32 wins; F16 with BF16 needs F32 to hold both ranges and mantissas


def combine(
    adapters: Sequence[Adapter],
    *,
    weights: Sequence[float] | None = None,
    device: str = "cpu",
    **rules: Unpack[RuleArgs],
) -> tuple[Adapter, LowRankReport]:
    """The exact weighted sum Σ w_i·ΔW_i per target (weights default to 1), optionally truncated.

    Per target, [w_1 s_1 B_1 | w_2 s_2 B_2 | …] against [A_1; A_2; …] *is* Σ w_i s_i B_i A_i, with
    each input's own scale s_i (alpha, rank and rsLoRA flag). Without a rule those concatenated
    factors are written as they are (scale 1), unless their rank exceeds min(in, out), where the
    QR core cuts them to min(in, out) without loss. With a rule, the QR core keeps the best rank-k
    approximation. Targets present in only some inputs are kept; a target whose shape or kind
    differs between inputs raises ``CompatibilityError``. The result binds to the inputs' common
    hub id (none, with a warning, when they differ); its provenance lists the inputs (file name,
    sha256, weight); the inputs' own provenance and unknown metadata are not carried over.
    """
    if not adapters:
        raise UsageError("combine needs at least one adapter", code="no-inputs")
    check_rule_keys("combine", dict(rules))
    rule = make_rule(**rules, required=False)
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weights for {len(adapters)} adapters",
            code="weights",
            hint="give --weight once per adapter, in the same order, or not at all (all 1)",
        )
    ws = [float(w) for w in weights]
    for each in adapters:  # spec 1.1 parts: refused, never dropped (plain conv2d is exact)
        plain_conv = (C.KIND_CONV2D,)
        kinds.check_plain(
            [t for t in each.targets.values() if t.kind not in plain_conv or t.features],
            "combine",
        )
    if not all(math.isfinite(w) for w in ws):
        raise UsageError("weights must be finite numbers", code="weights")

    import torch

    from ..format import torch_dtype

    names = sorted({name for a in adapters for name in a.targets})
    jobs: list[CoreJob] = []
    info: dict[str, tuple[Target, int, str, list[int]]] = {}  # first target, R, dtype, inputs
    for name in names:
        parts = [(i, ws[i], a.targets[name]) for i, a in enumerate(adapters) if name in a.targets]
        first = parts[0][2]
        for i, _, t in parts[1:]:
            if (t.kind, t.in_features, t.out_features, t.fields) != (
                first.kind,
                first.in_features,
                first.out_features,
                first.fields,
            ):
                raise CompatibilityError(
                    f"target '{name}' is {first.kind} {first.out_features}×{first.in_features} in "
                    f"adapter 1 but {t.kind} {t.out_features}×{t.in_features} in adapter {i + 1}",
                    code="target-mismatch",
                    hint="the adapters were made for different base models",
                )
        bs, as_, bound = [], [], 0.0
        for i, w, t in parts:
            a, b = factors32(t, adapters[i].path)
            c = w * t.scale  # this input's whole multiplier, moved into its B block
            bs.append(b * c)
            as_.append(a)
            bound += abs(c) * float(b.norm()) * float(a.norm())
        B, A = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        jobs.append(CoreJob(name, B, A, 1.0, 1.0, bound))
        dtype = _widest_dtype(t.dtype for _, _, t in parts)
        info[name] = (first, B.shape[1], dtype, [i for i, _, _ in parts])
    solved = solve(jobs, rule, device=device)

    report = LowRankReport("combine", rule)
    new: dict[str, Target] = {}
    for job in jobs:
        first, total_rank, dtype, inputs = info[job.name]
        r = solved[job.name]
        m, n = first.out_features, fan_in(first)
        method = "qr-core"
        A_out, B_out, k = r.A, r.B, r.k
        if rule is None and not r.zero and total_rank <= min(m, n):
            A_out, B_out, k, method = (
                job.A,
                job.B,
                total_rank,
                "concat",
            )  # exact as is: no SVD rounding
        dt = torch_dtype(dtype)
        new[job.name] = lora_like(
            first, A_out, B_out, alpha=float(k), scale_rule=C.SCALE_STANDARD, dtype=dt
        )
        params_before = sum(adapters[i].targets[job.name].num_params for i in inputs)
        bytes_before = sum(
            adapters[i].targets[job.name].num_params
            * C.DTYPE_SIZES[adapters[i].targets[job.name].dtype]
            for i in inputs
        )
        report.targets.append(
            report_row(
                job.name,
                r.sv,
                k,
                old_rank=total_rank,
                m=m,
                n=n,
                bytes_in=bytes_before,
                bytes_out=C.DTYPE_SIZES[dtype],
                params_before=params_before,
                zero=r.zero,
                method=method,
            )
        )
        if r.zero:
            report.warnings.append(
                f"target '{job.name}' sums to zero: kept at rank {k} with zero factors"
            )

    hub_ids = {(a.base.hub_id, a.base.revision) for a in adapters if a.base and a.base.hub_id}
    hub_id, revision = (None, None)
    if len(hub_ids) == 1:
        hub_id, revision = next(iter(hub_ids))
    elif len(hub_ids) > 1:
        report.warnings.append(
            "the inputs name different base models ("
            + ", ".join(sorted(f"{h}@{v}" if v else str(h) for h, v in hub_ids))
            + "); the result records none"
        )
    provenance = {
        "operations": [
            {
                "operation": "combine",
                "rule": None if rule is None else rule.to_json(),
                "inputs": [
                    {**source_entry(a), "weight": w} for a, w in zip(adapters, ws, strict=True)
                ],
            }
        ]
    }
    out = Adapter(targets=new, provenance=provenance)
    out.base = BaseBinding(out.computed_fingerprint(), hub_id, revision)
    return out, report
