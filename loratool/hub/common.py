"""What push, pull and hf:// reads share: file names, endpoint, offline mode, repo paths, client.

The endpoint is resolved at call time and every call goes through ``HfApi(endpoint=...)`` (see
the package docstring); huggingface_hub is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..card import is_hub_id
from ..errors import UsageError
from .errors import CallContext, Secrets

if TYPE_CHECKING:
    from huggingface_hub import HfApi

ADAPTER_FILE = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
CARD_FILE = "README.md"
DEFAULT_ENDPOINT = "https://huggingface.co"

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``$HF_ENDPOINT`` as it is now, else huggingface_hub's default."""
    ep = endpoint or os.environ.get("HF_ENDPOINT")
    if not ep:
        try:
            from huggingface_hub import constants as hf_constants

            ep = hf_constants.ENDPOINT
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            ep = DEFAULT_ENDPOINT
    ep = ep.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", ep):
        raise UsageError(
            f"Hub endpoint {ep!r} is not an http(s) URL",
            code="bad-endpoint",
            hint="set HF_ENDPOINT (or --endpoint) to a URL like https://huggingface.co",
        )
    return ep


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says now, or at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants as hf_constants

        return bool(hf_constants.is_offline_mode())
    except ImportError:  # pragma: no cover
        return False


def split_ref(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]`` -> (repo id, revision); an explicit ``revision`` must agree."""
    repo_id, sep, rev = spec.partition("@")
    if sep:
        if not rev:
            raise UsageError(f"'{spec}' has an empty revision after '@'", code="bad-repo-id")
        if revision is not None and revision != rev:
            raise UsageError(
                f"'{spec}' names revision '{rev}' but revision '{revision}' was also given",
                code="bad-repo-id",
            )
        revision = rev
    check_repo_id(repo_id)
    return repo_id, revision


def check_repo_id(repo_id: str) -> None:
    if "/" not in repo_id or not is_hub_id(repo_id):
        raise UsageError(
            f"'{repo_id}' is not a Hub repo id",
            code="bad-repo-id",
            hint="use NAMESPACE/NAME, e.g. your-user/my-lora (letters, digits, '-', '_', '.')",
        )


def check_repo_path(name: str, *, what: str = "file name") -> str:
    """A repo-relative path that cannot escape a folder: no absolute, '..', '\\' or empty parts."""
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise UsageError(
            f"{what} {name!r} is not a safe repo path",
            code="unsafe-path",
            hint="use a relative path inside the repo, like adapter.safetensors",
        )
    return name


def is_safe_repo_path(name: object) -> bool:
    if not isinstance(name, str):
        return False
    try:
        check_repo_path(name)
    except UsageError:
        return False
    return True


def sibling_path(path: str, name: str) -> str:
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    return f"{folder}/{name}" if folder else name


def hub_client(endpoint: str, token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    from .. import __version__

    return HfApi(
        endpoint=endpoint, token=token, library_name="loratool", library_version=__version__
    )


def has_token(api: HfApi) -> bool:
    if api.token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # pragma: no cover - a broken token file is not our error to raise here
        return False


def connect(
    endpoint: str,
    token: str | None,
    repo_id: str,
    revision: str | None,
    filename: str | None,
    action: str,
) -> tuple[HfApi, CallContext]:
    """The client for one operation on ``repo_id`` at the resolved ``endpoint``, and the context
    its errors are reported in (the tokens in play masked, whether one is sent)."""
    api = hub_client(endpoint, token)
    ctx = CallContext(endpoint, repo_id, revision, filename, action, Secrets(token), has_token(api))
    return api, ctx


@contextlib.contextmanager
def client_output(*, progress: bool) -> Iterator[None]:
    """huggingface_hub's tqdm bars only when asked (a TTY); its no-op commit warning never.

    The bars are process-global switches in huggingface_hub; the previous state is restored.
    ``HF_HUB_DISABLE_PROGRESS_BARS``, when the user set it, wins over ``progress``.
    """
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    user_choice = hf_constants.HF_HUB_DISABLE_PROGRESS_BARS is not None
    was_disabled = are_progress_bars_disabled()
    if not user_choice:
        (enable_progress_bars if progress else disable_progress_bars)()
    # We report "no commit" ourselves (PushReport.committed); hf_api logs it as a warning.
    api_logger = logging.getLogger("huggingface_hub.hf_api")
    level = api_logger.level
    api_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        api_logger.setLevel(level)
        if not user_choice:
            (disable_progress_bars if was_disabled else enable_progress_bars)()
