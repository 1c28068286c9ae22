"""combine: the exact weighted sum of adapters, target by target, optionally truncated."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, BaseBinding, Target
from ..errors import CompatibilityError, UsageError
from .core import CoreJob, factors32, solve
from .report import LowRankReport, report_row, source_entry
from .rules import RuleArgs, check_rule_keys, make_rule
from .shapes import fan_in, lora_like

if TYPE_CHECKING:
    import torch


def _widest_dtype(names: Iterable[str]) -> str:
    kinds = set(names)
    if len(kinds) == 1:
        return kinds.pop()
    return "F32"  # any F32 wins; F16 with BF16 needs F32 to hold both ranges and mantissas


_WHOLE = (C.KIND_FULL, C.KIND_TOKENS, C.KIND_BIAS)
_SUMMED = frozenset({C.FEATURE_LORA_BIAS, C.FEATURE_BIAS})  # features with an exact weighted sum


def _summable(t: Target) -> bool:
    """Targets combine sums exactly (spec §3.7): LoRA pairs of a 1.0 kind or plain conv2d,
    their lora_bias and bias features, and the whole-tensor kinds (``_whole_targets``). DoRA's
    magnitudes do not add; it is refused by its kind's reason."""
    if t.kind in _WHOLE:
        return True
    if t.kind == C.KIND_CONV2D:
        return not t.features
    return t.kind in C.KINDS_10 and set(t.features) <= _SUMMED


def _features_of_parts(parts: dict[str, torch.Tensor]) -> list[str]:
    by_part = {C.PART_LORA_BIAS: C.FEATURE_LORA_BIAS, C.PART_BIAS_DELTA: C.FEATURE_BIAS}
    return sorted(by_part[p] for p in parts)


def _feature_sums(
    parts: Sequence[tuple[float, Target]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Σ w_i·s_i·lora_bias_i and Σ w_i·bias_delta_i over the inputs that have them (fp64)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for w, t in parts:
        for feature, part, c in (
            (C.FEATURE_LORA_BIAS, C.PART_LORA_BIAS, w * t.scale),
            (C.FEATURE_BIAS, C.PART_BIAS_DELTA, w),
        ):
            if feature in t.features:
                x = t.part(part).to(torch.float64) * c
                out[part] = out[part] + x if part in out else x
    return {p: x.to(dtype) for p, x in out.items()}


def _whole_targets(adapters: Sequence[Adapter], ws: Sequence[float]) -> dict[str, Target]:
    """Whole tensors in the sum: a replacement (``full``, ``tokens``) from one input at weight
    1 is carried; twice, or at another weight, it has no exact form and is refused. Bias deltas
    (kind ``bias``) add: Σ w_i·δ_i."""
    import torch

    out: dict[str, Target] = {}
    names = sorted({n for a in adapters for n, t in a.targets.items() if t.kind in _WHOLE})
    for name in names:
        parts = [
            (w, a.targets[name]) for a, w in zip(adapters, ws, strict=True) if name in a.targets
        ]
        kinds_ = {t.kind for _, t in parts}
        if len(kinds_) > 1 or any(t.kind not in _WHOLE for _, t in parts):
            raise CompatibilityError(
                f"target '{name}' is a whole tensor in one adapter and not in another",
                code="target-mismatch",
            )
        first = parts[0][1]
        if first.kind == C.KIND_BIAS:
            total = sum(t.part(C.PART_BIAS_DELTA).to(torch.float64) * w for w, t in parts)
            assert isinstance(total, torch.Tensor)
            delta = total.to(first.part(C.PART_BIAS_DELTA).dtype)
            out[name] = Target.whole(name, C.KIND_BIAS, {C.PART_BIAS_DELTA: delta})
            continue
        if len(parts) > 1:
            raise UsageError(
                f"target '{name}': two adapters replace the same {first.kind} tensor; a sum of "
                "replacements has no exact form",
                code="unsupported-feature",
                hint="combine without one of them, or merge them one after the other",
            )
        if parts[0][0] != 1.0:
            raise UsageError(
                f"target '{name}': a {first.kind} replacement at weight {parts[0][0]:g} is "
                "X + w·(V − X), which needs the base",
                code="unsupported-feature",
                hint="give that adapter weight 1, or merge it with --weight",
            )
        out[name] = first
    return out


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
    Spec 1.1 (§3.7): ``lora_bias`` and ``bias`` features sum with their weights, whole tensors
    as ``_whole_targets`` says, and DoRA is refused (magnitudes do not add).
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
    for each in adapters:  # spec 1.1 parts with no exact sum: refused, never dropped
        kinds.check_plain([t for t in each.targets.values() if not _summable(t)], "combine")
    if not all(math.isfinite(w) for w in ws):
        raise UsageError("weights must be finite numbers", code="weights")

    import torch

    from ..format import torch_dtype

    whole = _whole_targets(adapters, ws)
    names = sorted({name for a in adapters for name in a.targets} - set(whole))
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
        sums = _feature_sums([(ws[i], adapters[i].targets[job.name]) for i in inputs], dt)
        if sums:  # the result's scale is 1: a lora_bias sums as Σ w·s·b, a bias delta as Σ w·δ
            new[job.name] = new[job.name].replace(features=_features_of_parts(sums), tensors=sums)
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

    new.update(whole)
    if whole:
        report.warnings.append(
            f"{len(whole)} whole-tensor targets carried (a replacement at weight 1, bias deltas "
            "summed with their weights)"
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
