"""Pick a repo's adapter files and fetch them into the HF cache, trusting no name it sends."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HubError
from .common import ADAPTER_FILE, COMMIT_RE, PEFT_CONFIG, PEFT_WEIGHTS, is_safe_repo_path

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# One path component that is safe as a cache file name: the Hub's ETags are a git sha1 or a
# sha256; we accept any plain token, never "/" or "..".
_ETAG_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,128}$")


def choose_files(repo_id: str, rev: str, names: list[Any]) -> list[str]:
    """Which files to fetch, from a listing we do not trust (names are checked, then matched)."""
    safe = [n for n in names if is_safe_repo_path(n)]
    unsafe = [n for n in names if not is_safe_repo_path(n)]
    top = {n for n in safe if "/" not in n}
    if ADAPTER_FILE in top:
        return [ADAPTER_FILE]
    if PEFT_WEIGHTS in top and PEFT_CONFIG in top:
        return [PEFT_CONFIG, PEFT_WEIGHTS]
    candidates = sorted(n for n in top if n.endswith(".safetensors"))
    if len(candidates) == 1:
        return candidates
    note = f" ({len(unsafe)} listed names were unsafe paths and ignored)" if unsafe else ""
    if not candidates:
        if "adapter_model.bin" in top:
            raise HubError(
                f"{repo_id}@{rev} has only a pickle adapter (adapter_model.bin){note}",
                code="pickle",
                hint="pickle files can run code when loaded and loratool never opens them; "
                "ask the author for adapter_model.safetensors",
            )
        raise HubError(
            f"{repo_id}@{rev} has no adapter: no {ADAPTER_FILE}, no PEFT pair and no "
            f".safetensors file at the top level{note}",
            code="no-adapter",
            hint="pass --filename PATH for a file in a subfolder",
        )
    shown = ", ".join(candidates[:5]) + (", …" if len(candidates) > 5 else "")
    raise HubError(
        f"{repo_id}@{rev} has {len(candidates)} .safetensors files ({shown}); which one?",
        code="ambiguous",
        hint="pass --filename NAME",
    )


def choose_cached_files(
    api: HfApi, repo_id: str, rev: str, cache_dir: str | os.PathLike[str] | None
) -> list[str]:
    """Offline there is no listing: choose among the files the cached snapshot holds."""
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir or hf_constants.HF_HUB_CACHE) / repo_folder_name(
        repo_id=repo_id, repo_type="model"
    )
    commit = rev
    ref = root / "refs" / rev
    if not COMMIT_RE.match(rev) and ref.is_file():
        commit = ref.read_text(errors="replace").strip()
    snapshot = root / "snapshots" / commit
    names: list[str] = []
    if COMMIT_RE.match(commit) and snapshot.is_dir():
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        return choose_files(repo_id, rev, names)
    except HubError as e:
        if e.code != "no-adapter":
            raise
        raise HubError(
            f"{repo_id}@{rev} has no adapter in the local cache, and offline mode is on "
            "(HF_HUB_OFFLINE)",
            code="not-cached",
            hint="pull it once while online, or unset HF_HUB_OFFLINE",
        ) from None


def download_file(
    api: HfApi,
    repo_id: str,
    name: str,
    revision: str,
    offline: bool,
    cache_dir: str | os.PathLike[str] | None,
) -> str:
    """``hf_hub_download`` into the cache, after checking what the server says about the file.

    huggingface_hub 2.4 joins the server's ETag into the blob path unchecked, so an ETag like
    ``../../x`` writes outside the cache; we look at the metadata first and refuse such answers,
    then check the path we got back.
    """
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata

    if not offline:
        meta = get_hf_file_metadata(
            url=hf_hub_url(repo_id, name, revision=revision, endpoint=api.endpoint),
            token=api.token,
            library_name=api.library_name,
            library_version=api.library_version,
            endpoint=api.endpoint,
            retry_on_errors=True,  # as hf_hub_download's own second try does
        )
        etag, commit = meta.etag or "", meta.commit_hash or ""
        if not _ETAG_RE.match(etag) or etag in (".", "..") or not COMMIT_RE.match(commit):
            raise HubError(
                f"the server sent unsafe metadata for {repo_id}/{name} "
                f"(ETag {etag[:80]!r}, commit {commit[:80]!r}); refusing to download",
                code="unsafe-server",
                hint="check HF_ENDPOINT: it does not behave like the Hugging Face Hub",
            )
    path = api.hf_hub_download(
        repo_id,
        name,
        revision=revision,
        cache_dir=_cache(cache_dir),
        local_files_only=offline,
    )
    assert isinstance(path, str)
    root = Path(cache_dir or hf_constants.HF_HUB_CACHE).resolve()
    real = Path(path).resolve()
    if root not in real.parents:
        raise HubError(
            f"the downloaded {name} resolved outside the Hugging Face cache ({real})",
            code="unsafe-server",
            hint="check HF_ENDPOINT and remove that file",
        )
    return path


def _cache(cache_dir: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(cache_dir) if cache_dir is not None else None


def snapshot_commit(path: str) -> str:
    """The commit a cache path belongs to: .../snapshots/<commit>/<file>."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and COMMIT_RE.match(parts[i + 1]):
            return parts[i + 1]
    return "unknown"
