"""The format: golden bytes, round trips, one hostile file per rule, fuzzing, integrity, writes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loratool
from loratool import constants as C
from loratool.adapter import Adapter, Target
from loratool.errors import FormatError, OutputExistsError
from loratool.format import read_header, to_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
GOLDEN = FIXTURES / "valid" / "golden.safetensors"
# Pinned: any change to the writer's bytes is a spec change (spec §5) and must be deliberate.
GOLDEN_SHA256 = "c64dbb924f350bec23ee5921b7b586b288eb7aa8f4fa312a2caed0b478a60303"

import generate  # noqa: E402  (fixtures/ is on sys.path via conftest)


def test_golden_bytes_are_pinned() -> None:
    blob = to_bytes(generate.golden())
    assert blob == GOLDEN.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_SHA256


def test_golden_layout_is_canonical() -> None:
    blob = GOLDEN.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0
    header = blob[8 : 8 + n].rstrip(b" ")
    doc = json.loads(header)
    assert list(doc) == sorted(doc)
    assert (
        header
        == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert "loratool.provenance" not in doc["__metadata__"]  # nothing but content: no timestamps


def test_committed_fixtures_match_the_generator() -> None:
    out = subprocess.run(
        [sys.executable, str(FIXTURES / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", MANIFEST["valid"])
def test_round_trip_is_byte_identical(name: str, tmp_path: Path) -> None:
    src = FIXTURES / "valid" / name
    adapter = loratool.load(src, verify=True)
    adapter.save(tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == src.read_bytes()
    again = loratool.load(tmp_path / "copy.safetensors")
    for t in adapter.targets.values():
        u = again.targets[t.name]
        assert torch.equal(t.lora_A, u.lora_A) and torch.equal(t.lora_B, u.lora_B)
        assert (t.rank, t.alpha, t.scale_rule, t.kind) == (u.rank, u.alpha, u.scale_rule, u.kind)


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    adapter = loratool.load(FIXTURES / "valid" / "mixed.safetensors")
    assert adapter.metadata == {"x.vendor.note": "unknown keys are kept on round trips"}
    assert adapter.provenance["seed"] == generate.SEED


def test_safetensors_library_reads_our_files() -> None:
    from safetensors.torch import load_file

    for name in MANIFEST["valid"]:
        tensors = load_file(FIXTURES / "valid" / name)
        adapter = loratool.load(FIXTURES / "valid" / name)
        assert set(tensors) == set(adapter.state_dict())


@pytest.mark.parametrize("name", sorted(MANIFEST["invalid"]))
def test_each_hostile_file_is_rejected_with_its_code(name: str) -> None:
    expected = MANIFEST["invalid"][name]
    path = FIXTURES / "invalid" / name
    with pytest.raises(FormatError) as info:
        loratool.load(path, verify=True)
    assert info.value.code == expected["code"]
    assert str(path) in str(info.value)
    report = loratool.verify(path)
    assert not report.ok and report.error is not None and report.error.code == expected["code"]


def test_every_rule_has_one_fixture_and_a_spec_row() -> None:
    spec = (FIXTURES.parent / "spec" / "adapter-format.md").read_text()
    rules = sorted((e["rule"], e["code"]) for e in MANIFEST["invalid"].values())
    assert [r for r, _ in rules] == list(range(1, len(rules) + 1))
    for number, code in rules:
        assert f"| {number:<2} | `{code}`" in spec, (number, code)


def test_header_rules_do_not_read_tensor_data(tmp_path: Path) -> None:
    blob = GOLDEN.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = read_header(GOLDEN)
    assert header.header_bytes == n and header.data_start == 8 + n
    for t in header.adapter.targets.values():
        assert t._A is None and t._B is None  # lazy until used


def test_flipped_byte_anywhere_in_data_is_caught(tmp_path: Path) -> None:
    blob = bytearray((FIXTURES / "valid" / "mixed.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    for offset in range(8 + n, len(blob), max(1, (len(blob) - 8 - n) // 17)):
        bad = bytearray(blob)
        bad[offset] ^= 0x10
        path = tmp_path / f"flip{offset}.safetensors"
        path.write_bytes(bad)
        report = loratool.verify(path)
        assert not report.ok and report.error is not None
        assert report.error.code in ("integrity", "non-finite")


def _mutations() -> st.SearchStrategy[bytes]:
    base = (FIXTURES / "valid" / "mixed.safetensors").read_bytes()

    def flip(args: tuple[int, int]) -> bytes:
        pos, val = args
        b = bytearray(base)
        b[pos % len(b)] = val
        return bytes(b)

    flips = st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)).map(flip)
    truncations = st.integers(0, len(base)).map(lambda k: base[:k])
    junk = st.binary(max_size=256)
    spliced = st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=16)).map(
        lambda a: base[: a[0]] + a[1] + base[a[0] :]
    )
    return st.one_of(flips, flips, truncations, junk, spliced)


def _header_mutations() -> st.SearchStrategy[bytes]:
    blob = (FIXTURES / "valid" / "mixed.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    values = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
        st.text(max_size=20), st.lists(st.integers(-5, 2**40), max_size=4),
        st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    )  # fmt: skip
    keys = sorted(doc)

    def mutate(args: tuple[int, str, object, bool]) -> bytes:
        i, field, value, in_meta = args
        d = json.loads(json.dumps(doc))
        key = keys[i % len(keys)]
        if in_meta:
            meta = d["__metadata__"]
            mkey = sorted(meta)[i % len(meta)]
            inner = json.loads(meta[mkey]) if meta[mkey].startswith("{") else None
            if isinstance(inner, dict) and inner:
                first = sorted(inner)[0]
                if isinstance(inner[first], dict):
                    inner[first][field] = value
                else:
                    inner[field] = value
                meta[mkey] = json.dumps(inner)
            else:
                meta[mkey] = json.dumps(value)
        elif key != "__metadata__":
            d[key][field] = value
        raw = json.dumps(d).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    fields = st.sampled_from(
        ["rank", "alpha", "kind", "scale_rule", "in_features", "out_features", "fingerprint",
         "hub_id", "dtype", "shape", "data_offsets", "extra"]
    )  # fmt: skip
    return st.tuples(st.integers(0, 1000), fields, values, st.booleans()).map(mutate)


def _only_documented_errors(blob: bytes, path: Path) -> None:
    path.write_bytes(blob)
    try:
        adapter = loratool.load(path, verify=True)
        adapter.save(path.with_suffix(".out"), force=True)
    except FormatError as e:
        assert e.code and e.where == str(path)
    report = loratool.verify(path)
    assert report.ok or report.error is not None


@settings(
    max_examples=int(os.environ.get("LORATOOL_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(blob=_mutations())
def test_fuzz_bytes_raise_only_format_errors(blob: bytes, tmp_path: Path) -> None:
    _only_documented_errors(blob, tmp_path / "fuzz.safetensors")


@settings(
    max_examples=int(os.environ.get("LORATOOL_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(blob=_header_mutations())
def test_fuzz_headers_raise_only_format_errors(blob: bytes, tmp_path: Path) -> None:
    _only_documented_errors(blob, tmp_path / "fuzz.safetensors")


def test_save_refuses_to_overwrite_and_writes_atomically(tmp_path: Path) -> None:
    adapter = generate.golden()
    out = tmp_path / "a.safetensors"
    adapter.save(out)
    with pytest.raises(OutputExistsError):
        adapter.save(out)
    adapter.save(out, force=True)
    bad = Adapter.from_targets(
        [Target.from_factors("m", torch.full((1, 2), float("nan")), torch.ones(2, 1))]
    )
    with pytest.raises(FormatError) as info:
        bad.save(tmp_path / "nan.safetensors")
    assert info.value.code == "non-finite"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temp file, no partial output


def test_writer_validates_before_writing(tmp_path: Path) -> None:
    t = Target.from_factors("m", torch.ones(2, 3), torch.ones(4, 2))
    t.rank = 3  # now inconsistent with the tensors
    with pytest.raises(FormatError) as info:
        Adapter.from_targets([t]).save(tmp_path / "x.safetensors")
    assert info.value.code == "shape-mismatch"
    with pytest.raises(FormatError) as info:
        Target.from_factors(
            "m", torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
        )
    assert info.value.code == "dtype"
    assert not list(tmp_path.iterdir())


def test_pickles_are_refused_by_name_and_by_content(tmp_path: Path) -> None:
    for name, blob in (
        ("adapter.bin", b"anything"),
        ("model.pt", b"PK\x03\x04zip"),
        ("x.safetensors", b"\x80\x04K."),
    ):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(FormatError) as info:
            loratool.load(p)
        assert info.value.code == "pickle" and info.value.hint


def test_scale_rules_and_kinds() -> None:
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    std = Target.from_factors("m", a, b, alpha=8.0)
    rs = Target.from_factors("m", a, b, alpha=8.0, scale_rule=C.SCALE_RSLORA)
    assert std.scale == 2.0 and rs.scale == 4.0
    torch.testing.assert_close(std.delta(), 2.0 * b @ a)
    conv = Target.from_factors("m", a, b, kind=C.KIND_CONV1D)
    assert conv.weight_shape == (6, 5) and std.weight_shape == (5, 6)


def test_fingerprint_is_order_free_and_shape_sensitive() -> None:
    f = loratool.fingerprint
    assert f([("a.weight", (2, 3)), ("b.weight", (4, 5))]) == f(
        [("b.weight", (4, 5)), ("a.weight", (2, 3))]
    )
    assert f([("a.weight", (2, 3))]) != f([("a.weight", (3, 2))])
    adapter = loratool.load(GOLDEN)
    expected = hashlib.sha256(b"model.layers.0.self_attn.q_proj.weight:3x4\n").hexdigest()
    assert adapter.binding().fingerprint == "sha256:" + expected


def test_metadata_matches_the_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((FIXTURES.parent / "spec" / "metadata.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    defs = {k: {**v, "$defs": schema["$defs"]} for k, v in schema["$defs"].items()}

    def check(meta: dict[str, str]) -> None:
        validator.validate(meta)
        for key, ref in (
            ("loratool.targets", "targets"),
            ("loratool.base", "base"),
            ("loratool.provenance", "provenance"),
        ):
            if key in meta:
                jsonschema.Draft202012Validator(defs[ref]).validate(json.loads(meta[key]))

    for name in MANIFEST["valid"]:
        check(read_header(FIXTURES / "valid" / name).metadata)
    for name in ("11-unsupported-version", "12-metadata-missing", "14-bad-target"):
        blob = (FIXTURES / "invalid" / f"{name}.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8 : 8 + n])["__metadata__"]
        with pytest.raises(jsonschema.ValidationError):
            check(meta)


def test_a_header_length_that_looks_like_a_pickle_opcode_is_still_safetensors(
    tmp_path: Path,
) -> None:
    # N = 0x0380 starts the file with bytes 80 03: a pickle protocol-3 opcode by magic alone.
    adapter = generate.golden()
    for pad in range(0, 1000):
        adapter.provenance = {"note": "x" * pad}
        blob = to_bytes(adapter)
        if blob[:2] == b"\x80\x03":
            break
    else:
        pytest.fail("no padding gave a header of length 0x380")
    path = tmp_path / "tricky.safetensors"
    path.write_bytes(blob)
    assert loratool.verify(path).ok
