"""llama.cpp LoRA adapters in GGUF, written as llama.cpp's ``convert_lora_to_gguf.py`` would.

What llama.cpp expects (llama.cpp ``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``):

- ``general.architecture`` of the base, ``general.type = "adapter"``, ``adapter.type = "lora"``,
  and one ``adapter.lora.alpha`` for the whole file;
- per module ``<gguf tensor>.lora_a`` = A ``[r, in]`` and ``<gguf tensor>.lora_b`` = B
  ``[out, r]``, named by gguf-py's ``TensorNameMap`` (``blk.N.attn_q.weight.lora_a``...);
  ``token_embd.weight.lora_a`` is stored transposed (``[num_embeddings, r]``, llama.cpp gathers
  its rows per token);
- Llama-family ``q_proj``/``k_proj`` rows permuted as ``convert_hf_to_gguf.py``'s
  ``LlamaModel.permute`` permutes the base weights (k with the KV head count): a row
  permutation of ΔW, so only B's rows move;
- at run time llama.cpp scales each module by ``alpha / r`` (r = that module's rank).

Scale convention. With one alpha per file, a module's exact scale s_t is kept by folding
f_t = s_t·r_t / alpha into its B, so that (alpha / r_t)·f_t·B = s_t·B. alpha is the value of
s_t·r_t shared by the most modules, so those modules' B is written bit for bit (f_t = 1): a
plain adapter (one rank, one alpha, standard scale) comes out exactly as llama.cpp's own
converter writes it, and rsLoRA (s = α/√r) or mixed ranks/alphas stay exact where that converter
mis-scales them. A folded B is computed in f32 from the stored B and rounded once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from .. import kinds
from ..errors import FormatError, UsageError
from . import naming
from .kohya import kohya_alpha

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..adapter import Adapter, Target

# Architectures llama.cpp converts with LlamaModel (convert_hf_to_gguf.py), hence the permutation.
LLAMA_ARCHITECTURES = (
    "LlamaForCausalLM",
    "LLaMAForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
)
LLAMA_MODEL_TYPES = ("llama", "mistral", "mixtral")
GGUF_ARCH = "llama"


def _gguf() -> Any:
    """The gguf package (an optional dependency), or a UsageError saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            "GGUF export needs the gguf package",
            code="missing-dependency",
            hint="pip install 'loratool[gguf]'",
        ) from None
    return gguf


def _file_types() -> dict[Any, int]:
    """general.file_type as llama.cpp's LlamaFileType numbers it (ALL_F32, MOSTLY_F16/BF16)."""
    import torch

    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 32}


def base_hparams(base: str | os.PathLike[str]) -> dict[str, Any]:
    """The base model's config.json (a model folder, or the config file itself)."""
    from ._st import read_json

    p = Path(base)
    config = p / "config.json" if p.is_dir() else p
    if config.name != "config.json" or not config.is_file():
        raise UsageError(
            f"no config.json for the base at '{base}'",
            code="needs-base-config",
            hint="--base must be the base model's folder (config.json and weights)",
        )
    doc = read_json(config, what="config.json")
    if not isinstance(doc, dict):
        raise FormatError("config.json is not a JSON object", code="bad-config", where=str(config))
    text = doc.get("text_config")
    if isinstance(text, dict) and "num_attention_heads" in text:
        return {**doc, **text}
    return doc


def check_llama(hparams: Mapping[str, Any], architecture: str | None) -> None:
    archs = hparams.get("architectures") or []
    model_type = hparams.get("model_type")
    if architecture is not None and architecture != GGUF_ARCH:
        raise UsageError(
            f"GGUF export supports the Llama family (architecture '{GGUF_ARCH}'), not "
            f"'{architecture}'",
            code="gguf-architecture",
        )
    if not hparams:
        return
    if not (set(archs) & set(LLAMA_ARCHITECTURES) or model_type in LLAMA_MODEL_TYPES):
        what = archs[0] if archs else model_type
        raise UsageError(
            f"GGUF export supports Llama-family bases ({', '.join(LLAMA_ARCHITECTURES)}), not "
            f"{what!r}",
            code="gguf-architecture",
            hint="llama.cpp names and permutes tensors per architecture; only the Llama family "
            "is implemented and tested",
        )


def llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` on the rows of ``rows`` ([out, ...])."""
    out = rows.shape[0]
    return (
        rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def file_alpha(adapter: Adapter) -> float:
    """The file's ``adapter.lora.alpha``: the most common s_t·r_t (see the module docstring)."""
    return float(naming.most_common(kohya_alpha(t) for t in adapter.targets.values()))


def _heads(hparams: Mapping[str, Any], name: str, out: int) -> int:
    n_head = hparams.get("num_attention_heads")
    n_kv = hparams.get("num_key_value_heads")
    n = n_kv if name.endswith("k_proj") and n_kv is not None and n_kv != n_head else n_head
    if not isinstance(n, int) or n <= 0 or out % (2 * n):
        raise FormatError(
            f"cannot permute '{name}' ({out} rows) for {n!r} heads", code="bad-config"
        )
    return n


def _numpy(x: torch.Tensor) -> tuple[np.ndarray[Any, Any], Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor; bf16 goes as raw bytes."""
    import torch

    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint8).numpy(), _gguf().GGMLQuantizationType.BF16
    return x.numpy(), None


def gguf_tensors(
    adapter: Adapter, hparams: Mapping[str, Any], *, dtype: str | None = None
) -> tuple[list[tuple[str, torch.Tensor]], float, list[str]]:
    """(name, tensor) pairs in llama.cpp's layout, the file alpha, and notes.

    ``dtype`` ("f32", "f16", "bf16"; default: the adapter's, f32 if mixed) is the stored type;
    a folded lora_b is computed in f32 from the stored factors and rounded once to it.
    """
    import torch

    from ..format import torch_dtype

    gguf = _gguf()
    if not hparams.get("num_hidden_layers"):
        raise FormatError("the base config has no num_hidden_layers", code="bad-config")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(hparams["num_hidden_layers"]))
    dtypes = adapter.dtypes
    if dtype is not None:
        out_dtype = torch_dtype({"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype])
    else:
        out_dtype = torch_dtype(dtypes[0]) if len(dtypes) == 1 else torch.float32
    alpha = file_alpha(adapter)
    alpha32 = float(torch.tensor(alpha, dtype=torch.float32))
    out: list[tuple[str, torch.Tensor]] = []
    seen: dict[str, str] = {}
    folded = 0
    for t in sorted(adapter.targets.values(), key=lambda t: t.name):
        gname = _gguf_name(names, t, hparams)
        if gname in seen:
            raise UsageError(
                f"modules '{seen[gname]}' and '{t.name}' both map to GGUF tensor '{gname}'",
                code="name-collision",
            )
        seen[gname] = t.name
        a, b = t.lora_A.to(out_dtype), t.lora_B
        factor = kohya_alpha(t) / alpha32
        if factor != 1.0:
            b = b.to(torch.float32) * factor
            folded += 1
        b = b.to(out_dtype)
        if t.name.endswith(("q_proj", "k_proj")):
            b = llama_permute(b, _heads(hparams, t.name, t.out_features))
        if kinds.get(t.kind).gguf_a_transposed:
            a = a.T  # llama.cpp gathers lora_a rows by token id (llm_build_inp_embd)
        out.append((gname + ".lora_a", a.contiguous()))
        out.append((gname + ".lora_b", b.contiguous()))
    notes = [f"adapter.lora.alpha = {alpha32:g}"]
    if folded:
        notes.append(f"scale folded into lora_b for {folded} modules (their s·r differs)")
    return out, alpha32, notes


def _gguf_name(names: Any, t: Target, hparams: Mapping[str, Any]) -> str:
    kind = kinds.get(t.kind)
    if not kind.in_gguf:
        raise UsageError(
            f"target '{t.name}' is a {kind.label} layer, not Llama", code="gguf-architecture"
        )
    module = t.name
    for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
        if module.startswith(prefix):
            module = repl + module[len(prefix) :]
    if module == "lm_head" and hparams.get("tie_word_embeddings"):
        raise UsageError(
            "the adapter targets lm_head, but this base ties it to the token embeddings and "
            "llama.cpp has no separate output tensor to apply it to (llama.cpp #9065)",
            code="gguf-tied-output",
            hint="drop lm_head from the adapter, or target embed_tokens instead",
        )
    gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
    if gname is None:
        hint = None
        if ".experts." in module:
            hint = "llama.cpp stores each layer's experts as one stacked tensor; LoRA on single experts cannot be expressed"
        raise UsageError(
            f"module '{t.name}' has no llama.cpp tensor name", code="gguf-name", hint=hint
        )
    if not kind.dense and gname != "token_embd.weight":
        raise UsageError(f"embedding LoRA on '{t.name}' is not supported in GGUF", code="gguf-name")
    return str(gname)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def write_gguf(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    architecture: str | None = None,
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write a llama.cpp LoRA adapter (GGUF) atomically.

    ``base`` is the base model's folder: its config.json gives the architecture (Llama family
    only), head counts for the Q/K permutation, the layer count and whether lm_head is tied.
    Without it, ``architecture`` must be "llama" and the adapter may not touch q_proj/k_proj.
    ``dtype`` ("f32", "f16", "bf16") is the stored type (default: the adapter's).
    """
    return write_gguf_notes(
        adapter, path, architecture=architecture, base=base, dtype=dtype, force=force
    )[0]


def write_gguf_notes(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    architecture: str | None = None,
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> tuple[Path, list[str]]:
    """``write_gguf``, also returning notes for the convert report."""
    from .._io import atomic_write, check_output
    from ..format import canonical_json

    out = check_output(path, force=force)
    if base is not None:
        hparams = base_hparams(base)
        check_llama(hparams, architecture)
    else:
        if architecture is None:
            raise UsageError(
                "GGUF export needs the base model's config",
                code="needs-base",
                hint="pass --base BASE_MODEL_FOLDER (llama.cpp names and permutes tensors by "
                "its architecture and head counts)",
            )
        check_llama({}, architecture)
        if any(n.endswith(("q_proj", "k_proj")) for n in adapter.targets):
            raise UsageError(
                "the adapter targets q_proj/k_proj, whose rows llama.cpp permutes by head count",
                code="needs-base",
                hint="pass --base BASE_MODEL_FOLDER",
            )
        digits = [int(p) for n in adapter.targets for p in n.split(".") if p.isdigit()]
        hparams = {"num_hidden_layers": max(digits, default=0) + 1}
    tensors, alpha, notes = gguf_tensors(adapter, hparams, dtype=dtype)
    gguf = _gguf()

    binding = adapter.binding()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp_path = Path(tmp) / "adapter.gguf"
        writer = gguf.GGUFWriter(tmp_path, arch=GGUF_ARCH)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        kinds = {x.dtype for _, x in tensors}
        writer.add_file_type(_file_types().get(kinds.pop(), 0) if len(kinds) == 1 else 0)
        if binding.hub_id:
            short = binding.hub_id.split("/")[-1]
            writer.add_name(f"{short} LoRA")
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, short)
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{binding.hub_id}")
        # The GGUF spec leaves adapter identity open ("must match an existing model exactly");
        # the loratool binding says which base (names and shapes) this adapter was made for.
        writer.add_string(C.BASE_KEY, canonical_json(binding.header()))
        for name, x in tensors:
            arr, raw = _numpy(x)
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return atomic_write(out, _file_chunks(tmp_path), force=force), notes
