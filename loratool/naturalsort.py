"""Natural order for target and weight names: ``layers.2`` before ``layers.10``.

The one sort key every table of targets uses (inspect, reduce-rank, combine, extract, merge and
unmerge reports), so they all list a model's layers in the order people count them.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key: runs of digits compare as numbers, the rest as text; ties fall back to ``name``.

    ``re.split`` with a capturing group alternates text and digits, starting with text (``""``
    when the name starts with a digit), so two keys always hold the same type at each position
    and never compare a string with an integer. ``layers.02`` and ``layers.2`` split equal; the
    name itself then orders them, so the order is total and does not depend on the input's.
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name
