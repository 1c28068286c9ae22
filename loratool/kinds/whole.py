"""Spec 1.1 kinds that store whole tensors, not factors (§3.6): ``full``, ``tokens`` and ``bias``.

* ``full``: replacement ``M.weight`` and/or ``M.bias`` (PEFT ``modules_to_save``); ``base_rows``
  records a grown vocabulary (the base has that many rows; the rest are new).
* ``tokens``: replacement rows of an embedding, ``indices`` in the header and ``M.token_values``
  ``[n, dim]`` (PEFT ``trainable_token_indices``: its ``trainable_tokens_delta`` holds the new rows,
  not a difference, and ``index_copy`` puts them in).
* ``bias``: a bias delta ``M.bias_delta`` on a module with no LoRA (PEFT ``bias="all"``).

Replacements merge as ``X + w·(V − X)``, which is ``V`` itself at the only weight merge accepts
(1); they cannot be unmerged without the original, which only a reversible merge keeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import constants as C
from .base import Kind

if TYPE_CHECKING:
    import torch

    from ..adapter import Target
    from .base import Bad

_WHOLE = "whole tensors"
# op -> why a whole-tensor kind refuses it; ops absent here handle it (spec §3.7).
WHOLE_REFUSALS: dict[str, str] = {
    "kohya": f"kohya LoRA files hold no {_WHOLE}",
    "gguf": f"llama.cpp LoRA adapters hold no {_WHOLE}",
    "diffusers": f"diffusers LoRA files hold no {_WHOLE}; convert --to peft",
    "serve": f"the server does not swap in {_WHOLE}; merge the adapter into the base",
}


def _dim(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= C.MAX_DIM


class _Whole(Kind):
    lowrank: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset()
    in_gguf: ClassVar[bool] = False
    dense: ClassVar[bool] = False

    def needs_dense(self, t: Target) -> bool:
        return True

    def touches_bias(self, t: Target) -> bool:
        return False

    def exact_inverse(self, t: Target) -> bool:
        return False  # a replacement: the original is gone unless a reversible merge kept it

    def refusal(self, op: str, t: Target) -> str | None:
        why = WHOLE_REFUSALS.get(op)
        return None if why is None else f"{self.name}: {why}"

    @staticmethod
    def replaced(X: torch.Tensor, V: torch.Tensor, coef: float) -> torch.Tensor:
        v = V.detach().to(device=X.device, dtype=X.dtype)
        return v.clone() if coef == 1.0 else X + coef * (v - X)


class Full(_Whole):
    name: ClassVar[str] = C.KIND_FULL
    label: ClassVar[str] = "replaced module"
    entry_fields: ClassVar[tuple[str, ...]] = ("kind", "shapes")

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        shapes = entry["shapes"]
        if not isinstance(shapes, dict) or not shapes or set(shapes) - {C.PART_WEIGHT, C.PART_BIAS}:
            raise bad("shapes must be an object with 'weight' and/or 'bias'")
        parsed: dict[str, tuple[int, ...]] = {}
        for part, shape in shapes.items():
            if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(map(_dim, shape)):
                raise bad(f"shapes.{part} must be a list of 1 to 8 dimensions in 1..{C.MAX_DIM}")
            parsed[part] = tuple(shape)
        rows = entry.get("base_rows")
        if rows is not None:
            weight = parsed.get(C.PART_WEIGHT)
            if weight is None or not _dim(rows) or rows >= weight[0]:
                raise bad("base_rows must be an integer below the weight's first dimension")
        return {"shapes": parsed, "base_rows": rows}

    def entry(self, t: Target) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.name,
            "shapes": {p: list(s) for p, s in t.fields["shapes"].items()},
        }
        if t.fields.get("base_rows") is not None:
            out["base_rows"] = t.fields["base_rows"]
        return out

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        return dict(t.fields["shapes"])

    def bound(self, t: Target) -> tuple[str, tuple[int, ...]]:
        shapes = t.fields["shapes"]
        if C.PART_WEIGHT not in shapes:
            return ".bias", shapes[C.PART_BIAS]
        shape = shapes[C.PART_WEIGHT]
        rows = t.fields.get("base_rows")
        return ".weight", shape if rows is None else (rows, *shape[1:])

    def touches_bias(self, t: Target) -> bool:
        shapes = t.fields["shapes"]
        return C.PART_WEIGHT in shapes and C.PART_BIAS in shapes

    def merge_weight(self, t: Target, W: torch.Tensor, coef: float) -> torch.Tensor:
        part = C.PART_WEIGHT if C.PART_WEIGHT in t.fields["shapes"] else C.PART_BIAS
        return self.replaced(W, t.part(part), coef)

    def merge_bias(self, t: Target, b: torch.Tensor, coef: float) -> torch.Tensor:
        return self.replaced(b, t.part(C.PART_BIAS), coef)


class Tokens(_Whole):
    name: ClassVar[str] = C.KIND_TOKENS
    label: ClassVar[str] = "Embedding rows"
    transposed: ClassVar[bool] = True  # like embedding: in = vocabulary, stored [in, out]
    entry_fields: ClassVar[tuple[str, ...]] = ("kind", "in_features", "out_features", "indices")

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        from ..errors import FormatError

        idx, vocab = entry["indices"], entry["in_features"]
        ok = (
            isinstance(idx, list)
            and 1 <= len(idx) <= C.MAX_TOKENS
            and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
        )
        if ok and _dim(vocab):
            ok = all(0 <= i < vocab for i in idx) and all(a < b for a, b in itertools.pairwise(idx))
        if not ok:
            err = bad(
                f"indices must be 1..{C.MAX_TOKENS} ascending distinct token ids below "
                "in_features (the vocabulary)"
            )
            if isinstance(err, FormatError):
                err.code = "bad-indices"
            raise err
        return {"indices": tuple(idx)}

    def entry(self, t: Target) -> dict[str, Any]:
        return {
            "in_features": t.in_features,
            "indices": list(t.fields["indices"]),
            "kind": self.name,
            "out_features": t.out_features,
        }

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        return {C.PART_TOKEN_VALUES: (len(t.fields["indices"]), t.out_features)}

    def merge_weight(self, t: Target, W: torch.Tensor, coef: float) -> torch.Tensor:
        import torch

        idx = torch.tensor(t.fields["indices"], dtype=torch.int64, device=W.device)
        out = W.clone()
        out[idx] = self.replaced(W[idx], t.part(C.PART_TOKEN_VALUES), coef)
        return out


class BiasDelta(_Whole):
    name: ClassVar[str] = C.KIND_BIAS
    label: ClassVar[str] = "bias"
    entry_fields: ClassVar[tuple[str, ...]] = ("kind", "out_features")

    def entry(self, t: Target) -> dict[str, Any]:
        return {"kind": self.name, "out_features": t.out_features}

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        return {C.PART_BIAS_DELTA: (t.out_features,)}

    def bound(self, t: Target) -> tuple[str, tuple[int, ...]]:
        return ".bias", (t.out_features,)

    def exact_inverse(self, t: Target) -> bool:
        return True

    def merge_weight(self, t: Target, W: torch.Tensor, coef: float) -> torch.Tensor:
        d = t.part(C.PART_BIAS_DELTA).detach().to(device=W.device, dtype=W.dtype)
        return W + coef * d
