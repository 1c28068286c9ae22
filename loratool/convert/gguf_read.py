"""llama.cpp LoRA adapters (GGUF) read back: ours (``convert --to gguf``) or llama.cpp's own.

The inverse of ``gguf.py``: each ``<gguf tensor>.lora_a``/``.lora_b`` pair becomes a target with
``alpha`` = the file's ``adapter.lora.alpha`` and the standard rule, because llama.cpp scales a
module by ``alpha / r`` (``llm_build_lora_mm``; alpha 0 or absent means scale 1, kept as alpha = r).
A folded B (our writer's exact scales) therefore reads back as the same ΔW. ``token_embd``'s
``lora_a`` is stored ``[vocab, r]`` (llama.cpp gathers its rows) and is transposed back.

Names and the Q/K permutation need the base: llama.cpp names tensors by architecture
(``TensorNameMap``) and permutes q/k rows by head count (``LlamaModel.permute``). Without a base
the targets get the Llama family's Hugging Face names, and q/k targets stay *pending* (their rows
are still in llama.cpp's order) until ``complete`` (run by ``convert --base``) maps names through
the base's own weight names and undoes the permutation with its head counts.

The header is parsed here with hard bounds before any tensor byte is read (GGUF spec: magic,
version 2 or 3, counts, typed key/values, tensor infos, aligned data); anything out of bounds is
a ``FormatError``. Tensor types: F32, F16, BF16, and Q8_0 (llama.cpp's ``--outtype q8_0``)
dequantised with the gguf package.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..errors import FormatError

if TYPE_CHECKING:
    import numpy as np

    from ..adapter import Adapter, Target
    from ..checkpoint import Checkpoint
    from ..sources import Opened

MAGIC = b"GGUF"
MAX_KV = 65_536
MAX_STRING = 1 << 20
MAX_ARRAY = 1 << 24
MAX_DIMS = 4
# GGML tensor types read here -> (numpy dtype name or None for quantised, block elems, bytes)
TYPES: dict[int, tuple[str, int, int]] = {0: ("f32", 1, 4), 1: ("f16", 1, 2), 30: ("bf16", 1, 2)}
Q8_0 = (8, 32, 34)  # type, block of 32 values, 2-byte scale + 32 int8
# GGUF value types -> struct format (fixed size); 8 string, 9 array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
PERMUTED = "gguf_permuted"  # Target.fields: q/k rows still in llama.cpp's order
GGUF_NAME = "gguf_name"  # Target.fields: the tensor name in the file
PENDING = "pending"  # as peft_features.PENDING: the writer refuses until a base completes it
# Hugging Face module templates of the Llama family (what convert_hf_to_gguf.py maps from).
LLAMA_MODULES = (
    "model.embed_tokens",
    "lm_head",
    *(
        f"model.layers.{{bid}}.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ),
)


class _Cursor:
    """Bounded little-endian reads over the header bytes; every overrun is a FormatError."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def bad(self, msg: str) -> FormatError:
        return FormatError(f"GGUF header: {msg}", code="bad-gguf", where=self.where)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.bad(f"ends inside a value at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > MAX_STRING:
            raise self.bad(f"a string of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad("a string that is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth == 0:
            inner, n = self.unpack("I"), self.unpack("Q")
            if n > MAX_ARRAY:
                raise self.bad(f"an array of {n} values")
            return [self.value(inner, 1) for _ in range(n)]
        raise self.bad(f"value type {vtype}")


def _header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """(key/values, [(name, numpy shape, type, offset)], data start) with every bound checked."""
    from ..limits import check_adapter_bytes, check_targets

    where = str(path)
    size = path.stat().st_size
    check_adapter_bytes(size, what="GGUF adapter", where=where)
    with open(path, "rb") as f:
        data = f.read(min(size, 64 << 20))  # the header of any real adapter is far smaller
    cur = _Cursor(data, where)
    cur.take(4)
    version = cur.unpack("I")
    if version not in (2, 3):
        raise cur.bad(f"version {version} (llama.cpp writes 3)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_kv > MAX_KV:
        raise cur.bad(f"{n_kv} key/values")
    check_targets(n_tensors // 2, where=where)
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.bad(f"tensor '{name}' has {n_dims} dimensions")
        ne = [cur.unpack("Q") for _ in range(n_dims)]
        if any(not 1 <= d <= C.MAX_DIM for d in ne):
            raise cur.bad(f"tensor '{name}' has dimensions {ne}")
        infos.append((name, tuple(reversed(ne)), cur.unpack("I"), cur.unpack("Q")))
    align = kv.get("general.alignment", 32)
    if not isinstance(align, int) or not 1 <= align <= 1 << 16 or align & (align - 1):
        raise cur.bad(f"general.alignment {align!r}")
    start = -(-cur.pos // align) * align
    for name, shape, ttype, offset in infos:
        n = _nbytes(shape, ttype, cur, name)
        if offset % align or start + offset + n > size:
            raise cur.bad(f"tensor '{name}' at offset {offset} ({n} bytes) is outside the file")
    return kv, infos, start


def _nbytes(shape: tuple[int, ...], ttype: int, cur: _Cursor, name: str) -> int:
    import math

    count = math.prod(shape)
    if ttype in TYPES:
        return count * TYPES[ttype][2]
    if ttype == Q8_0[0] and shape[-1] % Q8_0[1] == 0:
        return count // Q8_0[1] * Q8_0[2]
    raise cur.bad(f"tensor '{name}' has GGML type {ttype} (F32, F16, BF16 and Q8_0 are read)")


def _read(path: Path, shape: tuple[int, ...], ttype: int, at: int) -> Any:
    import numpy as np
    import torch

    with open(path, "rb") as f:
        f.seek(at)
        if ttype in TYPES:
            kind, _, width = TYPES[ttype]
            raw = f.read(int(np.prod(shape)) * width)
            if kind == "bf16":
                x = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
                return x.reshape(shape).clone()
            arr = np.frombuffer(raw, dtype=np.float32 if kind == "f32" else np.float16)
            return torch.from_numpy(arr.reshape(shape).copy())
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = f.read(int(np.prod(shape)) // Q8_0[1] * Q8_0[2])
        blocks: np.ndarray[Any, Any] = np.frombuffer(raw, dtype=np.uint8)
        rows = blocks.reshape(*shape[:-1], -1)
        return torch.from_numpy(np.ascontiguousarray(dequantize(rows, GGMLQuantizationType.Q8_0)))


def _name_map(n_layers: int, modules: list[str] | None = None) -> dict[str, str]:
    """GGUF tensor name (``blk.0.attn_q.weight``) -> module path, for the Llama family."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, max(n_layers, 1))
    if modules is None:
        modules = [m.format(bid=i) for m in LLAMA_MODULES for i in range(n_layers)]
        modules = list(dict.fromkeys(modules))
    out: dict[str, str] = {}
    for m in modules:
        plain = m
        for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
            if plain.startswith(prefix):
                plain = repl + plain[len(prefix) :]
        g = names.get_name(plain + ".weight", try_suffixes=(".weight",))
        if g is not None:
            out.setdefault(str(g), m)
    return out


def open_gguf(path: str) -> Opened | None:
    """The reader for ``sources.READERS``: None unless ``path`` is a file starting with GGUF."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if not p.is_file() or f.read(4) != MAGIC:
                return None
    except OSError:
        return None
    from ..sources import Opened

    adapter = read_gguf(p)
    return Opened(adapter, "gguf", os.fspath(p), p.stat().st_size)


def read_gguf(path: str | os.PathLike[str]) -> Adapter:
    """A llama.cpp LoRA adapter as an ``Adapter`` (q/k pending until ``complete``)."""
    from ..adapter import Adapter, Target

    p = Path(path)
    where = str(p)
    kv, infos, start = _header(p)
    if kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora":
        from .detect import unknown_format

        raise unknown_format(
            where,
            f"a GGUF file that is not a llama.cpp LoRA adapter (general.type "
            f"{kv.get('general.type')!r}, adapter.type {kv.get('adapter.type')!r})",
        )
    arch = kv.get("general.architecture")
    if arch != "llama":
        raise FormatError(
            f"GGUF adapters of architecture {arch!r}: only 'llama' is read",
            code="gguf-architecture",
            where=where,
        )
    pairs: dict[str, dict[str, tuple[tuple[int, ...], int, int]]] = {}
    for name, shape, ttype, offset in infos:
        base, dot, part = name.rpartition(".")
        if not dot or part not in ("lora_a", "lora_b") or len(shape) != 2:
            raise FormatError(
                f"tensor '{name}' is not a 2-D lora_a/lora_b", code="unexpected-tensor", where=where
            )
        pairs.setdefault(base, {})[part] = (shape, ttype, start + offset)
    layers = [
        int(b.split(".")[1]) for b in pairs if b.startswith("blk.") and b.split(".")[1].isdigit()
    ]
    names = _name_map(max(layers, default=0) + 1)
    raw_alpha = kv.get("adapter.lora.alpha", 0.0)
    if not isinstance(raw_alpha, int | float) or raw_alpha < 0 or raw_alpha != raw_alpha:
        raise FormatError(f"adapter.lora.alpha {raw_alpha!r}", code="bad-gguf", where=where)
    targets: dict[str, Target] = {}
    for gname, parts in sorted(pairs.items()):
        if set(parts) != {"lora_a", "lora_b"}:
            raise FormatError(
                f"'{gname}' has {', '.join(sorted(parts))} but needs lora_a and lora_b",
                code="missing-tensor",
                where=where,
            )
        module = names.get(gname)
        if module is None:
            raise FormatError(
                f"GGUF tensor '{gname}' names no Llama module loratool knows",
                code="gguf-name",
                where=where,
            )
        a = _read(p, *parts["lora_a"])
        b = _read(p, *parts["lora_b"])
        emb = gname == "token_embd.weight"
        if emb:
            a = a.T.contiguous()  # stored [vocab, r]: llama.cpp gathers rows by token id
        if a.dtype != b.dtype:  # Q8_0 quantises only rows of 32: lora_b often stays F16/F32
            a, b = a.float(), b.float()  # every F16/BF16/Q8_0 value is exact in F32
        if a.shape[0] != b.shape[1]:
            raise FormatError(
                f"'{gname}': lora_a {list(a.shape)} and lora_b {list(b.shape)} do not pair",
                code="rank-mismatch",
                where=where,
            )
        rank = int(a.shape[0])
        t = Target.from_factors(
            module,
            a,
            b,
            alpha=float(raw_alpha) if raw_alpha else float(rank),
            kind=C.KIND_EMBEDDING if emb else C.KIND_LINEAR,
        )
        t.fields[GGUF_NAME] = gname
        if gname.split(".")[-2] in ("attn_q", "attn_k"):
            t.fields[PERMUTED] = True
            t.fields[PENDING] = "its rows are in llama.cpp's permuted order: convert with --base"
        targets[module] = t
    adapter = Adapter.from_targets(list(targets.values()), hub_id=_hub_id(kv))
    adapter.provenance["source"] = {"format": "gguf", "alpha": float(raw_alpha)}
    return adapter


def _hub_id(kv: Mapping[str, Any]) -> str | None:
    raw = kv.get(C.BASE_KEY)  # our writer's binding
    if isinstance(raw, str):
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("hub_id"), str):
            return str(doc["hub_id"])
    url = kv.get("general.base_model.0.repo_url")
    prefix = "https://huggingface.co/"
    if isinstance(url, str) and url.startswith(prefix) and url.count("/") == 4:
        return url[len(prefix) :]
    return None


def complete_gguf(adapter: Adapter, ckpt: Checkpoint) -> list[str]:
    """Map GGUF targets onto the base's module names and undo the Q/K permutation."""
    from .gguf import base_hparams, llama_permute

    ts = [t for t in adapter.targets.values() if GGUF_NAME in t.fields]
    if not ts:
        return []
    where = str(ckpt.path)
    hparams = base_hparams(ckpt.path if Path(ckpt.path).is_dir() else Path(ckpt.path).parent)
    modules = [k[: -len(".weight")] for k in ckpt.entries if k.endswith(".weight")]
    names = _name_map(int(hparams.get("num_hidden_layers") or 1), modules)
    renamed: dict[str, Target] = {}
    unpermuted = 0
    for t in ts:
        module = names.get(t.fields[GGUF_NAME])
        if module is None:
            raise FormatError(
                f"GGUF tensor '{t.fields[GGUF_NAME]}' has no module in the base",
                code="missing-module",
                where=where,
            )
        b = t.lora_B
        if t.fields.get(PERMUTED):
            b = _unpermute(b, _heads(hparams, module, t.out_features, where), llama_permute)
            unpermuted += 1
        del adapter.targets[t.name]
        fields = {k: v for k, v in t.fields.items() if k not in (PERMUTED, PENDING, GGUF_NAME)}
        renamed[module] = t.replace(name=module, lora_A=t.lora_A, lora_B=b, fields=fields)
    adapter.targets.update(renamed)
    return [f"GGUF names mapped to the base's modules; Q/K rows un-permuted for {unpermuted}"]


def _heads(hparams: Mapping[str, Any], module: str, rows: int, where: str) -> int:
    """The head count llama.cpp permuted ``module``'s rows by (k: the KV heads, as gguf.py)."""
    n_head = hparams.get("num_attention_heads")
    n_kv = hparams.get("num_key_value_heads")
    n = n_kv if module.endswith("k_proj") and n_kv is not None else n_head
    if not isinstance(n, int) or n <= 0 or rows % (2 * n):
        raise FormatError(
            f"cannot un-permute '{module}' ({rows} rows) for {n!r} heads",
            code="bad-config",
            where=where,
        )
    return n


def _unpermute(b: Any, n_head: int, permute: Any) -> Any:
    """The inverse of ``llama_permute``: a row permutation, so apply its inverse index."""
    import torch

    order = permute(torch.arange(b.shape[0]), n_head)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(b.shape[0])
    return b[inverse].contiguous()
