"""Putting LoRA layers on a model: ``inject`` fresh ones for training (``attaching``: a saved one).

Targets follow PEFT's ``target_modules`` rules; which modules can be wrapped, and how, is the kind
registry's answer (loratool/kinds), not a list kept here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import constants as C
from .. import kinds
from ..adapter import Adapter
from ..errors import UsageError
from .extras import SAVED_FLAG, BiasShift, TiedRows, TokenRows, saved_copy
from .layer import LoraLayer, kind_of

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "lora_only", "all")  # PEFT's ``bias`` and loralib's vocabulary


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
            hits = [n for n, m in modules if kind_of(m) in kinds.linear_like() and m is not head]
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


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
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
    dora: bool = False,
    lora_bias: bool = False,
    bias: str = "none",
    modules_to_save: str | Iterable[str] = (),
    trainable_tokens: Iterable[int] | Mapping[str, Iterable[int]] | None = None,
) -> InjectionReport:
    """Wrap the ``targets`` modules of ``model`` in ``LoraLayer``s, in place, and freeze the rest.

    ``alpha`` defaults to ``rank`` (scale 1). Afterwards only the LoRA factors have
    ``requires_grad``; the factors are fp32 on the device of the weight they adapt. The spec 1.1
    options take PEFT's names and compute what PEFT's layers compute (``extras``): ``dora``
    (a magnitude per output row, ``use_dora``), ``lora_bias`` (a bias on B), ``bias`` (``"lora_only"``: the LoRA modules'
    biases train too; ``"all"``: every bias), ``modules_to_save`` (trained copies of whole
    modules, PEFT's suffix rule) and ``trainable_tokens`` (ids of rows of the input embedding
    that train, or ``{module: ids}``; a tied output head follows).
    """
    if rank < 1:
        raise UsageError(f"rank must be at least 1, got {rank}", code="bad-rank")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}", code="bad-dropout")
    if dora and lora_bias:
        raise UsageError(
            "DoRA and lora_bias exclude each other (PEFT refuses the pair)", code="bad-feature"
        )
    if bias not in BIAS_MODES:
        raise UsageError(
            f"bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}", code="bad-bias"
        )
    names = select_modules(model, targets)
    tokens = _token_modules(model, trainable_tokens)
    saved = _saved_modules(model, modules_to_save)
    clash = sorted((set(names) | set(tokens)) & set(saved)) or sorted(set(names) & set(tokens))
    if clash:
        raise UsageError(
            f"module '{clash[0]}' is asked for twice (LoRA target, modules_to_save, tokens)",
            code="target-conflict",
            hint="give each module one role",
        )
    for p in model.parameters():
        p.requires_grad_(False)
    kinds: dict[str, int] = {}
    for name in names:
        base = model.get_submodule(name)
        if dora and C.FEATURE_DORA not in kinds_of(base):
            raise UsageError(
                f"DoRA is defined for Linear and Conv1D targets; '{name}' is a "
                f"{type(base).__name__}",
                code="unsupported-feature",
                hint="leave embeddings out of the targets, or train without --dora",
            )
        layer = LoraLayer(
            base,
            rank=rank,
            alpha=float(rank if alpha is None else alpha),
            dropout=dropout,
            rslora=rslora,
            dora=dora,
            train_bias=bias != "none",
            lora_bias=lora_bias,
        )
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        set_module(model, name, layer)
    for name in saved:
        set_module(model, name, saved_copy(model.get_submodule(name)))
    wrap_tokens(model, tokens)
    if bias == "all":
        _shift_biases(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectionReport(modules=names, trainable_params=trainable, all_params=total, kinds=kinds)


def kinds_of(module: nn.Module) -> frozenset[str]:
    """The §3.5 features the kind that wraps ``module`` accepts."""
    kind = kinds.of_module(module)
    return frozenset() if kind is None else kind.accepts


def _saved_modules(model: nn.Module, names: str | Iterable[str]) -> list[str]:
    """PEFT's ``modules_to_save`` rule (a plain suffix match on the module path), outermost hits.

    The ``full`` kind stores a module's own ``weight`` and ``bias``; a module holding any other
    parameter (a whole decoder layer, say) is refused rather than half saved.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    wanted = [n.strip() for n in wanted if n.strip()]
    chosen: list[str] = []
    modules = [(n, m) for n, m in model.named_modules() if n]
    for entry in wanted:
        hits = [n for n, _ in modules if n.endswith(entry)]
        if not hits:
            raise UsageError(
                f"modules_to_save entry '{entry}' matches no module of the model",
                code="no-such-module",
                hint=f"module names look like {_examples(modules)}",
            )
        chosen += [n for n in hits if n not in chosen]
    outer = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
    for n in outer:
        own = {k for k, _ in model.get_submodule(n).named_parameters()}
        if not own or own - {C.PART_WEIGHT, C.PART_BIAS}:
            raise UsageError(
                f"modules_to_save '{n}' holds parameters {sorted(own)[:4]}; a saved module is "
                "one layer's weight and bias",
                code="unsupported-module",
                hint="name the layers inside it",
            )
    return outer


