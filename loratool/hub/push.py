"""push: upload an adapter, its PEFT twin and a model card to a Hub repo in one commit.

A push uploads, in one commit: the adapter in loratool's format as ``adapter.safetensors``
(a fixed name, so ``pull`` and PEFT-style tooling find it without listing the repo, and so a
later push replaces it instead of adding a second file), PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` (unless ``peft=False``) and the README model card. Pushing the same
adapter again makes no commit: the Hub's ``preupload`` answer carries each remote file's oid, and
huggingface_hub drops files whose local oid matches and skips a commit left empty; the card is
rendered from the adapter alone, so it matches too (``PushReport.committed`` tells).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import BaseBinding
from ..card import TASK_TYPES, CardFiles, guess_task_type, is_hub_id, render_card
from ..errors import HubError, LoratoolError, UsageError
from .common import (
    ADAPTER_FILE,
    CARD_FILE,
    COMMIT_RE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    client_output,
    connect,
    is_offline,
    resolve_endpoint,
    split_ref,
)
from .errors import CallContext, hub_errors

if TYPE_CHECKING:
    from huggingface_hub import HfApi


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
    base: str | os.PathLike[str] | None = None,
) -> PushReport:
    """Upload an adapter, its PEFT twin and a model card to ``repo_id`` in one commit.

    ``base`` (a local base model) gives the PEFT twin what only the base knows: PEFT stores
    trained biases as values (the base's plus the adapter's deltas, spec 1.1 §3.5).

    ``adapter_path`` is anything ``open_adapter`` reads. ``base_model`` sets (or overrides) the
    base model's Hub id in the card, the PEFT config and the uploaded adapter's binding; without
    one, the card leaves ``base_model`` out and ``PushReport.warnings`` says so. ``revision`` is a
    branch, created from ``main`` when missing. ``progress`` shows huggingface_hub's bars.
    """
    from .. import __version__
    from ..sources import open_adapter

    repo_id, revision = split_ref(repo_id, revision)
    branch = revision or "main"
    if COMMIT_RE.match(branch) or branch.startswith("refs/"):
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
        from ..format import check_data

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
    # An image model's adapter (diffusers names, conv/LoHa/LoKr kinds) is loaded with diffusers.
    from ..convert.sd_names import is_image_adapter

    image = is_image_adapter(adapter.targets.values())
    library_name = "diffusers" if image else "peft" if peft else "loratool"

    ep = resolve_endpoint(endpoint)
    if is_offline():
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
            code="offline",
            hint="unset HF_HUB_OFFLINE to reach the Hub",
        )
    api, ctx = connect(ep, token, repo_id, branch, None, "push to")

    with tempfile.TemporaryDirectory(prefix="loratool-push-") as tmp_name:
        tmp = Path(tmp_name)
        local: dict[str, Path] = {}
        # Our format: the file's own bytes when they already say what we upload (so a pull is
        # byte-identical to the input), else canonical bytes with the binding we publish.
        if opened.format == "loratool" and new_binding.header() == binding.header():
            local[ADAPTER_FILE] = Path(opened.path)
            sha256 = adapter.sha256
        else:
            from ..format import read_header, save

            adapter.base = new_binding
            save(adapter, tmp / ADAPTER_FILE)
            local[ADAPTER_FILE] = tmp / ADAPTER_FILE
            adapter = read_header(tmp / ADAPTER_FILE).adapter  # what we upload, lazily read
            sha256 = adapter.sha256
        files = CardFiles(ADAPTER_FILE)
        if peft:
            from ..convert.peft import write_peft

            peft_dir = tmp / "peft"
            lyco = [t.kind in ("loha", "lokr") for t in adapter.targets.values()]
            try:
                if lyco and all(lyco):  # a PEFT LoHaConfig/LoKrConfig folder
                    from ..convert.peft_lycoris import write_peft_lycoris

                    write_peft_lycoris(adapter, peft_dir, force=True)
                else:
                    if base is not None:  # bias values need the base's biases
                        from ..checkpoint import Checkpoint
                        from ..convert.peft_features import complete

                        complete(adapter, Checkpoint(base))
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

        with client_output(progress=progress), hub_errors(ctx):
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
    ctx: CallContext,
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
