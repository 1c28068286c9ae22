"""Training checkpoints: one atomic directory per step, no pickle, enough to resume exactly.

    <checkpoint dir>/step-00000040/
        adapter.safetensors    the LoRA factors in the loratool format (usable as an adapter)
        optimizer.safetensors  AdamW moments and step count per factor, keyed like the adapter
        rng.safetensors        every process's torch RNG states (CPU, and CUDA where used)
        state.json             step, token counts, elapsed time, data hashes, hyper-parameters

The data position needs no cursor: the row order of every epoch is a pure function of the seed,
so the global step says where the next batch starts. Directories are written through
``_io.atomic_dir``: a crash while saving leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from ..adapter import Adapter
from ..errors import TrainingError

MARKER = "loratool.train-checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass
class Saved:
    """What a checkpoint holds, read back."""

    path: Path
    state: dict[str, Any]
    factors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def save(
    root: Path,
    *,
    step: int,
    adapter: Adapter,
    optimizer: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-N`` atomically (replacing one of the same step), then prune to ``keep``."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    out = step_dir(root, step)
    with atomic_dir(out, force=True) as tmp:
        adapter.save(tmp / "adapter.safetensors")
        save_file({k: v.contiguous() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
        save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
        doc = {"format": MARKER, "version": VERSION, "step": step, **state}
        (tmp / "state.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load(path: Path) -> Saved:
    """Read a checkpoint directory, or raise TrainingError saying why it cannot resume."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..format import load as load_adapter

    where = str(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(
            f"not a training checkpoint ({e.__class__.__name__})",
            code="bad-checkpoint",
            where=where,
            hint="pass a step-N directory written by loratool train, or the folder holding them",
        ) from None
    if not isinstance(state, dict) or state.get("format") != MARKER:
        raise TrainingError(
            "not a loratool training checkpoint", code="bad-checkpoint", where=where
        )
    if state.get("version") != VERSION:
        raise TrainingError(
            f"checkpoint version {state.get('version')} is not supported",
            code="bad-checkpoint",
            where=where,
        )
    try:
        adapter = load_adapter(path / "adapter.safetensors", verify=True)
        factors = {k: v.clone() for k, v in adapter.state_dict().items()}
        optimizer = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, SafetensorError) as e:
        raise TrainingError(
            f"checkpoint is incomplete: {e}", code="bad-checkpoint", where=where
        ) from None
    return Saved(path, state, factors, optimizer, rng)


def remove_all(root: Path) -> None:
    """Delete the step-N directories under ``root`` (a fresh run with --force)."""
    for p in list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)


# -- what goes in and out of a checkpoint ---------------------------------------------------------


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """AdamW's state as ``{'<factor>.exp_avg' | '.exp_avg_sq' | '.step': tensor}`` on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"{name}.{key}"] = st[key].detach().cpu()
        if "step" in st:
            out[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def restore(
    saved: Saved, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
) -> None:
    """Copy the saved factors into ``params`` and the saved moments into ``optimizer``."""
    where = str(saved.path)
    with torch.no_grad():
        for name, p in params.items():
            if name not in saved.factors:
                raise TrainingError(
                    f"the checkpoint has no '{name}'", code="resume-mismatch", where=where
                )
            p.copy_(saved.factors[name].to(p.device, p.dtype))
    for name, p in params.items():
        if f"{name}.exp_avg" in saved.optimizer:
            optimizer.state[p] = {
                "step": saved.optimizer[f"{name}.step"].reshape(()).clone(),
                "exp_avg": saved.optimizer[f"{name}.exp_avg"].to(p.device),
                "exp_avg_sq": saved.optimizer[f"{name}.exp_avg_sq"].to(p.device),
            }


def find_resume(resume: str | None, root: Path) -> Saved | None:
    """The checkpoint ``--resume`` names: "latest" in ``root``, a step-N directory, or its folder."""
    if not resume:
        return None
    if resume == "latest":
        path = latest(root)
        if path is None:
            raise TrainingError(
                f"no checkpoint to resume in '{root}'",
                code="no-checkpoint",
                hint="run without --resume, or pass a checkpoint directory",
            )
    else:
        path = Path(resume)
        if path.is_dir() and not (path / "state.json").exists():
            path = latest(path) or path  # the folder that holds step-N directories
    return load(path)


# Settings that change what the saved state means; the others (lr, schedule, steps...) may change.
# dora .. trainable_tokens: the spec 1.1 parts the adapter holds (older checkpoints: None).
FIXED = (
    *("targets", "rank", "alpha", "rslora", "seed", "seq_len", "packing"),
    *("dora", "lora_bias", "bias", "modules_to_save", "trainable_tokens"),
)


@dataclass(frozen=True)
class ResumeRules:
    """What a trainer's checkpoint must share with the run that resumes it, and how to say so.

    ``batches`` is formatted with the checkpoint's and this run's rows a step and row counts.
    """

    fixed: tuple[str, ...] = FIXED
    task: str | None = None  # checkpoints of this task record it; None: the causal-LM trainer's
    batches: str = "{old} rows a step over {old_n} rows; now {new} over {new_n}"
    batches_hint: str = (
        "resume with the same --batch-size × --grad-accum × processes, --seq-len and --packing"
    )
    settings_hint: str | None = "resume with the settings it was trained with"


CAUSAL_LM = ResumeRules()


def check_resumable(saved: Saved, now: dict[str, Any], rules: ResumeRules = CAUSAL_LM) -> list[str]:
    """Raise TrainingError unless ``now`` (data hashes, batch plan, hyper-parameters) can resume
    ``saved``; return the hyper-parameters that changed harmlessly."""
    st, where = saved.state, str(saved.path)
    if rules.task is not None and st.get("task") != rules.task:
        raise TrainingError(
            f"the checkpoint is from a causal-LM run, not --task {rules.task}",
            code="resume-mismatch",
            where=where,
        )
    if st.get("data_sha256") != now["data_sha256"]:
        raise TrainingError(
            "the data file differs from the one this checkpoint trained on",
            code="resume-mismatch",
            where=where,
        )
    if (st.get("num_rows"), st.get("global_rows")) != (now["num_rows"], now["global_rows"]):
        shown = rules.batches.format(
            old=st.get("global_rows"),
            old_n=st.get("num_rows"),
            new=now["global_rows"],
            new_n=now["num_rows"],
        )
        raise TrainingError(
            f"the batches differ from the checkpoint's ({shown})",
            code="resume-mismatch",
            where=where,
            hint=rules.batches_hint,
        )
    old, new = st.get("hyperparameters", {}), now["hyperparameters"]
    bad = [k for k in rules.fixed if old.get(k) != new.get(k)]
    if bad:
        raise TrainingError(
            f"the checkpoint was trained with other {', '.join(bad)}",
            code="resume-mismatch",
            where=where,
            hint=rules.settings_hint,
        )
    return [k for k in new if k not in rules.fixed and old.get(k) != new.get(k)]
