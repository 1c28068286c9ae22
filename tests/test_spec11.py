"""Spec 1.1 (§3.5–3.7): the features file, 1.0 compatibility, generic header rules, dense merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loratool
from loratool import constants as C
from loratool import merge, unmerge
from loratool.adapter import Adapter, Target
from loratool.errors import CompatibilityError, FormatError
from loratool.format import read_header, to_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FEATURES = FIXTURES / "valid" / "features.safetensors"

import generate  # noqa: E402  (fixtures/ is on sys.path via conftest)


@pytest.mark.parametrize("name", MANIFEST["valid11"])
def test_1_1_round_trip_is_byte_identical(name: str, tmp_path: Path) -> None:
    src = FIXTURES / "valid" / name
    adapter = loratool.load(src, verify=True)
    adapter.save(tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == src.read_bytes()
    again = loratool.load(tmp_path / "copy.safetensors")
    for t in adapter.targets.values():
        u = again.targets[t.name]
        assert t.parts() == u.parts() and t.features == u.features and t.kind == u.kind
        assert all(torch.equal(t.part(p), u.part(p)) for p in t.parts())


def test_1_1_file_declares_version_and_requires() -> None:
    meta = read_header(FEATURES).metadata
    assert meta[C.VERSION_KEY] == "1.1"
    assert json.loads(meta[C.REQUIRES_KEY]) == ["bias", "dora", "full", "lora_bias", "tokens"]


def test_1_0_files_stay_1_0() -> None:
    for name in MANIFEST["valid"]:
        meta = read_header(FIXTURES / "valid" / name).metadata
        assert meta[C.VERSION_KEY] == "1.0" and C.REQUIRES_KEY not in meta


def test_a_1_0_reader_refuses_every_1_1_target() -> None:
    # §4.1.3: each 1.1 target either adds a tensor (orphan for 1.0) or lacks lora_A/lora_B.
    header = read_header(FEATURES)
    for t in header.adapter.targets.values():
        names = {n for n in header.tensors if n.rsplit(".", 1)[0] == t.name}
        assert names != {t.name + ".lora_A", t.name + ".lora_B"}


def test_the_1_1_schema_accepts_the_features_file() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((FIXTURES.parent / "spec" / "metadata.schema.json").read_text())
    defs = {k: {**v, "$defs": schema["$defs"]} for k, v in schema["$defs"].items()}
    meta = read_header(FEATURES).metadata
    jsonschema.Draft202012Validator(schema).validate(meta)
    jsonschema.Draft202012Validator(defs["targets"]).validate(json.loads(meta[C.TARGETS_KEY]))
    jsonschema.Draft202012Validator(defs["requires"]).validate(json.loads(meta[C.REQUIRES_KEY]))
    bad = json.loads(meta[C.TARGETS_KEY])
    bad["model.layers.0.self_attn.q_proj"]["features"] = ["dora", "lora_bias"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(defs["targets"]).validate(bad)


def _edit_tensors(drop: str | None = None, reshape: str | None = None) -> bytes:
    blob = FEATURES.read_bytes()
    tensors = generate.tensors_of(blob)
    if drop:
        del tensors[drop]
    if reshape:
        dtype, shape, raw = tensors[reshape]
        tensors[reshape] = (dtype, [shape[0] // 2, 2, *shape[1:]], raw)
    return generate.rebuild(blob, tensors)


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (dict(drop="model.layers.0.self_attn.q_proj.magnitude"), "missing-tensor"),
        (dict(drop="model.embed_tokens.token_values"), "missing-tensor"),
        (dict(reshape="model.layers.0.self_attn.q_proj.magnitude"), "shape-mismatch"),
        (dict(reshape="lm_head.weight"), "shape-mismatch"),
    ],
)
def test_generic_tensor_rules_cover_every_part(
    edit: dict[str, str], code: str, tmp_path: Path
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(_edit_tensors(**edit))
    with pytest.raises(FormatError) as e:
        read_header(path)
    assert e.value.code == code


def test_writer_refuses_a_feature_the_kind_does_not_accept() -> None:
    a, b = torch.zeros(2, 10), torch.zeros(8, 2)
    t = Target.from_factors("emb", a, b, kind="embedding", tensors={"magnitude": torch.ones(8)})
    with pytest.raises(FormatError) as e:
        to_bytes(Adapter.from_targets([t]))
    assert e.value.code == "bad-feature"


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.self_attn.v_proj.bias": torch.randn(4, generator=g),
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.0.input_layernorm.bias": torch.zeros(8),
    }


def _mergeable() -> Adapter:
    a = loratool.load(FEATURES)
    return Adapter.from_targets([t for n, t in a.targets.items() if n != "lm_head"])


def test_dense_merge_applies_each_rule_and_reversible_unmerge_is_bit_exact() -> None:
    base, a = _base(), _mergeable()
    r = merge(base, [a], reversible=True, force=True)
    sd = r.state_dict
    q = a.targets["model.layers.0.self_attn.q_proj"]
    V = base["model.layers.0.self_attn.q_proj.weight"].double() + q.delta(torch.float64)
    want = q.part("magnitude").double()[:, None] * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(sd["model.layers.0.self_attn.q_proj.weight"].double(), want, atol=1e-6)
    v = a.targets["model.layers.0.self_attn.v_proj"]
    b = base["model.layers.0.self_attn.v_proj.bias"]
    want_b = b + v.scale * v.part("lora_bias") + v.part("bias_delta")
    assert torch.allclose(sd["model.layers.0.self_attn.v_proj.bias"], want_b, atol=1e-6)
    e = sd["model.embed_tokens.weight"]
    assert torch.equal(e[[1, 5]], a.targets["model.embed_tokens"].part("token_values"))
    assert torch.equal(
        e[[0, 2, 3, 4, 6, 7, 8, 9]], base["model.embed_tokens.weight"][[0, 2, 3, 4, 6, 7, 8, 9]]
    )
    u = unmerge(sd, [a], record=r.record, sidecar=r.sidecar, force=True)
    for k, w in base.items():
        assert torch.equal(u.state_dict[k], w), k


def test_unmerge_without_the_sidecar_refuses_dora_and_replacements() -> None:
    base, a = _base(), _mergeable()
    r = merge(base, [a], force=True)
    with pytest.raises(CompatibilityError) as e:
        unmerge(r.state_dict, [a], force=True)
    assert e.value.code == "not-reversible"


def test_merge_refuses_what_has_no_exact_rule() -> None:
    base, a = _base(), _mergeable()
    with pytest.raises(CompatibilityError) as e:
        merge(base, [a], weights=[0.5], force=True)
    assert e.value.code == "nonlinear-weight"
    del base["model.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(CompatibilityError) as e:
        merge(base, [a], force=True)
    assert e.value.code == "no-bias"


def test_lowrank_operations_refuse_1_1_parts_instead_of_dropping_them() -> None:
    from loratool.errors import UsageError
    from loratool.lowrank import combine, reduce_rank

    a = loratool.load(FEATURES)
    for call in (lambda: combine([a, a]),):
        with pytest.raises(UsageError) as e:
            call()
        assert e.value.code == "unsupported-feature"
    # reduce-rank now keeps every 1.1 part (spec §3.7): features beside the reduced factors,
    # whole tensors carried; nothing is dropped
    reduced, _ = reduce_rank(a, rank=1)
    assert reduced.requires == a.requires
    for t in a.targets.values():
        kept = reduced.targets[t.name]
        for part in t.parts():
            if part not in ("lora_A", "lora_B"):
                assert torch.equal(kept.part(part), t.part(part)), (t.name, part)
