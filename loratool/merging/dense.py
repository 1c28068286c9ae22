"""The dense merge path for spec 1.1 (§3.5–3.6): DoRA, biases, replaced tensors and token rows.

Plain LoRA merges as one stacked product (``delta.py``); what that cannot express goes here,
one weight at a time, through the kind's own rule (``Kind.merge_weight``/``merge_bias``):

* the base is upcast exactly to fp32 (fp64 for a reversible merge, whose sidecar must match what
  unmerge computes later), the rule applied there, the result rounded once to the output dtype;
* DoRA's norms ``‖V‖`` are kept, for a reversible merge, in the sidecar under ``<key>@dense``
  (unmerge's inverse needs them: §3.6.4); replacements keep the originals as ordinary sidecar
  corrections, since unmerge cannot compute them — it leaves the tensor and the sidecar puts
  back every element the merge changed;
* ``plan_features`` checks before anything is written: weights ±1 only where a rule is not
  linear, a bias to merge into, one non-linear term per tensor (grown vocabularies and tied
  heads: ``vocab.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import kinds
from ..errors import CompatibilityError
from .delta import DeltaResult
from .ulp import int_view

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint
    from .compute import Context, Outcome
    from .inputs import Input
    from .plan import Job

DENSE_SUFFIX = "@dense"  # sidecar pseudo-key: DoRA's pre-merge norms (or a marker)


def is_bias_key(job: Job, t: Any) -> bool:
    return job.key.endswith(".bias") and not t.weight_name.endswith(".bias")


def needs_dense(job: Job) -> bool:
    """Whether a job has a term the stacked product cannot apply."""
    for t, _ in job.terms:
        k = kinds.get(t.kind)
        if is_bias_key(job, t) or k.needs_dense(t):
            return True
    return False


def plan_features(
    base: Checkpoint, inputs: list[Input], jobs: dict[str, Job], *, sign: float
) -> None:
    """Add each target's bias term to its module's bias job and refuse what has no exact rule."""
    for inp in inputs:
        for tname, key in inp.keys.items():
            t = inp.adapter.targets[tname]
            kind = kinds.get(t.kind)
            nonlinear = not t.lowrank or not kind.exact_inverse(t)
            if nonlinear and abs(inp.weight) != 1.0:
                raise CompatibilityError(
                    f"target '{tname}' of {inp.name} ({kind.name}{_feat(t)}) merges only with "
                    f"weight 1, got {inp.weight:g}",
                    code="nonlinear-weight",
                    hint="DoRA and replaced tensors have no weighted form; merge them alone at 1",
                )
            if kind.touches_bias(t):
                bkey = base.resolve(tname, ".bias")
                if bkey is None:
                    raise CompatibilityError(
                        f"target '{tname}' of {inp.name} changes a bias but '{key}' has none",
                        code="no-bias",
                        where=str(base.path),
                        hint="PEFT refuses this too: the base layer has no bias to merge into",
                    )
                jobs[bkey].terms.append((t, sign * inp.weight))
    for job in jobs.values():
        heavy = [t for t, _ in job.terms if kinds.get(t.kind).needs_dense(t)]
        if heavy and len(job.terms) > 1 and not job.key.endswith(".bias"):
            raise CompatibilityError(
                f"'{job.key}' takes {len(job.terms)} adapters, one of them "
                f"{heavy[0].kind}{_feat(heavy[0])}: their order would change the result",
                code="nonlinear-stack",
                hint="merge the DoRA or replacing adapter on its own, then the others",
            )


def _feat(t: Any) -> str:
    return f" with {', '.join(t.features)}" if t.features else ""


def compute_dense(
    job: Job, W: torch.Tensor, out: torch.Tensor, ctx: Context, outcome: Outcome
) -> DeltaResult:
    """Apply a job's terms densely; with ``ctx.roundtrip`` also what unmerge would give back."""
    import torch

    cdt = torch.float64 if ctx.precise or torch.float64 in (W.dtype, out.dtype) else torch.float32
    X = W.detach().to(cdt)
    unmerge = all(w < 0 for _, w in job.terms)
    if unmerge:
        new = _unmerge(job, X, ctx)
    else:
        new = X
        for t, w in job.terms:
            new = _apply(job, t, new, w)
    # out may be W's own buffer (the pipeline writes in place): keep what the check needs
    orig = W.detach().clone() if ctx.roundtrip and not unmerge else W
    out.copy_(new.to(out.dtype))  # the one rounding
    got = out.to(cdt)
    if job.new_shape is not None:  # a grown vocabulary: its new rows count against zeros
        X = torch.cat([X, X.new_zeros((new.shape[0] - X.shape[0], *X.shape[1:]))])
    res = DeltaResult([float((new - X).square().sum())])
    res.sums += [float((got - X).square().sum()), float((got - new).square().sum())]
    if ctx.roundtrip and not unmerge:
        norms = _norms(job, X)
        back = _inverse(job, got, norms).to(W.dtype)
        _misses(back[: orig.shape[0]], orig, res, collect=ctx.collect)
        if ctx.collect and not all(kinds.get(t.kind).exact_inverse(t) for t, _ in job.terms):
            _keep(outcome, job.key + DENSE_SUFFIX, norms)
    return res


