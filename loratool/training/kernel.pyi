# The compiled training passes (kernel.c); built only where a C compiler was present at install.
from typing import Any

isa: str  # the instruction set of the passes in use: "v4", "v3" (x86-64 levels) or "base"

def swiglu_backward(
    grad: Any, gate: Any, up: Any, sig: Any, grad_gate: Any, grad_up: Any, itemsize: int = 2
) -> None: ...
