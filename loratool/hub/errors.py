"""Map huggingface_hub / httpx2 exceptions to one-line HubErrors (exit 5), tokens masked."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import HubError, LoratoolError, UsageError

_AUTH_HINT = (
    "set HF_TOKEN, run `hf auth login` (formerly `huggingface-cli login`), or pass --token; "
    "the token needs write access to push"
)
_WRITE_ACTIONS = ("push to", "create", "create branch")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class Secrets:
    """The tokens in play, so that no message we raise can carry one."""

    def __init__(self, token: str | None) -> None:
        values = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
        self.values = sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)

    def mask(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, "***")
        return _TOKEN_RE.sub("hf_***", text)


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass
class CallContext:
    endpoint: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    action: str = "talk to"
    secrets: Secrets | None = None
    authenticated: bool = False

    @property
    def where(self) -> str:
        if not self.repo_id:
            return self.endpoint
        ref = f"@{self.revision}" if self.revision else ""
        path = f"/{self.filename}" if self.filename else ""
        return f"{self.repo_id}{ref}{path}"


@contextlib.contextmanager
def hub_errors(ctx: CallContext) -> Iterator[None]:
    """Turn the Hub client's exceptions into one-line HubErrors; anything else passes."""
    try:
        yield
    except LoratoolError:
        raise
    except Exception as e:
        mapped = _map_error(e, ctx)
        if mapped is None:
            raise
        if ctx.secrets is not None:
            mapped.message = ctx.secrets.mask(mapped.message)
            mapped.hint = ctx.secrets.mask(mapped.hint) if mapped.hint else mapped.hint
        raise mapped from None


