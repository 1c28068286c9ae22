"""The kind registry: each adapter kind is defined once, and every operation asks it.

A *kind* says how a target's factors relate to the base weight they adapt: the tensors it stores,
the shape of that weight, how ``ΔW = s·B·A`` (always ``[out, in]``, spec §3) lands on the weight as
the base stores it, how the training layer applies it, and what it is called in PEFT, kohya and
GGUF files. Merge, unmerge, reduce-rank, combine, extract, inspect, convert and the trainer's
layer look a kind up here instead of branching on its name::

    from loratool import kinds
    kind = kinds.get(target.kind)           # by the name in the file's header
    kind = kinds.of_module(module)          # by the torch module it would wrap (or None)
    left, right = kind.stored_factors(A, B, coef)   # left @ right == coef·ΔW, stored orientation

A new kind is one module in this package with a ``Kind`` subclass, added to ``REGISTRY`` below;
its name goes into ``constants.KINDS`` (spec §3.2). This package imports no torch: methods that
work on tensors import it when called.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .base import Kind
from .conv import Conv2d
from .embedding import Embedding
from .linear import Conv1D, Linear
from .lycoris import LoHa, LoKr
from .whole import BiasDelta, Full, Tokens

REGISTRY: dict[str, Kind] = {
    k.name: k
    for k in (
        Linear(),
        Conv1D(),
        Embedding(),
        Full(),
        Tokens(),
        BiasDelta(),
        Conv2d(),
        LoHa(),
        LoKr(),
    )
}


def get(name: str) -> Kind:
    """The kind called ``name`` in a file's header (spec §3.2)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown layer kind '{name}'",
            code="unknown-kind",
            hint=f"known kinds: {', '.join(REGISTRY)}",
        ) from None


def of_module(module: Any) -> Kind | None:
    """The kind that adapts this torch module, or None when no kind does."""
    for kind in REGISTRY.values():
        if kind.wraps(module):
            return kind
    return None


def linear_like() -> tuple[str, ...]:
    """Kinds PEFT's ``all-linear`` selects: dense layers whose input is a vector (not ids)."""
    return tuple(k.name for k in REGISTRY.values() if k.dense and k.lowrank)


def check_plain(targets: Any, op: str) -> None:
    """Refuse (``unsupported-feature``) any target ``op`` has no exact rule for yet: spec §3.7
    says never drop a part. The kind's ``refusal`` gives the reason where the spec has one."""
    from .. import constants as C

    for t in targets:
        if t.features or t.kind not in C.KINDS_10:
            why = get(t.kind).refusal(op, t) or (
                f"{t.kind}{' with ' + ', '.join(t.features) if t.features else ''}: "
                f"{op} does not carry it yet"
            )
            raise UsageError(
                f"target '{t.name}': {why}",
                code="unsupported-feature",
                hint="merge the adapter, or convert --to peft and use PEFT for this operation",
            )


def requirements(targets: Any) -> list[str]:
    """The sorted ``loratool.requires`` names (§4.1) a set of targets uses: 1.1 features and
    every kind that is not a 1.0 kind. Empty for a file a 1.0 reader reads."""
    from .. import constants as C

    used: set[str] = set()
    for t in targets:
        used.update(t.features)
        if t.kind not in C.KINDS_10:
            used.add(t.kind)
    return sorted(used)


__all__ = [
    "REGISTRY",
    "BiasDelta",
    "Conv1D",
    "Conv2d",
    "Embedding",
    "Full",
    "Kind",
    "Linear",
    "LoHa",
    "LoKr",
    "Tokens",
    "check_plain",
    "get",
    "linear_like",
    "of_module",
    "requirements",
]
