"""Base checkpoints: shard discovery, header-first reads, name resolution, fit checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.adapter import Adapter, Target
from loratool.checkpoint import Checkpoint
from loratool.errors import CompatibilityError, FormatError


def test_sharded_checkpoint_reads_every_tensor_exactly(tiny_sharded_llama_dir: Path) -> None:
    ckpt = Checkpoint(tiny_sharded_llama_dir)
    assert len(ckpt.shards) >= 3 and ckpt.index is not None
    expected: dict[str, torch.Tensor] = {}
    for shard in ckpt.shards:
        expected.update(load_file(shard))
    assert set(ckpt.entries) == set(expected)
    for name, tensor in expected.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert any(f.name == "config.json" for f in ckpt.other_files())
    assert not any(f.suffix == ".safetensors" for f in ckpt.other_files())


def _adapter_for(ckpt: Checkpoint, module: str, key: str) -> Adapter:
    out_f, in_f = ckpt.shape(key)
    return Adapter.from_targets(
        [Target.from_factors(module, torch.randn(2, in_f), torch.randn(out_f, 2))]
    )


def test_fit_checks_name_shape_and_fingerprint(tiny_llama_dir: Path) -> None:
    ckpt = Checkpoint(tiny_llama_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    good = _adapter_for(ckpt, "model.layers.0.self_attn.q_proj", key)
    assert ckpt.check_fits(good) == {"model.layers.0.self_attn.q_proj": key}
    assert ckpt.fingerprint_for(good) == good.binding().fingerprint

    missing = _adapter_for(ckpt, "model.layers.9.self_attn.q_proj", key)
    with pytest.raises(CompatibilityError) as info:
        ckpt.check_fits(missing)
    assert info.value.code == "missing-module" and info.value.exit_code == 4

    out_f, in_f = ckpt.shape(key)
    wrong = Adapter.from_targets(
        [
            Target.from_factors(
                "model.layers.0.self_attn.q_proj", torch.randn(2, in_f + 1), torch.randn(out_f, 2)
            )
        ]
    )
    with pytest.raises(CompatibilityError) as info:
        ckpt.check_fits(wrong)
    assert info.value.code == "shape-mismatch"


def test_resolve_tolerates_a_wrapper_prefix(tmp_path: Path) -> None:
    save_file(
        {"h.0.attn.c_attn.weight": torch.zeros(4, 12), "wte.weight": torch.zeros(10, 4)},
        tmp_path / "m.safetensors",
    )
    ckpt = Checkpoint(tmp_path / "m.safetensors")
    assert ckpt.resolve("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn.weight"
    assert ckpt.resolve("h.0.attn.c_attn") == "h.0.attn.c_attn.weight"
    assert ckpt.resolve("h.1.attn.c_attn") is None


def test_hostile_checkpoints_fail_cleanly(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(FormatError) as info:
        Checkpoint(tmp_path)
    assert info.value.code == "not-found" and "pickle" in (info.value.hint or "")
    with pytest.raises(FormatError) as info:
        Checkpoint(tmp_path / "pytorch_model.bin")
    assert info.value.code == "pickle"
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../evil.safetensors"}})
    )
    with pytest.raises(FormatError) as info:
        Checkpoint(tmp_path)
    assert info.value.code == "bad-index"
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FormatError) as info:
        Checkpoint(tmp_path)
    assert info.value.code == "bad-index"
