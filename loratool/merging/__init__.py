"""Merge adapters into a base checkpoint and take them out again: streaming, exact, reversible.

``merge(base, adapters, out)`` writes ``W' = round(W + Σ wᵢ·ΔWᵢ)`` for every targeted weight and
copies everything else, shard for shard, tensor by tensor; ``unmerge`` subtracts the same deltas.

The package, one job per module (each imports only modules listed before it):
  * ``sidecar`` — the reversible sidecar: corrections encoded, spooled, written and read back;
  * ``report`` — ``MergeReport``, ``TargetReport``, ``ProgressEvent``: what a run did;
  * ``inputs`` — the base (checkpoint or state dict) and the adapters, opened and digested;
  * ``plan`` — which weights change, into which dtype, checked before anything is written;
  * ``ulp`` — float bits as integers: ULP distances, the torch path's round-trip compare;
  * ``delta`` — ``apply_delta``: the ΔW arithmetic and its rounding, the same on every device;
  * ``compute`` — one planned weight applied, checked and reported; the state-dict loop;
  * ``pipeline`` — the streaming reader/worker threads and buffer pools over the shards;
  * ``output`` — the atomic output directory or file, index.json, the other files copied;
  * ``prepare`` — the checks and set-up merge and unmerge share, the output around the shards;
  * ``provenance`` — the merge records in the shards' metadata;
  * ``merger``, ``unmerger`` — ``merge`` and ``unmerge``, which put the above together.
"""

from __future__ import annotations

from .delta import apply_delta
from .inputs import MemoryCheckpoint, adapter_digest
from .merger import merge
from .output import STALE_WEIGHTS
from .plan import DTYPES, FLOATS, WIDENINGS
from .provenance import RECORDS_KEY, read_records
from .report import LOSS_THRESHOLD, MergeReport, Progress, ProgressEvent, TargetReport
from .sidecar import (
    SIDECAR_FORMAT,
    SIDECAR_NAME,
    SIDECAR_VERSION,
    Sidecar,
    decode_corrections,
    encode_corrections,
)
from .unmerger import unmerge

__all__ = [
    "DTYPES",
    "FLOATS",
    "LOSS_THRESHOLD",
    "RECORDS_KEY",
    "SIDECAR_FORMAT",
    "SIDECAR_NAME",
    "SIDECAR_VERSION",
    "STALE_WEIGHTS",
    "WIDENINGS",
    "MemoryCheckpoint",
    "MergeReport",
    "Progress",
    "ProgressEvent",
    "Sidecar",
    "TargetReport",
    "adapter_digest",
    "apply_delta",
    "decode_corrections",  # the sidecar's encoding of one weight's corrections, and back
    "encode_corrections",
    "merge",
    "read_records",
    "unmerge",
]
