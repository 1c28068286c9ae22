# The compiled LoRA pass (kernel.c); built only where a C compiler was present at install.
from typing import Any

isa: str  # the instruction set of the pass in use: "v4", "v3" (x86-64 levels) or "base"

def dropout(
    seed: int, thr: int, itemsize: int, src: Any, dst: Any, src2: Any = ..., dst2: Any = ...
) -> None: ...
