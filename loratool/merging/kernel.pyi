# The compiled merge pass (kernel.c); built only where a C compiler was present at install.
from typing import Any

isa: str  # the instruction set of the passes in use: "v4", "v3" (x86-64 levels) or "base"
fuses_product: bool  # merge_lowrank runs here (v3)

def merge_block(
    src: Any,
    delta: Any,
    dst: Any,
    itemsize: int,
    roundtrip: bool,
    index: Any = None,
    values: Any = None,
    start: int = 0,
    scratch: Any = None,
) -> tuple[float, float, int, int, int]: ...
def merge_lowrank(
    src: Any,
    left: Any,
    packed: Any,
    dst: Any,
    itemsize: int,
    rank: int,
    cols: int,
    roundtrip: bool,
) -> tuple[float, float, int, int]: ...
