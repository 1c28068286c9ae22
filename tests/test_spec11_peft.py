"""Spec 1.1 against PEFT itself: DoRA, trainable tokens and modules_to_save adapters made by PEFT
convert to loratool and back with PEFT's outputs, merge gives PEFT's unmerged outputs, and a
reversible unmerge restores the base bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import loratool
from loratool.convert.core import convert

pytest.importorskip("peft")

CASES: dict[str, dict[str, Any]] = {
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[7, 5]),
    "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["norm", "gate_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_variant_round_trip_merge_unmerge(
    case: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = str(tiny_llama_dir)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2]])
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case]),
    )
    with torch.no_grad():  # move the trained extras off their initial values
        for n, p in pm.named_parameters():
            if any(k in n for k in ("lora_magnitude", "trainable_tokens", "modules_to_save")):
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(ids).logits
    convert(tmp_path / "peft", tmp_path / "a.safetensors", base=base)
    convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "back")
    with torch.no_grad():
        assert float((back.eval()(ids).logits - ref).abs().max()) <= 1e-5
    loratool.merge(base, [tmp_path / "a.safetensors"], tmp_path / "merged", reversible=True)
    shutil.copy(Path(base) / "config.json", tmp_path / "merged" / "config.json")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert float((merged(ids).logits - ref).abs().max()) <= 1e-5
    loratool.unmerge(tmp_path / "merged", [tmp_path / "a.safetensors"], tmp_path / "unmerged")
    want = load_file(Path(base) / "model.safetensors")
    got = load_file(tmp_path / "unmerged" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
