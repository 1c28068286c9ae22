"""Share adapters on the Hugging Face Hub: push (one commit), pull (cache, verify), remote headers.

Everything goes through ``huggingface_hub.HfApi(endpoint=...)`` with the endpoint resolved at
call time (argument, else ``$HF_ENDPOINT`` now, else the library's import-time default), never
through the module-level helpers or ``ModelCard.push_to_hub``, which keep the endpoint seen when
huggingface_hub was imported (shared/notes/hub.md §0.3).

A push uploads, in one commit: the adapter in loratool's format as ``adapter.safetensors``
(a fixed name, so ``pull`` and PEFT-style tooling find it without listing the repo, and so a
later push replaces it instead of adding a second file), PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` (unless ``peft=False``) and the README model card. Pushing the same
adapter again makes no commit: the Hub's ``preupload`` answer carries each remote file's oid, and
huggingface_hub drops files whose local oid matches and skips a commit left empty; the card is
rendered from the adapter alone, so it matches too (``PushReport.committed`` tells).

A pull downloads through the standard cache (``hf_hub_download``), verifies format and integrity,
converts PEFT and kohya files the way ``convert`` does, and writes atomically. File names from a
repo are checked before use and never become output paths.

huggingface_hub is imported inside functions: ``import loratool`` and local ``inspect`` stay light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import constants as C
from .adapter import Adapter, BaseBinding
from .card import TASK_TYPES, CardFiles, guess_task_type, is_hub_id, render_card
from .errors import FormatError, HubError, LoratoolError, UsageError

if TYPE_CHECKING:
    import torch
    from huggingface_hub import HfApi

    from .format import Header
    from .sources import Opened

ADAPTER_FILE = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
CARD_FILE = "README.md"
HF_SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"

_AUTH_HINT = (
    "set HF_TOKEN, run `hf auth login` (formerly `huggingface-cli login`), or pass --token; "
    "the token needs write access to push"
)
_WRITE_ACTIONS = ("push to", "create", "create branch")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# One path component that is safe as a cache file name: the Hub's ETags are a git sha1 or a
# sha256; we accept any plain token, never "/" or "..".
_ETAG_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,128}$")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass
class PushReport:
    """What ``push`` did. ``committed`` is False when nothing changed and no commit was made."""

    repo_id: str
    revision: str
    commit: str
    commit_url: str
    committed: bool
    created_repo: bool
    created_branch: bool
    private: bool
    files: list[str]
    changed: list[str]
    deleted: list[str]
    base_model: str | None
    library_name: str
    task_type: str | None
    endpoint: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        # Field by field: asdict() would deep-copy the adapter and its tensors.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapter"}


# ---------------------------------------------------------------------------------------------
# Small helpers: endpoint, ids, names, secrets


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


def _is_safe_repo_path(name: object) -> bool:
    if not isinstance(name, str):
        return False
    try:
        check_repo_path(name)
    except UsageError:
        return False
    return True


class _Secrets:
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


def _api(endpoint: str, token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    from . import __version__

    return HfApi(
        endpoint=endpoint, token=token, library_name="loratool", library_version=__version__
    )


# ---------------------------------------------------------------------------------------------
# Error mapping: huggingface_hub / httpx2 exceptions -> HubError (exit 5), one line and a hint


@dataclass
class _Ctx:
    endpoint: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    action: str = "talk to"
    secrets: _Secrets | None = None
    authenticated: bool = False

    @property
    def where(self) -> str:
        if not self.repo_id:
            return self.endpoint
        ref = f"@{self.revision}" if self.revision else ""
        path = f"/{self.filename}" if self.filename else ""
        return f"{self.repo_id}{ref}{path}"


@contextlib.contextmanager
def _hub_errors(ctx: _Ctx) -> Iterator[None]:
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


def _map_error(e: BaseException, ctx: _Ctx) -> LoratoolError | None:
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


@contextlib.contextmanager
def _client_output(*, progress: bool) -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------
# push


def push(
    adapter_path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    peft: bool = True,
    token: str | None = None,
    base_model: str | None = None,
    task_type: str | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> PushReport:
    """Upload an adapter, its PEFT twin and a model card to ``repo_id`` in one commit.

    ``adapter_path`` is anything ``open_adapter`` reads. ``base_model`` sets (or overrides) the
    base model's Hub id in the card, the PEFT config and the uploaded adapter's binding; without
    one, the card leaves ``base_model`` out and ``PushReport.warnings`` says so. ``revision`` is a
    branch, created from ``main`` when missing. ``progress`` shows huggingface_hub's bars.
    """
    from . import __version__
    from .sources import open_adapter

    repo_id, revision = split_ref(repo_id, revision)
    branch = revision or "main"
    if _COMMIT_RE.match(branch) or branch.startswith("refs/"):
        raise UsageError(
            f"cannot push to '{branch}': push needs a branch name",
            code="bad-revision",
            hint="pass --revision BRANCH (created from main if missing)",
        )
    if base_model is not None and not is_hub_id(base_model):
        raise UsageError(
            f"--base-model {base_model!r} is not a Hub model id",
            code="bad-base-model",
            hint="use the base model's id on the Hub, e.g. HuggingFaceTB/SmolLM2-135M-Instruct; "
            "a local path cannot be linked",
        )
    if task_type is not None and task_type not in TASK_TYPES:
        raise UsageError(
            f"unknown task type {task_type!r}",
            code="bad-task-type",
            hint="one of " + ", ".join(TASK_TYPES),
        )
    if message is not None and not message.strip():
        raise UsageError("the commit message is empty", code="bad-message")

    opened = open_adapter(adapter_path)
    adapter = opened.adapter
    if opened.header is not None:
        from .format import check_data

        check_data(opened.header)  # rules 21-22: never publish a corrupt file
    warnings: list[str] = []
    binding = adapter.binding()
    hub_id = base_model or binding.hub_id
    if hub_id is not None and not is_hub_id(hub_id):
        warnings.append(
            f"the adapter's base model '{hub_id}' is not a Hub id (a local path?): it is not "
            "uploaded, and the card names no base model; pass --base-model ORG/NAME to link it"
        )
        hub_id = None
    elif hub_id is None:
        warnings.append(
            "the adapter names no base model on the Hub: the card leaves base_model out; "
            "pass --base-model ORG/NAME to link it"
        )
    new_binding = BaseBinding(
        binding.fingerprint,
        hub_id,
        binding.revision if hub_id == binding.hub_id else None,
        dict(binding.extra),
    )
    task = task_type or guess_task_type(adapter)
    # library_name picks the Hub's integration: "peft" counts downloads by adapter_config.json and
    # shows a "Use in PEFT" snippet built from it, so without the PEFT files it would advertise a
    # snippet that cannot work; "loratool" then says which tool reads the repo.
    library_name = "peft" if peft else "loratool"

    ep = resolve_endpoint(endpoint)
    if is_offline():
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
            code="offline",
            hint="unset HF_HUB_OFFLINE to reach the Hub",
        )
    secrets = _Secrets(token)
    api = _api(ep, token)
    authenticated = _has_token(api)
    ctx = _Ctx(ep, repo_id, branch, None, "push to", secrets, authenticated)

    with tempfile.TemporaryDirectory(prefix="loratool-push-") as tmp_name:
        tmp = Path(tmp_name)
        local: dict[str, Path] = {}
        # Our format: the file's own bytes when they already say what we upload (so a pull is
        # byte-identical to the input), else canonical bytes with the binding we publish.
        if opened.format == "loratool" and new_binding.header() == binding.header():
            local[ADAPTER_FILE] = Path(opened.path)
            sha256 = adapter.sha256
        else:
            from .format import read_header, save

            adapter.base = new_binding
            save(adapter, tmp / ADAPTER_FILE)
            local[ADAPTER_FILE] = tmp / ADAPTER_FILE
            adapter = read_header(tmp / ADAPTER_FILE).adapter  # what we upload, lazily read
            sha256 = adapter.sha256
        files = CardFiles(ADAPTER_FILE)
        if peft:
            from .convert.peft import write_peft

            peft_dir = tmp / "peft"
            try:
                write_peft(adapter, peft_dir, force=True, base_model=hub_id, task_type=task)
            except LoratoolError as e:
                e.hint = (e.hint + "; " if e.hint else "") + "or push with --no-peft"
                raise
            for name in (PEFT_CONFIG, PEFT_WEIGHTS):
                if not (peft_dir / name).is_file():  # pragma: no cover - write_peft's contract
                    raise LoratoolError(f"write_peft did not produce {name}", code="peft-export")
                local[name] = peft_dir / name
            files = CardFiles(ADAPTER_FILE, PEFT_CONFIG, PEFT_WEIGHTS)
        card = render_card(
            adapter,
            repo_id=repo_id,
            base_model=hub_id,
            library_name=library_name,
            task_type=task,
            files=files,
            revision=branch,
            sha256=sha256,
            loratool_version=__version__,
        )
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        local[CARD_FILE] = tmp / CARD_FILE

        with _client_output(progress=progress), _hub_errors(ctx):
            return _push_files(
                api,
                repo_id,
                branch=branch,
                private=private,
                local=local,
                remove_peft=not peft,
                message=message
                or f"Upload LoRA adapter ({len(adapter.targets)} targets) with loratool",
                ctx=ctx,
                report=dict(
                    base_model=hub_id,
                    library_name=library_name,
                    task_type=task,
                    endpoint=ep,
                    warnings=warnings,
                ),
            )


def _push_files(
    api: HfApi,
    repo_id: str,
    *,
    branch: str,
    private: bool,
    local: dict[str, Path],
    remove_peft: bool,
    message: str,
    ctx: _Ctx,
    report: dict[str, Any],
) -> PushReport:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    created_repo = created_branch = False
    ctx.action = "read"
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        ctx.action = "create"
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.repo_info(repo_id)
        created_repo = True
    if private and not info.private:
        raise HubError(
            f"{repo_id} already exists and is public; --private cannot make it private",
            code="visibility",
            hint="change its visibility in the repo settings on the Hub, or push without --private",
        )
    ctx.action = "read"
    try:
        head = api.repo_info(repo_id, revision=branch).sha
    except RevisionNotFoundError:
        ctx.action = "create branch"
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        created_branch = True
    if not head:
        raise HubError(
            f"{ctx.endpoint} sent no commit id for {repo_id}@{branch}",
            code="not-a-hub",
            hint="check HF_ENDPOINT: it must point to a Hub-compatible server",
        )

    # A push without PEFT files must not leave an older push's PEFT weights behind: they would
    # disagree with the adapter next to them.
    deletes: list[str] = []
    if remove_peft:
        ctx.action = "list"
        remote = set(api.list_repo_files(repo_id, revision=head))
        deletes = [n for n in (PEFT_CONFIG, PEFT_WEIGHTS, "adapter_model.bin") if n in remote]

    def operations() -> list[Any]:  # fresh objects per attempt: huggingface_hub mutates them
        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in local.items()
        ]
        return ops + [CommitOperationDelete(path_in_repo=n) for n in deletes]

    ctx.action = "push to"
    ops = operations()
    try:
        info_commit = api.create_commit(
            repo_id, operations=ops, commit_message=message, revision=branch, parent_commit=head
        )
    except ConnectionError as e:
        # huggingface_hub sends every "lfs" file through Xet when hf_xet is installed and has no
        # fallback (shared/notes/hub.md §0.2); a server without Xet (a mirror, a self-hosted
        # Hub) refuses the token. Nothing was committed: retry once through git-LFS.
        if "xet-write-token" not in str(e):
            raise
        report["warnings"].append(
            f"{ctx.endpoint} does not accept Xet uploads; uploaded through git-LFS instead "
            "(set HF_HUB_DISABLE_XET=1 to skip the Xet attempt)"
        )
        ops = operations()
        with _xet_disabled():
            info_commit = api.create_commit(
                repo_id, operations=ops, commit_message=message, revision=branch, parent_commit=head
            )
    oid = info_commit.oid
    committed = oid != head
    changed = [op.path_in_repo for op in ops if isinstance(op, CommitOperationAdd) and _changed(op)]
    return PushReport(
        repo_id=repo_id,
        revision=branch,
        commit=oid,
        commit_url=info_commit.commit_url,
        committed=committed,
        created_repo=created_repo,
        created_branch=created_branch,
        private=bool(info.private),
        files=sorted(local),
        changed=sorted(changed) if committed else [],
        deleted=sorted(deletes) if committed else [],
        **report,
    )


@contextlib.contextmanager
def _xet_disabled() -> Iterator[None]:
    """What HF_HUB_DISABLE_XET=1 does, for one call: huggingface_hub reads the flag per upload."""
    from huggingface_hub import constants as hf_constants

    saved = hf_constants.HF_HUB_DISABLE_XET
    hf_constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_DISABLE_XET = saved


def _changed(op: Any) -> bool:
    """Whether huggingface_hub found this file different from the remote one (its no-op test)."""
    try:
        remote = op._remote_oid
        return remote is None or remote != op._local_oid
    except Exception:  # private attributes of CommitOperationAdd: if they move, say "changed"
        return True


def _has_token(api: HfApi) -> bool:
    if api.token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # pragma: no cover - a broken token file is not our error to raise here
        return False


# ---------------------------------------------------------------------------------------------
# pull


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
) -> PullReport:
    """Download an adapter through the Hugging Face cache, verify it, and write it to ``out``.

    ``repo_id`` may carry ``@REVISION``. Without ``filename`` the repo's files pick the format:
    ``adapter.safetensors`` (loratool), else ``adapter_config.json`` + ``adapter_model.safetensors``
    (PEFT), else its only top-level ``.safetensors`` file (kohya and other formats ``convert``
    reads). loratool files are verified (rules 1-22) and written byte for byte; other formats are
    converted and written in loratool's format. With ``out=None`` nothing is written and the
    report's ``adapter`` holds the result. Offline (HF_HUB_OFFLINE) it reads only the cache.
    """
    from ._io import check_output

    repo_id, revision = split_ref(repo_id, revision)
    rev = revision or "main"
    if filename is not None:
        check_repo_path(filename, what="--filename")
    if out is not None:
        check_output(out, force=force)
    ep = resolve_endpoint(endpoint)
    offline = is_offline()
    secrets = _Secrets(token)
    api = _api(ep, token)
    ctx = _Ctx(ep, repo_id, rev, filename, "download", secrets, _has_token(api))

    with _client_output(progress=progress), _hub_errors(ctx):
        if filename is not None:
            wanted = [filename]
            if filename.rsplit("/", 1)[-1] == PEFT_WEIGHTS:
                wanted = [_sibling(filename, PEFT_CONFIG), filename]
        elif offline:
            wanted = _choose_offline(api, repo_id, rev, cache_dir)
        else:
            # The revision first (one request, not retried by the client: a missing repo or
            # revision, or a dead server, fails fast), then the listing at that exact commit.
            ctx.action = "read"
            sha = api.repo_info(repo_id, revision=rev).sha
            ctx.action = "list files of"
            names = list(api.list_repo_files(repo_id, revision=sha or rev))
            wanted = _choose(repo_id, rev, names)
        ctx.action = "download"
        paths: dict[str, str] = {}
        commit: str | None = None
        for name in wanted:
            ctx.filename = name
            # The PEFT config beside a --filename of PEFT weights is optional.
            optional = filename is not None and name != filename
            try:
                path = _download(
                    api, repo_id, name, rev if commit is None else commit, offline, cache_dir
                )
            except Exception as e:
                from huggingface_hub.errors import EntryNotFoundError

                if optional and isinstance(e, EntryNotFoundError):
                    continue
                raise
            paths[name] = path
            snap = _snapshot_commit(path)
            if commit is not None and snap != commit:  # pragma: no cover - cache layout guard
                raise HubError(f"{name} came from commit {snap}, not {commit}", code="inconsistent")
            commit = snap
    main_name = wanted[-1]
    main_path = paths[main_name]
    assert commit is not None
    adapter, fmt, sha256, src = _open_pulled(main_path, paths, where=f"{repo_id}@{rev}/{main_name}")
    converted = fmt != "loratool"
    if converted:
        adapter.provenance = dict(adapter.provenance)
        adapter.provenance.setdefault(
            "hub", {"repo_id": repo_id, "revision": rev, "commit": commit, "files": sorted(paths)}
        )
    written: str | None = None
    if out is not None:
        if converted:
            from .format import read_header, save

            save(adapter, out, force=force)
            sha256 = read_header(out).adapter.sha256
        else:
            from ._io import atomic_write

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
    )


def _sibling(path: str, name: str) -> str:
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    return f"{folder}/{name}" if folder else name


def _choose(repo_id: str, rev: str, names: list[Any]) -> list[str]:
    """Which files to fetch, from a listing we do not trust (names are checked, then matched)."""
    safe = [n for n in names if _is_safe_repo_path(n)]
    unsafe = [n for n in names if not _is_safe_repo_path(n)]
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


def _choose_offline(
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
    if not _COMMIT_RE.match(rev) and ref.is_file():
        commit = ref.read_text(errors="replace").strip()
    snapshot = root / "snapshots" / commit
    names: list[str] = []
    if _COMMIT_RE.match(commit) and snapshot.is_dir():
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        return _choose(repo_id, rev, names)
    except HubError as e:
        if e.code != "no-adapter":
            raise
        raise HubError(
            f"{repo_id}@{rev} has no adapter in the local cache, and offline mode is on "
            "(HF_HUB_OFFLINE)",
            code="not-cached",
            hint="pull it once while online, or unset HF_HUB_OFFLINE",
        ) from None


def _download(
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
        if not _ETAG_RE.match(etag) or etag in (".", "..") or not _COMMIT_RE.match(commit):
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


def _snapshot_commit(path: str) -> str:
    """The commit a cache path belongs to: .../snapshots/<commit>/<file>."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _COMMIT_RE.match(parts[i + 1]):
            return parts[i + 1]
    return "unknown"


