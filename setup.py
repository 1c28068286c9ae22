"""The optional C passes; everything else about the package is in pyproject.toml.

Both are optional: an install without a C compiler still works, and the callers run the same
arithmetic as torch calls (``loratool/native.py``). No FMA contraction and no -ffast-math: the
bits must be IEEE single precision's. (Declared here, not in pyproject.toml, whose
``ext-modules`` table setuptools still calls experimental and warns about at every install.)
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp-simd", "-fno-math-errno"]


def _pass(name: str) -> Extension:
    path = name.replace(".", "/") + ".c"
    return Extension(
        name, [path], depends=["loratool/native.h"], extra_compile_args=FLAGS, optional=True
    )


setup(
    ext_modules=[
        _pass("loratool.merging.kernel"),  # the merge's per-block pass
        _pass("loratool.training.kernel"),  # SwiGLU's backward
        _pass("loratool.lora.kernel"),  # dropout's mask and zeros
    ]
)
