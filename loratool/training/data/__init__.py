"""Training data for the causal-LM trainer: jsonl records to tokenised documents to batches.

``records`` reads and validates the jsonl lines (every bad line in one ``BadDataError``),
``tokens`` turns records into documents with loss masks, ``batches`` packs documents into rows
and makes padded tensors. The names below are what the trainers, the tests and the benchmarks use.
"""

from __future__ import annotations

from .batches import Batch, make_batch, pack
from .records import (
    MAX_REPORTED,
    BadDataError,
    Record,
    file_sha256,
    holdout,
    jsonl_rows,
    line_ranges,
    parse_record,
    read_jsonl,
)
from .tokens import IGNORE, Doc, Tokenized, chat_segments, tokenize

__all__ = [
    "IGNORE",
    "MAX_REPORTED",
    "BadDataError",
    "Batch",
    "Doc",
    "Record",
    "Tokenized",
    "chat_segments",
    "file_sha256",
    "holdout",
    "jsonl_rows",
    "line_ranges",
    "make_batch",
    "pack",
    "parse_record",
    "read_jsonl",
    "tokenize",
]
