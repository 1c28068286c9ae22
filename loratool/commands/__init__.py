"""One module per CLI command; each exposes ``command``, a click command (see loratool/cli.py)."""
