"""Image-model bases: the tiny diffusers fixtures, their folder layouts and the single-file map."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")  # the fixture builder makes the models with diffusers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

import image_models

from loratool.checkpoint import Checkpoint
from loratool.layouts import diffusers_unet_to_single, unet_aliases


def _load(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def test_diffusers_folders_open_as_checkpoints() -> None:
    one = Checkpoint(image_models.unet_dir())
    sharded = Checkpoint(image_models.unet_dir("tiny-sd-sharded"))
    assert len(sharded.shards) >= 3 and sharded.index is not None
    assert sharded.index_name == "diffusion_pytorch_model.safetensors.index.json"
    assert [p.name for p in one.shards] == ["diffusion_pytorch_model.safetensors"]
    assert set(one.entries) == set(sharded.entries)
    assert [f.name for f in sharded.other_files()] == ["config.json"]
    flux = Checkpoint(image_models.flux_dir())
    assert flux.resolve("single_transformer_blocks.0.attn.to_q") is not None


def test_single_file_names_are_diffusers_inverse() -> None:
    """diffusers' own convert_ldm_unet_checkpoint reads our single file back to the UNet."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    single = _load(image_models.single_file())
    config = json.loads((image_models.unet_dir() / "config.json").read_text())
    ref = _load(image_models.unet_dir() / "diffusion_pytorch_model.safetensors")
    back = convert_ldm_unet_checkpoint(single, config)
    assert set(back) == set(ref)
    assert all(back[k].equal(ref[k]) for k in ref)  # type: ignore[attr-defined]
    aliases = unet_aliases(single)
    assert all(single[aliases[k]].equal(ref[k]) for k in ref)  # type: ignore[attr-defined]
    assert diffusers_unet_to_single(ref) == {k: aliases[k] for k in ref}


def test_single_file_resolves_diffusers_module_paths() -> None:
    ckpt = Checkpoint(image_models.single_file())
    key = ckpt.resolve("down_blocks.1.attentions.0.proj_in")
    assert key == "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert ckpt.resolve("unet.up_blocks.0.upsamplers.0.conv") == (
        "model.diffusion_model.output_blocks.2.2.conv.weight"
    )
    assert ckpt.resolve("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert ckpt.resolve("mid_block.resnets.1.conv2") == (
        "model.diffusion_model.middle_block.2.out_layers.3.weight"
    )


def test_the_image_kinds_fixture_loads_and_validates() -> None:
    """fixtures/valid/image.safetensors: every image kind, verified, schema-valid, ΔW by kind."""
    import struct

    jsonschema = pytest.importorskip("jsonschema")
    import loratool

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    path = fixtures / "valid" / "image.safetensors"
    adapter = loratool.load(path, verify=True)
    assert {t.kind for t in adapter.targets.values()} == {"conv2d", "loha", "lokr", "linear"}
    for t in adapter.targets.values():
        assert tuple(t.delta().shape) == tuple(t.weight_shape)
    schema = json.loads((fixtures.parent / "spec" / "metadata.schema.json").read_text())
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    jsonschema.Draft202012Validator(schema).validate(meta)
    targets = {**schema["$defs"]["targets"], "$defs": schema["$defs"]}
    jsonschema.Draft202012Validator(targets).validate(json.loads(meta["loratool.targets"]))
    assert json.loads(meta["loratool.requires"]) == ["conv2d", "dora", "loha", "lokr"]


def test_sdxl_single_file_names_are_diffusers_inverse() -> None:
    """The SDXL UNet (text_time embedding, label_emb, 2 transformer layers) in the single-file
    layout converts back to its diffusers keys with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = image_models.unet_dir("tiny-sdxl")
    ref = _load(unet / "diffusion_pytorch_model.safetensors")
    names = diffusers_unet_to_single(ref)
    assert set(names) == set(ref)
    single = {names[k]: v for k, v in ref.items()}
    back = convert_ldm_unet_checkpoint(single, json.loads((unet / "config.json").read_text()))
    assert set(back) == set(ref)
    assert all(back[k].equal(ref[k]) for k in ref)  # type: ignore[attr-defined]
    assert {k: unet_aliases(single)[k] for k in ref} == names
