"""One adapted module: ``Target`` (its tensors and the numbers that say how to apply them), and
the scale, shape and fingerprint rules every target follows (spec §3–4).

Tensors are torch tensors, loaded lazily from the file they came from, so building a ``Target``
from a header imports no torch. ΔW of a low-rank target is ``scale · lora_B @ lora_A`` in the
``[out, in]`` orientation of ``torch.nn.Linear`` (spec §3); ``kind`` (loratool/kinds) says how that
lands on the stored weight.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import constants as C
from . import kinds

if TYPE_CHECKING:
    import torch

TensorLoader = Callable[[str], "torch.Tensor"]


def scale_for(alpha: float, rank: int, scale_rule: str) -> float:
    """The multiplier on B·A: α/r (standard) or α/√r (rsLoRA)."""
    return alpha / math.sqrt(rank) if scale_rule == C.SCALE_RSLORA else alpha / rank


def alpha_for(scale: float, rank: int, scale_rule: str) -> float:
    """The alpha that gives ``scale`` at ``rank`` under ``scale_rule`` (inverse of scale_for)."""
    return scale * math.sqrt(rank) if scale_rule == C.SCALE_RSLORA else scale * rank


def weight_shape(kind: str, in_features: int, out_features: int) -> tuple[int, int]:
    """Shape of the base weight ``M.weight`` as the base model stores it (spec §3.2)."""
    return kinds.get(kind).weight_shape(in_features, out_features)


def fingerprint(weights: Iterable[tuple[str, Iterable[int]]]) -> str:
    """Spec §4.3: SHA-256 over sorted ``name:d0xd1\\n`` lines of the targeted base weights."""
    lines = sorted(f"{name}:{'x'.join(str(int(d)) for d in shape)}\n" for name, shape in weights)
    return C.FINGERPRINT_PREFIX + hashlib.sha256("".join(lines).encode()).hexdigest()


class Target:
    """One adapted module: its tensors and the numbers that say how to apply them.

    A 1.0 target is a LoRA pair (``lora_A``, ``lora_B``). Spec 1.1 adds ``features`` (DoRA's
    magnitude, a LoRA bias, a bias delta: each one more tensor, §3.5) and kinds that own other
    tensors (§3.6, ``fields`` holding their header fields); ``parts()`` names every tensor the
    target stores, as its kind says, and ``part(name)`` loads one.
    """

    def __init__(
        self,
        name: str,
        *,
        rank: int = 1,
        alpha: float = 1.0,
        in_features: int = 1,
        out_features: int = 1,
        scale_rule: str = C.SCALE_STANDARD,
        kind: str = C.KIND_LINEAR,
        dtype: str = "F32",
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        loader: TensorLoader | None = None,
        features: Iterable[str] = (),
        fields: Mapping[str, Any] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.scale_rule = scale_rule
        self.kind = kind
        self.dtype = dtype  # safetensors dtype name of every tensor of the target: F32, F16, BF16
        self.features: tuple[str, ...] = tuple(sorted(set(features)))
        self.fields: dict[str, Any] = dict(fields or {})  # the kind's own header fields (§3.6)
        self._A = lora_A
        self._B = lora_B
        self._parts: dict[str, torch.Tensor] = dict(tensors or {})  # parts other than A and B
        self._loader = loader

    @classmethod
    def from_factors(
        cls,
        name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        *,
        alpha: float | None = None,
        scale_rule: str = C.SCALE_STANDARD,
        kind: str = C.KIND_LINEAR,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> Target:
        """A target from tensors A ``[r, in]`` and B ``[out, r]``; alpha defaults to r (scale 1).

        ``tensors`` adds §3.5 feature parts by part name (``magnitude``, ``lora_bias``,
        ``bias_delta``), which turns the features on.
        """
        from .dtypes import dtype_name

        rank, in_features = lora_A.shape
        out_features, rank_b = lora_B.shape
        if rank_b != rank:
            raise ValueError(f"{name}: lora_B has rank {rank_b} but lora_A has rank {rank}")
        if lora_A.dtype != lora_B.dtype:
            raise ValueError(f"{name}: lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}")
        return cls(
            name,
            rank=rank,
            alpha=float(rank) if alpha is None else alpha,
            in_features=in_features,
            out_features=out_features,
            scale_rule=scale_rule,
            kind=kind,
            dtype=dtype_name(lora_A.dtype),
            lora_A=lora_A,
            lora_B=lora_B,
            features=features_of(tensors or {}),
            tensors=tensors,
        )

    @classmethod
    def whole(
        cls,
        name: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        base_rows: int | None = None,
        indices: Iterable[int] | None = None,
    ) -> Target:
        """A §3.6 target: ``full`` (parts ``weight``/``bias``, ``base_rows`` for grown rows),
        ``tokens`` (``token_values`` rows at ``indices``) or ``bias`` (``bias_delta``)."""
        from .dtypes import dtype_name

        first = next(iter(tensors.values()))
        fields: dict[str, Any] = {}
        in_f, out_f = 1, int(first.shape[0]) if first.dim() else 1
        if kind == C.KIND_FULL:
            fields = {"shapes": {p: tuple(x.shape) for p, x in tensors.items()}}
            fields["base_rows"] = base_rows
            w = tensors.get(C.PART_WEIGHT)
            if w is not None and w.dim() >= 2:
                in_f = math.prod(w.shape[1:])
        elif kind == C.KIND_TOKENS:
            if indices is None:
                raise ValueError(f"{name}: a tokens target needs its indices")
            fields = {"indices": tuple(int(i) for i in indices)}
            in_f = int(base_rows or 0)  # the vocabulary; callers pass it as base_rows
            out_f = int(first.shape[1])
        return cls(
            name,
            kind=kind,
            in_features=in_f,
            out_features=out_f,
            dtype=dtype_name(first.dtype),
            fields=fields,
            tensors=tensors,
        )

    @property
    def lowrank(self) -> bool:
        """A LoRA pair (every 1.0 kind), as opposed to §3.6's whole tensors."""
        return kinds.get(self.kind).lowrank

    @property
    def plain(self) -> bool:
        """A 1.0 target: a LoRA pair of a 1.0 kind with no 1.1 feature."""
        return not self.features and self.kind in C.KINDS_10

    def parts(self) -> dict[str, tuple[int, ...]]:
        """Every tensor part this target stores, with its shape (the file's ``M.<part>``)."""
        return kinds.get(self.kind).parts(self)

    def part(self, part: str) -> torch.Tensor:
        """One stored tensor by part name (``lora_A``, ``magnitude``, ``weight``, …), lazily."""
        if part == C.PART_A:
            return self.lora_A
        if part == C.PART_B:
            return self.lora_B
        if part not in self._parts:
            if self._loader is None:
                raise KeyError(f"target '{self.name}' has no tensor part '{part}'")
            self._parts[part] = self._loader(f"{self.name}.{part}")
        return self._parts[part]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Part name → tensor for every part (loads them)."""
        return {p: self.part(p) for p in self.parts()}

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank, self.scale_rule)

    @property
    def lora_A(self) -> torch.Tensor:
        if self._A is None:
            assert self._loader is not None, "target without tensors or loader"
            self._A = self._loader(self.name + C.LORA_A_SUFFIX)
        return self._A

    @property
    def lora_B(self) -> torch.Tensor:
        if self._B is None:
            assert self._loader is not None, "target without tensors or loader"
            self._B = self._loader(self.name + C.LORA_B_SUFFIX)
        return self._B

    @property
    def weight_name(self) -> str:
        """The base tensor this target binds to (§4.3): ``M.weight``, or ``M.bias`` for §3.6
        targets that only touch a bias."""
        return self.name + kinds.get(self.kind).bound(self)[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        # The kind says (a 1.0 kind: weight_shape(in, out); conv2d and 1.1 kinds: their bound).
        return kinds.get(self.kind).bound(self)[1]

    @property
    def num_params(self) -> int:
        if self.plain:
            return self.rank * (self.in_features + self.out_features)
        return sum(math.prod(s) for s in self.parts().values())

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``scale · B @ A`` in ``[out, in]``, computed in fp32 (or ``dtype``).

        Only for merging and tests: algebra on the adapter works on the factors (loratool/lowrank/).
        """
        import torch

        dt = dtype or torch.float32
        dense = getattr(kinds.get(self.kind), "dense_delta", None)
        if dense is not None:  # conv2d, LoHa, LoKr: ΔW shaped like the weight, by the kind
            return dense(self, dt)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scale

    def header(self) -> dict[str, Any]:
        """This target's entry in ``loratool.targets`` (spec §4.2; 1.0 targets as 1.0 wrote them)."""
        return kinds.get(self.kind).entry(self)

    def replace(self, **changes: Any) -> Target:
        """A copy with some fields changed (tensors are shared, not copied)."""
        kw: dict[str, Any] = dict(
            rank=self.rank,
            alpha=self.alpha,
            in_features=self.in_features,
            out_features=self.out_features,
            scale_rule=self.scale_rule,
            kind=self.kind,
            dtype=self.dtype,
            features=self.features,
            fields=self.fields,
        )
        if not {"lora_A", "lora_B"} & set(changes):
            kw.update(lora_A=self._A, lora_B=self._B, loader=self._loader)
            if "tensors" not in changes:
                kw["tensors"] = self._parts
            elif self._parts:
                kw["tensors"] = {**self._parts, **changes.pop("tensors")}
        elif "tensors" not in changes and self.features:
            # new factors, same feature parts: load them now, the loader stays with the old copy
            kw.update(
                tensors={p: self.part(p) for p in self.parts() if p not in ("lora_A", "lora_B")}
            )
        kw.update(changes)
        name = kw.pop("name", self.name)
        return Target(name, **kw)

    def __repr__(self) -> str:
        if not self.lowrank:
            return (
                f"Target({self.name!r}, kind={self.kind}, parts={self.parts()}, dtype={self.dtype})"
            )
        extra = f", features={list(self.features)}" if self.features else ""
        return (
            f"Target({self.name!r}{extra}, rank={self.rank}, alpha={self.alpha}, scale={self.scale:.6g}, "
            f"kind={self.kind}, in={self.in_features}, out={self.out_features}, dtype={self.dtype})"
        )


def features_of(tensors: Mapping[str, Any]) -> list[str]:
    """The §3.5 features that the given extra parts turn on."""
    from .kinds.base import FEATURE_PART

    by_part = {p: f for f, p in FEATURE_PART.items()}
    unknown = set(tensors) - set(by_part)
    if unknown:
        raise ValueError(f"unknown feature parts {sorted(unknown)}; known: {sorted(by_part)}")
    return [by_part[p] for p in tensors]
