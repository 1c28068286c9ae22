"""LyCORIS' LoHa and LoKr (also PEFT's ``LoHaConfig``/``LoKrConfig``): ΔW from Hadamard and
Kronecker products of small factors, on Linear and Conv2d weights.

Tensor names and layouts are LyCORIS' (``lycoris/modules/loha.py``, ``lokr.py``), which PEFT
copies (``peft/tuners/loha``, ``lokr``); ``scale = alpha/rank`` (α/√r under rsLoRA) as both apply
it in the forward pass, each reader folding its file's own convention into alpha:

* **LoHa** — ΔW = scale · (w1_a·w1_b) ⊙ (w2_a·w2_b), w*_a ``[out, r]``, w*_b ``[r, in·kh·kw]``;
  the Tucker form of a conv (``tucker``) has ``hada_t1/t2 [r, r, kh, kw]``, w*_a ``[r, out]``,
  w*_b ``[r, in]`` and rebuilds each half as ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)``.
* **LoKr** — ΔW = scale · kron(w1, w2), w1 ``[a, c]`` (``lokr_w1``, or ``lokr_w1_a [a, r]`` ·
  ``lokr_w1_b [r, c]``), w2 ``[b, d(, kh, kw)]`` (``lokr_w2``, or ``lokr_w2_a [b, r]`` ·
  ``lokr_w2_b [r, d·kh·kw]``, or Tucker ``lokr_t2 [r, r, kh, kw]`` with w2_a ``[r, b]``,
  w2_b ``[r, d]``); out = a·b, in = c·d. Header field ``lokr`` records the four sizes and which
  sides are factored.

Both are dense kinds (``lowrank`` False: no lora_A/lora_B): merge forms ΔW per weight in fp32 or
fp64 and rounds once; unmerge subtracts the same ΔW. reduce-rank turns them into plain LoRA of
the same ΔW (lowrank/dense.py); what has no exact rule is refused (``refusal``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import constants as C
from .base import Kind
from .conv import KERNEL, coded, read_kernel

if TYPE_CHECKING:
    import torch

    from ..adapter import Target
    from .base import Bad

LOHA, LOKR = "loha", "lokr"
TUCKER = "tucker"
LOKR_FIELD = (
    "lokr"  # {"a", "b", "c", "d", "w1": "full"|"factored", "w2": "full"|"factored"|"tucker"}
)

_REFUSALS = {
    "combine": "a weighted sum of Hadamard or Kronecker products is not one of them; "
    "reduce-rank each to LoRA first",
    "extract": "extract writes LoRA",
    "gguf": "llama.cpp adapters hold LoRA pairs only; reduce-rank to LoRA first",
    "diffusers": "diffusers LoRA files hold LoRA pairs only; convert --to peft or --to kohya",
    "attach": "the training and serving layers apply LoRA only; merge the adapter",
    "serve": "the server applies LoRA only; merge the adapter into the base",
}


def _is_dim(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= C.MAX_DIM


class _Product(Kind):
    """What LoHa and LoKr share: dense merge, weight shape from in/out/kernel, refusals."""

    lowrank: ClassVar[bool] = False
    dense: ClassVar[bool] = False
    in_kohya: ClassVar[bool] = True  # LyCORIS files are kohya-family files
    in_gguf: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset()

    def kernel(self, t: Target) -> tuple[int, ...]:
        return tuple(t.fields.get(KERNEL) or ())

    def bound(self, t: Target) -> tuple[str, tuple[int, ...]]:
        return ".weight", (t.out_features, t.in_features, *self.kernel(t))

    def fan_in(self, t: Target) -> int:
        return t.in_features * math.prod(self.kernel(t))

    def entry(self, t: Target) -> dict[str, Any]:
        out = super().entry(t)
        if self.kernel(t):
            out[KERNEL] = list(self.kernel(t))
        return out

    def fit_shape(self, t: Target, shape: tuple[int, ...]) -> None:
        """Take a conv's kernel from the base weight when the file could not say it.

        Non-Tucker LoHa/LoKr on a Conv2d store ``[r, in·kh·kw]`` factors (PEFT and LyCORIS
        alike), so a reader sees a fan-in, not a kernel: a base weight ``[out, in, kh, kw]``
        with the same out and ``in·kh·kw`` settles it (Checkpoint.check_fits calls this).
        """
        if self.kernel(t) or len(shape) != 4 or shape[0] != t.out_features:
            return
        if shape[1] * shape[2] * shape[3] != t.in_features:
            return
        fields = dict(t.fields)
        fields[KERNEL] = (int(shape[2]), int(shape[3]))
        if LOKR_FIELD in fields:
            lk = dict(fields[LOKR_FIELD])
            if lk["d"] % (shape[2] * shape[3]):
                return
            lk["d"] //= shape[2] * shape[3]
            fields[LOKR_FIELD] = lk
        t.fields = fields
        t.in_features = int(shape[1])

    def needs_dense(self, t: Target) -> bool:
        return True

    def dense_delta(self, t: Target, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def merge_weight(self, t: Target, W: torch.Tensor, coef: float) -> torch.Tensor:
        return W + coef * self.dense_delta(t, W.dtype, W.device)

    def exact_inverse(self, t: Target) -> bool:
        return True  # W' − ΔW, with ΔW computed the same way: the round trip is checked per bit

    def touches_bias(self, t: Target) -> bool:
        return False

    def refusal(self, op: str, t: Target) -> str | None:
        why = _REFUSALS.get(op)
        return None if why is None else f"{self.name}: {why}"

    def _get(self, t: Target, part: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return t.part(part).detach().to(device=device, dtype=dtype)


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``[out, in, kh, kw]`` from a Tucker core ``[r, r, kh, kw]``, wa ``[r, out]``, wb ``[r, in]``."""
    import torch

    return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)


