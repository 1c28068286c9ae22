"""hf:// paths: read an adapter's header with HTTP range requests, its tensors only when asked."""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .. import constants as C
from ..errors import FormatError, HubError, UsageError
from .common import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_repo_id,
    check_repo_path,
    client_output,
    connect,
    is_offline,
    resolve_endpoint,
    sibling_path,
)
from .download import download_file
from .errors import CallContext, hub_errors
from .net import install, policy

if TYPE_CHECKING:
    import torch
    from huggingface_hub import HfApi

    from ..format import Header
    from ..sources import Opened

HF_SCHEME = "hf://"


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://NAMESPACE/NAME[@REVISION]/PATH`` -> (repo id, revision, path in the repo).

    A revision containing '/' (``refs/pr/1``) is written URL-encoded (``refs%2Fpr%2F1``), as
    huggingface_hub's HfFileSystem does.
    """
    if not uri.startswith(HF_SCHEME):
        raise UsageError(f"'{uri}' is not an hf:// path", code="bad-uri")
    parts = uri[len(HF_SCHEME) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(
            f"'{uri}' must look like hf://NAMESPACE/NAME[@REVISION]/FILE",
            code="bad-uri",
            hint="e.g. hf://your-user/my-lora/adapter.safetensors",
        )
    name, _, rev = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    revision = unquote(rev) if rev else None
    path = "/".join(parts[2:])
    check_repo_id(repo_id)
    check_repo_path(path)
    return repo_id, revision, path


def open_remote_header(
    uri: str, *, token: str | None = None, endpoint: str | None = None
) -> Opened:
    """Open ``hf://REPO_ID[@REV]/FILE`` by reading only its header (two HTTP range requests).

    A loratool file is validated (rules 1-20) from the first 8 + N bytes; its tensors load later,
    each with its own range request, only if asked for (``inspect --stats``); the integrity hash
    is not checked here (``pull`` does). A file in another format is downloaded through the
    cache (with its adapter_config.json for PEFT) and opened the way ``convert`` reads it.
    Offline, a cached copy is used if there is one.
    """
    from .. import __version__
    from ..format import Header, adapter_from_tensors, parse_container
    from ..sources import Opened, open_adapter

    repo_id, revision, filename = parse_hf_uri(uri)
    rev = revision or "main"
    ep = resolve_endpoint(endpoint)
    install(policy())  # every range request bounded by $LORATOOL_HUB_TIMEOUT
    api, ctx = connect(ep, token, repo_id, rev, filename, "read")

    if is_offline():
        with client_output(progress=False), hub_errors(ctx):
            local = api.hf_hub_download(repo_id, filename, revision=rev, local_files_only=True)
        opened = open_adapter(str(local))
        opened.path = uri
        return opened

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, filename, revision=rev, endpoint=ep)
    headers = build_hf_headers(token=token, library_name="loratool", library_version=__version__)
    with hub_errors(ctx):
        first, total = _read_range(url, headers, 0, C.HEADER_LENGTH_BYTES)
        head = first
        if len(first) == C.HEADER_LENGTH_BYTES:
            (n,) = struct.unpack("<Q", first)
            if n <= min(C.MAX_HEADER_BYTES, total - C.HEADER_LENGTH_BYTES):
                rest, _ = _read_range(
                    url, headers, C.HEADER_LENGTH_BYTES, C.HEADER_LENGTH_BYTES + n
                )
                head = first + rest
    n, tensors, meta = parse_container(head, total, uri)
    try:
        adapter = adapter_from_tensors(tensors, meta, uri)
    except FormatError as e:
        if e.code != "not-loratool":
            raise
        return _open_remote_other(api, repo_id, rev, filename, uri, ctx)
    header = Header(uri, total, n, tensors, meta, adapter)
    loader = _RemoteLoader(url, headers, header, ctx)
    for t in adapter.targets.values():
        t._loader = loader
    # No ``header`` on the Opened: readers of Opened.header (inspect's integrity check) open
    # header.path as a local file. The integrity hash is checked by ``pull``.
    return Opened(adapter, "loratool", uri, total)


def _open_remote_other(
    api: HfApi, repo_id: str, rev: str, filename: str, uri: str, ctx: CallContext
) -> Opened:
    from huggingface_hub.errors import EntryNotFoundError

    from ..sources import open_adapter

    with client_output(progress=False), hub_errors(ctx):
        path = download_file(api, repo_id, filename, rev, False, None)
        src = path
        if filename.rsplit("/", 1)[-1] == PEFT_WEIGHTS:
            with contextlib.suppress(EntryNotFoundError):
                download_file(api, repo_id, sibling_path(filename, PEFT_CONFIG), rev, False, None)
                src = str(Path(path).parent)
    opened = open_adapter(src)
    opened.path = uri
    return opened


def _read_range(url: str, headers: dict[str, str], start: int, end: int) -> tuple[bytes, int]:
    """Bytes [start, end) of ``url`` and the file's total size; never more than asked for.

    A server that ignores Range answers 200 with the whole file: we read only ``end`` bytes of
    that stream and close it.
    """
    from huggingface_hub.utils import get_session, hf_raise_for_status

    want = end - start
    if want <= 0:
        return b"", 0
    req = {**headers, "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=req, follow_redirects=True) as r:
        if r.status_code == 416:
            r.read()
            total = _total_from(r.headers.get("Content-Range", ""))
            return b"", total if total is not None else start
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        buf = bytearray()
        if r.status_code == 206:
            total = _total_from(r.headers.get("Content-Range", ""))
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) >= want:
                    break
            data = bytes(buf[:want])
        else:
            total = _int(r.headers.get("X-Linked-Size") or r.headers.get("Content-Length"))
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) >= end:
                    break
            data = bytes(buf[start:end])
    if total is None:
        raise HubError(
            f"the server did not say how large {url} is (no Content-Range)",
            code="not-a-hub",
            hint="check HF_ENDPOINT: range requests need a Hub-compatible server",
        )
    return data, total


def _total_from(content_range: str) -> int | None:
    m = re.match(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$", content_range.strip())
    return int(m.group(1)) if m else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _RemoteLoader:
    """Loads one tensor of a remote loratool file with one range request."""

    def __init__(self, url: str, headers: dict[str, str], header: Header, ctx: CallContext) -> None:
        self.url, self.headers, self.header, self.ctx = url, headers, header, ctx

    def __call__(self, name: str) -> torch.Tensor:
        import torch

        from ..format import torch_dtype

        info = self.header.tensors[name]
        start = self.header.data_start + info.begin
        size = info.end - info.begin
        if size == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        with hub_errors(self.ctx):
            data, _ = _read_range(self.url, self.headers, start, start + size)
        if len(data) != size:
            raise FormatError(
                f"tensor '{name}' ends past the end of the remote file",
                code="truncated",
                where=self.header.path,
            )
        return torch.frombuffer(bytearray(data), dtype=torch_dtype(info.dtype)).reshape(info.shape)
