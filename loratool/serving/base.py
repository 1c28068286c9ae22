"""The base model a run serves: loaded once (a local directory or a Hub id through the cache),
and prompts turned into token ids (plain text, or the model's own chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn

DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Base:
    model: nn.Module
    tokenizer: Any
    name: str  # what clients call it: the directory or Hub id as given
    max_positions: int  # the model's context length (its config's max_position_embeddings)


def resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device here", code="no-cuda")
    return spec


def load_base(path: str, *, dtype: str = "auto", device: str = "auto") -> Base:
    """The model (eval, frozen) and its tokenizer; a bad path or id is a ``UsageError``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # people's output is ours, on stderr
    torch_dtype: Any = {
        "auto": "auto",
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        from ..training.runtime import load_error

        raise load_error(str(path), e) from None
    model = model.to(resolve_device(device))  # type: ignore[arg-type]  # transformers' stubs
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    return Base(model, tokenizer, path, int(positions))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A plain prompt's ids, with the tokenizer's usual special tokens (a BOS if it adds one)."""
    ids: list[int] = tokenizer(text)["input_ids"]
    return ids


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template over ``messages``, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "the model has no chat template",
            code="no-chat-template",
            hint="send a plain prompt instead (-p, or /v1/completions)",
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids
