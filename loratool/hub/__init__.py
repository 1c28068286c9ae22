"""Share adapters on the Hugging Face Hub: push (one commit), pull (cache, verify), remote headers.

Everything goes through ``huggingface_hub.HfApi(endpoint=...)`` with the endpoint resolved at
call time (argument, else ``$HF_ENDPOINT`` now, else the library's import-time default), never
through the module-level helpers or ``ModelCard.push_to_hub``, which keep the endpoint seen when
huggingface_hub was imported (shared/notes/hub.md §0.3).

The package, one job per module:

- ``common``: the fixed file names, endpoint and offline mode, repo ids and safe repo paths, the
  ``HfApi`` client and its console output;
- ``errors``: huggingface_hub / httpx2 exceptions -> one-line ``HubError`` by one table
  (``RULES``: exception type and condition -> code, message, hint), tokens masked;
- ``push``: upload an adapter, its PEFT twin and a model card in one commit;
- ``download``: pick a repo's adapter files and fetch them into the cache, trusting no name;
- ``pull``: download, verify, convert and write an adapter;
- ``remote``: ``hf://`` paths, the header by HTTP range requests.

huggingface_hub is imported inside functions: ``import loratool`` and local ``inspect`` stay light.
Imports point one way: this package uses ``sources`` (open what was fetched) and
``convert.peft`` (the PEFT twin of a push); neither imports it (``sources`` names
``remote.open_remote_header`` as the ``hf://`` opener and imports it only for such paths).
"""

from __future__ import annotations

from .common import (
    ADAPTER_FILE,
    CARD_FILE,
    DEFAULT_ENDPOINT,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_repo_id,
    check_repo_path,
    is_offline,
    resolve_endpoint,
    split_ref,
)
from .pull import PullReport, pull
from .push import PushReport, push
from .remote import HF_SCHEME, open_remote_header, parse_hf_uri

__all__ = [
    "ADAPTER_FILE",
    "CARD_FILE",
    "DEFAULT_ENDPOINT",
    "HF_SCHEME",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PullReport",
    "PushReport",
    "check_repo_id",
    "check_repo_path",
    "is_offline",
    "open_remote_header",
    "parse_hf_uri",
    "pull",
    "push",
    "resolve_endpoint",
    "split_ref",
]
