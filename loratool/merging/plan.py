"""The plan: which base weights the adapters change, into which dtype, checked before writing."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..adapter import Target
from ..checkpoint import ALL_DTYPES, Checkpoint
from ..errors import CompatibilityError, UsageError
from .inputs import Input

DTYPES = {"keep": None, "f32": "F32", "bf16": "BF16", "f16": "F16"}

FLOATS = ("F64", "F32", "F16", "BF16")

# Exactly representable casts: these can be undone, so they are allowed with ``reversible``.
WIDENINGS = {("F16", "F32"), ("F16", "F64"), ("BF16", "F32"), ("BF16", "F64"), ("F32", "F64")}


@dataclass
class Job:
    key: str
    in_dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    terms: list[tuple[Target, float]] = field(default_factory=list)  # (target, signed weight)

    @property
    def targeted(self) -> bool:
        return bool(self.terms)


def plan_jobs(
    base: Checkpoint,
    inputs: list[Input],
    *,
    sign: float,
    out_dtype: Callable[[str, str], str],
    force: bool,
) -> dict[str, Job]:
    """Check every adapter against the base (before anything is written) and plan each tensor."""
    jobs = {
        name: Job(name, e.info.dtype, out_dtype(name, e.info.dtype), e.info.shape)
        for name, e in base.entries.items()
    }
    for inp in inputs:
        inp.keys = base.check_fits(inp.adapter, force=force)
        seen: dict[str, str] = {}
        for tname, key in inp.keys.items():
            if key in seen:
                raise CompatibilityError(
                    f"targets '{seen[key]}' and '{tname}' of {inp.name} both resolve to '{key}'",
                    code="duplicate-target",
                    where=str(base.path),
                )
            seen[key] = tname
            job = jobs[key]
            if job.in_dtype not in FLOATS:
                raise CompatibilityError(
                    f"'{key}' is {job.in_dtype}; only F64/F32/F16/BF16 weights can take a delta",
                    code="unsupported-dtype",
                    where=str(base.path),
                    hint="dequantize the base first",
                )
            job.terms.append((inp.adapter.targets[tname], sign * inp.weight))
    from .dense import plan_features  # spec 1.1: bias terms and the refusals, before writing

    plan_features(base, inputs, jobs, sign=sign)
    return jobs


def dtype_rule(dtype: str) -> Callable[[str, str], str]:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", code="dtype", hint="keep, f32, bf16 or f16")
    target = DTYPES[dtype]

    def rule(name: str, current: str) -> str:
        return target if target is not None and current in FLOATS else current

    return rule


def check_reversible_dtypes(jobs: Mapping[str, Job]) -> None:
    for job in jobs.values():
        if job.out_dtype != job.in_dtype and (job.in_dtype, job.out_dtype) not in WIDENINGS:
            raise UsageError(
                f"--reversible with a narrowing --dtype "
                f"({job.in_dtype} → {job.out_dtype} for '{job.key}')",
                code="not-reversible",
                hint="a narrowing cast discards bits no compact sidecar restores; "
                "keep the dtype or widen it",
            )


def module_names(inputs: list[Input]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for inp in inputs:
        for tname, key in inp.keys.items():
            names.setdefault(key, [])
            if tname not in names[key]:
                names[key].append(tname)
    return names


def job_nbytes(job: Job, dtype: str) -> int:
    return math.prod(job.shape) * ALL_DTYPES[dtype]
