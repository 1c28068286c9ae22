"""Where a run executes: processes (torchrun), device, precision, and the model itself.

``--dtype bf16`` keeps the frozen base weights in bf16 and computes under autocast, while the LoRA
factors and AdamW's moments stay fp32; ``auto`` picks it where the hardware does bf16 natively
(CUDA, and CPUs with AVX512-BF16 or AMX, where bf16 matmuls run ~5x faster than fp32).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from .config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_dist(device_spec: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_spec.startswith("cuda") or (
            device_spec == "auto" and torch.cuda.is_available()
        )
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def end_processes(dist: Dist, *holders: Any) -> None:
    """Tear a multi-process run's process group down while Python is still whole.

    FSDP's modules keep the group alive past ``destroy_process_group``; one that lives until
    interpreter exit is destroyed there, where gloo's worker threads can abort the process
    ("terminate called without an active exception", SIGABRT on a rank after "done"). So the
    ``holders`` (the trainer, its result) let go of the model first: a multi-process run's
    ``TrainResult.model`` is None. A single process keeps everything.
    """
    if dist.world <= 1:
        return
    import gc

    import torch.distributed as tdist

    for holder in holders:
        if holder is not None:
            holder.model = None
    gc.collect()
    if tdist.is_initialized():
        tdist.destroy_process_group()


def resolve_device(spec: str, dist: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and dist.world > 1:
        spec = f"cuda:{dist.local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(
            f"unknown device '{spec}'", code="bad-device", hint="cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available", code="bad-device")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """bf16 (frozen weights in bf16, compute under autocast) or f32; auto picks bf16 where fast."""
    if spec == "f32":
        return torch.float32
    if spec == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        # AVX512-BF16 / AMX run bf16 matmuls ~5x faster than fp32; elsewhere bf16 is emulated.
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


# -- model ---------------------------------------------------------------------------------------


def load_model(config: TrainConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) through transformers: a local directory or a Hub id via the cache."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # the command draws its own progress
    kwargs: dict[str, Any] = {"revision": config.revision} if config.revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise load_error(config.model, e) from None
    model.config.use_cache = False
    return model, tokenizer


def hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a Hub model was loaded from, read from the local cache's snapshot path."""
    import re

    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id, an unreadable cache: no commit to record
        return None
    if not isinstance(found, str):
        return None
    match = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", found)
    return match.group(1) if match else None


def body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise UsageError(
            f"{type(model).__name__} is not a causal LM with a separate output head",
            code="unsupported-model",
        )
    return body, head


def check_packing_isolation(body: torch.nn.Module, vocab: int, device: torch.device) -> bool:
    """Whether packed documents are kept from attending to each other, on the actual model.

    Two short documents, packed with restarting position ids (and their boundaries, for the
    packed attention), must give the second one the hidden states it gets alone. Both runs take
    the same attention path, so the comparison sees isolation, not kernel rounding.
    """
    from .attention import packed_segments

    a = torch.arange(3, 8, device=device) % vocab
    b = torch.arange(11, 18, device=device) % vocab
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None]
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            with packed_segments((((0, 5), (5, 12)),)):
                packed = body(input_ids=ids, position_ids=pos, use_cache=False)[0][0, 5:].float()
            with packed_segments((((0, 7),),)):
                alone = body(
                    input_ids=b[None],
                    position_ids=torch.arange(7, device=device)[None],
                    use_cache=False,
                )[0][0].float()
    finally:
        body.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    return bool(((packed - alone).abs().max() / scale) < 0.05)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for a bf16 run, nothing for fp32."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_checkpointing(model: Any) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"{type(model).__name__} does not support gradient checkpointing", code="bad-value"
        )
    # Non-reentrant: works with frozen inputs, no enable_input_require_grads hack needed.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def library_versions() -> dict[str, str]:
    """The versions a trained adapter records in provenance["training"]["versions"]."""
    import transformers

    from .. import __version__

    return {
        "loratool": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def load_error(model: str, e: BaseException) -> UsageError:
    """The one-line error for a model transformers could not load (its first line says why)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UsageError(
        f"cannot load model '{model}': {first}",
        code="bad-model",
        hint="a local Hugging Face model directory, or a Hub id (cached, or reachable)",
    )
