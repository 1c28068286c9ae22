"""kohya/LyCORIS ``dora_scale`` on Linear LoRA (LoCon with weight_decompose, ``wd_on_out``): a
DoRA adapter written as kohya merges, under LyCORIS' own rule, into what loratool's merge gives,
and reads back bit for bit; features kohya files cannot hold are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loratool
from loratool import lora
from loratool.convert.core import convert
from loratool.errors import LoratoolError

pytest.importorskip("lycoris")


def _dora_adapter(base: Path, path: Path, **options: object) -> loratool.Adapter:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora.inject(model, targets="q_proj,v_proj", rank=4, alpha=8, **options)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    adapter = lora.extract_adapter(model)
    adapter.save(path)
    return adapter


def test_kohya_dora_scale_is_lycoris_rule(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lycoris.functional.general import weight_decompose
    from safetensors.torch import load_file

    adapter = _dora_adapter(tiny_llama_dir, tmp_path / "d.safetensors", dora=True)
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", to="kohya")
    kohya = load_file(tmp_path / "k.safetensors")
    loratool.merge(tiny_llama_dir, [tmp_path / "d.safetensors"], tmp_path / "merged")
    base = load_file(tiny_llama_dir / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name in adapter.targets:
        k = "lora_unet_" + name.replace(".", "_")
        down, up = kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"]
        scale = float(kohya[f"{k}.alpha"]) / down.shape[0]
        assert kohya[f"{k}.dora_scale"].shape == (up.shape[0], 1)  # wd_on_out: per output row
        w = base[name + ".weight"].double()
        want = weight_decompose(
            (w + scale * up.double() @ down.double()).float(), kohya[f"{k}.dora_scale"]
        )
        got = merged[name + ".weight"]
        assert float((got - want).abs().max()) <= 1e-5, name
    convert(tmp_path / "k.safetensors", tmp_path / "back.safetensors", base=tiny_llama_dir)
    back = loratool.load(tmp_path / "back.safetensors")
    for name, t in adapter.targets.items():
        for part, x in t.tensors().items():
            assert torch.equal(back.targets[name].part(part), x), (name, part)


def test_kohya_refuses_biases(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    lora.inject(model, targets="query", rank=2, bias="lora_only")
    lora.extract_adapter(model).save(tmp_path / "b.safetensors")
    with pytest.raises(LoratoolError, match="kohya LoRA files hold no bias deltas"):
        convert(tmp_path / "b.safetensors", tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()
