"""Rank rules: how many singular triplets each target keeps (``--rank``, ``--energy``, …).

**Rank rules** (σ_1 ≥ σ_2 ≥ …, k counted from 1; kohya's resize keeps one component more than its
own definitions for the dynamic rules — these are the definitions, exactly):
- ``rank=K``: k = K;
- ``energy=F``: smallest k with Σ_{i≤k} σ_i² / Σ σ_i² ≥ F, 0 < F ≤ 1;
- ``sv_fro=P``: smallest k with sqrt(Σ_{i≤k} σ_i²) / ‖ΔW‖_F ≥ P, 0 < P ≤ 1;
- ``sv_cumulative=P``: smallest k with Σ_{i≤k} σ_i / Σ σ_i ≥ P, 0 < P ≤ 1;
- ``sv_ratio=P``: keep every σ_i ≥ σ_1 / P, P ≥ 1.
*Ties*: a rule counts as met when it holds within a relative ``REL_TOL`` = 1e-6 (about 8 fp32 ulps,
above the rounding of σ computed from fp32 factors), so a threshold that is met exactly in exact
arithmetic keeps the smaller rank, and one missed by more than 1e-6 relative takes the next
component. Then k is clamped to [min_rank, max_rank] and capped at min(in, out, input rank): no
output rank exceeds what ΔW can have.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from ..errors import UsageError

REL_TOL = 1e-6  # ties at a rule's threshold: see the module docstring

RULE_FLAGS = {
    "rank": "--rank",
    "energy": "--energy",
    "sv_ratio": "--sv-ratio",
    "sv_cumulative": "--sv-cumulative",
    "sv_fro": "--sv-fro",
}


class RuleArgs(TypedDict, total=False):
    """The rank-rule keywords of ``make_rule``, ``reduce_rank``, ``combine`` and ``extract``.

    Spelled once here: the operations take ``**rules: Unpack[RuleArgs]`` and hand them on, and
    the CLI builds its options from ``RULE_KEYS``. At most one of the first five is given.
    """

    rank: int | None
    energy: float | None
    sv_ratio: float | None
    sv_cumulative: float | None
    sv_fro: float | None
    max_rank: int | None
    min_rank: int | None


RULE_KEYS: tuple[str, ...] = tuple(RuleArgs.__annotations__)  # in the order above


def check_rule_keys(caller: str, rules: dict[str, Any]) -> None:
    """The ``TypeError`` Python raises for an unknown keyword, which ``**rules`` would swallow."""
    for key in rules:
        if key not in RULE_KEYS:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")


_RULE_HINT = "pass one of --rank K, --energy F, --sv-ratio P, --sv-cumulative P, --sv-fro P"


@dataclass(frozen=True)
class Rule:
    """How many singular triplets to keep per target (definitions in the module docstring)."""

    name: str  # a key of RULE_FLAGS
    value: float
    max_rank: int | None = None
    min_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        value: float | int = int(self.value) if self.name == "rank" else self.value
        return {
            "name": self.name,
            "value": value,
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
        }

    def select(
        self,
        sv: Sequence[float],
        *,
        cap: int,
        total_sq: float | None = None,
        complete: bool = True,
    ) -> int | None:
        """k for descending ``sv`` (not all zero), clamped and capped at ``cap``.

        ``complete=False`` says ``sv`` are only the leading values (a randomized SVD):
        ``total_sq`` must then be the exact ‖ΔW‖_F², and None means "not reached yet".
        """
        k = self._raw(sv, total_sq, complete)
        if k is None:
            if self.max_rank is None or len(sv) < self.max_rank:
                return None
            k = self.max_rank  # the rule needs more than max_rank anyway
        if self.min_rank is not None:
            k = max(k, self.min_rank)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(1, min(k, cap))

    def _raw(self, sv: Sequence[float], total_sq: float | None, complete: bool) -> int | None:
        v, keep = self.value, 1.0 - REL_TOL
        if self.name == "rank":
            return int(v)
        if self.name == "sv_ratio":  # σ_i ≥ σ_1 / P: a prefix, since σ is descending
            k = sum(1 for s in sv if s * v >= sv[0] * keep)
            return k if complete or k < len(sv) else None
        if self.name == "sv_cumulative":
            total = sum(sv)
            met = (c / total >= v * keep for c in itertools.accumulate(sv))
        else:
            total = sum(s * s for s in sv) if total_sq is None else total_sq
            cum = itertools.accumulate(s * s for s in sv)
            if self.name == "energy":
                met = (c / total >= v * keep for c in cum)
            else:  # sv_fro
                met = (math.sqrt(c) / math.sqrt(total) >= v * keep for c in cum)
        for k, ok in enumerate(met, 1):
            if ok:
                return k
        return len(sv) if complete else None

    def zero_rank(self, cap: int) -> int:
        """The rank a zero target keeps: K under ``rank``, else max(1, min_rank); capped."""
        k = int(self.value) if self.name == "rank" else max(1, self.min_rank or 1)
        return max(1, min(k, cap))


def make_rule(*, required: bool = True, **rules: Unpack[RuleArgs]) -> Rule | None:
    """Validate one rank rule and its bounds; raise ``UsageError`` on a bad combination."""
    check_rule_keys("make_rule", dict(rules))
    values = {key: rules.get(key) for key in RULE_FLAGS}
    max_rank, min_rank = rules.get("max_rank"), rules.get("min_rank")
    given = {k: v for k, v in values.items() if v is not None}
    if len(given) > 1:
        flags = " and ".join(RULE_FLAGS[k] for k in given)
        raise UsageError(
            f"{flags} are alternatives; give one", code="rule-conflict", hint=_RULE_HINT
        )
    for flag, bound in (("--max-rank", max_rank), ("--min-rank", min_rank)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, int) or bound < 1
        ):
            raise UsageError(f"{flag} must be a whole number ≥ 1, got {bound!r}", code="bad-rule")
    if not given:
        if max_rank is not None or min_rank is not None:
            raise UsageError(
                "--max-rank and --min-rank bound a dynamic rule, but none was given",
                code="no-rule",
                hint="add --energy F, --sv-ratio P, --sv-cumulative P or --sv-fro P (or use --rank K)",
            )
        if required:
            raise UsageError("no rank rule given", code="no-rule", hint=_RULE_HINT)
        return None
    name, value = next(iter(given.items()))
    flag = RULE_FLAGS[name]
    if name == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--rank must be a whole number ≥ 1, got {value!r}", code="bad-rule")
        if max_rank is not None or min_rank is not None:
            raise UsageError(
                "--max-rank and --min-rank bound a dynamic rule; --rank K already fixes the rank",
                code="rule-conflict",
                hint="drop them, or use --energy/--sv-ratio/--sv-cumulative/--sv-fro",
            )
        return Rule(name, float(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value!r}", code="bad-rule")
    if name == "sv_ratio" and value < 1.0:
        raise UsageError(
            f"--sv-ratio must be ≥ 1 (keep σ ≥ σ_max / P), got {value}",
            code="bad-rule",
            hint="--sv-ratio 10 keeps singular values within a factor 10 of the largest",
        )
    if name != "sv_ratio" and not 0.0 < value <= 1.0:
        raise UsageError(
            f"{flag} is a fraction in (0, 1], got {value}",
            code="bad-rule",
            hint=f"e.g. {flag} 0.95",
        )
    if max_rank is not None and min_rank is not None and min_rank > max_rank:
        raise UsageError(f"--min-rank {min_rank} is above --max-rank {max_rank}", code="bad-rule")
    return Rule(name, float(value), max_rank, min_rank)
