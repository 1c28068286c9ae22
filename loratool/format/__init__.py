"""Read, validate and write loratool adapter files (spec/adapter-format.md, v1).

The reader bounds and checks the whole header before it touches tensor data, and raises only
``FormatError`` with the spec's rule code; nothing here imports torch until a tensor is needed.
The writer produces canonical bytes: the same content always gives the same file (spec §5).

One job per module, in the order a file is read:

- ``strictjson``: JSON without duplicate keys or NaN, and the canonical dump;
- ``container``: the safetensors layer (rules 1–9) and the pickle test;
- ``header``: the loratool layer (rules 10–20), an ``Adapter`` from a validated container;
- ``reader``: ``read_header``, lazy tensor loading, the data checks (rules 21–22);
- ``writer``: canonical bytes and the atomic ``save``;
- ``verifying``: every rule as a report.
"""

from __future__ import annotations

from ..dtypes import dtype_name, torch_dtype
from .container import PICKLE_SUFFIXES, TensorInfo, is_pickle, parse_container, read_head
from .header import adapter_from_tensors
from .reader import Header, check_data, data_sha256, load, read_header
from .strictjson import canonical_json, strict_loads
from .verifying import Check, VerifyReport, verify
from .writer import iter_targets, save, serialize, to_bytes

__all__ = [
    "PICKLE_SUFFIXES",
    "Check",
    "Header",
    "TensorInfo",
    "VerifyReport",
    "adapter_from_tensors",
    "canonical_json",
    "check_data",
    "data_sha256",
    "dtype_name",
    "is_pickle",
    "iter_targets",
    "load",
    "parse_container",
    "read_head",
    "read_header",
    "save",
    "serialize",
    "strict_loads",
    "to_bytes",
    "torch_dtype",
    "verify",
]
