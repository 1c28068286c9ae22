"""``--fsdp``: the frozen base sharded across processes with PyTorch's FSDP2 (``fully_shard``).

Each decoder layer, then the model body around them, becomes one FSDP unit: a process keeps 1/N of
every frozen base tensor (dense, or the packed parts of a ``--quantize``d ``QuantLinear``, which
are plain frozen parameters to FSDP) and gathers one layer's worth just before that layer runs,
forward and again in backward, then frees it (``reshard_after_forward``). Peak base memory per
process is ~1/N of the base plus one layer.

The LoRA factors are FSDP's ``ignored_params``: every process keeps them whole, as without
``--fsdp``. They are ~1% of the parameters, so sharding them would save little while changing
what checkpoints, clipping and resume see; the trainer's one all-reduce of their gradients is
what DDP would do, and it stays exactly the same code path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the largest ``ModuleList`` of the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(best)


def shard(
    model: nn.Module, body: nn.Module, head: nn.Module, device: torch.device
) -> dict[str, Any]:
    """``fully_shard`` every decoder layer of ``body``, then ``body`` itself, in place.

    ``body`` is what the trainer calls (FSDP's hooks run on a unit's forward); the output head
    is applied by the chunked loss straight from its weight, outside any forward, so its weight
    (and the embedding, when tied to it) stays whole on every process, like the LoRA factors.
    Needs an initialised process group (torchrun). Returns what was done, for the run's report.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise UsageError(
            "--fsdp needs several processes",
            code="bad-value",
            hint="start the run with torchrun --nproc-per-node N -m loratool train ... --fsdp",
        )
    whole = local_base_bytes(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    keep = {p for p in model.parameters() if p.requires_grad} | set(head.parameters())
    units = layer_units(body)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=keep)
    fully_shard(body, mesh=mesh, ignored_params=keep)
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters() if not p.requires_grad)
    return {
        "units": len(units) + 1,
        "processes": dist.get_world_size(),
        "base_bytes": whole,
        "local_bytes": local_base_bytes(model),
        "head_bytes": head_bytes,
    }


def local_base_bytes(model: nn.Module) -> int:
    """Bytes of frozen base parameters this process holds (its shards, under FSDP)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def fillers(n: int) -> int:
    """How many more forwards than ``n`` this process must run to match the busiest process."""
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) - n
