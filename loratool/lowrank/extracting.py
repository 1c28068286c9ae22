"""extract: a LoRA whose ΔW per module is the truncated SVD of finetuned − base.

**Extraction** takes D = finetuned − base per module (fp32, one module in memory at a time) and its
truncated SVD: an exact ``torch.linalg.svd`` when min(m, n) ≤ ``EXACT_MAX_SIDE`` (256, where it costs
milliseconds), when the sampled width l would exceed min(m, n)/4 (no saving left) or under
``sv_cumulative`` (which needs every σ for Σσ); otherwise a randomized range finder (Halko, Martinsson
& Tropp 2011, Alg. 4.4, as ``torch.svd_lowrank``) with l = k + max(16, k/4) samples, ``POWER_ITERS``
= 4 QR-orthonormalised power iterations and a fixed seed, so files are reproducible. Dynamic rules
start at l for k = min(max_rank, 64) and double until the rule is met inside the computed σ (energy
and sv_fro measure against the exact ‖D‖_F). The retained energy reported is ‖D_k‖²/‖D‖² of the
factors written, exact because D_k is an orthogonal projection of D.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Unpack

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, BaseBinding, Target
from ..errors import FormatError, UsageError
from .core import EPS32
from .modules import hub_of, select_modules
from .report import LowRankReport, report_row
from .rules import Rule, RuleArgs, check_rule_keys, make_rule

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint

Progress = Callable[[int, int, str], None]  # (done, total, target name), after each target

EXACT_MAX_SIDE = 256  # extract: exact SVD at or below this min(m, n)
OVERSAMPLE = 16  # extract: randomized samples beyond k (at least; k/4 for large k)
POWER_ITERS = 4  # extract: power iterations of the range finder
DYNAMIC_START = 64  # extract: first k tried by dynamic rules without max_rank
SEED = 0  # extract: the range finder's random test matrix


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda: no CUDA device is available", code="no-gpu", hint="use --device cpu"
            )
        return device
    raise UsageError(f"unknown device {device!r}", code="bad-device", hint="auto, cpu or cuda")


def _randomized_svd(
    D: torch.Tensor, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. 2011 Alg. 4.4: an orthonormal basis Q of D's range from D·Ω, refined by
    ``POWER_ITERS`` power iterations (re-orthonormalised each half-step, so small σ survive fp32),
    then an exact SVD of the small Qᵀ·D. Costs O(mn·width·(2·iters + 2))."""
    import torch

    n = D.shape[1]
    omega = torch.randn(n, width, generator=generator, device=D.device, dtype=D.dtype)
    q = torch.linalg.qr(D @ omega).Q
    for _ in range(POWER_ITERS):
        q = torch.linalg.qr(D.mT @ q).Q
        q = torch.linalg.qr(D @ q).Q
    u, s, vh = torch.linalg.svd(q.mT @ D, full_matrices=False)
    return q @ u, s, vh


