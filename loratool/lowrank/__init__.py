"""Exact low-rank algebra on adapters: reduce rank, combine, extract, and the spectra behind them.

One job per module (each states its own in its docstring, with the maths it implements):
- ``core``: the QR core, why it is exact, the new factors and numerical zeros; ``spectrum``;
- ``rules``: the rank rules (``--rank``, ``--energy``, ``--sv-*``) and their ties;
- ``report``: ``LowRankReport``/``TargetReport`` and the provenance entries;
- ``reducing``: ``reduce_rank``; ``combining``: ``combine``;
- ``extracting``: ``extract`` and its truncated SVD; ``modules``: the checkpoint modules it reads.

**Dtypes.** All algebra runs in fp32. ``reduce_rank`` keeps each target's dtype; ``combine`` writes
the widest input dtype (F32 when any input is F32, or when F16 and BF16 meet, since neither holds the
other); ``extract`` writes F32 unless asked otherwise.

Importing this package imports no torch: every module imports it inside the functions that use it.
"""

from __future__ import annotations

# The public API is ``__all__``. Names imported as ``X as X`` were importable from the single
# ``lowrank`` module before the split (the CLI, tests and benchmarks use some) and stay so.
from .combining import combine
from .core import BATCH_BYTES as BATCH_BYTES
from .core import EPS32 as EPS32
from .core import Spectrum, factor_svd, spectrum
from .extracting import DYNAMIC_START as DYNAMIC_START
from .extracting import EXACT_MAX_SIDE as EXACT_MAX_SIDE
from .extracting import OVERSAMPLE as OVERSAMPLE
from .extracting import POWER_ITERS as POWER_ITERS
from .extracting import SEED as SEED
from .extracting import Progress as Progress
from .extracting import extract
from .extracting import resolve_device as resolve_device
from .reducing import reduce_rank
from .report import LowRankReport, TargetReport
from .rules import REL_TOL as REL_TOL
from .rules import RULE_FLAGS as RULE_FLAGS
from .rules import Rule, make_rule

__all__ = [
    "LowRankReport",
    "Rule",
    "Spectrum",
    "TargetReport",
    "combine",
    "extract",
    "factor_svd",
    "make_rule",
    "reduce_rank",
    "spectrum",
]
