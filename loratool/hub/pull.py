"""pull: download an adapter through the Hugging Face cache, verify it, convert it, write it.

A pull downloads through the standard cache (``hf_hub_download``), verifies format and integrity,
converts PEFT and kohya files the way ``convert`` does, and writes atomically. File names from a
repo are checked before use and never become output paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import FormatError, HubError
from .common import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_repo_path,
    client_output,
    connect,
    is_offline,
    resolve_endpoint,
    sibling_path,
    split_ref,
)
from .download import (
    PEFT_PICKLES,
    choose_cached_files,
    choose_files,
    download_file,
    snapshot_commit,
)
from .errors import hub_errors
from .fetch import evict
from .net import install, policy


@dataclass
class PullReport:
    """What ``pull`` fetched, from which commit, and where it went."""

    repo_id: str
    revision: str
    commit: str
    files: list[str]  # repo paths downloaded
    source_format: str  # "loratool", "peft", "kohya", ...
    cache_path: str  # the main file (or PEFT folder) in the Hugging Face cache
    out: str | None  # what was written, if anything
    sha256: str | None  # the integrity hash of the tensor data (in the file or computed on save)
    num_targets: int
    total_params: int
    base_model: str | None
    converted: bool
    offline: bool
    adapter: Adapter = field(repr=False, compare=False)
    from_pickle: bool = False  # read with the restricted unpickler (--allow-pickle)

    def to_dict(self) -> dict[str, Any]:
        # Field by field: asdict() would deep-copy the adapter and its tensors.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapter"}


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    out: str | os.PathLike[str] | None = None,
    filename: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    force: bool = False,
    progress: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    allow_pickle: bool = False,
    base: str | os.PathLike[str] | None = None,
) -> PullReport:
    """Download an adapter through the Hugging Face cache, verify it, and write it to ``out``.

    ``repo_id`` may carry ``@REVISION``. Without ``filename`` the repo's files pick the format:
    ``adapter.safetensors`` (loratool), else ``adapter_config.json`` + ``adapter_model.safetensors``
    (PEFT), else its only top-level ``.safetensors`` file (kohya and other formats ``convert``
    reads). loratool files are verified (rules 1-22) and written byte for byte; other formats are
    converted and written in loratool's format. With ``out=None`` nothing is written and the
    report's ``adapter`` holds the result. Offline (HF_HUB_OFFLINE) it reads only the cache.

    Every request waits at most ``timeout`` seconds (default ``$LORATOOL_HUB_TIMEOUT`` or 30)
    for a connection or a byte; downloads are retried and verified as ``hub.net`` and
    ``hub.fetch`` say. Pickled weights (``adapter_model.bin``, kohya ``.pt``) are refused unless
    ``allow_pickle``, which reads their tensors with ``loratool.unpickle`` and never again.
    ``base`` (a local base model) binds a converted adapter to it as ``convert --base`` does:
    what a PEFT file leaves to the base (a tokens target's vocabulary, bias values) comes from it.
    """
    from .._io import check_output

    repo_id, revision = split_ref(repo_id, revision)
    rev = revision or "main"
    if filename is not None:
        check_repo_path(filename, what="--filename")
    if out is not None:
        check_output(out, force=force)
    ep = resolve_endpoint(endpoint)
    offline = is_offline()
    net = policy(timeout)
    install(net)
    api, ctx = connect(ep, token, repo_id, rev, filename, "download")

    with client_output(progress=progress), hub_errors(ctx):
        if filename is not None:
            wanted = [filename]
            base = filename.rsplit("/", 1)[-1]
            if base == PEFT_WEIGHTS or (allow_pickle and base in PEFT_PICKLES):
                wanted = [sibling_path(filename, PEFT_CONFIG), filename]
        elif offline:
            wanted = choose_cached_files(api, repo_id, rev, cache_dir, allow_pickle=allow_pickle)
        else:
            # The revision first (one request, not retried by the client: a missing repo or
            # revision, or a dead server, fails fast), then the listing at that exact commit.
            ctx.action = "read"
            sha = api.repo_info(repo_id, revision=rev).sha
            ctx.action = "list files of"
            names = list(api.list_repo_files(repo_id, revision=sha or rev))
            wanted = choose_files(repo_id, rev, names, allow_pickle=allow_pickle)
        ctx.action = "download"
        paths: dict[str, str] = {}
        commit: str | None = None
        for name in wanted:
            ctx.filename = name
            # The PEFT config beside a --filename of PEFT weights is optional.
            optional = filename is not None and name != filename
            try:
                path = download_file(
                    api,
                    repo_id,
                    name,
                    rev if commit is None else commit,
                    offline,
                    cache_dir,
                    net=net,
                )
            except Exception as e:
                from huggingface_hub.errors import EntryNotFoundError

                if optional and isinstance(e, EntryNotFoundError):
                    continue
                raise
            paths[name] = path
            snap = snapshot_commit(path)
            if commit is not None and snap != commit:  # pragma: no cover - cache layout guard
                raise HubError(f"{name} came from commit {snap}, not {commit}", code="inconsistent")
            commit = snap
    main_name = wanted[-1]
    main_path = paths[main_name]
    assert commit is not None
    where = f"{repo_id}@{rev}/{main_name}"
    with _opened(main_path, paths, where=where, allow_pickle=allow_pickle) as opened:
        adapter, fmt, sha256, src, from_pickle = opened
        converted = fmt != "loratool"
        if converted and base is not None:
            from ..convert.core import bind_to_base

            adapter, _ = bind_to_base(adapter, base, [])
        if converted:
            adapter.provenance = dict(adapter.provenance)
            adapter.provenance.setdefault(
                "hub",
                {"repo_id": repo_id, "revision": rev, "commit": commit, "files": sorted(paths)},
            )
        written: str | None = None
        if out is not None:
            if converted:
                from ..format import read_header, save

                save(adapter, out, force=force)
                sha256 = read_header(out).adapter.sha256
            else:
                from .._io import atomic_write

                atomic_write(out, _chunks(main_path), force=force)
            written = os.fspath(out)
    binding = adapter.binding()
    return PullReport(
        repo_id=repo_id,
        revision=rev,
        commit=commit,
        files=sorted(paths),
        source_format=fmt,
        cache_path=src,
        out=written,
        sha256=sha256,
        num_targets=len(adapter.targets),
        total_params=adapter.total_params,
        base_model=binding.hub_id,
        converted=converted,
        offline=offline,
        adapter=adapter,
        from_pickle=from_pickle,
    )


@contextlib.contextmanager
def _opened(
    main_path: str, paths: dict[str, str], *, where: str, allow_pickle: bool
) -> Iterator[tuple[Adapter, str, str | None, str, bool]]:
    """(adapter, format, sha256, source path, from a pickle) for what was pulled, open while
    the caller writes it (a pickle's safetensors twin lives only that long).

    A cached file that fails its integrity hash, or a pickle the restricted unpickler refuses,
    is removed from the cache (link and blob): the next pull fetches it again, and no other
    reader of the cache ever trusts it.
    """
    from ..format import is_pickle

    pickled = is_pickle(main_path)
    if pickled and not allow_pickle:
        raise FormatError(
            "this is a pickle file; loratool opens those only with --allow-pickle",
            code="pickle",
            where=where,
            hint="pass --allow-pickle to read its tensors with the restricted unpickler",
        )
    try:
        if not pickled:
            yield _open_pulled(main_path, paths, where=where)
            return
        from ..convert.pickled import staged

        # PEFT: the snapshot folder (config + weights); kohya: the file itself.
        src = main_path
        if any(n.rsplit("/", 1)[-1] == PEFT_CONFIG for n in paths):
            src = str(Path(main_path).parent)
        with staged(src) as twin:
            adapter, fmt, _, _, _ = _open_pulled(twin, {}, where=where, staged=True)
            yield adapter, fmt, None, src, True
    except FormatError as e:
        if e.code == "integrity" or e.code.startswith(("pickle", "bad-pickle")):
            evict(Path(main_path))
        raise


def _open_pulled(
    main_path: str, paths: dict[str, str], *, where: str, staged: bool = False
) -> tuple[Adapter, str, str | None, str, bool]:
    """Verify a loratool file (rules 1-22), or read another format the way ``convert`` does."""
    from ..format import check_data, read_header
    from ..sources import open_adapter

    try:
        header = None if staged else read_header(main_path)
    except FormatError as e:
        if e.code != "not-loratool":
            e.where = where
            raise
        header = None
    if header is not None:
        try:
            check_data(header)
        except FormatError as e:
            e.where = where
            if e.code == "integrity":
                e.hint = (
                    "the file on the Hub is corrupt (its copy was removed from the cache, so a "
                    "later pull fetches it again); tell the repo's author"
                )
            raise
        return header.adapter, "loratool", header.adapter.sha256, main_path, False
    # PEFT: open the snapshot folder that holds adapter_config.json next to the weights.
    src = main_path
    if Path(main_path).name == PEFT_WEIGHTS and any(
        n.rsplit("/", 1)[-1] == PEFT_CONFIG for n in paths
    ):
        src = str(Path(main_path).parent)
    opened = open_adapter(src)
    return opened.adapter, opened.format, None, src, False


def _chunks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
