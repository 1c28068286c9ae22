"""The LoRA layer and its injection into a torch model: inject, attach, extract, remove.

``LoraLayer`` wraps a frozen ``nn.Linear``, transformers ``Conv1D`` or ``nn.Embedding`` and computes

    x ↦ W0·x + s·B(A(dropout(x))),   s = α/r (standard) or α/√r (rsLoRA, Kalajdzievski 2023)

with ``A`` ``[r, in]`` and ``B`` ``[out, r]`` in the ``nn.Linear`` orientation of the adapter format
(spec §3), so ``extract_adapter`` hands the factors to ``loratool.Adapter`` as they are. ``A`` starts
Kaiming-uniform (a=√5) and ``B`` at zero, as in PEFT, so an injected model computes exactly what the
base model did. The factors stay fp32 whatever the base dtype: under bf16 autocast the matmuls run
in bf16 while the weights, their gradients and the optimizer state keep fp32 precision.
Without dropout a Linear or Conv1D layer runs as one autograd function (``_FusedLora``) that
accumulates the low-rank product into the base result instead of adding a second tensor.

``inject`` adds fresh layers by PEFT's target rules (for training), ``attach`` puts a saved
``Adapter``'s factors on a model (to use it unmerged), ``extract_adapter`` reads the layers back
as an ``Adapter``, and ``remove`` takes them out again, optionally merging ΔW into the weights.

This module imports torch at the top: ``import loratool`` never imports it (it is not re-exported).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import constants as C
from .adapter import Adapter, Target, scale_for
from .errors import UsageError

ALL_LINEAR = "all-linear"
SOURCE_FILE = "loratool_source.json"  # written beside a model's weights: {"hub_id": ..., ...}


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (weight [in, out], y = x @ W + b); matched by name so that this
    # module does not import transformers.
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def kind_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return C.KIND_LINEAR
    if _is_conv1d(module):
        return C.KIND_CONV1D
    if isinstance(module, nn.Embedding):
        return C.KIND_EMBEDDING
    return None


class LoraLayer(nn.Module):
    """``x ↦ W0x + (α/r)·B(A(dropout(x)))`` around a frozen Linear, Conv1D or Embedding ``base``.

    For an embedding the input is token ids and ``A(x)`` is the lookup of ``Aᵀ`` (PEFT's
    ``lora_embedding_A``); there is no dropout on ids, and A starts at zero with B normal, as PEFT
    does, because a lookup in a Kaiming-uniform A of fan-in ``num_embeddings`` would be ~0 anyway.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        super().__init__()
        kind = kind_of(base)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base).__name__}")
        w = base.weight
        assert isinstance(w, torch.Tensor)
        self.base = base
        self.kind = kind
        self.in_features, self.out_features = (
            (w.shape[1], w.shape[0]) if kind == C.KIND_LINEAR else (w.shape[0], w.shape[1])
        )
        self.rank = rank
        self.alpha = float(alpha)
        self.scale_rule = C.SCALE_RSLORA if rslora else C.SCALE_STANDARD
        self.scale = scale_for(self.alpha, rank, self.scale_rule)
        # Dropout 0 is no module at all: not even an identity call per forward.
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind != C.KIND_EMBEDDING else None
        dev = w.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=dev))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.kind == C.KIND_EMBEDDING:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of lora_A
            nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for code that looks at ``module.weight``."""
        w = self.base.weight
        assert isinstance(w, torch.Tensor)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_w = self.base.weight
        if self.kind != C.KIND_EMBEDDING and self.dropout is None and not base_w.requires_grad:
            bias = getattr(self.base, "bias", None)
            y: torch.Tensor = _FusedLora.apply(
                x, base_w, bias, self.lora_A, self.lora_B, self.scale, self.kind == C.KIND_CONV1D
            )
            return y
        out = self.base(x)
        if self.kind == C.KIND_EMBEDDING:
            emb = self.base
            assert isinstance(emb, nn.Embedding)
            h = F.embedding(x, self.lora_A.t(), emb.padding_idx, emb.max_norm, emb.norm_type)
        else:
            if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(self.lora_A.dtype)  # a bf16 base outside autocast: the factors are fp32
            h = F.linear(x if self.dropout is None else self.dropout(x), self.lora_A)
        # Scale the r-wide intermediate, not the out-wide result: r ≪ out elements to multiply.
        delta = F.linear(h * self.scale, self.lora_B)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s·B@A`` in fp32, oriented like the base weight as it is stored (spec §3.2)."""
        d = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return d if self.kind == C.KIND_LINEAR else d.t()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:.4g}"