def _apply(job: Job, t: Any, X: torch.Tensor, w: float) -> torch.Tensor:
    k = kinds.get(t.kind)
    if is_bias_key(job, t):
        return k.merge_bias(t, X, w)
    return k.merge_weight(t, X, w)


def _norms(job: Job, X: torch.Tensor) -> torch.Tensor:
    """DoRA's ‖V‖ per output for the job's DoRA term (from the original weight, as PEFT's
    merge), or a one-element marker that says "a reversible merge kept this tensor"."""
    import torch

    from ..kinds.features import dora_norm, lowrank_delta

    for t, _ in job.terms:
        k = kinds.get(t.kind)
        if k.lowrank and "dora" in t.features and not is_bias_key(job, t):
            delta = k.to_stored(lowrank_delta(t, X.dtype, X.device))
            return dora_norm(k, X + delta).to(torch.float64).cpu()
    return torch.zeros(1, dtype=torch.float64)


def _inverse(
    job: Job, M: torch.Tensor, norms: torch.Tensor | None, *, merged: bool = True
) -> torch.Tensor:
    """Unmerge's computation from the merged tensor: exact inverses subtract, DoRA divides by
    its kept norms, replacements stay (the sidecar puts the originals back). ``merged``: the
    terms carry the merge's weights (the round-trip check), else unmerge's (already negated)."""
    from ..kinds.features import dora_unmerge, lowrank_delta

    X = M
    for t, w in reversed(job.terms):
        k = kinds.get(t.kind)
        if not t.lowrank and not k.exact_inverse(t):
            continue  # a replacement: only the sidecar restores it
        if k.lowrank and "dora" in t.features and not is_bias_key(job, t):
            delta = k.to_stored(lowrank_delta(t, X.dtype, X.device))
            assert norms is not None and norms.numel() > 1, "DoRA unmerge without its norms"
            X = dora_unmerge(k, t, X, delta, norms.to(X.device))
            continue
        X = _apply(job, t, X, -w if merged else w)
    return X


def _unmerge(job: Job, X: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Unmerge a dense job: exact inverses subtract; DoRA and replacements need the sidecar."""
    import torch

    kept = ctx.corrections(job.key + DENSE_SUFFIX)
    needs = [
        t
        for t, _ in job.terms
        if not kinds.get(t.kind).exact_inverse(t) and not is_bias_key(job, t)
    ]
    if needs and kept is None:
        t = needs[0]
        raise CompatibilityError(
            f"'{job.key}' was changed by '{t.name}' ({t.kind}{_feat(t)}), which unmerge cannot "
            "undo from the merged weights alone",
            code="not-reversible",
            where=ctx.where,
            hint="unmerge needs the sidecar of a `merge --reversible` (it keeps DoRA's norms "
            "and the replaced values)",
        )
    norms = None if kept is None else kept[1].to(torch.float64)
    return _inverse(job, X, norms, merged=False)


def _keep(outcome: Outcome, key: str, values: torch.Tensor) -> None:
    import torch

    idx = torch.arange(values.numel(), dtype=torch.int64)
    if outcome.spool is not None:
        outcome.spool.add(key, idx, values)
    else:
        outcome.sidecar_parts.append((key, idx, values))


def _misses(back: torch.Tensor, W: torch.Tensor, res: DeltaResult, *, collect: bool) -> None:
    """Elements whose bits unmerge would not give back (counted; gathered for the sidecar)."""
    import torch

    ints = int_view(W.dtype)
    g = back.contiguous().view(ints).reshape(-1)
    w = W.contiguous().view(ints).reshape(-1)
    flat = (g != w).nonzero().squeeze(1)
    if not flat.numel():
        return
    res.off += int(flat.numel())
    gd, wd = g[flat].to(torch.int64), w[flat].to(torch.int64)
    res.max_ulp = max(res.max_ulp, int((gd - wd).abs().max()))
    if collect:
        res.index = flat.cpu()
        res.value = w[flat].view(W.dtype).cpu()
