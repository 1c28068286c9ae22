"""The settings of a training run: defaults, a YAML or TOML config file, flags over both.

A config file's keys are the long flag names, with dashes or underscores (``max-steps`` or
``max_steps``); a flag given on the command line wins over the file, and the file over the
defaults below. Unknown keys and values of the wrong type are usage errors naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "f32", "bf16")
QUANTIZE = ("nf4", "int8")
BIAS_MODES = ("none", "lora_only", "all")  # PEFT's bias= (mirrors lora.injection.BIAS_MODES)


@dataclass
class TrainConfig:
    """Every knob of ``loratool train``; the defaults are the command's defaults."""

    model: str = ""  # local HF directory or Hub id
    data: str = ""  # jsonl file
    output: str = ""  # adapter file to write (loratool format)
    revision: str | None = None  # Hub revision of --model (branch, tag or commit)
    # -- adapter: all-linear and alpha = 2·rank follow the QLoRA recipe (Dettmers et al. 2023)
    targets: str = "all-linear"
    rank: int = 16
    alpha: float | None = None  # None: 2 × rank
    dropout: float = 0.0  # PEFT's default; 0 skips the dropout op entirely
    rslora: bool = False  # scale α/√r instead of α/r
    # spec 1.1, PEFT's names: DoRA's magnitude, biases that train, whole modules, token rows
    dora: bool = False  # PEFT use_dora (Liu et al. 2024), the norm held constant (their §4.3)
    lora_bias: bool = False  # PEFT lora_bias: a trained bias on B (not with dora)
    bias: str = "none"  # none | lora_only | all (PEFT bias, loralib mark_only_lora_as_trainable)
    modules_to_save: str | None = None  # comma-separated name suffixes, trained whole
    trainable_tokens: str | None = None  # comma-separated ids of input-embedding rows that train
    # -- optimisation (AdamW on the LoRA factors only)
    lr: float = 2e-4
    weight_decay: float = 0.0  # transformers Trainer's default
    max_grad_norm: float = 1.0  # transformers Trainer's default; 0 turns clipping off
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when given
    batch_size: int = 4  # rows (packed sequences) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024  # tokens per row
    packing: bool = True
    warmup: float = 0.0  # steps if >= 1, else a fraction of all steps
    schedule: str = "cosine"
    # -- evaluation
    eval_data: str | None = None
    eval_split: float = 0.0  # fraction of --data records held out when no --eval-data
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    # -- execution
    grad_checkpointing: bool = False
    dtype: str = "auto"  # auto: bf16 where the device computes it natively, else f32
    device: str = "auto"  # auto: cuda (this process's local rank) if available, else cpu
    # QLoRA: frozen linear weights stored NF4 (double-quantised) or int8, computed in --dtype
    quantize: str | None = None
    fsdp: bool = False  # under torchrun: shard the frozen base across processes (FSDP2)
    seed: int = 0
    # -- checkpoints and logs
    save_every: int = 500  # steps; 0 saves only on Ctrl-C
    checkpoint_dir: str | None = None  # default: <output stem>-checkpoints beside the output
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint dir, or "latest" in --checkpoint-dir
    metrics: str | None = None  # JSON lines, one per step and per evaluation
    force: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    def checkpoint_root(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.with_name(out.stem + "-checkpoints")

    def validate(self) -> None:
        """Raise UsageError for a missing required setting or a value out of range."""
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                flag = "-o/--output" if key == "output" else f"--{key}"
                raise UsageError(
                    f"{flag} is required",
                    code="missing-option",
                    hint="give it as a flag or in the --config file",
                )
        positive = ("rank", "batch_size", "grad_accum", "seq_len", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) < 1:
                raise UsageError(
                    f"--{_flag(key)} must be at least 1, got {getattr(self, key)}", code="bad-value"
                )
        nonneg = ("lr", "weight_decay", "max_grad_norm", "warmup", "eval_every", "save_every")
        for key in nonneg:
            if getattr(self, key) < 0:
                raise UsageError(f"--{_flag(key)} must not be negative", code="bad-value")
        if self.seq_len < 2:
            raise UsageError("--seq-len must be at least 2", code="bad-value")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError("--max-steps must be at least 1", code="bad-value")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UsageError("--epochs must be positive", code="bad-value")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError("--dropout must be in [0, 1)", code="bad-value")
        if self.alpha is not None and not self.alpha > 0:
            raise UsageError("--alpha must be positive", code="bad-value")
        if self.dora and self.lora_bias:
            raise UsageError(
                "--dora and --lora-bias exclude each other (as PEFT)", code="bad-value"
            )
        if self.bias not in BIAS_MODES:
            raise UsageError(f"--bias must be one of {', '.join(BIAS_MODES)}", code="bad-value")
        self.token_ids()
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}", code="bad-value")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}", code="bad-value")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE)}", code="bad-value")
        if self.eval_data and self.eval_split:
            raise UsageError("give --eval-data or --eval-split, not both", code="bad-value")
        if self.eval_split and not 0.0 < self.eval_split < 1.0:
            raise UsageError("--eval-split must be in (0, 1)", code="bad-value")

    def token_ids(self) -> list[int] | None:
        """``--trainable-tokens`` as ids (None when not given)."""
        if self.trainable_tokens is None:
            return None
        try:
            ids = [int(x) for x in str(self.trainable_tokens).split(",") if x.strip()]
        except ValueError:
            ids = []
        if not ids or min(ids) < 0:
            raise UsageError(
                "--trainable-tokens must be comma-separated token ids, e.g. 0,1,49152",
                code="bad-value",
            )
        return ids

    def inject_options(self) -> dict[str, Any]:
        """The spec 1.1 keywords of ``lora.inject`` (PEFT's vocabulary)."""
        return {
            "dora": self.dora,
            "lora_bias": self.lora_bias,
            "bias": self.bias,
            "modules_to_save": [n for n in (self.modules_to_save or "").split(",") if n.strip()],
            "trainable_tokens": self.token_ids(),
        }

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that shape the result, as recorded in the adapter's provenance."""
        keep = (
            "targets",
            "rank",
            "dropout",
            "rslora",
            "lr",
            "weight_decay",
            "max_grad_norm",
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "packing",
            "warmup",
            "schedule",
            "eval_split",
            "grad_checkpointing",
            "seed",
        )
        out = {k: getattr(self, k) for k in keep}
        out["alpha"] = self.lora_alpha
        if self.quantize:  # only when set: the adapters of unquantised runs keep their keys
            out["quantize"] = self.quantize
        for key in ("dora", "lora_bias", "modules_to_save", "trainable_tokens"):  # likewise
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.bias != "none":
            out["bias"] = self.bias
        return dict(sorted(out.items()))