class _FusedLora(torch.autograd.Function):
    """``y = x·W0ᵀ (+ b) + x·Aᵀ·(s·B)ᵀ`` for a frozen W0, with one accumulate in place of an add.

    Autograd on the plain expression writes ``[tokens, out]`` twice in forward (base, then the sum)
    and ``[tokens, in]`` twice in backward; here the low-rank product is accumulated into the base
    result by ``addmm_`` (BLAS beta=1) both ways, and only ``x`` and the r-wide ``x·Aᵀ`` are saved.
    Matmuls run in the autocast dtype when autocast is on (bf16), gradients of A and B come back
    in the factors' dtype (fp32), as autocast would give them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        transposed: bool,
    ) -> torch.Tensor:
        dev = x.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            w = weight.to(cd)
            wt = w if transposed else w.t()  # Conv1D stores [in, out]
            a = lora_A.to(cd)
            bs = (lora_B * scale).to(cd)
            y = x2 @ wt if bias is None else torch.addmm(bias.to(cd), x2, wt)
            h = x2 @ a.t()
            y.addmm_(h, bs.t())
        ctx.save_for_backward(x2, h, w, a, bs)
        ctx.scale, ctx.transposed, ctx.x_dtype = scale, transposed, x.dtype
        ctx.factor_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        x2, h, w, a, bs = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        gbs = g @ bs  # [T, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = g @ (w.t() if ctx.transposed else w)
            gx.addmm_(gbs, a)
            grad_x = gx.view(*grad_y.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (gbs.t() @ x2).to(ctx.factor_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = ((g.t() @ h) * ctx.scale).to(ctx.factor_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None, None


# -- injection -----------------------------------------------------------------------------------


@dataclass
class InjectionReport:
    """What ``inject`` did: the wrapped modules and a parameter count like PEFT's."""

    modules: list[str]
    trainable_params: int
    all_params: int
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def summary(self) -> str:
        """PEFT's ``print_trainable_parameters`` line."""
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


