"""Pick a repo's adapter files and fetch them into the HF cache, trusting no name it sends."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HubError
from .common import ADAPTER_FILE, COMMIT_RE, PEFT_CONFIG, PEFT_WEIGHTS, is_safe_repo_path
from .fetch import fetch_to_cache
from .net import Policy, policy, with_retries

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# One path component that is safe as a cache file name: the Hub's ETags are a git sha1 or a
# sha256; we accept any plain token, never "/" or "..".
# Pickled weights, chosen only under --allow-pickle (PEFT's names first, then a lone kohya file).
PEFT_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_ETAG_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,128}$")


def choose_files(
    repo_id: str, rev: str, names: list[Any], *, allow_pickle: bool = False
) -> list[str]:
    """Which files to fetch, from a listing we do not trust (names are checked, then matched).

    Pickled weights (``adapter_model.bin``, a lone kohya ``.pt``/``.ckpt``/``.bin``) are chosen
    only with ``allow_pickle``, and only where no safetensors file would do.
    """
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
        chosen = _pickled(top)
        if chosen and allow_pickle:
            return chosen
        if chosen:
            raise HubError(
                f"{repo_id}@{rev} has only a pickled adapter ({chosen[-1]}){note}",
                code="pickle",
                hint="pickle files can run code when loaded; pass --allow-pickle to read its "
                "tensors with loratool's restricted unpickler (tensors and plain containers "
                "only), or ask the author for adapter_model.safetensors",
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


def _pickled(top: set[str]) -> list[str] | None:
    """The pickled adapter among top-level names: PEFT weights (with their config), or the
    only pickle-suffixed file (kohya); None if there is none, or no single one."""
    for n in PEFT_PICKLES:
        if n in top:
            return [PEFT_CONFIG, n] if PEFT_CONFIG in top else [n]
    pickles = sorted(n for n in top if n.endswith(PICKLE_SUFFIXES))
    return pickles if len(pickles) == 1 else None


def choose_cached_files(
    api: HfApi,
    repo_id: str,
    rev: str,
    cache_dir: str | os.PathLike[str] | None,
    *,
    allow_pickle: bool = False,
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
        return choose_files(repo_id, rev, names, allow_pickle=allow_pickle)
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
    *,
    net: Policy | None = None,
) -> str:
    """One file into the cache, after checking what the server says about it; its cache path.

    huggingface_hub 2.4 joins the server's ETag into the blob path unchecked, so an ETag like
    ``../../x`` writes outside the cache; we look at the metadata first and refuse such answers,
    then fetch with ``fetch.fetch_to_cache`` (bounded, retried, verified against the ETag before
    it moves into place) and check the path we got back. Offline, the client reads the cache.
    """
    from huggingface_hub import constants as hf_constants

    root = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    if offline:
        path = api.hf_hub_download(
            repo_id, name, revision=revision, cache_dir=_cache(cache_dir), local_files_only=True
        )
        assert isinstance(path, str)
    else:
        path = _fetch(api, repo_id, name, revision, root, net or policy())
    real = Path(path).resolve()
    if root.resolve() not in real.parents:
        raise HubError(
            f"the downloaded {name} resolved outside the Hugging Face cache ({real})",
            code="unsafe-server",
            hint="check HF_ENDPOINT and remove that file",
        )
    return path


def _fetch(api: HfApi, repo_id: str, name: str, revision: str, root: Path, p: Policy) -> str:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata, repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=api.endpoint)
    meta = with_retries(
        p,
        lambda: get_hf_file_metadata(
            url=url,
            token=api.token,
            library_name=api.library_name,
            library_version=api.library_version,
            endpoint=api.endpoint,
            retry_on_errors=False,  # our policy retries, with our bounds
        ),
    )
    etag, commit = meta.etag or "", meta.commit_hash or ""
    if not _ETAG_RE.match(etag) or etag in (".", "..") or not COMMIT_RE.match(commit):
        raise HubError(
            f"the server sent unsafe metadata for {repo_id}/{name} "
            f"(ETag {etag[:80]!r}, commit {commit[:80]!r}); refusing to download",
            code="unsafe-server",
            hint="check HF_ENDPOINT: it does not behave like the Hugging Face Hub",
        )
    headers = build_hf_headers(
        token=api.token, library_name=api.library_name, library_version=api.library_version
    )
    return fetch_to_cache(
        # At the commit the metadata named, so every retry asks for the same bytes.
        url=hf_hub_url(repo_id, name, revision=commit, endpoint=api.endpoint),
        headers=headers,
        storage=root / repo_folder_name(repo_id=repo_id, repo_type="model"),
        name=name,
        revision=revision,
        commit=commit,
        etag=etag,
        size=meta.size,
        policy=p,
        where=f"{repo_id}@{revision}/{name}",
    )


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
