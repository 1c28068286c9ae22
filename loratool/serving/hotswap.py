"""Switch adapters on a loaded model in place: merged with the base restored bit for bit, or not.

``HotSwap(model, merged=...)`` loads several adapters once (``load``) and makes one of them, a
weighted mix, or none active (``activate``), without reloading the model:

* unmerged (default): every (adapter, target) pair gets its ``LoraLayer`` built once, at load,
  as ``lora.attach`` builds it; a switch puts those layers (or the base modules) in place, a
  pointer swap per module. A single adapter at weight 1 therefore computes exactly what
  ``attach`` computes. A mix is one layer per module with the factors stacked along the rank,
  ``A = [A₁; A₂]``, ``B = [w₁s₁B₁, w₂s₂B₂]`` at scale 1: the exact sum of the weighted deltas.
* merged: ``W ← round(W + ΔW)`` in place (``inplace.merge_inplace``: ΔW = L·R formed once per
  switch in fp32 from factors cached in fp32 on the weight's device at load, one rounding of the
  sum), keeping the elements where ``round(W' − ΔW)`` is not W, with W's original bits (the
  reversible merge's corrections, in memory: ~1% of the elements for SmolLM2 in fp32). Switching away
  subtracts the same ΔW and writes those elements back, so the base returns bit for bit
  (``torch.equal`` on every weight), and costs no extra latency per token. Each direction is
  about one pass over the targeted weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import constants as C
from ..errors import UsageError
from .adapters import check_fits, check_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..adapter import Adapter, Target
    from ..lora import LoraLayer
    from .inplace import Corrections

Mix = dict[str, float]


@dataclass
class SwitchReport:
    """What one ``activate`` did."""

    active: Mix
    seconds: float
    modules: int  # modules whose weight or layer changed
    corrections: int = 0  # merged: elements kept to restore the base exactly


@dataclass
class _Merged:
    left: torch.Tensor  # fp32 [rows, Σr]
    right: torch.Tensor  # fp32 [Σr, cols]
    fix: Corrections  # where round(W' − ΔW) ≠ W, and W's bits there


@dataclass
class _Loaded:
    adapter: Adapter
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # unmerged only
    # merged only: module -> (L, R) in fp32 on the weight's device, L @ R = s·ΔW as stored
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class HotSwap:
    """Adapters loaded once on ``model``, switched in place; see the module docstring."""

    def __init__(self, model: nn.Module, *, merged: bool = False) -> None:
        from ..lora import lora_layers

        if any(True for _ in lora_layers(model)):
            raise UsageError(
                "the model already has LoRA layers",
                code="already-attached",
                hint="give HotSwap the bare base model (lora.remove first)",
            )
        for p in model.parameters():
            p.requires_grad_(False)  # frozen as attach leaves it (LoraLayer's fused inference path)
        self.model = model
        self.merged = merged
        self._loaded: dict[str, _Loaded] = {}
        self._bases: dict[str, nn.Module] = {}  # module name -> the base module
        self._active: Mix = {}
        self._merges: dict[str, _Merged] = {}

    @property
    def active(self) -> Mix:
        return dict(self._active)

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def load(self, name: str, adapter: Adapter) -> None:
        """Check ``adapter`` against the model and keep it under ``name`` (nothing is applied)."""
        import torch

        from ..lora import LoraLayer

        check_name(name)
        if name in self._loaded:
            raise UsageError(f"an adapter named '{name}' is already loaded", code="name-taken")
        check_fits(self.model, adapter, where=name)
        for t in adapter.targets.values():
            if t.name not in self._bases:
                module = self.model.get_submodule(t.name)
                self._bases[t.name] = module.base if isinstance(module, LoraLayer) else module
        entry = _Loaded(adapter)
        if self.merged:
            for t in adapter.targets.values():
                W = self._bases[t.name].weight
                assert isinstance(W, torch.Tensor)
                entry.factors[t.name] = _factors(t, W.device)
        else:
            for t in adapter.targets.values():
                layer = LoraLayer(
                    self._bases[t.name],
                    rank=t.rank,
                    alpha=t.alpha,
                    rslora=t.scale_rule == C.SCALE_RSLORA,
                )
                with torch.no_grad():
                    layer.lora_A.copy_(t.lora_A)
                    layer.lora_B.copy_(t.lora_B)
                layer.requires_grad_(False)
                entry.layers[t.name] = layer
        self._loaded[name] = entry

    def unload(self, name: str) -> SwitchReport | None:
        """Forget ``name``; if it is active, switch to the rest of the mix first."""
        if name not in self._loaded:
            raise UsageError(f"no adapter named '{name}' is loaded", code="no-such-adapter")
        report = None
        if name in self._active:
            rest = {k: w for k, w in self._active.items() if k != name}
            report = self.activate(rest)
        del self._loaded[name]
        return report

    def activate(self, spec: str | Mapping[str, float] | None) -> SwitchReport:
        """Make ``spec`` active: an adapter name, ``{name: weight}``, or None for the base."""
        mix: Mix = {} if spec is None else {spec: 1.0} if isinstance(spec, str) else dict(spec)
        for n in mix:
            if n not in self._loaded:
                raise UsageError(
                    f"no adapter named '{n}' is loaded",
                    code="no-such-adapter",
                    hint=f"loaded: {', '.join(self._loaded) or '(none)'}",
                )
        mix = {n: float(w) for n, w in mix.items() if w != 0}
        started = time.perf_counter()
        if self.merged:
            changed, kept = self._switch_merged(mix)
        else:
            changed, kept = self._switch_unmerged(mix), 0
        self._active = mix
        return SwitchReport(dict(mix), time.perf_counter() - started, changed, kept)

    def close(self) -> None:
        """Back to the bare base model (merged: bit for bit)."""
        self.activate(None)

    # -- unmerged ------------------------------------------------------------------------------

    def _terms(self, mix: Mix) -> dict[str, list[tuple[Target, float]]]:
        terms: dict[str, list[tuple[Target, float]]] = {}
        for n, w in mix.items():
            for t in self._loaded[n].adapter.targets.values():
                terms.setdefault(t.name, []).append((t, w))
        return terms

    def _mixed_factors(self, mix: Mix) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (L, R) of the mix: the cached factors, weighted and stacked along the rank."""
        import torch

        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for n, w in mix.items():
            for module_name, (left, right) in self._loaded[n].factors.items():
                parts.setdefault(module_name, []).append((left, right, w))
        out = {}
        for module_name, p in parts.items():
            if len(p) == 1 and p[0][2] == 1.0:
                out[module_name] = (p[0][0], p[0][1])  # the cached tensors, no copy
            else:
                out[module_name] = (
                    torch.cat([left * w for left, _, w in p], 1),
                    torch.cat([right for _, right, _ in p], 0),
                )
        return out

    def _switch_unmerged(self, mix: Mix) -> int:
        terms = self._terms(mix)
        single = next(iter(mix)) if len(mix) == 1 and next(iter(mix.values())) == 1.0 else None
        changed = 0
        for module_name, base in self._bases.items():
            new: nn.Module = base
            if single is not None and module_name in self._loaded[single].layers:
                new = self._loaded[single].layers[module_name]
            elif module_name in terms:
                new = _stacked(base, terms[module_name])
            if self.model.get_submodule(module_name) is not new:
                _set_module(self.model, module_name, new)
                changed += 1
        return changed

    # -- merged --------------------------------------------------------------------------------

    def _switch_merged(self, mix: Mix) -> tuple[int, int]:
        import torch

        from .inplace import merge_inplace

        changed = len(self._merges)
        with torch.no_grad():
            for module_name in list(self._merges):
                self._unmerge(module_name)
            done: list[str] = []
            try:
                for module_name, (left, right) in self._mixed_factors(mix).items():
                    W = self._weight(module_name)
                    fix = merge_inplace(W, left, right, where=module_name)
                    self._merges[module_name] = _Merged(left, right, fix)
                    done.append(module_name)
            except BaseException:
                for module_name in done:
                    self._unmerge(module_name)
                self._active = {}
                raise
        kept = sum(m.fix.size for m in self._merges.values())
        return changed + len(done), kept

    def _weight(self, module_name: str) -> torch.Tensor:
        import torch

        W = self._bases[module_name].weight
        assert isinstance(W, torch.Tensor)
        return W

    def _unmerge(self, module_name: str) -> None:
        from .inplace import unmerge_inplace

        m = self._merges.pop(module_name)
        unmerge_inplace(self._weight(module_name), m.left, m.right, m.fix, where=module_name)


def _factors(t: Target, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L, R in fp32 on ``device`` with ``L @ R`` the target's scaled update of the stored weight.

    Scaled in fp64 and rounded once to fp32 (``Kind.stored_factors`` gives the orientation).
    """
    import torch

    from .. import kinds

    a = t.lora_A.detach().to(device=device, dtype=torch.float64)
    b = t.lora_B.detach().to(device=device, dtype=torch.float64)
    left, right = kinds.get(t.kind).stored_factors(a, b, t.scale)
    return left.float().contiguous(), right.float().contiguous()


def _stacked(base: nn.Module, terms: list[tuple[Target, float]]) -> LoraLayer:
    """One layer for a weighted mix: factors stacked along the rank, scales folded into B."""
    import torch

    from ..lora import LoraLayer

    rank = sum(t.rank for t, _ in terms)
    layer = LoraLayer(base, rank=rank, alpha=float(rank))  # scale 1
    with torch.no_grad():
        layer.lora_A.copy_(torch.cat([t.lora_A.float() for t, _ in terms], 0))
        layer.lora_B.copy_(torch.cat([t.lora_B.float() * (w * t.scale) for t, w in terms], 1))
    layer.requires_grad_(False)
    return layer
