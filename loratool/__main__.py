"""``python -m loratool``: the same as the ``loratool`` console script."""

from loratool.cli import main

main()