def _truncated_svd(
    D: torch.Tensor, rule: Rule, norm: float, method: str
) -> tuple[torch.Tensor, list[float], torch.Tensor, int, str, bool]:
    """(U, σ list, Vh, k, method used, complete) of D, chosen as the module docstring says."""
    import torch

    m, n = D.shape
    side = min(m, n)
    floor = 2.0 * math.sqrt(side) * EPS32 * norm

    def floored(s: torch.Tensor) -> list[float]:
        return [x if x > floor else 0.0 for x in s.to("cpu", torch.float64).tolist()]

    exact = method == "exact" or (
        method == "auto" and (side <= EXACT_MAX_SIDE or rule.name == "sv_cumulative")
    )
    if not exact:
        gen = torch.Generator(device=D.device).manual_seed(SEED)
        if rule.name == "rank":
            k0 = min(int(rule.value), side)
        else:
            k0 = min(rule.max_rank or DYNAMIC_START, side)
        while True:
            width = min(side, k0 + max(OVERSAMPLE, k0 // 4))
            if method == "auto" and 4 * width > side:
                exact = True  # sampling this wide saves nothing over the exact SVD
                break
            u, s, vh = _randomized_svd(D, width, gen)
            sv = floored(s)
            complete = width == side  # Q spans all of D's range: these are all the σ
            k = rule.select(sv, cap=side, total_sq=norm * norm, complete=complete)
            if k is not None:
                return u, sv, vh, k, "randomized", complete
            k0 = min(2 * k0, side)
    u, s, vh = torch.linalg.svd(D, full_matrices=False)
    sv = floored(s)
    k = rule.select(sv, cap=side)
    assert k is not None
    return u, sv, vh, k, "exact-svd", True


def extract(
    base: str | os.PathLike[str] | Checkpoint,
    finetuned: str | os.PathLike[str] | Checkpoint,
    *,
    targets: str | Sequence[str] | None = None,
    device: str = "auto",
    dtype: str = "F32",
    method: str = "auto",
    hub_id: str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    **rules: Unpack[RuleArgs],
) -> tuple[Adapter, LowRankReport]:
    """A LoRA whose ΔW per module is the truncated SVD of ``finetuned − base``.

    ``targets``: comma-separated module-name suffixes, or ``"all-linear"`` (the default: every
    2-D weight except embeddings and the output head ``lm_head``/``embed_out``). Modules are read
    one at a time (two tensors and their fp32 difference in memory). Unchanged modules are
    skipped. ``method``: ``auto`` (module docstring), ``exact`` or ``randomized``. The adapter is
    bound to ``base`` (``Checkpoint.fingerprint_for``), with ``hub_id``/``revision`` or those
    recorded in the base folder's ``loratool_source.json``.
    """
    import torch

    from ..checkpoint import ALL_DTYPES, Checkpoint
    from ..format import dtype_name, torch_dtype

    check_rule_keys("extract", dict(rules))
    rule = make_rule(**rules)
    assert rule is not None
    if method not in ("auto", "exact", "randomized"):
        raise UsageError(
            f"unknown SVD method {method!r}", code="bad-method", hint="auto, exact or randomized"
        )
    if method == "randomized" and rule.name == "sv_cumulative":
        raise UsageError(
            "--sv-cumulative needs every singular value (Σσ), which a randomized SVD does not give",
            code="rule-conflict",
            hint="use the exact SVD, or --energy/--sv-fro which measure against ‖D‖_F",
        )
    out_name = {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(dtype.lower(), dtype)
    if out_name not in C.DTYPE_SIZES:
        raise UsageError(f"unknown dtype {dtype!r}", code="bad-dtype", hint="f32, f16 or bf16")
    out_dtype = torch_dtype(out_name)
    dev = resolve_device(device)
    bc = base if isinstance(base, Checkpoint) else Checkpoint(base)
    fc = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint(finetuned)

    report = LowRankReport("extract", rule)
    modules = select_modules(bc, fc, targets, report.warnings)
    new: dict[str, Target] = {}
    for done, mod in enumerate(modules, 1):
        D = fc.read(mod.ft_key).to(dev, torch.float32)
        D.sub_(bc.read(mod.base_key).to(dev, torch.float32))
        D = kinds.get(mod.kind).from_stored(D)  # ΔW is [out, in] whatever the stored layout
        if mod.kernel:  # a Conv2d: ΔW as [out, in·kh·kw], the matrix its LoRA factors
            D = D.reshape(D.shape[0], -1)
        if not bool(torch.isfinite(D).all()):
            raise FormatError(
                f"'{mod.ft_key}' minus the base has NaN or Inf values",
                code="non-finite",
                where=str(fc.path),
            )
        norm = float(torch.linalg.vector_norm(D))
        if norm == 0.0:
            report.skipped.append({"name": mod.name, "reason": "unchanged"})
        else:
            u, sv, vh, k, used, complete = _truncated_svd(D, rule, norm, method)
            root = torch.tensor(sv[:k], dtype=torch.float64).sqrt().to(dev, torch.float32)
            B = (u[:, :k] * root).to("cpu", out_dtype).contiguous()
            A = (root[:, None] * vh[:k]).to("cpu", out_dtype).contiguous()
            if mod.kernel:
                new[mod.name] = Target(
                    mod.name,
                    rank=k,
                    alpha=float(k),
                    in_features=mod.in_features,
                    out_features=mod.out_features,
                    kind=C.KIND_CONV2D,
                    dtype=dtype_name(out_dtype),
                    fields={"kernel": mod.kernel},
                    lora_A=A.reshape(k, mod.in_features, *mod.kernel).contiguous(),
                    lora_B=B.reshape(mod.out_features, k, 1, 1).contiguous(),
                )
            else:
                new[mod.name] = Target.from_factors(mod.name, A, B, alpha=float(k), kind=mod.kind)
            residual_sq = None
            if not complete:  # measure ‖D − D_k‖ itself: the σ beyond the sample are unknown
                D.sub_((u[:, :k] * torch.tensor(sv[:k], device=dev)) @ vh[:k])
                residual_sq = float(torch.linalg.vector_norm(D)) ** 2
            m, n = D.shape
            report.targets.append(
                report_row(
                    mod.name,
                    sv,
                    k,
                    old_rank=min(m, n),
                    m=m,
                    n=n,
                    bytes_in=m * n * ALL_DTYPES[fc.dtype(mod.ft_key)],
                    bytes_out=C.DTYPE_SIZES[dtype_name(out_dtype)],
                    params_before=m * n,
                    zero=False,
                    method=used,
                    total_sq=norm * norm,
                    complete=complete,
                    residual_sq=residual_sq,
                )
            )
        del D
        if progress is not None:
            progress(done, len(modules), mod.name)
    if not new:
        raise UsageError(
            "the checkpoints do not differ in any selected module",
            code="no-difference",
            hint="check that FINETUNED is the fine-tuned model and --targets names changed modules",
        )
    changed = _changed_biases(bc, fc)
    if changed:  # spec 1.1 §3.7: say what a plain LoRA does not carry, never drop it silently
        report.warnings.append(
            f"{len(changed)} biases differ from the base (e.g. '{changed[0]}'); extract makes "
            "plain LoRA and does not carry them"
        )
    if hub_id is None and revision is None:
        hub_id, revision = hub_of(bc)
    provenance = {
        "operations": [
            {
                "operation": "extract",
                "rule": rule.to_json(),
                "base": {"path": bc.path.name, "hub_id": hub_id, "revision": revision},
                "finetuned": {"path": fc.path.name},
                "methods": sorted({t.method for t in report.targets}),
            }
        ]
    }
    adapter = Adapter(targets=new, provenance=provenance)
    adapter.base = BaseBinding(bc.fingerprint_for(adapter), hub_id, revision)
    return adapter, report


def _changed_biases(bc: Checkpoint, fc: Checkpoint) -> list[str]:
    """Bias tensors present in both checkpoints whose values differ (small: read whole)."""
    import torch

    out = []
    for key in sorted(k for k in bc.entries if k.endswith(".bias") and k in fc.entries):
        if bc.shape(key) == fc.shape(key) and not torch.equal(bc.read(key), fc.read(key)):
            out.append(key)
    return out
