"""merge of PEFT ``modules_to_save`` copies that change the checkpoint's layout (spec §3.6.1):
grown vocabularies (``resize_token_embeddings``) and replaced embeddings of a tied base. The
merged folder, loaded by transformers, computes what PEFT's unmerged model computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import loratool
from loratool.convert.core import convert
from loratool.errors import LoratoolError

pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 2]])
GROWN_IDS = torch.tensor([[1, 5, 515, 9, 519, 2]])


def _model(path: Path | str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _untied(tiny: Path, dest: Path) -> Path:
    """The tiny llama with its own lm_head (a copy of the embedding, then perturbed)."""
    m = _model(tiny)
    m.config.tie_word_embeddings = False
    head = torch.nn.Linear(64, m.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(m.get_input_embeddings().weight + 0.01)
    m.lm_head = head
    m.save_pretrained(dest)
    assert "lm_head.weight" in _keys(dest / "model.safetensors")
    return dest


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


def _peft(base: Path, tmp: Path, *, grow: int | None, modules: list[str]) -> torch.Tensor:
    """A PEFT adapter (LoRA on q_proj + ``modules`` saved) in tmp/peft; its unmerged logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    start = base
    if grow is not None:
        m = _model(base)
        m.resize_token_embeddings(grow)
        m.save_pretrained(tmp / "resized")
        start = tmp / "resized"
    pm = get_peft_model(
        _model(start),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=modules),
    )
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval().save_pretrained(tmp / "peft")
    with torch.no_grad():
        return pm(GROWN_IDS if grow else IDS).logits


def _merged_logits(
    base: Path, tmp: Path, ids: torch.Tensor, *, dtype: str = "keep"
) -> torch.Tensor:
    convert(tmp / "peft", tmp / "a.safetensors", base=base)
    loratool.merge(base, [tmp / "a.safetensors"], tmp / "merged", dtype=dtype)
    with torch.no_grad():
        return _model(tmp / "merged")(ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_merge_grown_vocabulary_equals_peft(
    tiny_llama_dir: Path, tmp_path: Path, tied: bool
) -> None:
    base = tiny_llama_dir if tied else _untied(tiny_llama_dir, tmp_path / "untied")
    ref = _peft(base, tmp_path, grow=520, modules=["embed_tokens", "lm_head"])
    got = _merged_logits(base, tmp_path, GROWN_IDS)
    assert got.shape == ref.shape == (1, 6, 520)
    assert float((got - ref).abs().max()) <= 1e-5
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 520 and config["tie_word_embeddings"] is False
    with pytest.raises(LoratoolError) as e:
        loratool.unmerge(tmp_path / "merged", [tmp_path / "a.safetensors"], tmp_path / "u")
    assert e.value.code == "grown-vocabulary", e.value
    with pytest.raises(LoratoolError) as e:
        loratool.merge(base, [tmp_path / "a.safetensors"], tmp_path / "r", reversible=True)
    assert e.value.code == "not-reversible" and "grown vocabulary" in str(e.value)
    assert not (tmp_path / "u").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("modules", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_merge_replaced_tied_embedding_unties(
    tiny_llama_dir: Path, tmp_path: Path, modules: list[str]
) -> None:
    """PEFT's copy of one side of a tied pair leaves the other side the original: the merged
    checkpoint carries its own lm_head.weight and says tie_word_embeddings false."""
    ref = _peft(tiny_llama_dir, tmp_path, grow=None, modules=modules)
    got = _merged_logits(tiny_llama_dir, tmp_path, IDS)
    assert float((got - ref).abs().max()) <= 1e-5
    assert "lm_head.weight" in _keys(tmp_path / "merged" / "model.safetensors")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 512
    base_cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "tie_word_embeddings"} == {
        k: v for k, v in base_cfg.items() if k != "tie_word_embeddings"
    }


def test_grown_embedding_without_lm_head_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The resized base's new lm_head rows are in no adapter file: merge refuses, names it."""
    _peft(tiny_llama_dir, tmp_path, grow=520, modules=["embed_tokens"])
    convert(tmp_path / "peft", tmp_path / "a.safetensors", base=tiny_llama_dir)
    with pytest.raises(LoratoolError) as e:
        loratool.merge(tiny_llama_dir, [tmp_path / "a.safetensors"], tmp_path / "m")
    assert e.value.code == "grown-vocabulary" and "lm_head" in str(e.value)
    assert not (tmp_path / "m").exists()
    shutil.rmtree(tmp_path / "peft")


def test_sharded_grown_vocabulary_index(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    """On a sharded base the untied lm_head goes into its embedding's shard, the index maps it,
    and total_size and every header hold the new shapes (merged into f32 from the bf16 base,
    as PEFT computes it here)."""
    from safetensors import safe_open

    base = tiny_sharded_llama_dir
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    ref = _peft(base, tmp_path, grow=vocab + 8, modules=["embed_tokens", "lm_head"])
    got = _merged_logits(base, tmp_path, GROWN_IDS, dtype="f32")
    assert float((got - ref).abs().max()) <= 1e-5
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wmap = index["weight_map"]
    assert wmap["lm_head.weight"] == wmap["model.embed_tokens.weight"]
    total = 0
    for shard in sorted(set(wmap.values())):
        with safe_open(out / shard, "pt") as f:
            assert set(f.keys()) == {k for k, v in wmap.items() if v == shard}
            for k in list(f.keys()):
                t = f.get_slice(k)
                total += int(torch.tensor(t.get_shape()).prod()) * 4  # merged into f32
                if k in ("lm_head.weight", "model.embed_tokens.weight"):
                    assert t.get_shape()[0] == vocab + 8
    assert index["metadata"]["total_size"] == total


def test_lora_on_a_tied_lm_head_unties(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A LoRA on lm_head of a tied base (PEFT's layer changes the head, not the embedding): the
    target binds to the embedding's weight and the merge writes the head apart."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(
        _model(tiny_llama_dir),
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False
        ),
    )
    pm.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(IDS).logits
    got = _merged_logits(tiny_llama_dir, tmp_path, IDS)
    assert float((got - ref).abs().max()) <= 1e-5
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
