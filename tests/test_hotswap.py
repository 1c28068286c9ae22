"""HotSwap: merged switches restore the base bit for bit; unmerged computes what attach does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loratool import Adapter, CompatibilityError, UsageError, lora
from loratool.serving.hotswap import HotSwap


def _model(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


def random_adapter(path: Path, *, seed: int, rank: int = 4, targets: str = "all-linear") -> Adapter:
    """An adapter for the model at ``path`` with random, clearly non-zero factors."""
    model = _model(path)
    lora.inject(model, targets=targets, rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return lora.extract_adapter(model)


def _ids() -> torch.Tensor:
    return torch.arange(5, 29).reshape(2, 12)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=_ids()).logits
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merged_switching_restores_the_base_bit_for_bit(
    tiny_llama_dir: Path, dtype: torch.dtype
) -> None:
    a = random_adapter(tiny_llama_dir, seed=1)
    b = random_adapter(tiny_llama_dir, seed=2, rank=2, targets="q_proj,v_proj,down_proj")
    model = _model(tiny_llama_dir, dtype)
    base = _snapshot(model)
    swap = HotSwap(model, merged=True)
    swap.load("a", a)
    swap.load("b", b)
    kept = []
    for spec in ["a", "b", {"a": 0.5, "b": -1.0}, "a", None, "b", None]:
        report = swap.activate(spec)
        kept.append(report.corrections)
        if spec is not None:
            assert not torch.equal(
                model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                base["model.layers.0.self_attn.q_proj.weight"],
            )
        swap.activate(None)
        _assert_bitwise(model, base)
    if dtype == torch.bfloat16:
        assert max(kept) > 0  # rounding does destroy bits; the corrections put them back
    swap.activate("a")
    swap.close()
    _assert_bitwise(model, base)


def test_merged_equals_unmerged_and_attach_up_to_rounding(tiny_llama_dir: Path) -> None:
    a = random_adapter(tiny_llama_dir, seed=3)
    ref = _model(tiny_llama_dir)
    lora.attach(ref, a)
    want = _logits(ref)
    merged = HotSwap(_model(tiny_llama_dir), merged=True)
    merged.load("a", a)
    merged.activate("a")
    torch.testing.assert_close(_logits(merged.model), want, rtol=1e-4, atol=1e-4)


def test_unmerged_single_adapter_computes_exactly_what_attach_computes(
    tiny_llama_dir: Path,
) -> None:
    a = random_adapter(tiny_llama_dir, seed=4)
    b = random_adapter(tiny_llama_dir, seed=5, rank=8, targets="q_proj,k_proj")
    model = _model(tiny_llama_dir)
    base_logits = _logits(model)
    swap = HotSwap(model)
    swap.load("a", a)
    swap.load("b", b)
    for name, adapter in [("a", a), ("b", b), ("a", a)]:
        swap.activate(name)
        ref = _model(tiny_llama_dir)
        lora.attach(ref, adapter)
        assert torch.equal(_logits(model), _logits(ref))
    swap.activate(None)
    assert not list(lora.lora_layers(model))
    assert torch.equal(_logits(model), base_logits)


def test_unmerged_mix_is_the_weighted_sum_of_deltas(tiny_llama_dir: Path) -> None:
    a = random_adapter(tiny_llama_dir, seed=6)
    b = random_adapter(tiny_llama_dir, seed=7, rank=2, targets="q_proj,v_proj")
    mix = {"a": 0.25, "b": 1.5}
    unmerged = HotSwap(_model(tiny_llama_dir))
    merged = HotSwap(_model(tiny_llama_dir, torch.float64), merged=True)
    for swap in (unmerged, merged):
        swap.load("a", a)
        swap.load("b", b)
        swap.activate(mix)
    assert unmerged.active == mix
    torch.testing.assert_close(
        _logits(unmerged.model).double(), _logits(merged.model), rtol=1e-4, atol=1e-4
    )


def test_unload_of_the_active_adapter_switches_to_the_rest(tiny_llama_dir: Path) -> None:
    a = random_adapter(tiny_llama_dir, seed=8)
    model = _model(tiny_llama_dir, torch.bfloat16)
    base = _snapshot(model)
    swap = HotSwap(model, merged=True)
    swap.load("a", a)
    swap.activate("a")
    swap.unload("a")
    assert swap.active == {} and swap.names == []
    _assert_bitwise(model, base)


def test_bad_names_and_misfits_are_refused_before_anything_changes(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    model = _model(tiny_llama_dir)
    base = _snapshot(model)
    swap = HotSwap(model, merged=True)
    with pytest.raises(CompatibilityError) as e:
        swap.load("g", random_adapter(tiny_gpt2_dir, seed=1))
    assert e.value.code == "missing-module"
    a = random_adapter(tiny_llama_dir, seed=9)
    swap.load("a", a)
    with pytest.raises(UsageError, match="already loaded"):
        swap.load("a", a)
    with pytest.raises(UsageError) as u:
        swap.activate({"a": 1.0, "nope": 1.0})
    assert u.value.code == "no-such-adapter"
    with pytest.raises(UsageError):
        swap.load("has space", a)
    _assert_bitwise(model, base)
    attached = _model(tiny_llama_dir)
    lora.attach(attached, a)
    with pytest.raises(UsageError) as already:
        HotSwap(attached)
    assert already.value.code == "already-attached"


def test_a_fingerprint_that_differs_is_refused(tiny_llama_dir: Path) -> None:
    a = random_adapter(tiny_llama_dir, seed=10)
    assert a.base is not None
    a.base.fingerprint = "sha256:" + "0" * 64
    swap = HotSwap(_model(tiny_llama_dir))
    with pytest.raises(CompatibilityError) as e:
        swap.load("a", a)
    assert e.value.code == "fingerprint-mismatch"