def parse_targets(targets: str | Iterable[str]) -> list[str]:
    """``"q_proj, v_proj"`` or a list -> ``["q_proj", "v_proj"]``; ``all-linear`` stays one item."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise UsageError("no target modules given", code="no-targets", hint="e.g. q_proj,v_proj")
    return names


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def select_modules(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the modules ``targets`` picks, in model order.

    Each entry matches a module whose full name equals it or ends with ``.`` + it (PEFT's
    ``target_modules`` list rule). ``all-linear`` is every Linear and Conv1D except the output head
    (PEFT's rule). Unlike PEFT, an entry that matches nothing is an error, so a typo cannot
    silently train fewer modules than asked.
    """
    wanted = parse_targets(targets)
    head = _output_head(model)
    modules = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, LoraLayer)]
    inside_lora = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    modules = [(n, m) for n, m in modules if not any(n.startswith(p + ".") for p in inside_lora)]
    chosen: dict[str, None] = {}
    for entry in wanted:
        if entry == ALL_LINEAR:
            hits = [
                n
                for n, m in modules
                if kind_of(m) in (C.KIND_LINEAR, C.KIND_CONV1D) and m is not head
            ]
        else:
            hits = [n for n, _ in modules if n == entry or n.endswith("." + entry)]
        if not hits:
            raise UsageError(
                f"target '{entry}' matches no module of the model",
                code="no-such-module",
                hint=f"module names look like {_examples(modules)}; or use all-linear",
            )
        for n in hits:
            chosen[n] = None
    by_name = dict(modules)
    for n in chosen:
        if kind_of(by_name[n]) is None:
            raise UsageError(
                f"target '{n}' is a {type(by_name[n]).__name__}, not a Linear, Conv1D or Embedding",
                code="unsupported-module",
                hint="name the linear layers inside it, e.g. its q_proj/v_proj",
            )
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def _examples(modules: list[tuple[str, nn.Module]]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if kind_of(m) is not None})
    return ", ".join(leaves[:8]) or "(none)"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    *,
    targets: str | Iterable[str],
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
) -> InjectionReport:
    """Wrap the ``targets`` modules of ``model`` in ``LoraLayer``s, in place, and freeze the rest.

    ``alpha`` defaults to ``rank`` (scale 1). Afterwards only the LoRA factors have
    ``requires_grad``; the factors are fp32 on the device of the weight they adapt.
    """
    if rank < 1:
        raise UsageError(f"rank must be at least 1, got {rank}", code="bad-rank")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}", code="bad-dropout")
    names = select_modules(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    kinds: dict[str, int] = {}
    for name in names:
        base = model.get_submodule(name)
        layer = LoraLayer(
            base,
            rank=rank,
            alpha=float(rank if alpha is None else alpha),
            dropout=dropout,
            rslora=rslora,
        )
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        _set_module(model, name, layer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectionReport(modules=names, trainable_params=trainable, all_params=total, kinds=kinds)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(module name, layer)`` for every LoRA layer, names as in the base model."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{'<module>.lora_A': A, '<module>.lora_B': B}``: the trainable state, keyed as in files."""
    out: dict[str, nn.Parameter] = {}
    for name, layer in lora_layers(model):
        out[name + C.LORA_A_SUFFIX] = layer.lora_A
        out[name + C.LORA_B_SUFFIX] = layer.lora_B
    return out


def load_factors(model: nn.Module, adapter: Adapter) -> None:
    """Copy an adapter's factors into the injected model's matching LoRA layers."""
    layers = dict(lora_layers(model))
    missing = sorted(set(adapter.targets) ^ set(layers))
    if missing:
        raise UsageError(
            f"adapter and model disagree on targets: {', '.join(missing[:5])}",
            code="target-mismatch",
        )
    with torch.no_grad():
        for name, t in adapter.targets.items():
            layer = layers[name]
            if (t.rank, t.alpha, t.scale_rule) != (layer.rank, layer.alpha, layer.scale_rule):
                raise UsageError(f"target '{name}' has other rank/alpha", code="target-mismatch")
            layer.lora_A.copy_(t.lora_A)
            layer.lora_B.copy_(t.lora_B)


def attach(model: nn.Module, adapter: Adapter) -> InjectionReport:
    """Wrap each of the adapter's target modules in a LoraLayer holding its factors (unmerged).

    Each target keeps its own rank, alpha and scale rule. The factors are copied in fp32 to the
    device of the weight they adapt; the rest of the model is frozen as ``inject`` leaves it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    kinds: dict[str, int] = {}
    for name, t in adapter.targets.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise UsageError(
                f"the model has no module '{name}'",
                code="missing-module",
                hint="the adapter was made for another base model",
            ) from None
        kind = kind_of(base)
        w = getattr(base, "weight", None)
        if kind != t.kind or not isinstance(w, torch.Tensor) or tuple(w.shape) != t.weight_shape:
            raise UsageError(
                f"module '{name}' is not a {t.kind} of shape {list(t.weight_shape)}",
                code="shape-mismatch",
            )
        layer = LoraLayer(base, rank=t.rank, alpha=t.alpha, rslora=t.scale_rule == C.SCALE_RSLORA)
        with torch.no_grad():
            layer.lora_A.copy_(t.lora_A)
            layer.lora_B.copy_(t.lora_B)
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        _set_module(model, name, layer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectionReport(
        modules=list(adapter.targets), trainable_params=trainable, all_params=total, kinds=kinds
    )


# -- extraction and removal ----------------------------------------------------------------------


def hub_id_for(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The Hub id a model loaded from ``name_or_path`` binds to, or None; never a local path.

    A local directory gives the ``hub_id`` of its ``loratool_source.json`` if it has one; a name
    that is not a local path and looks like ``owner/name`` is taken as a Hub id.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.exists():
        try:
            record = json.loads((path / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            return None
        hub = record.get("hub_id") if isinstance(record, dict) else None
        return hub if isinstance(hub, str) and hub else None
    text = str(name_or_path)
    return text if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else None


def extract_adapter(
    model: nn.Module,
    *,
    hub_id: str | None = None,
    revision: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """The injected LoRA layers as a ``loratool.Adapter`` (factors copied to CPU in ``dtype``).

    ``hub_id`` defaults to what the model was loaded from (``config._name_or_path`` through
    ``hub_id_for``), so a model from a fixture directory binds to its recorded Hub id.
    """
    if hub_id is None:
        config = getattr(model, "config", None)
        hub_id = hub_id_for(getattr(config, "_name_or_path", None))
    targets = [
        Target.from_factors(
            name,
            layer.lora_A.detach().to("cpu", dtype).contiguous(),
            layer.lora_B.detach().to("cpu", dtype).contiguous(),
            alpha=layer.alpha,
            scale_rule=layer.scale_rule,
            kind=layer.kind,
        )
        for name, layer in lora_layers(model)
    ]
    if not targets:
        raise UsageError("the model has no LoRA layers", code="no-targets", hint="call inject()")
    return Adapter.from_targets(targets, hub_id=hub_id, revision=revision, provenance=provenance)


def remove(model: nn.Module, *, merge: bool = False) -> int:
    """Put the base modules back in place of the LoRA layers; with ``merge``, add ΔW first.

    The merge adds ``s·B@A`` computed in fp32 and cast to the weight's dtype. Returns how many
    layers were removed. Parameters keep their ``requires_grad`` as ``inject`` left them (frozen).
    """
    found = list(lora_layers(model))
    for name, layer in found:
        if merge:
            with torch.no_grad():
                w = layer.weight
                w.copy_((w.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        _set_module(model, name, layer.base)
    return len(found)