class LoHa(_Product):
    name: ClassVar[str] = LOHA
    label: ClassVar[str] = "LoHa"
    entry_fields: ClassVar[tuple[str, ...]] = C.TARGET_FIELDS

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        kernel = read_kernel(entry, bad, required=False)
        tucker = entry.get(TUCKER, False)
        if not isinstance(tucker, bool) or (tucker and not kernel):
            why = "tucker must be true or false, and true only with a kernel"
            raise coded(bad, "bad-kernel", why)
        return {KERNEL: kernel, TUCKER: tucker}

    def entry(self, t: Target) -> dict[str, Any]:
        out = super().entry(t)
        if t.fields.get(TUCKER):
            out[TUCKER] = True
        return out

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        r, o = t.rank, t.out_features
        if t.fields.get(TUCKER):
            core = (r, r, *self.kernel(t))
            ab = {"a": (r, o), "b": (r, t.in_features)}
            return {
                "hada_t1": core,
                "hada_w1_a": ab["a"],
                "hada_w1_b": ab["b"],
                "hada_t2": core,
                "hada_w2_a": ab["a"],
                "hada_w2_b": ab["b"],
            }
        n = self.fan_in(t)
        return {"hada_w1_a": (o, r), "hada_w1_b": (r, n), "hada_w2_a": (o, r), "hada_w2_b": (r, n)}

    def dense_delta(self, t: Target, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
        """``scale · (w1_a·w1_b) ⊙ (w2_a·w2_b)`` shaped like the weight, in ``dtype``."""

        def get(p: str) -> torch.Tensor:
            return self._get(t, p, dtype, device)

        shape = self.bound(t)[1]
        if t.fields.get(TUCKER):
            w1 = rebuild_tucker(get("hada_t1"), get("hada_w1_a"), get("hada_w1_b"))
            w2 = rebuild_tucker(get("hada_t2"), get("hada_w2_a"), get("hada_w2_b"))
        else:
            w1 = get("hada_w1_a") @ get("hada_w1_b")
            w2 = get("hada_w2_a") @ get("hada_w2_b")
        return ((w1 * w2) * t.scale).reshape(shape)


class LoKr(_Product):
    name: ClassVar[str] = LOKR
    label: ClassVar[str] = "LoKr"
    entry_fields: ClassVar[tuple[str, ...]] = (*C.TARGET_FIELDS, LOKR_FIELD)

    def read_entry(self, entry: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        kernel = read_kernel(entry, bad, required=False)
        raw = entry[LOKR_FIELD]

        def fail(why: str) -> Exception:  # rule 28, spec §3.8
            return coded(bad, "bad-factorization", why)

        if not isinstance(raw, dict) or set(raw) != {"a", "b", "c", "d", "w1", "w2"}:
            raise fail("lokr must be an object with a, b, c, d, w1 and w2")
        if not all(_is_dim(raw[k]) for k in "abcd"):
            raise fail(f"lokr.a..d must be integers in 1..{C.MAX_DIM}")
        if raw["w1"] not in ("full", "factored") or raw["w2"] not in ("full", "factored", TUCKER):
            raise fail("lokr.w1 must be full or factored; lokr.w2 full, factored or tucker")
        if raw["w2"] == TUCKER and not kernel:
            raise coded(bad, "bad-kernel", "lokr.w2 tucker needs a kernel")
        out_f, in_f = entry["out_features"], entry["in_features"]
        if raw["a"] * raw["b"] != out_f or raw["c"] * raw["d"] != in_f:
            raise fail("lokr.a·b must be out_features and lokr.c·d in_features")
        return {KERNEL: kernel, LOKR_FIELD: dict(raw)}

    def entry(self, t: Target) -> dict[str, Any]:
        out = super().entry(t)
        out[LOKR_FIELD] = dict(t.fields[LOKR_FIELD])
        return out

    def parts(self, t: Target) -> dict[str, tuple[int, ...]]:
        f, r, k = t.fields[LOKR_FIELD], t.rank, self.kernel(t)
        a, b, c, d = f["a"], f["b"], f["c"], f["d"]
        shapes: dict[str, tuple[int, ...]] = {}
        if f["w1"] == "full":
            shapes["lokr_w1"] = (a, c)
        else:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        if f["w2"] == "full":
            shapes["lokr_w2"] = (b, d, *k)
        elif f["w2"] == TUCKER:
            shapes.update(lokr_t2=(r, r, *k), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(k)))
        return shapes

    def dense_delta(self, t: Target, dtype: torch.dtype, device: Any = "cpu") -> torch.Tensor:
        """``scale · kron(w1, w2)`` shaped like the weight, in ``dtype``."""
        import torch

        def get(p: str) -> torch.Tensor:
            return self._get(t, p, dtype, device)

        f, k = t.fields[LOKR_FIELD], self.kernel(t)
        w1 = get("lokr_w1") if f["w1"] == "full" else get("lokr_w1_a") @ get("lokr_w1_b")
        if f["w2"] == "full":
            w2 = get("lokr_w2")
        elif f["w2"] == TUCKER:
            w2 = rebuild_tucker(get("lokr_t2"), get("lokr_w2_a"), get("lokr_w2_b"))
        else:
            w2 = (get("lokr_w2_a") @ get("lokr_w2_b")).reshape(f["b"], f["d"], *k)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)  # kron over the kernel dims: w1 is constant across them
        # torch.kron views its inputs: an einsum result (Tucker) must be made contiguous first.
        return (torch.kron(w1.contiguous(), w2.contiguous()) * t.scale).reshape(self.bound(t)[1])