def _map_error(e: BaseException, ctx: CallContext) -> LoratoolError | None:
    import httpx2
    from huggingface_hub import errors as E

    if isinstance(e, E.HFValidationError):
        return UsageError(_first_line(str(e)), code="bad-repo-id")
    if isinstance(e, E.OfflineModeIsEnabled):
        return HubError(
            f"cannot {ctx.action} {ctx.where}: offline mode is on (HF_HUB_OFFLINE)",
            code="offline",
            hint="unset HF_HUB_OFFLINE to reach the Hub",
        )
    if isinstance(e, E.GatedRepoError):
        return HubError(
            f"{ctx.repo_id} is a gated repo and this account has not been granted access",
            code="gated",
            hint="accept the conditions on the repo's page, then use that account's token; "
            + _AUTH_HINT,
        )
    if isinstance(e, E.RepositoryNotFoundError):
        status = e.response.status_code if e.response is not None else 404
        if status == 401 and ctx.action in _WRITE_ACTIONS:
            # On https endpoints the client files any 401 on a repo URL under "not found".
            sent = "the token was refused" if ctx.authenticated else "no token was sent"
            return HubError(
                f"cannot {ctx.action} {ctx.where}: authentication failed (401, {sent})",
                code="unauthorized",
                hint=_AUTH_HINT,
            )
        if status == 401 and not ctx.authenticated:
            return HubError(
                f"repo {ctx.repo_id} not found on {ctx.endpoint}, or private and no token was sent (401)",
                code="repo-not-found",
                hint="check the repo id; for a private repo " + _AUTH_HINT,
            )
        return HubError(
            f"repo {ctx.repo_id} not found on {ctx.endpoint} (or not visible to this token)",
            code="repo-not-found",
            hint="check the repo id and that the token's account can see it",
        )
    if isinstance(e, E.RevisionNotFoundError):
        return HubError(
            f"revision '{ctx.revision or 'main'}' not found in {ctx.repo_id}",
            code="revision-not-found",
            hint="use an existing branch, tag or commit (REPO_ID@REVISION)",
        )
    if isinstance(e, E.RemoteEntryNotFoundError):
        return HubError(
            f"file '{ctx.filename}' not found in {ctx.repo_id}@{ctx.revision or 'main'}",
            code="file-not-found",
            hint="list the repo's files on the Hub; pick one with --filename",
        )
    if isinstance(e, E.LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        if cause is not None and not isinstance(cause, E.OfflineModeIsEnabled):
            inner = _map_error(cause, ctx)
            if inner is not None:
                return inner
        return HubError(
            f"{ctx.where} is not in the local cache and the Hub cannot be reached (offline mode)",
            code="not-cached",
            hint="pull it once while online, or unset HF_HUB_OFFLINE",
        )
    if isinstance(e, E.FileMetadataError):
        return HubError(
            f"{ctx.endpoint} did not answer like a Hugging Face Hub for {ctx.where}",
            code="not-a-hub",
            hint="check HF_ENDPOINT (or --endpoint): it must point to a Hub-compatible server",
        )
    if isinstance(e, E.HfHubHTTPError):
        resp = e.response
        status = resp.status_code if resp is not None else 0
        server = _first_line(e.server_message or "")
        detail = f": {server}" if server else ""
        if status == 401:
            sent = "the token was refused" if ctx.authenticated else "no token was sent"
            return HubError(
                f"cannot {ctx.action} {ctx.where}: authentication failed (401, {sent}){detail}",
                code="unauthorized",
                hint=_AUTH_HINT,
            )
        if status == 403:
            return HubError(
                f"cannot {ctx.action} {ctx.where}: permission denied (403){detail}",
                code="forbidden",
                hint="use a token with write access to this namespace; " + _AUTH_HINT,
            )
        if status == 412:
            return HubError(
                f"{ctx.where} changed while pushing (someone else committed)",
                code="conflict",
                hint="run the command again",
            )
        if status >= 500:
            method = resp.request.method if resp is not None and resp.request is not None else ""
            return HubError(
                f"the Hub at {ctx.endpoint} failed with {status} {_reason(status)} while trying to "
                f"{ctx.action} {ctx.where}{detail} ({method} {_url_path(resp)})",
                code="server-error",
                hint="a problem on the Hub's side: try again later (the client already retried "
                "the requests it can retry)",
            )
        return HubError(
            f"cannot {ctx.action} {ctx.where}: the Hub answered {status} {_reason(status)}{detail}",
            code="http-error",
            hint="check the repo id, revision and file name",
        )
    if isinstance(e, httpx2.TimeoutException):
        return HubError(
            f"timed out trying to {ctx.action} {ctx.where} at {ctx.endpoint}",
            code="network",
            hint="check your connection (and HF_ENDPOINT / proxy settings), then try again",
        )
    if isinstance(e, httpx2.TransportError):
        kind = {
            "ConnectError": "could not connect",
            "RemoteProtocolError": "the connection was dropped",
            "ReadError": "the connection broke while reading",
            "WriteError": "the connection broke while sending",
            "ProxyError": "the proxy refused the connection",
        }.get(type(e).__name__, "network failure")
        return HubError(
            f"{kind} trying to {ctx.action} {ctx.where} at {ctx.endpoint} "
            f"({_first_line(str(e)) or type(e).__name__})",
            code="network",
            hint="check your connection (and HF_ENDPOINT / proxy settings), then try again; "
            "the client retries idempotent requests before giving up",
        )
    if isinstance(e, ConnectionError):  # hf_xet (Rust) reports transfer failures this way
        return HubError(
            f"transfer failed trying to {ctx.action} {ctx.where}: {_first_line(str(e))}",
            code="network",
            hint="check your connection and try again; for a Hub without Xet storage "
            "set HF_HUB_DISABLE_XET=1",
        )
    if isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
        return HubError(
            f"the Hub rejected the model card of {ctx.where}: {_first_line(str(e).split('README.md', 1)[-1])}",
            code="invalid-card",
            hint="check --base-model is a Hub model id",
        )
    return None


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _url_path(resp: Any) -> str:
    try:
        return str(resp.request.url.path)
    except AttributeError:
        return ""
