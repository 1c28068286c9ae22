"""kohya-family files beyond Linear LoRA: LoCon convs (+ Tucker ``lora_mid``), LoHa, LoKr, DoRA.

What LyCORIS (``lycoris/modules/{locon,loha,lokr}.py``) and kohya (``networks/lora.py``) write
per module ``<name>``, with ``scale = alpha/r`` and a missing or zero alpha meaning alpha = r:

| tensors | kind | r |
|---|---|---|
| ``lora_down.weight [r, in, kh, kw]``, ``lora_up.weight [out, r, 1, 1]`` | conv2d | down's first dim |
| + ``lora_mid.weight [r, r, kh, kw]``, down ``[r, in, 1, 1]`` (Tucker) | conv2d, A = mid ×₂ down | the same |
| ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1/t2``) | loha | w1_b's first dim |
| ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``) | lokr | w1_a's or w2_a's second dim |
| ``dora_scale [out, 1(, 1, 1)]`` (``wd_on_out``) on LoCon | the dora feature | |

LyCORIS ignores alpha when both LoKr sides are full matrices (scale 1): read with alpha = r, and
written with the scale folded into w1 when it is not 1 (the one rounding of that export). The
Tucker core is folded into A on reading (exact: ΔW = up·(mid ×₂ down) is one conv LoRA of the
same rank), so a LoCon written back is the plain form of the same ΔW. ``dora_scale`` with
``wd_on_out=False`` (a norm per input channel) has no rule in loratool's spec and is refused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Target
from ..errors import FormatError, UsageError
from ..kinds.conv import KERNEL
from ..kinds.lycoris import LOKR_FIELD, TUCKER

if TYPE_CHECKING:
    import torch

    from ._st import StFile

DOWN, UP, MID, DORA = "lora_down.weight", "lora_up.weight", "lora_mid.weight", "dora_scale"
HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PARTS = (DOWN, UP, MID, DORA, *HADA, *LOKR)  # suffixes after "<name>."


def is_lycoris(parts: dict[str, str], st: StFile) -> bool:
    """Whether a module needs this reader (anything but a 2-D lora_down/lora_up pair)."""
    if set(parts) - {"down", "up", "alpha"}:
        return True
    down = parts.get("down")
    return down is not None and len(st.tensors[down].shape) != 2


def _shape(st: StFile, key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in st.tensors[key].shape)


def _fail(module: str, why: str, where: str) -> FormatError:
    return FormatError(f"module '{module}': {why}", code="shape-mismatch", where=where)


def read_module(
    st: StFile, name: str, module: str, keys: dict[str, str], alpha: float | None, where: str
) -> Target:
    """The Target of one LyCORIS/LoCon module (``keys``: part suffix → tensor key)."""
    if any(k.startswith("hada_") for k in keys):
        return _loha(st, name, module, keys, alpha, where)
    if any(k.startswith("lokr_") for k in keys):
        return _lokr(st, name, module, keys, alpha, where)
    return _locon(st, name, module, keys, alpha, where)


def _dtype(st: StFile, keys: dict[str, str]) -> str:
    dts = {st.tensors[k].dtype for p, k in keys.items() if p != DORA}
    dt = dts.pop() if len(dts) == 1 else "F32"
    return dt if dt in C.DTYPE_SIZES else "F32"


def _loader(st: StFile, name: str, mapping: dict[str, Any], dtype: str) -> Any:
    """A Target loader: part → a stored key, or a callable building the part from the file."""

    def load(key: str) -> Any:
        from ..format import torch_dtype

        part = key.rsplit(".", 1)[1]  # part names have no dot; the target may be renamed
        src = mapping[part]
        x = src(st) if callable(src) else st.read(src)
        want = torch_dtype(dtype)
        return x if x.dtype == want else x.to(want)

    return load


def _alpha(alpha: float | None, rank: int) -> float:
    return float(rank) if alpha is None or alpha == 0.0 else float(alpha)


def _locon(
    st: StFile, name: str, module: str, keys: dict[str, str], alpha: float | None, where: str
) -> Target:
    if DOWN not in keys or UP not in keys:
        raise FormatError(
            f"module '{module}' has {', '.join(sorted(keys))}: LoCon needs lora_down and lora_up",
            code="missing-tensor",
            where=where,
        )
    down, up = _shape(st, keys[DOWN]), _shape(st, keys[UP])
    rank = down[0]
    if not 1 <= rank <= C.MAX_RANK or up[1:2] != (rank,):
        raise _fail(module, f"lora_up {list(up)} does not match lora_down {list(down)}", where)
    dtype = _dtype(st, keys)
    mapping: dict[str, Any] = {}
    features: list[str] = []
    if len(down) == 2 and len(up) == 2:
        kind, fields, in_f = C.KIND_LINEAR, None, down[1]
        mapping = {C.PART_A: keys[DOWN], C.PART_B: keys[UP]}
    elif len(down) == 4 and len(up) == 4 and up[2:] == (1, 1):
        kind, in_f = C.KIND_CONV2D, down[1]
        if MID in keys:
            mid = _shape(st, keys[MID])
            if down[2:] != (1, 1) or len(mid) != 4 or mid[:2] != (rank, rank):
                raise _fail(module, f"lora_mid {list(mid)} is not a [r, r, kh, kw] core", where)
            kernel = mid[2:]

            def fold(st: StFile) -> torch.Tensor:
                import torch

                m, d = st.read(keys[MID]).float(), st.read(keys[DOWN]).float()[:, :, 0, 0]
                return torch.einsum("pqhw,qi->pihw", m, d)

            mapping = {C.PART_A: fold, C.PART_B: keys[UP]}
        else:
            kernel = down[2:]
            mapping = {C.PART_A: keys[DOWN], C.PART_B: keys[UP]}
        fields = {KERNEL: tuple(kernel)}
    else:
        raise _fail(
            module,
            f"lora_down {list(down)} / lora_up {list(up)} are neither Linear nor Conv2d",
            where,
        )
    out_f = up[0]
    if DORA in keys:
        ds = _shape(st, keys[DORA])
        if math.prod(ds) != out_f or ds[0] != out_f:
            raise FormatError(
                f"module '{module}': dora_scale {list(ds)} normalises per input channel "
                "(LyCORIS wd_on_out=False), which loratool's DoRA rule (per output) is not",
                code="unsupported-feature",
                where=where,
                hint="train with wd_on_out=True (LyCORIS' default) or merge with LyCORIS",
            )
        features.append(C.FEATURE_DORA)
        dk = keys[DORA]
        mapping[C.PART_MAGNITUDE] = lambda st: st.read(dk).reshape(-1)
    load = _loader(st, name, mapping, dtype)
    return Target(
        name,
        rank=rank,
        alpha=_alpha(alpha, rank),
        in_features=in_f,
        out_features=out_f,
        kind=kind,
        dtype=dtype,
        fields=fields,
        features=features,
        loader=load,
    )


def _refuse_dora(module: str, keys: dict[str, str], what: str, where: str) -> None:
    if DORA in keys:
        raise FormatError(
            f"module '{module}' is {what} with DoRA (dora_scale): no exact rule in loratool yet",
            code="unsupported-feature",
            where=where,
            hint="merge it with LyCORIS (merge_to) and `loratool extract` a LoRA",
        )


def _loha(
    st: StFile, name: str, module: str, keys: dict[str, str], alpha: float | None, where: str
) -> Target:
    _refuse_dora(module, keys, "LoHa", where)
    need = set(HADA[:4]) | ({"hada_t1", "hada_t2"} if "hada_t1" in keys else set())
    if set(keys) - {"alpha"} != need:
        raise FormatError(
            f"module '{module}' has {', '.join(sorted(keys))}: LoHa needs {', '.join(sorted(need))}",
            code="missing-tensor",
            where=where,
        )
    s = {p: _shape(st, keys[p]) for p in need}
    tucker = "hada_t1" in need
    if tucker:
        rank, out_f, in_f = s["hada_w1_a"][0], s["hada_w1_a"][1], s["hada_w1_b"][1]
        kernel = s["hada_t1"][2:]
    else:
        rank, out_f, fan = s["hada_w1_b"][0], s["hada_w1_a"][0], s["hada_w1_b"][1]
        kernel, in_f = (), fan
    t = Target(
        name,
        rank=rank,
        alpha=_alpha(alpha, rank),
        in_features=in_f,
        out_features=out_f,
        kind="loha",
        dtype=_dtype(st, keys),
        fields={KERNEL: tuple(kernel), TUCKER: tucker},
    )
    return _finish(st, t, keys, s, module, where)


def _lokr(
    st: StFile, name: str, module: str, keys: dict[str, str], alpha: float | None, where: str
) -> Target:
    _refuse_dora(module, keys, "LoKr", where)
    s = {p: _shape(st, k) for p, k in keys.items() if p != "alpha"}
    w1 = "full" if "lokr_w1" in s else "factored"
    w2 = "full" if "lokr_w2" in s else (TUCKER if "lokr_t2" in s else "factored")
    try:
        a, c = s["lokr_w1"] if w1 == "full" else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if w2 == "full":
            b, d, *kernel = s["lokr_w2"]
        elif w2 == TUCKER:
            b, d, kernel = s["lokr_w2_a"][1], s["lokr_w2_b"][1], list(s["lokr_t2"][2:])
        else:
            b, d, kernel = s["lokr_w2_a"][0], s["lokr_w2_b"][1], []
        r1 = s["lokr_w1_a"][1] if w1 == "factored" else None
        r2 = s["lokr_w2_a"][1] if w2 == "factored" else s["lokr_t2"][0] if w2 == TUCKER else None
    except (KeyError, IndexError, ValueError):
        raise FormatError(
            f"module '{module}' has {', '.join(sorted(keys))}: not a LoKr layout",
            code="missing-tensor",
            where=where,
        ) from None
    ranks = {r for r in (r1, r2) if r is not None}
    if len(ranks) > 1:
        raise _fail(module, f"LoKr sides have ranks {sorted(ranks)}", where)
    rank = ranks.pop() if ranks else 1
    # LyCORIS: both sides full → alpha ignored, scale 1 (LokrModule.__init__).
    al = float(rank) if not (r1 or r2) else _alpha(alpha, rank)
    t = Target(
        name,
        rank=rank,
        alpha=al,
        in_features=c * d,
        out_features=a * b,
        kind="lokr",
        dtype=_dtype(st, keys),
        fields={
            KERNEL: tuple(kernel),
            LOKR_FIELD: {"a": a, "b": b, "c": c, "d": d, "w1": w1, "w2": w2},
        },
    )
    return _finish(st, t, keys, s, module, where)


def _finish(
    st: StFile,
    t: Target,
    keys: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    module: str,
    where: str,
) -> Target:
    """Check every stored shape against what the kind says, then attach the loader."""
    dims = (t.rank, t.in_features, t.out_features)
    if not 1 <= t.rank <= C.MAX_RANK or not all(1 <= d <= C.MAX_DIM for d in dims[1:]):
        raise _fail(module, f"rank {t.rank}, in {t.in_features}, out {t.out_features}", where)
    want = t.parts()
    if set(want) != set(shapes):
        raise FormatError(
            f"module '{module}' has {', '.join(sorted(shapes))}; {t.kind} needs "
            f"{', '.join(sorted(want))}",
            code="missing-tensor",
            where=where,
        )
    for part, shape in want.items():
        got = shapes[part]
        if got != shape:
            raise _fail(module, f"{part} is {list(got)}, expected {list(shape)}", where)
    return Target(
        t.name,
        rank=t.rank,
        alpha=t.alpha,
        in_features=t.in_features,
        out_features=t.out_features,
        kind=t.kind,
        dtype=t.dtype,
        fields=t.fields,
        loader=_loader(st, t.name, {p: keys[p] for p in want}, t.dtype),
    )


# -- writing -------------------------------------------------------------------------------------


def lycoris_tensors(t: Target, prefix: str) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors of one non-Linear module under its kohya name, and the alpha to store."""
    import torch

    if t.kind in (C.KIND_CONV2D, C.KIND_LINEAR):
        # LyCORIS LoCon with weight_decompose, wd_on_out: dora_scale [out, 1(, 1, 1)], the
        # norm per output row, PEFT's (LyCORIS adds float eps to the norm: ~1e-7 relative).
        out = {f"{prefix}.{DOWN}": t.lora_A, f"{prefix}.{UP}": t.lora_B}
        if C.FEATURE_DORA in t.features:
            m = t.part(C.PART_MAGNITUDE)
            out[f"{prefix}.{DORA}"] = m.reshape(-1, *[1] * (t.lora_A.dim() - 1))
        return out, t.alpha * (math.sqrt(t.rank) if t.scale_rule == C.SCALE_RSLORA else 1.0)
    if t.kind not in ("loha", "lokr"):
        raise UsageError(
            f"kohya files hold no {t.kind} targets ('{t.name}')", code="unsupported-kind"
        )
    parts = {p: t.part(p) for p in t.parts()}
    alpha = t.scale * t.rank  # LyCORIS reads scale = alpha / r
    if t.kind == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts and t.scale != 1.0:
        # LyCORIS ignores alpha here (scale 1): fold the scale into w1, rounded once.
        w1 = parts["lokr_w1"]
        parts["lokr_w1"] = (w1.to(torch.float64) * t.scale).to(w1.dtype)
        alpha = float(t.rank)
    return {f"{prefix}.{p}": x for p, x in parts.items()}, alpha
