"""PEFT's adapter_config.json: the file names of a PEFT folder, and the config check.

``check_config`` validates a LoRA config (PEFT's, or the one diffusers stores in its header),
fills in PEFT's defaults for the fields loratool uses, and refuses what a LoRA file cannot carry
(DoRA, LoRA biases, trainable tokens, LoRA variants, inits that rewrite the base), naming the
feature. How ``rank_pattern``/``alpha_pattern`` and ``target_modules`` match module names is
PEFT's own matching, mirrored in ``naming``.
"""

from __future__ import annotations

import math
from typing import Any

from .. import constants as C
from ..errors import FormatError
from . import naming

FORMAT = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# Inits that rewrite the base weights: the saved adapter only works on that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# LoRA variants that change how PEFT applies the factors (each a config field, None when off).
_VARIANT_FIELDS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= C.MAX_RANK


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    """Validate a LoRA config dict (PEFT's or diffusers'), refusing what loratool cannot carry.

    Returns the config with PEFT's defaults filled in for the fields loratool uses.
    """

    def bad(message: str, code: str = "bad-config", hint: str | None = None) -> FormatError:
        return FormatError(message, code=code, where=where, hint=hint)

    if not isinstance(cfg, dict):
        raise bad("the adapter config is not a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise bad(
            f'peft_type is {peft_type!r}; loratool reads LoRA adapters (peft_type "LORA") only',
            code="peft-type",
            hint="AdaLoRA, IA3, prompt tuning and other PEFT methods have no LoRA equivalent",
        )
    out = dict(cfg)
    out.setdefault("r", 8)
    out.setdefault("lora_alpha", 8)
    if not _is_rank(out["r"]):
        raise bad(f"r must be an integer in 1..{C.MAX_RANK}, got {out['r']!r}")
    if not _is_number(out["lora_alpha"]):
        raise bad(f"lora_alpha must be a finite number, got {out['lora_alpha']!r}")
    for key, check, what in (
        ("rank_pattern", _is_rank, "an integer rank"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        pats = out.get(key) or {}
        if not isinstance(pats, dict):
            raise bad(f"{key} must be an object, got {type(pats).__name__}")
        for k, v in pats.items():
            for pattern in naming.composite_patterns(key, k):
                naming.check_pattern(pattern, what=key, where=where)
            if not check(v):
                raise bad(f"{key}[{k!r}] must be {what}, got {v!r}")
        out[key] = pats
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora"):
        if not isinstance(out.get(key, False), bool):
            raise bad(f"{key} must be true or false, got {out[key]!r}")

    targets = out.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() != naming.ALL_LINEAR:
            naming.check_pattern(targets, what="target_modules", where=where)
    elif targets is not None and (
        not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
    ):
        raise bad("target_modules must be a list of names or a regex string")
    excl = out.get("exclude_modules")
    if isinstance(excl, str):
        naming.check_pattern(excl, what="exclude_modules", where=where)
    elif excl is not None and not (
        isinstance(excl, list) and all(isinstance(e, str) for e in excl)
    ):
        raise bad("exclude_modules must be a list of names or a regex string")
    for key in ("modules_to_save", "layers_pattern"):
        value = out.get(key)
        values = [value] if isinstance(value, str) else value or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(f"{key} must be a list of names")
        for v in values:
            for pattern in naming.composite_patterns(key, v):
                naming.check_pattern(pattern, what=key, where=where)
    layers = out.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise bad("layers_to_transform must be an integer or a list of integers")

    # use_dora, lora_bias and trainable_token_indices are spec 1.1 features (peft_features).
    tokens = out.get("trainable_token_indices")
    if tokens is not None:
        lists = list(tokens.values()) if isinstance(tokens, dict) else [tokens]
        if isinstance(tokens, dict) and not all(isinstance(k, str) for k in tokens):
            raise bad("trainable_token_indices must map module names to lists of token ids")
        for ids in lists:
            if not (
                isinstance(ids, list)
                and len(ids) <= C.MAX_TOKENS
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
                and len(set(ids)) == len(ids)
            ):
                raise bad(
                    "trainable_token_indices must be a list of distinct token ids "
                    f"(at most {C.MAX_TOKENS}), or a dict of such lists"
                )
    if out.get("use_qalora"):
        raise bad(
            "the adapter is a QA-LoRA adapter (use_qalora): it pools inputs before lora_A",
            code="peft-variant",
        )
    for key, what in _VARIANT_FIELDS.items():
        if out.get(key):
            raise bad(
                f"the adapter uses {what}, which changes how PEFT applies it; loratool "
                "reads plain LoRA only",
                code="peft-variant",
            )
    init = out.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise bad(
            f"the adapter was initialised with {init!r}, which rewrites the base weights: "
            "it only works on that rewritten base",
            code="peft-variant",
            hint="save it with PEFT's save_pretrained(..., path_initial_model_for_weight_"
            "conversion=...) to get a plain LoRA of the original base",
        )
    return out
