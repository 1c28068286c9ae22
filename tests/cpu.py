"""The x86-64 levels of this CPU that the compiled passes are built for (``loratool/isa.h``)."""

from __future__ import annotations

from pathlib import Path

V3 = ("avx2", "fma", "bmi2")
V4 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def isa_levels() -> list[str]:
    """``base``, then ``v3`` and ``v4`` where /proc/cpuinfo lists their flags."""
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    levels = ["base"]
    if flags.issuperset(V3):
        levels.append("v3")
        if flags.issuperset(V4):
            levels.append("v4")
    return levels
