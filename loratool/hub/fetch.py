"""Download one repo file into the Hugging Face cache, verified before it moves into place.

huggingface_hub 2.4's ``hf_hub_download`` checks only the size of what it fetched, then moves it
into ``blobs/<etag>``: a server that sends other bytes than its ETag names (a broken mirror, a
proxy, a lie) leaves a wrong blob that every later reader of the cache trusts. We fetch into a
unique ``blobs/<etag>.XXXXXXXX.incomplete`` (the client's own pattern), check the byte count
against the announced size and the content against the ETag (an LFS file's ETag is its sha256,
a regular file's its git blob sha1), and only then rename it into place and link the snapshot
the way ``hf_hub_download`` does, so its cache readers (offline mode, PEFT) find the file. A
blob already in the cache is checked the same way before reuse and removed if it fails.

Transient failures (timeouts, dropped connections, 408/429/5xx) are retried per ``net.Policy``;
a dropped download resumes with a Range request. A download that arrives whole but wrong (size
or hash) starts again from the first byte, since a resumed tail could splice two answers. When
the tries are spent the temporary file is removed and nothing new is left in the cache. Xet
storage is not used: the Hub serves Xet-backed files over plain HTTP too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import HubError
from .net import Policy, retry_after, retryable

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20


class Mismatch(Exception):
    """What arrived is not what the server said it would send (size or content)."""


@dataclass
class _Progress:
    have: int = 0  # bytes in the temporary file that belong to this download


def check_blob(path: Path, etag: str, size: int | None) -> None:
    """Raise ``Mismatch`` unless ``path`` has ``size`` bytes and the content ``etag`` names."""
    got = path.stat().st_size
    if size is not None and got != size:
        raise Mismatch(f"{got} bytes arrived but the server announced {size}")
    if _SHA256_RE.match(etag):
        h = hashlib.sha256()
        what = "sha256"
    elif _SHA1_RE.match(etag):
        h = hashlib.sha1(b"blob %d\0" % got)  # git's blob id (not for security)
        what = "git blob id"
    else:
        return  # an ETag that names no hash we know: the size (and the adapter's hash) must do
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != etag:
        raise Mismatch(
            f"the {what} of what arrived is {h.hexdigest()[:16]}…, not the ETag {etag[:16]}…"
        )


def fetch_to_cache(
    *,
    url: str,
    headers: dict[str, str],
    storage: Path,
    name: str,
    revision: str,
    commit: str,
    etag: str,
    size: int | None,
    policy: Policy,
    where: str,
) -> str:
    """``storage/snapshots/<commit>/<name>``, a link to the verified ``storage/blobs/<etag>``."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        _get_pointer_path,
    )

    from ..limits import check_adapter_bytes

    if size is not None:
        check_adapter_bytes(size, what=f"{name} (as announced by the server)", where=where)
    blob = storage / "blobs" / etag
    pointer = Path(_get_pointer_path(str(storage), commit, name))
    if blob.is_file():
        try:
            check_blob(blob, etag, size)
        except Mismatch:
            # A wrong blob from an older client or a damaged disk: never reuse it.
            evict(pointer, blob)
    new = not blob.is_file()
    if new:
        blob.parent.mkdir(parents=True, exist_ok=True)
        download(url, headers, blob, etag=etag, size=size, policy=policy, where=where)
    if new or not pointer.exists():
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=new)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return str(pointer)


def evict(pointer: Path, blob: Path | None = None) -> None:
    """Remove a cached file: its snapshot link and the blob behind it."""
    target = blob
    if target is None and pointer.is_symlink():
        target = pointer.resolve()
    for p in (pointer, target):
        if p is not None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def download(
    url: str,
    headers: dict[str, str],
    dest: Path,
    *,
    etag: str,
    size: int | None,
    policy: Policy,
    where: str,
) -> None:
    """GET ``url`` into ``dest`` through a temporary sibling; verified, retried, all or nothing."""
    from .._io import disk_full_errno, disk_full_error, ensure_space

    if size is not None:
        ensure_space(dest.parent, size, out=dest)
    tmp = dest.with_name(f"{etag}.{secrets.token_hex(4)}.incomplete")
    try:
        with open(tmp, "wb") as f:
            _download_retrying(url, headers, f, tmp, etag=etag, size=size, p=policy, where=where)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except Exception as e:
        code = disk_full_errno(e)
        if code is not None:
            raise disk_full_error(code, dest) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _download_retrying(
    url: str,
    headers: dict[str, str],
    f: IO[bytes],
    tmp: Path,
    *,
    etag: str,
    size: int | None,
    p: Policy,
    where: str,
) -> None:
    state = _Progress()
    attempt = 0
    while True:
        try:
            _get(url, headers, f, state, size)
            f.flush()
            check_blob(tmp, etag, size)
            return
        except Mismatch as e:
            if attempt >= p.retries:
                tries = attempt + 1
                raise HubError(
                    f"{where}: the download does not match what the server announced ({e}; "
                    f"{tries} {'try' if tries == 1 else 'tries'}); nothing was kept",
                    code="corrupt-download",
                    hint="the server sends other bytes than its size and ETag name: try again "
                    "later; if it persists, check HF_ENDPOINT or tell the server's operator",
                ) from None
            f.seek(0)
            f.truncate()
            state.have = 0
            time.sleep(p.wait(attempt))
        except Exception as e:
            if attempt >= p.retries or not retryable(e):
                raise
            time.sleep(p.wait(attempt, retry_after(e)))
        attempt += 1


def _get(
    url: str, headers: dict[str, str], f: IO[bytes], state: _Progress, size: int | None
) -> None:
    """One GET, resuming after ``state.have`` bytes; ``state.have`` follows every write."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    # identity: the announced size is the size of the bytes, and a Range counts bytes of the file.
    req: dict[str, Any] = {**headers, "Accept-Encoding": "identity"}
    if state.have:
        req["Range"] = f"bytes={state.have}-"
    with get_session().stream("GET", url, headers=req, follow_redirects=True) as r:
        if r.status_code == 416 and state.have:
            r.read()
            raise Mismatch(f"the server has no bytes past {state.have}")
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        if state.have and r.status_code != 206:
            # The server ignored the Range and sends the whole file again: start over.
            f.seek(0)
            f.truncate()
            state.have = 0
        for chunk in r.iter_bytes():  # as it arrives: a chunk_size would hold back a tail
            if size is not None and state.have + len(chunk) > size:
                raise Mismatch(f"more than the {size} bytes the server announced arrived")
            f.write(chunk)
            state.have += len(chunk)
