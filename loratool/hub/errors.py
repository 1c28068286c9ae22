"""Map huggingface_hub / httpx2 exceptions to one-line HubErrors (exit 5), tokens masked.

One table (``RULES``) says, for each exception type and condition (status, action, token),
the error code, message and hint; every Hub call goes through ``hub_errors``, which applies it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
from collections.abc import Callable, Iterator
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
        mapped = map_error(e, ctx)
        if mapped is None:
            raise
        if ctx.secrets is not None:
            mapped.message = ctx.secrets.mask(mapped.message)
            mapped.hint = ctx.secrets.mask(mapped.hint) if mapped.hint else mapped.hint
        raise mapped from None


class Facts:
    """What a message may say about a failed call: the context's fields, and the exception's.

    Properties, so a message template reads only what it names (``{f.method}`` touches the
    response's request only for a 5xx).
    """

    def __init__(self, e: BaseException, ctx: CallContext, status: int) -> None:
        self.e, self.ctx, self.status = e, ctx, status
        self.action, self.where, self.repo_id = ctx.action, ctx.where, ctx.repo_id
        self.endpoint, self.filename = ctx.endpoint, ctx.filename
        self.revision = ctx.revision or "main"

    @property
    def first(self) -> str:
        return _first_line(str(self.e))

    @property
    def sent(self) -> str:
        return "the token was refused" if self.ctx.authenticated else "no token was sent"

    @property
    def detail(self) -> str:
        server = _first_line(getattr(self.e, "server_message", None) or "")
        return f": {server}" if server else ""

    @property
    def reason(self) -> str:
        return _reason(self.status)

    @property
    def method(self) -> str:
        resp = getattr(self.e, "response", None)
        return resp.request.method if resp is not None and resp.request is not None else ""

    @property
    def url_path(self) -> str:
        return _url_path(getattr(self.e, "response", None))

    @property
    def transport(self) -> str:
        return _TRANSPORT.get(type(self.e).__name__, "network failure")

    @property
    def first_or_type(self) -> str:
        return self.first or type(self.e).__name__

    @property
    def card_reason(self) -> str:
        return _first_line(str(self.e).split("README.md", 1)[-1])


@dataclass(frozen=True)
class Rule:
    """One row of the mapping: an exception type (and a condition) -> code, message, hint."""

    error: str  # "module:Class" the exception is an instance of (imported only when mapping)
    code: str
    message: str  # a str.format template over Facts, as {f.field}
    hint: str | None = None
    when: Callable[[Facts], bool] | None = None
    usage: bool = False  # bad input (a UsageError), not a Hub failure
    unwrap: bool = False  # map the exception's cause first, if it has a mapping of its own


_E = "huggingface_hub.errors:"
_TRANSPORT = {
    "ConnectError": "could not connect",
    "RemoteProtocolError": "the connection was dropped",
    "ReadError": "the connection broke while reading",
    "WriteError": "the connection broke while sending",
    "ProxyError": "the proxy refused the connection",
}
_NETWORK_HINT = "check your connection (and HF_ENDPOINT / proxy settings), then try again"

# First matching row wins; subclasses come before their bases (GatedRepoError is a
# RepositoryNotFoundError, which is an HfHubHTTPError; TimeoutException is a TransportError).
RULES: tuple[Rule, ...] = (
    Rule(_E + "HFValidationError", "bad-repo-id", "{f.first}", usage=True),
    Rule(
        _E + "OfflineModeIsEnabled",
        "offline",
        "cannot {f.action} {f.where}: offline mode is on (HF_HUB_OFFLINE)",
        "unset HF_HUB_OFFLINE to reach the Hub",
    ),
    Rule(
        _E + "GatedRepoError",
        "gated",
        "{f.repo_id} is a gated repo and this account has not been granted access",
        "accept the conditions on the repo's page, then use that account's token; " + _AUTH_HINT,
    ),
    # On https endpoints the client files any 401 on a repo URL under "not found".
    Rule(
        _E + "RepositoryNotFoundError",
        "unauthorized",
        "cannot {f.action} {f.where}: authentication failed (401, {f.sent})",
        _AUTH_HINT,
        when=lambda f: f.status == 401 and f.action in _WRITE_ACTIONS,
    ),
    Rule(
        _E + "RepositoryNotFoundError",
        "repo-not-found",
        "repo {f.repo_id} not found on {f.endpoint}, or private and no token was sent (401)",
        "check the repo id; for a private repo " + _AUTH_HINT,
        when=lambda f: f.status == 401 and not f.ctx.authenticated,
    ),
    Rule(
        _E + "RepositoryNotFoundError",
        "repo-not-found",
        "repo {f.repo_id} not found on {f.endpoint} (or not visible to this token)",
        "check the repo id and that the token's account can see it",
    ),
    Rule(
        _E + "RevisionNotFoundError",
        "revision-not-found",
        "revision '{f.revision}' not found in {f.repo_id}",
        "use an existing branch, tag or commit (REPO_ID@REVISION)",
    ),
    Rule(
        _E + "RemoteEntryNotFoundError",
        "file-not-found",
        "file '{f.filename}' not found in {f.repo_id}@{f.revision}",
        "list the repo's files on the Hub; pick one with --filename",
    ),
    Rule(
        _E + "LocalEntryNotFoundError",
        "not-cached",
        "{f.where} is not in the local cache and the Hub cannot be reached (offline mode)",
        "pull it once while online, or unset HF_HUB_OFFLINE",
        unwrap=True,
    ),
    Rule(
        _E + "FileMetadataError",
        "not-a-hub",
        "{f.endpoint} did not answer like a Hugging Face Hub for {f.where}",
        "check HF_ENDPOINT (or --endpoint): it must point to a Hub-compatible server",
    ),
    Rule(
        _E + "HfHubHTTPError",
        "unauthorized",
        "cannot {f.action} {f.where}: authentication failed (401, {f.sent}){f.detail}",
        _AUTH_HINT,
        when=lambda f: f.status == 401,
    ),
    Rule(
        _E + "HfHubHTTPError",
        "forbidden",
        "cannot {f.action} {f.where}: permission denied (403){f.detail}",
        "use a token with write access to this namespace; " + _AUTH_HINT,
        when=lambda f: f.status == 403,
    ),
    Rule(
        _E + "HfHubHTTPError",
        "conflict",
        "{f.where} changed while pushing (someone else committed)",
        "run the command again",
        when=lambda f: f.status == 412,
    ),
    Rule(
        _E + "HfHubHTTPError",
        "server-error",
        "the Hub at {f.endpoint} failed with {f.status} {f.reason} while trying to "
        "{f.action} {f.where}{f.detail} ({f.method} {f.url_path})",
        "a problem on the Hub's side: try again later (the client already retried "
        "the requests it can retry)",
        when=lambda f: f.status >= 500,
    ),
    Rule(
        _E + "HfHubHTTPError",
        "http-error",
        "cannot {f.action} {f.where}: the Hub answered {f.status} {f.reason}{f.detail}",
        "check the repo id, revision and file name",
    ),
    Rule(
        "httpx2:TooManyRedirects",
        "redirect-loop",
        "the server at {f.endpoint} redirected too many times trying to {f.action} {f.where} "
        "(a redirect loop?)",
        "check HF_ENDPOINT (or --endpoint) and any proxy: the Hub redirects a download once or "
        "twice, never in a circle",
    ),
    Rule(
        "httpx2:TimeoutException",
        "network",
        "timed out trying to {f.action} {f.where} at {f.endpoint}",
        _NETWORK_HINT + "; on a slow link raise the limit with --timeout SECONDS "
        "(or LORATOOL_HUB_TIMEOUT)",
    ),
    Rule(
        "httpx2:TransportError",
        "network",
        "{f.transport} trying to {f.action} {f.where} at {f.endpoint} ({f.first_or_type})",
        _NETWORK_HINT + "; the client retries idempotent requests before giving up",
    ),
    # hf_xet (Rust) reports transfer failures as ConnectionError.
    Rule(
        "builtins:ConnectionError",
        "network",
        "transfer failed trying to {f.action} {f.where}: {f.first}",
        "check your connection and try again; for a Hub without Xet storage "
        "set HF_HUB_DISABLE_XET=1",
    ),
    Rule(
        "builtins:ValueError",
        "invalid-card",
        "the Hub rejected the model card of {f.where}: {f.card_reason}",
        "check --base-model is a Hub model id",
        when=lambda f: "Invalid metadata in README.md" in str(f.e),
    ),
)


def map_error(e: BaseException, ctx: CallContext) -> LoratoolError | None:
    """The first row of ``RULES`` that ``e`` matches, as an error; None for an unknown one."""
    resp = getattr(e, "response", None) if isinstance(e, _cls(_E + "HfHubHTTPError")) else None
    status = resp.status_code if resp is not None else 0
    facts = Facts(e, ctx, status)
    for rule in RULES:
        if not isinstance(e, _cls(rule.error)) or (rule.when is not None and not rule.when(facts)):
            continue
        if rule.unwrap:
            cause = e.__cause__ or e.__context__
            if cause is not None and not isinstance(cause, _cls(_E + "OfflineModeIsEnabled")):
                inner = map_error(cause, ctx)
                if inner is not None:
                    return inner
        message = rule.message.format(f=facts)
        if rule.usage:
            return UsageError(message, code=rule.code, hint=rule.hint)
        return HubError(message, code=rule.code, hint=rule.hint)
    return None


@functools.cache
def _cls(spec: str) -> type:
    """The class a "module:Class" spec names (huggingface_hub and httpx2 load on first use)."""
    module, _, name = spec.partition(":")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


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
