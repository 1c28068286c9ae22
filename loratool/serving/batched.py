"""Per-row adapters in one batch: the adapters' factors stacked per module, gathered per row.

``MultiLora(model)`` wraps every module some loaded adapter targets in a ``LoraSlots`` that
holds, for each module, ``A`` ``[slots, r_max, in]`` and ``B·s`` ``[slots, out, r_max]``: slot 0 is
the bare base (zeros), adapter k is slot k, smaller ranks and untargeted modules zero-padded
(adding exact zeros changes no sum). A forward inside ``with multi.rows(["a", None, "b"]):``
computes, for row i with slot kᵢ,

    yᵢ = W0·xᵢ + (s·B_{kᵢ})·(A_{kᵢ}·xᵢ)

as two batched matmuls over the gathered factors (S-LoRA's and Punica's BGMV, here with
``torch.bmm``): mixed traffic runs as one batch and never waits for a swap. When every row has
the same slot the gather is skipped (one plain low-rank product, or none for the base).
The factors are kept in the base weight's dtype, as ``LoraLayer``'s inference path computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import constants as C
from ..errors import UsageError
from .adapters import check_fits, check_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..adapter import Adapter


@dataclass
class _Rows:
    """The current forward's per-row slots, shared by every ``LoraSlots`` of one model."""

    slots: torch.Tensor | None = None  # [batch] int64 on the model's device
    uniform: int | None = None  # the one slot of every row, when they agree


def _module_class() -> type[nn.Module]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LoraSlots(nn.Module):
        """A base Linear, Conv1D or Embedding plus every loaded adapter's factors for it."""

        lora_slots = True

        def __init__(self, base: nn.Module, kind: str, rows: _Rows) -> None:
            super().__init__()
            self.base = base
            self.kind = kind
            self.rows = rows
            self.A: torch.Tensor | None = None  # [slots, r, in]; embedding: [slots, num, r]
            self.B: torch.Tensor | None = None  # [slots, out, r], the scale folded in

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.base(x)
            A, B, rows = self.A, self.B, self.rows
            if A is None or B is None or rows.slots is None or rows.uniform == 0:
                return y
            if self.kind == C.KIND_EMBEDDING:
                if rows.uniform is not None:
                    h = F.embedding(x, A[rows.uniform])
                else:
                    h = A[rows.slots.view(-1, *([1] * (x.dim() - 1))).expand_as(x), x]
            elif rows.uniform is not None:
                h = x.to(A.dtype) @ A[rows.uniform].t()
            else:
                # [b, T, in] @ [b, in, r]: each row through its own adapter's A
                h = torch.bmm(
                    x.to(A.dtype).reshape(x.shape[0], -1, x.shape[-1]),
                    A[rows.slots].transpose(1, 2),
                )
            if rows.uniform is not None:
                delta = h @ B[rows.uniform].t()
            else:
                delta = torch.bmm(
                    h.reshape(h.shape[0], -1, h.shape[-1]), B[rows.slots].transpose(1, 2)
                )
            return y + delta.reshape(*y.shape).to(y.dtype)

    return LoraSlots


_CLASS: type[nn.Module] | None = None


def _slots_class() -> type[nn.Module]:
    global _CLASS
    if _CLASS is None:
        _CLASS = _module_class()
    return _CLASS


class MultiLora:
    """Adapters by name on one base model, applied per row of a batch (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self._rows = _Rows()
        self._adapters: dict[str, Adapter] = {}
        self._modules: dict[str, nn.Module] = {}  # module name -> its LoraSlots

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def slot(self, name: str | None) -> int:
        """0 for the base, k for the k-th loaded adapter."""
        if name is None:
            return 0
        if name not in self._adapters:
            raise UsageError(f"no adapter named '{name}' is loaded", code="no-such-adapter")
        return 1 + list(self._adapters).index(name)

    def add(self, name: str, adapter: Adapter) -> None:
        """Check ``adapter`` fits and add it; nothing changes if it does not."""
        check_name(name)
        if name in self._adapters:
            raise UsageError(f"an adapter named '{name}' is already loaded", code="name-taken")
        check_fits(self.model, adapter, where=name)
        for t in adapter.targets.values():  # materialise the factors before anything changes
            _ = t.lora_A, t.lora_B
        self._adapters[name] = adapter
        self._rebuild()

    def remove(self, name: str) -> None:
        if name not in self._adapters:
            raise UsageError(f"no adapter named '{name}' is loaded", code="no-such-adapter")
        del self._adapters[name]
        self._rebuild()

    @contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Forwards inside apply adapter ``names[i]`` to row i (None: the base)."""
        import torch

        slots = [self.slot(n) for n in names]
        device = next(self.model.parameters()).device
        self._rows.slots = torch.tensor(slots, dtype=torch.int64, device=device)
        self._rows.uniform = slots[0] if len(set(slots)) == 1 else None
        try:
            yield
        finally:
            self._rows.slots = None
            self._rows.uniform = None

    def _rebuild(self) -> None:
        """Stack every module's factors again, in slot order (between batches only)."""
        import torch

        from ..lora import kind_of

        cls = _slots_class()
        wanted = {t.name for a in self._adapters.values() for t in a.targets.values()}
        for name in list(self._modules):
            if name not in wanted:
                _set_module(self.model, name, self._modules.pop(name).base)  # type: ignore[arg-type]
        for name in wanted:
            if name not in self._modules:
                base = self.model.get_submodule(name)
                kind = kind_of(base)
                assert kind is not None
                self._modules[name] = cls(base, kind, self._rows)
                _set_module(self.model, name, self._modules[name])
        for name, module in self._modules.items():
            base_w = module.base.weight  # type: ignore[union-attr]
            assert isinstance(base_w, torch.Tensor)
            dt = base_w.dtype if base_w.dtype.is_floating_point else torch.float32
            terms = [a.targets.get(name) for a in self._adapters.values()]
            r = max(t.rank for t in terms if t is not None)
            shape_in, shape_out = _sizes(module.kind, base_w)  # type: ignore[arg-type]
            A = torch.zeros(len(terms) + 1, r, shape_in, dtype=torch.float32)
            B = torch.zeros(len(terms) + 1, shape_out, r, dtype=torch.float32)
            for k, t in enumerate(terms, start=1):
                if t is not None:
                    A[k, : t.rank] = t.lora_A.float()
                    B[k, :, : t.rank] = t.lora_B.float() * t.scale
            if module.kind == C.KIND_EMBEDDING:
                A = A.transpose(1, 2)  # a lookup of Aᵀ's rows, as LoraLayer does
            module.A = A.to(base_w.device, dt).contiguous()
            module.B = B.to(base_w.device, dt).contiguous()


def _sizes(kind: str, w: torch.Tensor) -> tuple[int, int]:
    """(in_features, out_features) of a weight as stored (spec §3.2)."""
    return (w.shape[1], w.shape[0]) if kind == C.KIND_LINEAR else (w.shape[0], w.shape[1])


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
