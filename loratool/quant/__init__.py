"""Quantised frozen bases for QLoRA: NF4 with double quantisation (or int8) in plain torch.

``codec`` packs and unpacks one weight (the QLoRA paper's NF4 code book, blocks of 64, scalers
double-quantised to int8 in blocks of 256); ``linear`` is the ``QuantLinear`` module that holds
it and computes with the dequantised weight; ``model`` quantises a model's linear layers in place
or while streaming them from the checkpoint; ``merging`` measures what the quantisation changed
and writes ``dequantise(W₄)`` bases for ``merge --onto-quantized``. Importing this package imports
torch (``import loratool`` does not).
"""

from __future__ import annotations

from .codec import BLOCK, INT8, NF4, SCALER_BLOCK, SCHEMES, Packed, dequantize, quantize
from .linear import QuantLinear
from .model import QuantReport, load_quantized, quantizable, quantize_model

__all__ = [
    "BLOCK",
    "INT8",
    "NF4",
    "SCALER_BLOCK",
    "SCHEMES",
    "Packed",
    "QuantLinear",
    "QuantReport",
    "dequantize",
    "load_quantized",
    "quantizable",
    "quantize",
    "quantize_model",
]
