# The compiled LoRA pass (kernel.c); built only where a C compiler was present at install.
from typing import Any

def dropout(
    state_hi: int,
    state_lo: int,
    inc_hi: int,
    inc_lo: int,
    thr: int,
    itemsize: int,
    src: Any,
    dst: Any,
    src2: Any = ...,
    dst2: Any = ...,
) -> None: ...