def _open_pulled(
    main_path: str, paths: dict[str, str], *, where: str
) -> tuple[Adapter, str, str | None, str]:
    """Verify a loratool file (rules 1-22), or read another format the way ``convert`` does."""
    from .format import check_data, is_pickle, read_header
    from .sources import open_adapter

    if is_pickle(main_path):
        raise FormatError(
            "this is a pickle file; loratool never opens those", code="pickle", where=where
        )
    try:
        header = read_header(main_path)
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
                    f"the file on the Hub, or its copy in the cache ({main_path}), is corrupt: "
                    "delete the cached copy and pull again; if that fails, tell the repo's author"
                )
            raise
        return header.adapter, "loratool", header.adapter.sha256, main_path
    # PEFT: open the snapshot folder that holds adapter_config.json next to the weights.
    src = main_path
    if Path(main_path).name == PEFT_WEIGHTS and any(
        n.rsplit("/", 1)[-1] == PEFT_CONFIG for n in paths
    ):
        src = str(Path(main_path).parent)
    opened = open_adapter(src)
    return opened.adapter, opened.format, None, src


def _chunks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


# ---------------------------------------------------------------------------------------------
# hf:// — read an adapter's header with HTTP range requests


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
    from . import __version__
    from .format import Header, _adapter_from, parse_container
    from .sources import Opened, open_adapter

    repo_id, revision, filename = parse_hf_uri(uri)
    rev = revision or "main"
    ep = resolve_endpoint(endpoint)
    secrets = _Secrets(token)
    api = _api(ep, token)
    ctx = _Ctx(ep, repo_id, rev, filename, "read", secrets, _has_token(api))

    if is_offline():
        with _client_output(progress=False), _hub_errors(ctx):
            local = api.hf_hub_download(repo_id, filename, revision=rev, local_files_only=True)
        opened = open_adapter(str(local))
        opened.path = uri
        return opened

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, filename, revision=rev, endpoint=ep)
    headers = build_hf_headers(token=token, library_name="loratool", library_version=__version__)
    with _hub_errors(ctx):
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
        adapter = _adapter_from(tensors, meta, uri)
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
    api: HfApi, repo_id: str, rev: str, filename: str, uri: str, ctx: _Ctx
) -> Opened:
    from huggingface_hub.errors import EntryNotFoundError

    from .sources import open_adapter

    with _client_output(progress=False), _hub_errors(ctx):
        path = _download(api, repo_id, filename, rev, False, None)
        src = path
        if filename.rsplit("/", 1)[-1] == PEFT_WEIGHTS:
            with contextlib.suppress(EntryNotFoundError):
                _download(api, repo_id, _sibling(filename, PEFT_CONFIG), rev, False, None)
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

    def __init__(self, url: str, headers: dict[str, str], header: Header, ctx: _Ctx) -> None:
        self.url, self.headers, self.header, self.ctx = url, headers, header, ctx

    def __call__(self, name: str) -> torch.Tensor:
        import torch

        from .format import torch_dtype

        info = self.header.tensors[name]
        start = self.header.data_start + info.begin
        size = info.end - info.begin
        if size == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        with _hub_errors(self.ctx):
            data, _ = _read_range(self.url, self.headers, start, start + size)
        if len(data) != size:
            raise FormatError(
                f"tensor '{name}' ends past the end of the remote file",
                code="truncated",
                where=self.header.path,
            )
        return torch.frombuffer(bytearray(data), dtype=torch_dtype(info.dtype)).reshape(info.shape)