FIELDS = {f.name: f for f in fields(TrainConfig)}
ALIASES = {"o": "output"}
NOT_IN_FILE = ("resume",)  # a file describes a run; which checkpoint to resume is per invocation


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, where: str) -> Any:
    kind = str(FIELDS[key].type)
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise UsageError(f"key '{key}' must not be empty", code="bad-config", where=where)
    if key in ("targets", "modules_to_save", "trainable_tokens") and isinstance(value, list):
        value = ",".join(str(v) for v in value)
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(value, bool):
            raise TypeError  # true/false is not a number here
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if not isinstance(value, str | int | float):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        want = kind.split(" ")[0]
        raise UsageError(
            f"key '{key}' must be {want}, got {value!r}", code="bad-config", where=where
        ) from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as ``{field name: value}``, checked and coerced."""
    p = Path(path)
    where = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(
            f"cannot read config file: {e.strerror}", code="bad-config", where=where
        ) from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            raw: Any = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise UsageError(
                "config files end in .yaml, .yml or .toml", code="bad-config", where=where
            )
    except UsageError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"cannot parse config file: {first}", code="bad-config", where=where
        ) from None
    if not isinstance(raw, dict):
        raise UsageError(
            "a config file must be a mapping of flag names to values",
            code="bad-config",
            where=where,
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key), str(key).replace("-", "_"))
        if name not in FIELDS or name in NOT_IN_FILE:
            known = ", ".join(sorted(_flag(k) for k in FIELDS if k not in NOT_IN_FILE))
            raise UsageError(
                f"unknown key '{key}'",
                code="bad-config",
                where=where,
                hint=f"keys are the long flag names: {known}",
            )
        out[name] = _coerce(name, value, where)
    # Relative paths in a config file are relative to the file, not to where the command runs.
    for key in ("data", "eval_data", "output", "checkpoint_dir", "metrics"):
        if isinstance(out.get(key), str) and not os.path.isabs(out[key]):
            out[key] = str(p.parent / out[key])
    if isinstance(out.get("model"), str) and (p.parent / out["model"]).is_dir():
        out["model"] = str(p.parent / out["model"])
    return out


def build_config(file_values: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file's values, then the flags given on the command line."""
    merged = {**file_values, **flags}
    unknown = sorted(set(merged) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown settings: {', '.join(unknown)}", code="bad-config")
    config = dataclasses.replace(TrainConfig(), **merged)
    config.validate()
    return config
