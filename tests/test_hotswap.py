"""HotSwap: merged switches restore the base bit for bit; unmerged computes what attach does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loratool import Adapter, CompatibilityError, UsageError, lora
from loratool.serving.hotswap import HotSwap
from loratool.serving.inplace import RestoreError, int_view, merge_inplace, unmerge_inplace


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


def test_switching_between_mixes_without_the_base_in_between(tiny_llama_dir: Path) -> None:
    a = random_adapter(tiny_llama_dir, seed=11)
    b = random_adapter(tiny_llama_dir, seed=12, rank=2, targets="q_proj,v_proj,down_proj")
    model = _model(tiny_llama_dir, torch.bfloat16)
    base = _snapshot(model)
    ref = HotSwap(_model(tiny_llama_dir, torch.bfloat16), merged=True)
    swap = HotSwap(model, merged=True)
    for s in (swap, ref):
        s.load("a", a)
        s.load("b", b)
    for spec in [{"a": 0.5, "b": -1.0}, "a", {"a": 2.0}, {"b": 0.25, "a": 0.75}, "b"]:
        swap.activate(spec)  # straight from the previous mix: unmerge it, merge this one
        ref.activate(None)
        ref.activate(spec)  # the same mix merged onto the pristine base
        _assert_bitwise(swap.model, _snapshot(ref.model))
    swap.activate(None)
    _assert_bitwise(model, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_inplace_round_trip_is_exact_over_many_blocks(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(700, 1000, generator=g) * 0.05).to(dtype)  # several CPU blocks of rows
    W[3] = -0.0  # −0 + 0 rounds to +0: the bit compare must catch it
    left = torch.randn(700, 8, generator=g) * 0.1
    left[3] = 0.0
    right = torch.randn(8, 1000, generator=g) * 0.1
    want_merged = (
        W.to(torch.float64 if dtype == torch.float64 else torch.float32) + (left @ right)
    ).to(dtype)
    orig = W.clone()
    fix = merge_inplace(W, left, right, where="w")
    assert torch.equal(W, want_merged)
    assert fix.size > 0 and len(fix.index) > 1
    unmerge_inplace(W, left, right, fix, where="w")
    assert torch.equal(W.view(int_view(dtype)), orig.view(int_view(dtype)))


def test_inplace_refuses_a_non_finite_result_and_leaves_the_weight_alone() -> None:
    W = torch.randn(700, 1000).to(torch.bfloat16)
    orig = W.clone()
    left = torch.full((700, 1), 1e-3)
    left[650] = 3e38  # only a late block overflows: the blocks already merged are undone
    right = torch.full((1, 1000), 1e3)
    with pytest.raises(CompatibilityError) as e:
        merge_inplace(W, left, right, where="w")
    assert e.value.code == "non-finite-result"
    assert torch.equal(W.view(torch.int16), orig.view(torch.int16))


def test_a_base_changed_behind_the_swaps_back_is_detected() -> None:
    W = torch.randn(300, 400)
    left, right = torch.randn(300, 4), torch.randn(4, 400)
    fix = merge_inplace(W, left, right, where="w")
    at = next(i for i in range(W.numel()) if i not in set(torch.cat(fix.index).tolist()))
    W.view(-1)[at] += 1.0  # someone wrote into the merged weight, where no correction lies
    with pytest.raises(RestoreError):
        unmerge_inplace(W, left, right, fix, where="w")