def _token_modules(
    model: nn.Module, spec: Iterable[int] | Mapping[str, Iterable[int]] | None
) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices``: ids for the input embedding, or ``{module: ids}``."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        name = next((n for n, m in model.named_modules() if m is emb and n), None)
        if name is None:
            raise UsageError(
                "the model has no input embedding for trainable tokens", code="no-embedding"
            )
        spec = {name: spec}
    out: dict[str, list[int]] = {}
    modules = dict(model.named_modules())
    for entry, ids in spec.items():
        hits = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
        if len(hits) != 1 or not isinstance(modules[hits[0]], nn.Embedding):
            raise UsageError(
                f"trainable tokens: '{entry}' names {len(hits)} modules, not one Embedding",
                code="no-such-module",
            )
        emb = modules[hits[0]]
        assert isinstance(emb, nn.Embedding)
        idx = sorted({int(i) for i in ids})
        if not idx or idx[0] < 0 or idx[-1] >= emb.num_embeddings:
            raise UsageError(
                f"trainable token ids for '{hits[0]}' must be 0..{emb.num_embeddings - 1}",
                code="bad-token-ids",
            )
        out[hits[0]] = idx
    return out


def wrap_tokens(model: nn.Module, tokens: Mapping[str, list[int]]) -> None:
    head = _output_head(model)
    head_name = next((n for n, m in model.named_modules() if m is head and n), None)
    for name, idx in tokens.items():
        emb = model.get_submodule(name)
        assert isinstance(emb, nn.Embedding)
        rows = TokenRows(emb, idx)
        set_module(model, name, rows)
        # A head sharing the embedding's weight sees the new rows too (PEFT's tied adapter).
        if isinstance(head, nn.Linear) and head.weight is emb.weight and head_name:
            set_module(model, head_name, TiedRows(head, rows))


def _shift_biases(model: nn.Module) -> None:
    """``bias="all"``: every bias outside the LoRA layers (which train their own) trains too."""
    skip = {n for n, m in model.named_modules() if isinstance(m, LoraLayer | TokenRows | TiedRows)}
    skip |= {n for n, m in model.named_modules() if getattr(m, SAVED_FLAG, None)}
    for name, m in list(model.named_modules()):
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        own = dict(m.named_parameters(recurse=False))
        if not any("bias" in k for k in own):
            continue
        if not BiasShift.fits(m) or set(own) - {C.PART_WEIGHT, C.PART_BIAS}:
            raise UsageError(
                f"bias='all' cannot train the bias of '{name}' ({type(m).__name__}): loratool "
                "trains biases added along the last dimension (Linear, Conv1D, LayerNorm)",
                code="unsupported-module",
                hint="use bias='lora_only', or name the module in modules_to_save",
            )
        set_module(model, name, BiasShift(m))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(module name, layer)`` for every LoRA layer, names as in the base model."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{'<module>.lora_A': A, '<module>.lora_B': B, ...}``: the trainable state, keyed as the
    adapter file keys it (``<module>.<part>``: magnitude, bias_delta, weight, token_values)."""
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out[name + C.LORA_A_SUFFIX] = m.lora_A
            out[name + C.LORA_B_SUFFIX] = m.lora_B
            for part in (C.PART_MAGNITUDE, C.PART_BIAS_DELTA, C.PART_LORA_BIAS):
                p = getattr(m, part)
                if p is not None:
                    out[f"{name}.{part}"] = p
        elif isinstance(m, BiasShift):
            out[f"{name}.{C.PART_BIAS_DELTA}"] = m.bias_delta
        elif isinstance(m, TokenRows):
            out[f"{name}.{C.PART_TOKEN_VALUES}"] = m.token_values
        elif getattr(m, SAVED_FLAG, None):
            for part, p in m.named_parameters(recurse=False):
                out[f"{name}.{part}"] = p
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
