"""Spec 1.1 training against PEFT itself: ``inject(dora=, bias=, modules_to_save=,
trainable_tokens=)`` computes what PEFT's layers compute, and the adapter it gives, written as
PEFT's files, loads in ``PeftModel`` with the same outputs (fp32, ≤ 1e-5); DoRA's gradients are
PEFT's (the norm held constant); ``train --dora --bias ...`` from the command line does the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from loratool import lora
from loratool.convert.core import convert

pytest.importorskip("peft")

# case -> (base fixture, inject options)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dora": ("tiny_llama_dir", dict(targets="q_proj,v_proj,down_proj", dora=True)),
    "tokens": ("tiny_llama_dir", dict(targets="q_proj", trainable_tokens=[7, 5, 30])),
    "modules-to-save": (
        "tiny_llama_dir",
        dict(targets="q_proj", modules_to_save=["norm", "up_proj"]),
    ),
    "bias-lora-only": ("tiny_bert_dir", dict(targets="query,value", bias="lora_only")),
    "bias-all": ("tiny_bert_dir", dict(targets="query,value", bias="all")),
    "dora-bias-all": ("tiny_bert_dir", dict(targets="query,value", bias="all", dora=True)),
    "dora-conv1d": ("tiny_gpt2_dir", dict(targets="c_attn", dora=True, bias="lora_only")),
    "lora-bias": ("tiny_bert_dir", dict(targets="query,value", lora_bias=True)),
    "lora-bias-conv1d": ("tiny_gpt2_dir", dict(targets="c_attn", lora_bias=True, bias="all")),
}


def _model(base: Path) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    causal = str(AutoConfig.from_pretrained(base).architectures[0]).endswith("ForCausalLM")
    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(base)


def _inputs(model: Any) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 30]])
    return {"input_ids": ids}


def _out(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("case", sorted(CASES))
def test_injected_variant_loads_in_peft_with_the_same_outputs(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from peft import PeftModel

    fixture, options = CASES[case]
    base = Path(request.getfixturevalue(fixture))
    torch.manual_seed(0)
    model = _model(base)
    report = lora.inject(model, rank=4, alpha=8, **options)
    params = lora.lora_parameters(model)
    assert sum(p.numel() for p in params.values()) == report.trainable_params
    with torch.no_grad():  # as if trained: every trained part off its initial value
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    inputs = _inputs(model)
    ref = _out(model, inputs)
    adapter = lora.extract_adapter(model)
    assert set(adapter.state_dict()) == set(params)
    adapter.save(tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "peft", to="peft", base=base)
    peft_model = PeftModel.from_pretrained(_model(base), tmp_path / "peft").eval()
    assert float((_out(peft_model, inputs) - ref).abs().max()) <= 1e-5
    # and back: PEFT's files read as the same adapter (bias values turned into differences)
    convert(tmp_path / "peft", tmp_path / "b.safetensors", base=base)
    from loratool.format import load

    again = load(tmp_path / "b.safetensors").state_dict()
    for key, x in adapter.state_dict().items():
        assert torch.allclose(again[key].float(), x.float(), atol=1e-6), key
    # remove(merge=True) computes the same outputs with plain modules
    assert lora.remove(model, merge=True) >= 1
    assert float((_out(model, inputs) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("dropout", [0.0])
def test_dora_gradients_are_peft_s(tiny_llama_dir: Path, tmp_path: Path, dropout: float) -> None:
    """DoRA §4.3 as PEFT: ‖V‖ is a constant in backward, so m, A and B get PEFT's gradients."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = _model(tiny_llama_dir)
    lora.inject(model, targets="q_proj,v_proj", rank=4, alpha=8, dora=True, dropout=dropout)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    lora.extract_adapter(model).save(tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "peft", to="peft", base=tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(
        _model(tiny_llama_dir), tmp_path / "peft", is_trainable=True
    )
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 30]])
    for m in (model, peft_model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    ours = {k: p.grad for k, p in lora.lora_parameters(model).items()}
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for n, g in theirs.items():
        module = n.removeprefix("base_model.model.").split(".lora_")[0]
        part = "magnitude" if "magnitude" in n else "lora_A" if ".lora_A." in n else "lora_B"
        mine = ours[f"{module}.{part}"]
        assert g is not None and mine is not None
        assert float((mine - g.reshape(mine.shape)).abs().max()) <= 1e-5 * max(
            1.0, float(g.abs().max())
        ), n


def test_inject_refuses_what_it_cannot_hold(tiny_llama_dir: Path, tiny_bert_dir: Path) -> None:
    from loratool.errors import UsageError

    with pytest.raises(UsageError, match="DoRA is defined for Linear"):
        lora.inject(_model(tiny_llama_dir), targets="embed_tokens", rank=2, dora=True)
    with pytest.raises(UsageError, match="bias must be one of"):
        lora.inject(_model(tiny_llama_dir), targets="q_proj", rank=2, bias="some")
    with pytest.raises(UsageError, match="asked for twice"):
        lora.inject(_model(tiny_llama_dir), targets="q_proj", rank=2, modules_to_save=["q_proj"])
    with pytest.raises(UsageError, match="one layer's weight and bias"):
        lora.inject(_model(tiny_llama_dir), targets="q_proj", rank=2, modules_to_save=["layers.0"])
    with pytest.raises(UsageError, match=r"must be 0\.\."):
        lora.inject(_model(tiny_llama_dir), targets="q_proj", rank=2, trainable_tokens=[10**6])
    with pytest.raises(UsageError, match="matches no module"):
        lora.inject(_model(tiny_llama_dir), targets="q_proj", rank=2, modules_to_save=["nope"])


def test_train_cli_dora_bias_tokens_loads_in_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from loratool.cli import cli
    from loratool.format import load

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"fact {i} is {i * 7}"}) + "\n" for i in range(8)))
    out = tmp_path / "a.safetensors"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "-o", str(out)]
    args += ["--targets", "q_proj,v_proj", "--rank", "4", "--max-steps", "2", "--seq-len", "32"]
    args += ["--dora", "--modules-to-save", "norm", "--trainable-tokens", "5,7", "--lr", "1e-2"]
    both = CliRunner().invoke(cli, [*args, "--lora-bias", "-q"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    res = CliRunner().invoke(cli, [*args, "-q"])
    assert res.exit_code == 0, res.output
    adapter = load(out)
    assert adapter.requires == ["dora", "full", "tokens"]
    hp = adapter.provenance["training"]["hyperparameters"]
    assert (
        hp["dora"] is True and hp["trainable_tokens"] == "5,7" and hp["modules_to_save"] == "norm"
    )
    t = adapter.targets["model.embed_tokens"]
    assert t.fields["indices"] == (5, 7)
    convert(out, tmp_path / "peft", to="peft", base=tiny_llama_dir)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and "model.norm" in cfg["modules_to_save"]  # PEFT: suffix rule
    model = _model(tiny_llama_dir)
    lora.inject(
        model,
        targets="q_proj,v_proj",
        rank=4,
        alpha=8,
        dora=True,
        modules_to_save=["norm"],
        trainable_tokens=[5, 7],
    )
    with torch.no_grad():
        params = lora.lora_parameters(model)
        for key, x in adapter.state_dict().items():
            params[key].copy_(x)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 30]])
    ref = _out(model.eval(), {"input_ids": ids})
    peft_model = PeftModel.from_pretrained(_model(tiny_llama_dir), tmp_path / "peft").eval()
    assert float((_out(peft_model, {"input_ids": ids}) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_trained_biases_convert_and_merge(
    bias: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """PEFT's own bias="lora_only"/"all" adapter: read with --base as bias deltas, written back
    with PEFT's outputs, merged into the base with PEFT's outputs, and refused without a base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    import loratool
    from loratool.errors import LoratoolError

    torch.manual_seed(0)
    pm = get_peft_model(
        AutoModel.from_pretrained(tiny_bert_dir),
        LoraConfig(r=2, target_modules=["query", "value"], bias=bias, init_lora_weights=False),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval().save_pretrained(tmp_path / "peft")
    inputs = {"input_ids": torch.tensor([[1, 5, 7, 9, 11, 13, 2, 30]])}
    ref = _out(pm, inputs)
    with pytest.raises(LoratoolError, match="convert with --base"):
        convert(tmp_path / "peft", tmp_path / "nobase.safetensors")
    convert(tmp_path / "peft", tmp_path / "a.safetensors", base=tiny_bert_dir)
    convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft", base=tiny_bert_dir)
    back = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / "back")
    assert float((_out(back.eval(), inputs) - ref).abs().max()) <= 1e-5
    loratool.merge(tiny_bert_dir, [tmp_path / "a.safetensors"], tmp_path / "merged")
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert float((_out(merged, inputs) - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("case", ["dora", "tokens", "modules-to-save", "bias-all", "lora-bias"])
def test_attach_applies_every_part_unmerged(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``attach`` puts a saved 1.1 adapter back on a fresh model with the trained outputs."""
    fixture, options = CASES[case]
    base = Path(request.getfixturevalue(fixture))
    torch.manual_seed(0)
    model = _model(base)
    lora.inject(model, rank=4, alpha=8, **options)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    inputs = _inputs(model)
    ref = _out(model.eval(), inputs)
    fresh = _model(base)
    lora.attach(fresh, lora.extract_adapter(model))
    assert float((_out(fresh.eval(), inputs) - ref).abs().max()) <= 1e-6


def test_inspect_and_verify_show_every_feature(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """inspect --json: ``requires``, per target ``features``, and ``parts``/``indices`` for 1.1
    targets; verify reports rules 23-26; plain targets keep their 1.0 fields."""
    from loratool.cli import cli

    model = _model(tiny_llama_dir)
    lora.inject(
        model,
        targets="q_proj",
        rank=2,
        dora=True,
        trainable_tokens=[7, 5],
        modules_to_save=["model.norm"],
    )
    lora.extract_adapter(model).save(tmp_path / "a.safetensors")
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a.safetensors"), "--json", "--stats"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["requires"] == ["dora", "full", "tokens"]
    rows = {t["name"]: t for t in doc["targets"]}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["features"] == ["dora"] and q["parts"]["magnitude"] == [64] and "delta_norm" in q
    assert rows["model.embed_tokens"]["indices"] == [5, 7]
    assert rows["model.embed_tokens"]["parts"] == {"token_values": [2, 64]}
    assert rows["model.norm"]["parts"] == {"weight": [64]} and rows["model.norm"]["features"] == []
    human = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a.safetensors")])
    assert "requires" in human.stdout and "2 token rows" in human.stdout and "dora" in human.stdout
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "a.safetensors"), "--json"])
    checks = {c["rule"]: c for c in json.loads(r.stdout)["checks"]}
    assert (
        checks["features"]["ok"] and "requires dora, full, tokens" in checks["features"]["detail"]
    )


def test_reduce_rank_keeps_features_and_carries_whole_tensors(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """reduce-rank on a DoRA + tokens + modules_to_save adapter: the low-rank part is reduced,
    the magnitude kept, whole tensors carried; with --base the whole DoRA update's error is
    reported (0 at the full rank, the merged model unchanged)."""
    from loratool.cli import cli
    from loratool.format import load

    model = _model(tiny_llama_dir)
    lora.inject(
        model, targets="q_proj", rank=4, alpha=8, dora=True, trainable_tokens=[5, 7],
        modules_to_save=["model.norm"],
    )  # fmt: skip
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    lora.extract_adapter(model).save(tmp_path / "a.safetensors")
    a = load(tmp_path / "a.safetensors")
    for k, name in ((4, "same"), (2, "half")):
        args = [
            "reduce-rank",
            str(tmp_path / "a.safetensors"),
            "-o",
            str(tmp_path / f"{name}.safetensors"),
        ]
        r = CliRunner().invoke(
            cli, [*args, "--rank", str(k), "--base", str(tiny_llama_dir), "--json"]
        )
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        errors = [t["update_error"] for t in doc["targets"]]
        assert len(errors) == 2 and (max(errors) <= 1e-6 if k == 4 else min(errors) > 0)
        b = load(tmp_path / f"{name}.safetensors")
        assert b.requires == a.requires == ["dora", "full", "tokens"]
        for t in a.targets.values():
            u = b.targets[t.name]
            if not t.lowrank:
                assert all(torch.equal(u.part(p), x) for p, x in t.tensors().items())
                continue
            assert u.rank == k and torch.equal(u.part("magnitude"), t.part("magnitude"))
            assert abs(u.scale - t.scale) < 1e-12
            if k == 4:
                assert torch.allclose(u.delta(), t.delta(), atol=1e-6)
    r = CliRunner().invoke(cli, ["reduce-rank", str(tmp_path / "a.safetensors"), "-o",
                                 str(tmp_path / "nb.safetensors"), "--rank", "2"])  # fmt: skip
    assert r.exit_code == 0 and "pass the base" in r.output


def test_combine_sums_biases_carries_replacements_refuses_the_rest(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """combine: bias features and bias kinds add with their weights (the merged model is the sum
    of both updates), a replacement from one input at weight 1 is carried, a tensor replaced
    twice and DoRA are refused."""
    import loratool
    from loratool.errors import UsageError
    from loratool.lowrank import combine

    def trained(seed: int, **options: Any) -> loratool.Adapter:
        torch.manual_seed(seed)
        model = _model(tiny_bert_dir)
        lora.inject(model, targets="query", rank=2, **options)
        with torch.no_grad():
            for p in lora.lora_parameters(model).values():
                p.add_(torch.randn_like(p) * 0.1)
        return lora.extract_adapter(model)

    a, b = trained(1, bias="all"), trained(2, bias="all")
    c, _ = combine([a, b], weights=[0.5, 2.0])
    for name, t in a.targets.items():
        got = c.targets[name].part("bias_delta").double()
        want = (
            0.5 * t.part("bias_delta").double() + 2.0 * b.targets[name].part("bias_delta").double()
        )
        assert torch.allclose(got, want, atol=1e-6), name
        if t.lowrank:
            d = 0.5 * t.delta(torch.float64) + 2.0 * b.targets[name].delta(torch.float64)
            assert torch.allclose(c.targets[name].delta(torch.float64), d, atol=1e-6)
    saved = trained(3, modules_to_save=["pooler.dense"])
    c, _ = combine([saved, trained(5, bias="lora_only")])
    assert torch.equal(
        c.targets["pooler.dense"].part("weight"), saved.targets["pooler.dense"].part("weight")
    )
    with pytest.raises(UsageError, match="replace the same"):
        combine([saved, saved])
    with pytest.raises(UsageError, match="needs the base"):
        combine([saved, trained(5)], weights=[0.5, 1.0])
    with pytest.raises(UsageError, match="magnitudes do not add"):
        combine([trained(4, dora=True), a])


def test_extract_names_changed_biases(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """extract makes plain LoRA: a fine-tune whose biases changed says so in its warnings."""
    from loratool.lowrank import extract

    torch.manual_seed(0)
    model = _model(tiny_bert_dir)
    lora.inject(model, targets="query", rank=2, bias="lora_only")
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    lora.remove(model, merge=True)
    model.save_pretrained(tmp_path / "ft")
    _, report = extract(tiny_bert_dir, tmp_path / "ft", rank=2, targets="query")
    assert any("biases differ from the base" in w for w in report.warnings), report.warnings


def test_merge_unties_a_replaced_embedding_tied_to_lm_head(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """PEFT's modules_to_save on a tied embedding leaves lm_head as it was; the merged checkpoint
    unties them (its own lm_head.weight, tie_word_embeddings false) and computes the injected
    model's outputs (the PEFT equivalence: tests/test_merge_vocab.py)."""
    import json

    import loratool

    model = _model(tiny_llama_dir)
    lora.inject(model, targets="q_proj", rank=2, modules_to_save=["embed_tokens"])
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    ids = _inputs(model)
    ref = _out(model.eval(), ids)
    lora.extract_adapter(model).save(tmp_path / "a.safetensors")
    loratool.merge(tiny_llama_dir, [tmp_path / "a.safetensors"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert float((_out(_model(tmp_path / "m").eval(), ids) - ref).abs().max()) <= 1e-5


def test_peft_grown_vocabulary_round_trips(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """PEFT's modules_to_save on a resized embedding (new tokens): read with --base as a grown
    ``full`` target (base_rows = the base's vocabulary), written back so PEFT on the resized base
    computes the same outputs; merge refuses it, cleanly: the resized base's new lm_head rows
    are in no adapter file (with lm_head saved too it merges: tests/test_merge_vocab.py)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    import loratool
    from loratool.errors import CompatibilityError
    from loratool.format import load

    torch.manual_seed(0)
    resized = _model(tiny_llama_dir)
    resized.resize_token_embeddings(520)
    resized.save_pretrained(tmp_path / "resized")
    pm = get_peft_model(
        _model(tmp_path / "resized"),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    )
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval().save_pretrained(tmp_path / "peft")
    ids = {"input_ids": torch.tensor([[1, 5, 515, 9, 519, 2]])}
    ref = _out(pm, ids)
    report = convert(tmp_path / "peft", tmp_path / "a.safetensors", base=tiny_llama_dir)
    assert any("grown vocabulary" in n for n in report["notes"])
    t = load(tmp_path / "a.safetensors").targets["model.embed_tokens"]
    assert t.fields["base_rows"] == 512 and t.fields["shapes"]["weight"] == (520, 64)
    convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    back = PeftModel.from_pretrained(_model(tmp_path / "resized"), tmp_path / "back").eval()
    assert float((_out(back, ids) - ref).abs().max()) <= 1e-5
    with pytest.raises(CompatibilityError) as e:
        loratool.merge(tiny_llama_dir, [tmp_path / "a.safetensors"], tmp_path / "m")
    assert e.value.code == "grown-vocabulary" and "lm_head" in str(e.value)
