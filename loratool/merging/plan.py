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
    # spec 1.1 vocabularies (vocab.py): the written shape where a grown vocabulary resizes the
    # weight, and the base key read for a tensor the base lacks (an untied lm_head)
    new_shape: tuple[int, ...] | None = None
    source: str | None = None

    @property
    def targeted(self) -> bool:
        return bool(self.terms)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape if self.new_shape is None else self.new_shape

    @property
    def read_key(self) -> str:
        return self.key if self.source is None else self.source

    @property
    def reshaped(self) -> bool:
        """Whether the output differs in layout from the base (no unmerge, no sidecar)."""
        return self.new_shape is not None or self.source is not None


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
    from .dense import plan_features  # spec 1.1: bias terms and the refusals, before writing
    from .vocab import plan_vocab, refuse_shrink, untie_keys  # spec 1.1: vocabularies, heads

    for inp in inputs:
        if sign < 0:
            refuse_shrink(inp)  # before check_fits, whose shape-mismatch would say less
        inp.keys = base.check_fits(inp.adapter, force=force)
        untie_keys(base, inp, jobs)
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
    plan_features(base, inputs, jobs, sign=sign)
    plan_vocab(base, jobs)
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
        if job.reshaped:
            raise UsageError(
                f"--reversible with a merge that changes the checkpoint's layout ('{job.key}': "
                + ("a grown vocabulary" if job.new_shape is not None else "an untied lm_head")
                + ")",
                code="not-reversible",
                hint="merge without --reversible; keep the base to go back to it",
            )
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


def job_nbytes(job: Job, dtype: str, *, out: bool = False) -> int:
    """Bytes of the job's tensor in ``dtype``: as read from the base, or (``out``) as written."""
    return math.prod(job.out_shape if out else job.shape) * ALL_DTYPES[dtype]
