"""The LoRA layer and injection: selection rules, init, exact forward/backward, extract, remove."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from loratool import UsageError, lora
from loratool.format import load
from loratool.lora.layer import dropout_mask, dropout_seed

TARGET_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


def _randomise_B(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def test_all_linear_is_every_linear_but_the_head(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    report = lora.inject(model, targets="all-linear", rank=4, alpha=8)
    assert len(report.modules) == 2 * len(TARGET_LEAVES)
    assert {m.rsplit(".", 1)[-1] for m in report.modules} == set(TARGET_LEAVES)
    assert "lm_head" not in report.modules
    assert report.kinds == {"linear": 14}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}" for m in report.modules for x in "AB"}
    expected = sum(4 * (lay.in_features + lay.out_features) for _, lay in lora.lora_layers(model))
    assert report.trainable_params == expected
    assert report.summary() == (
        f"trainable params: {expected:,} || all params: {report.all_params:,} "
        f"|| trainable%: {100 * expected / report.all_params:.4f}"
    )


def test_parameter_counts_match_peft(tiny_llama_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = _model(tiny_llama_dir)
    report = lora.inject(ours, targets="all-linear", rank=4, alpha=8)
    theirs = peft.get_peft_model(
        _model(tiny_llama_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert theirs.get_nb_trainable_parameters() == (report.trainable_params, report.all_params)


def test_suffix_matching_like_peft(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    names = lora.select_modules(model, "q_proj, v_proj")
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    assert lora.select_modules(model, ["layers.1.mlp.down_proj"]) == [
        "model.layers.1.mlp.down_proj"
    ]
    # A suffix matches whole dotted parts only: "proj" is not a module name.
    with pytest.raises(UsageError) as e:
        lora.select_modules(model, "q_proj,proj")
    assert e.value.code == "no-such-module" and "'proj'" in e.value.message
    with pytest.raises(UsageError) as e:
        lora.select_modules(model, "input_layernorm")
    assert e.value.code == "unsupported-module"
    with pytest.raises(UsageError):
        lora.select_modules(model, " , ")


def test_init_is_kaiming_A_and_zero_B_so_outputs_do_not_change(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    with torch.no_grad():
        before = model(_ids()).logits
    torch.manual_seed(0)
    lora.inject(model, targets="all-linear", rank=8, alpha=16)
    for _, layer in lora.lora_layers(model):
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=√5): √(6/(6·fan_in))
        assert layer.lora_A.abs().max() <= bound
        assert layer.lora_A.abs().max() > 0.8 * bound
        assert layer.lora_A.dtype == torch.float32
        assert torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, before)


def test_scale_standard_and_rslora(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    lora.inject(model, targets="q_proj", rank=16, alpha=32)
    assert {lay.scale for _, lay in lora.lora_layers(model)} == {2.0}
    model = _model(tiny_llama_dir)
    lora.inject(model, targets="q_proj", rank=16, alpha=32, rslora=True)
    assert {lay.scale for _, lay in lora.lora_layers(model)} == {8.0}
    ad = lora.extract_adapter(model)
    assert {t.scale_rule for t in ad.targets.values()} == {"rslora"}


def test_forward_matches_peft_with_the_same_factors(tiny_llama_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    ours = _model(tiny_llama_dir)
    lora.inject(ours, targets="q_proj,v_proj,down_proj", rank=4, alpha=12)
    _randomise_B(ours)
    theirs = peft.get_peft_model(
        _model(tiny_llama_dir),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours):
            module = theirs.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits)


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_layer_gradients_equal_plain_autograd(transposed: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base: nn.Module = Conv1D(24, 32) if transposed else nn.Linear(32, 24)
    base.requires_grad_(False)
    layer = lora.LoraLayer(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 32, requires_grad=True)

    def run() -> tuple[torch.Tensor, ...]:
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        y = layer(x)
        (y.square() * torch.arange(24)).sum().backward()
        assert x.grad is not None and layer.lora_A.grad is not None
        assert layer.lora_B.grad is not None
        return y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    fused = run()
    assert layer(x).grad_fn is not None and "Fused" in type(layer(x).grad_fn).__name__
    w = base.weight
    expect_y = (x @ w if transposed else x @ w.t()) + base.bias
    expect_y = expect_y + layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(fused[0], expect_y.detach())
    layer.dropout = nn.Identity()  # any dropout module takes the plain autograd path
    plain = run()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_factors_and_their_grads_fp32() -> None:
    base = nn.Linear(32, 16).to(torch.bfloat16).requires_grad_(False)
    layer = lora.LoraLayer(base, rank=4, alpha=4)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
    y2 = layer(x)  # outside autocast a bf16 base still works with fp32 factors
    assert y2.dtype == torch.bfloat16


def _merged_logits(model_dir: Path, adapter_path: Path) -> torch.Tensor:
    """Merge a saved adapter into a fresh base by ΔW alone (spec §3.2), return its logits."""
    fresh = _model(model_dir)
    adapter = load(adapter_path)
    with torch.no_grad():
        for name, t in adapter.targets.items():
            w = fresh.get_submodule(name).weight
            d = t.delta()
            w += d if t.kind == "linear" else d.t()
        return fresh(_ids()).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_extract_round_trip_merged_equals_injected(
    kind: str, tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    model_dir = tiny_llama_dir if kind == "llama" else tiny_gpt2_dir
    # (Both tie the output head to the input embedding, so an embedding target would change
    # the head too once merged; embeddings are checked on their own below.)
    model = _model(model_dir)
    report = lora.inject(model, targets="all-linear", rank=4, alpha=6)
    assert set(report.kinds) == {"conv1d" if kind == "gpt2" else "linear"}
    _randomise_B(model)
    with torch.no_grad():
        injected = model(_ids()).logits
    adapter = lora.extract_adapter(model, provenance={"test": True})
    assert adapter.base is not None and adapter.base.hub_id is None  # no hub id for tiny models
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    assert set(load(path).targets) == set(report.modules)
    torch.testing.assert_close(_merged_logits(model_dir, path), injected, rtol=1e-4, atol=1e-5)
    # remove(merge=True) folds the same ΔW into the weights in place.
    assert lora.remove(model, merge=True) == len(report.modules)
    assert not list(lora.lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, injected, rtol=1e-4, atol=1e-5)


def test_embedding_layer_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(50, 12, padding_idx=0))
    report = lora.inject(model, targets="emb", rank=3, alpha=6)
    assert report.kinds == {"embedding": 1}
    layer = model.get_submodule("emb")
    assert isinstance(layer, lora.LoraLayer)
    assert torch.count_nonzero(layer.lora_A) == 0  # PEFT's embedding init: A zero, B normal
    nn.init.normal_(layer.lora_A)
    ids = torch.tensor([[0, 3, 49, 7]])
    out = model(ids)
    out.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad[:, 0].abs().sum() == 0  # padding
    t = lora.extract_adapter(model).targets["emb"]
    assert (t.kind, t.in_features, t.out_features) == ("embedding", 50, 12)
    merged = layer.base.weight.detach() + t.delta().t()  # spec §3.2: W [num, dim] += ΔWᵀ
    torch.testing.assert_close(nn.functional.embedding(ids, merged), out.detach())


def test_remove_without_merge_restores_the_base(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    with torch.no_grad():
        before = model(_ids()).logits
    lora.inject(model, targets="all-linear", rank=4)
    _randomise_B(model)
    lora.remove(model)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, before)


def test_load_factors_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = _model(tiny_llama_dir)
    lora.inject(a, targets="q_proj,o_proj", rank=2, alpha=3)
    _randomise_B(a)
    lora.extract_adapter(a).save(tmp_path / "a.safetensors")
    b = _model(tiny_llama_dir)
    lora.inject(b, targets="q_proj,o_proj", rank=2, alpha=3)
    lora.load_factors(b, load(tmp_path / "a.safetensors"))
    with torch.no_grad():
        assert torch.equal(a(_ids()).logits, b(_ids()).logits)
    c = _model(tiny_llama_dir)
    lora.inject(c, targets="q_proj", rank=2, alpha=3)
    with pytest.raises(UsageError):
        lora.load_factors(c, load(tmp_path / "a.safetensors"))


def test_attach_puts_a_saved_adapter_on_a_fresh_model(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    a = _model(tiny_llama_dir)
    lora.inject(a, targets="q_proj,down_proj", rank=3, alpha=5, rslora=True)
    _randomise_B(a)
    adapter = lora.extract_adapter(a)
    # Targets may differ in rank (e.g. after reduce-rank): each keeps its own.
    name = "model.layers.0.self_attn.q_proj"
    t = adapter.targets[name]
    adapter.targets[name] = t.replace(
        rank=2, lora_A=t.lora_A[:2].clone(), lora_B=t.lora_B[:, :2].clone()
    )
    adapter.save(tmp_path / "a.safetensors")
    b = _model(tiny_llama_dir)
    report = lora.attach(b, load(tmp_path / "a.safetensors"))
    assert report.kinds == {"linear": 4}
    layer = b.get_submodule(name)
    assert isinstance(layer, lora.LoraLayer) and (layer.rank, layer.scale_rule) == (2, "rslora")
    expected = _merged_logits(tiny_llama_dir, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(b(_ids()).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError) as e:
        lora.attach(_model(tiny_gpt2_dir), load(tmp_path / "a.safetensors"))
    assert e.value.code == "missing-module"


def test_hub_id_binding_never_a_local_path(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert lora.hub_id_for(tiny_llama_dir) is None  # its loratool_source.json says null
    copy = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, copy)
    (copy / "loratool_source.json").write_text(json.dumps({"hub_id": "org/tiny"}))
    assert lora.hub_id_for(copy) == "org/tiny"
    (copy / "loratool_source.json").unlink()
    assert lora.hub_id_for(copy) is None
    assert lora.hub_id_for("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert lora.hub_id_for("/no/such/dir") is None
    model = _model(copy)
    (copy / "loratool_source.json").write_text(json.dumps({"hub_id": "org/tiny"}))
    lora.inject(model, targets="q_proj", rank=2)
    adapter = lora.extract_adapter(model)  # binds through config._name_or_path
    assert adapter.base is not None and adapter.base.hub_id == "org/tiny"


def test_bad_arguments(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    with pytest.raises(UsageError):
        lora.inject(model, targets="q_proj", rank=0)
    with pytest.raises(UsageError):
        lora.inject(model, targets="q_proj", rank=4, dropout=1.0)
    with pytest.raises(UsageError) as e:
        lora.extract_adapter(model)
    assert e.value.code == "no-targets"


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_dropout_equals_plain_autograd_with_the_same_mask(transposed: bool) -> None:
    """Dropout runs inside the fused function: same mask, same output and gradients as autograd."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    p = 0.25
    base: nn.Module = Conv1D(24, 32) if transposed else nn.Linear(32, 24)
    base.double().requires_grad_(False)  # fp64 both sides: only the summation order differs
    layer = lora.LoraLayer(base, rank=4, alpha=8, dropout=p).double().train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    assert "Fused" in type(y.grad_fn).__name__
    (y.square() * torch.arange(24)).sum().backward()
    fused = (y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    torch.manual_seed(7)  # the fused function draws its mask's seed first, the same way
    drop = dropout_mask(torch.Size([15, 32]), p, torch.device("cpu"), dropout_seed())
    mask = ~drop.view(3, 5, 32)
    x2 = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    w = base.weight
    ref = (x2 @ w if transposed else x2 @ w.t()) + base.bias
    ref = ref + layer.scale * ((x2 * mask / (1 - p)) @ A.t()) @ B.t()
    (ref.square() * torch.arange(24)).sum().backward()
    for got, want in zip(fused, (ref.detach(), x2.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got, want)
    assert 0.6 < mask.float().mean() < 0.9  # the mask really drops about p of the inputs

    layer.eval()  # no dropout at evaluation: the fused result equals the dropout-free formula
    with torch.no_grad():
        ye = layer(x)
        want = (x @ w if transposed else x @ w.t()) + base.bias
        want = want + layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(ye, want)
