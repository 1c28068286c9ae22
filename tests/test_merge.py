"""merge / unmerge: PEFT equivalence, exactness, reversibility, safety, layout, provenance, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import loratool  # noqa: E402
from loratool.adapter import Adapter, Target  # noqa: E402
from loratool.checkpoint import INDEX_NAME, Checkpoint  # noqa: E402
from loratool.cli import cli  # noqa: E402
from loratool.errors import CompatibilityError, FormatError, UsageError  # noqa: E402
from loratool.merging import RECORDS_KEY, SIDECAR_NAME, read_records  # noqa: E402
from loratool.stream import (  # noqa: E402
    SafetensorsWriter,
    TensorSpec,
    aligned_order,
    plan_shards,
    rewrite_metadata,
    shard_names,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    """Single-threaded torch: OpenMP regions crawl on a shared, oversubscribed 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapter(
    base: Path,
    suffixes: tuple[str, ...] = LLAMA_LINEAR,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    kind: str = "linear",
    seed: int = 0,
    std: float = 0.05,
    scale_rule: str = "standard",
) -> Adapter:
    """Random factors for every weight of ``base`` whose module name ends in one of ``suffixes``."""
    ckpt = Checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for key in sorted(ckpt.entries):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in suffixes:
            continue
        shape = ckpt.shape(key)
        in_f, out_f = (shape[1], shape[0]) if kind == "linear" else (shape[0], shape[1])
        a = torch.randn(rank, in_f, generator=gen) * std
        b = torch.randn(out_f, rank, generator=gen) * std
        targets.append(
            Target.from_factors(module, a, b, alpha=alpha, kind=kind, scale_rule=scale_rule)
        )
    assert targets, f"no {suffixes} in {base}"
    return Adapter.from_targets(targets)


def save(adapter: Adapter, path: Path) -> Path:
    adapter.save(path)
    return path


def tensors(path: Path) -> dict[str, Any]:
    ckpt = Checkpoint(path)
    return {k: ckpt.read(k) for k in ckpt.entries}


def peft_merged(
    model_dir: Path, adapter: Adapter, *, auto: str = "causal", fan_in_fan_out: bool = False
) -> dict[str, Any]:
    """PEFT's merge_and_unload of the same factors, built by get_peft_model + copying A and B."""
    import warnings

    import transformers
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings", category=UserWarning)
    cls = transformers.AutoModelForCausalLM if auto == "causal" else transformers.AutoModel
    model = cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    ts = list(adapter.targets.values())
    config = LoraConfig(
        r=ts[0].rank,
        lora_alpha=ts[0].alpha,
        target_modules=[t.name for t in ts],
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=ts[0].scale_rule == "rslora",
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for t in ts:
            m = modules[t.name]
            if t.kind == "embedding":
                m.lora_embedding_A["default"].copy_(t.lora_A)
                m.lora_embedding_B["default"].copy_(t.lora_B)
            else:
                m.lora_A["default"].weight.copy_(t.lora_A)
                m.lora_B["default"].weight.copy_(t.lora_B)
    merged = peft_model.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def assert_matches_peft(ours: Path, theirs: dict[str, Any], base: Path, adapter: Adapter) -> None:
    got, orig = tensors(ours), tensors(base)
    keys = {t.weight_name for t in adapter.targets.values()}
    assert set(got) == set(orig)
    for k, w in got.items():
        if k in keys:
            ref = theirs[k]
            err = float((w - ref).abs().max())
            assert err <= 1e-6 + 1e-6 * float(ref.abs().max()), (k, err)  # fp32 tolerance
            assert not torch.equal(w, orig[k]), f"{k} was not merged"
        else:
            assert torch.equal(w, orig[k]), f"untargeted {k} changed"


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# -- equivalence with PEFT ------------------------------------------------------------------


def test_merge_equals_peft_on_tiny_llama(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama_dir, rank=4, alpha=12.0)
    report = loratool.merge(
        tiny_llama_dir, [save(adapter, tmp_path / "a.safetensors")], tmp_path / "out"
    )
    assert_matches_peft(
        tmp_path / "out", peft_merged(tiny_llama_dir, adapter), tiny_llama_dir, adapter
    )
    assert report.summary()["targets"] == 14 and not report.lossy
    s = report.summary()
    assert s["retained"] == pytest.approx(1.0, abs=1e-6)


def test_merge_equals_peft_on_gpt2_conv1d(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_gpt2_dir, ("c_attn", "c_proj", "c_fc"), kind="conv1d", rank=3)
    loratool.merge(tiny_gpt2_dir, [save(adapter, tmp_path / "a.safetensors")], tmp_path / "out")
    theirs = peft_merged(tiny_gpt2_dir, adapter, fan_in_fan_out=True)
    assert_matches_peft(tmp_path / "out", theirs, tiny_gpt2_dir, adapter)


def test_merge_equals_peft_on_embedding_and_rslora(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama_dir, ("embed_tokens",), kind="embedding", rank=4, scale_rule="rslora"
    )
    t = adapter.targets["model.embed_tokens"]
    assert (t.in_features, t.out_features) == (512, 64)
    loratool.merge(tiny_llama_dir, [save(adapter, tmp_path / "a.safetensors")], tmp_path / "out")
    assert_matches_peft(
        tmp_path / "out", peft_merged(tiny_llama_dir, adapter), tiny_llama_dir, adapter
    )


@pytest.mark.slow
def test_merge_equals_peft_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(smollm2_dir, rank=8, alpha=16.0, std=0.02)
    report = loratool.merge(
        smollm2_dir, [save(adapter, tmp_path / "a.safetensors")], tmp_path / "out"
    )
    assert len(report.targets) == 7 * 30
    assert_matches_peft(tmp_path / "out", peft_merged(smollm2_dir, adapter), smollm2_dir, adapter)
    assert report.out_bytes - report.base_bytes < 4096  # same tensors, only the record added


def test_peft_directory_is_an_adapter_and_unmerges_with_its_conversion(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """ADAPTER is anything convert reads; provenance digests content, not the file format."""
    pytest.importorskip("loratool.convert")
    from safetensors.torch import save_file

    adapter = make_adapter(tiny_llama_dir, rank=4, alpha=8.0)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file(
        {
            f"base_model.model.{t.name}.lora_{x}.weight": getattr(t, f"lora_{x}").contiguous()
            for t in adapter.targets.values()
            for x in "AB"
        },
        str(peft_dir / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": list(LLAMA_LINEAR),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(tiny_llama_dir),
    }
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    report = loratool.merge(tiny_llama_dir, [peft_dir], tmp_path / "m")
    assert report.adapters[0]["format"] == "peft"
    loratool.merge(tiny_llama_dir, [adapter], tmp_path / "m2")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            tensors(tmp_path / "m").values(), tensors(tmp_path / "m2").values(), strict=True
        )
    )
    loratool.unmerge(tmp_path / "m", [save(adapter, tmp_path / "a.safetensors")], tmp_path / "u")


# -- exactness and reversibility ------------------------------------------------------------


def test_fp32_unmerge_restores_within_1e6(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = save(make_adapter(tiny_llama_dir, std=0.2), tmp_path / "a.safetensors")
    loratool.merge(tiny_llama_dir, [a], tmp_path / "m")
    report = loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    assert report.exact == "unknown"
    base, back = tensors(tiny_llama_dir), tensors(tmp_path / "u")
    for k, w in base.items():
        assert float((back[k] - w).norm() / w.norm()) < 1e-6, k
    meta = Checkpoint(tmp_path / "u").shard_metadata
    assert all(RECORDS_KEY not in m for m in meta.values())


def test_reversible_bf16_round_trip_is_bit_exact(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    base = tiny_sharded_llama_dir
    a = save(make_adapter(base, std=0.1), tmp_path / "a.safetensors")
    merged = loratool.merge(base, [a], tmp_path / "m", reversible=True)
    s = merged.summary()
    assert s["roundtrip_off"] > 0  # bf16 rounding destroyed something...
    assert (tmp_path / "m" / SIDECAR_NAME).stat().st_size == merged.sidecar_bytes
    assert merged.to_json()["reversible"]["fraction_of_base"] == pytest.approx(
        merged.sidecar_bytes / merged.base_bytes
    )
    report = loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    assert report.exact == "verified" and all(t.verified for t in report.targets)
    assert report.summary()["corrections"] == s["roundtrip_off"]  # ...and the sidecar put it back
    want, got = Checkpoint(base), Checkpoint(tmp_path / "u")
    for k in want.entries:
        assert want.read_bytes(k) == got.read_bytes(k), k
        assert want.dtype(k) == got.dtype(k)
    assert [p.name for p in got.shards] == [p.name for p in want.shards]
    assert list(got.shard_metadata.values()) == list(want.shard_metadata.values())
    assert not (tmp_path / "u" / SIDECAR_NAME).exists()


def test_roundtrip_prediction_is_what_unmerge_gets(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    """Without a sidecar, the counts the merge records are exactly the elements unmerge misses."""
    base = tiny_sharded_llama_dir
    a = save(make_adapter(base, std=0.1), tmp_path / "a.safetensors")
    merged = loratool.merge(base, [a], tmp_path / "m")
    report = loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    want, got = tensors(base), tensors(tmp_path / "u")
    off = sum(int((want[k].view(torch.int16) != got[k].view(torch.int16)).sum()) for k in want)
    assert (
        off
        == merged.summary()["roundtrip_off"]
        == read_records(Checkpoint(tmp_path / "m"))[-1]["roundtrip"]["elements"]
    )
    assert report.exact == "unknown" and any("not bit-exact" in w for w in report.warnings)


def test_widening_dtype_is_reversible_and_narrowing_is_refused(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    base = tiny_sharded_llama_dir
    a = save(make_adapter(base), tmp_path / "a.safetensors")
    loratool.merge(base, [a], tmp_path / "m", dtype="f32", reversible=True)
    assert {Checkpoint(tmp_path / "m").dtype(k) for k in Checkpoint(base).entries} == {"F32"}
    loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    want, got = Checkpoint(base), Checkpoint(tmp_path / "u")
    assert all(want.read_bytes(k) == got.read_bytes(k) for k in want.entries)
    with pytest.raises(UsageError, match="narrowing"):
        loratool.merge(
            tmp_path / "m", [a], tmp_path / "m16", dtype="f16", reversible=True, force=True
        )


def test_multi_adapter_weighted_merge_equals_the_sum(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a1 = make_adapter(tiny_llama_dir, seed=1)
    a2 = make_adapter(tiny_llama_dir, ("q_proj", "v_proj"), rank=2, alpha=5.0, seed=2)
    paths = [save(a1, tmp_path / "a1.safetensors"), save(a2, tmp_path / "a2.safetensors")]
    report = loratool.merge(tiny_llama_dir, paths, tmp_path / "m", weights=[0.5, -1.5])
    base, got = tensors(tiny_llama_dir), tensors(tmp_path / "m")
    expect = {k: v.double() for k, v in base.items()}
    for adapter, w in ((a1, 0.5), (a2, -1.5)):
        for t in adapter.targets.values():
            expect[t.weight_name] += w * t.delta(torch.float64)
    for k in base:
        torch.testing.assert_close(got[k], expect[k].float(), rtol=1e-6, atol=1e-6)
    q = next(t for t in report.targets if t.key.endswith("layers.0.self_attn.q_proj.weight"))
    assert sorted(q.modules) == ["model.layers.0.self_attn.q_proj"]
    rec = read_records(Checkpoint(tmp_path / "m"))[-1]
    assert [x["weight"] for x in rec["adapters"]] == [0.5, -1.5]
    # the order given to unmerge does not matter; the recorded weights are used
    loratool.unmerge(tmp_path / "m", list(reversed(paths)), tmp_path / "u")
    back = tensors(tmp_path / "u")
    for k, w in base.items():
        torch.testing.assert_close(back[k], w, rtol=1e-5, atol=1e-6)


def test_state_dict_api_matches_files_and_round_trips(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama_dir)
    state = {k: v.bfloat16() for k, v in tensors(tiny_llama_dir).items()}
    report = loratool.merge(state, [adapter], reversible=True)
    assert report.out is None and report.state_dict is not None and report.sidecar is not None
    untouched = "model.norm.weight"
    assert report.state_dict[untouched] is state[untouched]
    # the same merge through files (bf16 base written with our writer)
    specs = [TensorSpec(k, "BF16", tuple(v.shape)) for k, v in state.items()]
    (tmp_path / "b").mkdir()
    with SafetensorsWriter(tmp_path / "b" / "model.safetensors", specs) as w:
        for k, v in state.items():
            w.write(k, v)
    loratool.merge(tmp_path / "b", [adapter], tmp_path / "m", reversible=True)  # same product
    files = tensors(tmp_path / "m")
    for k, v in report.state_dict.items():
        assert torch.equal(v, files[k]), k
    back = loratool.unmerge(
        report.state_dict, [adapter], record=report.record, sidecar=report.sidecar
    )
    assert back.exact == "verified"
    assert back.state_dict is not None
    assert all(
        torch.equal(back.state_dict[k].view(torch.int16), v.view(torch.int16))
        for k, v in state.items()
    )


def test_stacked_merges_unmerge_in_reverse(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    base = tiny_sharded_llama_dir
    a = save(make_adapter(base, seed=1), tmp_path / "a.safetensors")
    b = save(make_adapter(base, ("q_proj",), seed=2), tmp_path / "b.safetensors")
    loratool.merge(base, [a], tmp_path / "m1", reversible=True)
    loratool.merge(tmp_path / "m1", [b], tmp_path / "m2", reversible=True)
    assert (tmp_path / "m2" / SIDECAR_NAME).exists()  # the first merge's, carried along
    assert (tmp_path / "m2" / "loratool-reversible-2.safetensors").exists()
    with pytest.raises(CompatibilityError) as e:
        loratool.unmerge(tmp_path / "m2", [a], tmp_path / "x")
    assert e.value.code == "merge-mismatch" and not (tmp_path / "x").exists()
    loratool.unmerge(tmp_path / "m2", [b], tmp_path / "u1")
    loratool.unmerge(tmp_path / "u1", [a], tmp_path / "u0")
    want, got = Checkpoint(base), Checkpoint(tmp_path / "u0")
    assert all(want.read_bytes(k) == got.read_bytes(k) for k in want.entries)


def test_single_file_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path / "base.safetensors")
    a = save(make_adapter(tiny_llama_dir), tmp_path / "a.safetensors")
    report = loratool.merge(
        tmp_path / "base.safetensors", [a], tmp_path / "merged.safetensors", reversible=True
    )
    assert (tmp_path / "merged.safetensors").is_file()
    assert (
        report.sidecar_name == f"merged.{SIDECAR_NAME}"
        and (tmp_path / report.sidecar_name).is_file()
    )
    loratool.unmerge(tmp_path / "merged.safetensors", [a], tmp_path / "back.safetensors")
    want, got = Checkpoint(tmp_path / "base.safetensors"), Checkpoint(tmp_path / "back.safetensors")
    assert all(want.read_bytes(k) == got.read_bytes(k) for k in want.entries)


# -- fidelity report ------------------------------------------------------------------------


def test_fidelity_report_flags_deltas_lost_to_bf16(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    base = tiny_sharded_llama_dir
    small = make_adapter(base, ("q_proj",), std=0.003, rank=2, alpha=2.0)  # ΔW ~1e-5 vs W ~0.02
    report = loratool.merge(base, [small], tmp_path / "m")
    assert len(report.lossy) == 2 and report.warnings and "lose more than 10%" in report.warnings[0]
    b, m = tensors(base), tensors(tmp_path / "m")
    for t in report.targets:
        delta = sum(
            x.delta(torch.float64) for x in small.targets.values() if x.weight_name == t.key
        )
        applied = m[t.key].double() - b[t.key].double()
        assert t.retained == pytest.approx(float(applied.norm() / delta.norm()), rel=1e-4)
        assert t.error == pytest.approx(float((applied - delta).norm() / delta.norm()), rel=1e-4)
        assert t.error > 0.1
    ok = loratool.merge(base, [small], tmp_path / "f32", dtype="f32")
    assert not ok.lossy and ok.summary()["error"] < 1e-3  # fp32 rounds too, far less


# -- refusals: nothing written ----------------------------------------------------------------


def test_mismatched_base_is_refused_before_writing(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    a = save(make_adapter(tiny_llama_dir), tmp_path / "a.safetensors")
    with pytest.raises(CompatibilityError) as e:
        loratool.merge(tiny_gpt2_dir, [a], tmp_path / "out")
    assert e.value.code == "missing-module"
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []
    wrong = make_adapter(tiny_llama_dir, ("q_proj",))
    t = wrong.targets["model.layers.0.self_attn.q_proj"]
    wrong.targets[t.name] = Target.from_factors(t.name, torch.ones(2, 63), torch.ones(64, 2))
    with pytest.raises(CompatibilityError) as e:
        loratool.merge(tiny_llama_dir, [wrong], tmp_path / "out")
    assert e.value.code == "shape-mismatch" and not (tmp_path / "out").exists()


def test_non_finite_factors_and_overflow_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bad = make_adapter(tiny_llama_dir, ("q_proj",))
    bad.targets["model.layers.1.self_attn.q_proj"].lora_B[0, 0] = float("nan")
    with pytest.raises(FormatError) as e:
        loratool.merge(tiny_llama_dir, [bad], tmp_path / "out")
    assert e.value.code == "non-finite" and not (tmp_path / "out").exists()
    huge = make_adapter(tiny_llama_dir, ("q_proj",), std=300.0)  # |ΔW| ~ 1e5 > f16's 65504
    with pytest.raises(CompatibilityError) as e:
        loratool.merge(tiny_llama_dir, [huge], tmp_path / "out", dtype="f16")
    assert e.value.code == "non-finite-result"
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_existing_output_and_overlap_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = save(make_adapter(tiny_llama_dir), tmp_path / "a.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(UsageError) as e:
        loratool.merge(tiny_llama_dir, [a], tmp_path / "out")
    assert e.value.code == "output-exists" and (tmp_path / "out" / "keep").exists()
    loratool.merge(tiny_llama_dir, [a], tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep").exists()
    with pytest.raises(UsageError) as e:
        loratool.merge(tmp_path / "out", [a], tmp_path / "out" / "inside")
    assert e.value.code == "output-overlaps"


def test_unmerge_refuses_what_was_not_merged(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = save(make_adapter(tiny_llama_dir, seed=1), tmp_path / "a.safetensors")
    b = save(make_adapter(tiny_llama_dir, seed=2), tmp_path / "b.safetensors")
    with pytest.raises(CompatibilityError) as e:
        loratool.unmerge(tiny_llama_dir, [a], tmp_path / "u")
    assert e.value.code == "no-merge-record"
    loratool.merge(tiny_llama_dir, [a], tmp_path / "m", weights=[0.5])
    with pytest.raises(CompatibilityError) as e:
        loratool.unmerge(tmp_path / "m", [b], tmp_path / "u")
    assert e.value.code == "merge-mismatch" and "a.safetensors ×0.5" in e.value.message
    with pytest.raises(CompatibilityError):
        loratool.unmerge(tmp_path / "m", [a], tmp_path / "u", weights=[1.0])
    assert not (tmp_path / "u").exists()
    forced = loratool.unmerge(tmp_path / "m", [b], tmp_path / "u", force=True)
    records = read_records(Checkpoint(tmp_path / "u"))
    assert [r["op"] for r in records] == ["merge", "unmerge"] and forced.exact == "unknown"


def test_missing_sidecar_is_refused(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "m", reversible=True)
    (tmp_path / "m" / SIDECAR_NAME).unlink()
    with pytest.raises(CompatibilityError) as e:
        loratool.unmerge(tmp_path / "m", [a], tmp_path / "u")
    assert e.value.code == "missing-sidecar"
    assert loratool.unmerge(tmp_path / "m", [a], tmp_path / "u", force=True).exact == "unknown"


KILL_SCRIPT = """
import os, signal, sys
import loratool
def progress(event):
    if event.shard_index == 2:  # mid-merge: two shards written, the third under way
        os.kill(os.getpid(), signal.SIGKILL)
loratool.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], reversible=True, progress=progress)
"""


def test_killed_merge_leaves_no_output(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(KILL_SCRIPT),
            str(tiny_sharded_llama_dir),
            str(a),
            str(out),
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert not out.exists()
    left = siblings(out)  # the temp sibling of the killed process, never renamed
    assert len(left) == 1 and left[0].endswith(".tmp")
    assert len(list((tmp_path / left[0]).glob("*.safetensors"))) == 3


def test_interrupted_merge_cleans_up(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    """An exception mid-merge (Ctrl-C in the CLI) stops every thread and removes the temp dir."""
    a = save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors")
    seen: list[str] = []

    def progress(event: Any) -> None:
        seen.append(event.shard)
        if event.shard_index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loratool.merge(
            tiny_sharded_llama_dir, [a], tmp_path / "out", reversible=True, progress=progress
        )
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []
    assert seen[0] == "model-00001-of-00004.safetensors"


# -- output layout, provenance --------------------------------------------------------------


def test_layout_files_and_provenance(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    base = tiny_sharded_llama_dir
    adapter = make_adapter(base)
    a = save(adapter, tmp_path / "a.safetensors")
    report = loratool.merge(base, [a], tmp_path / "m", reversible=True)
    out = tmp_path / "m"
    want, got = Checkpoint(base), Checkpoint(out)
    assert [p.name for p in got.shards] == [p.name for p in want.shards] == report.shards
    assert len(got.shards) >= 3
    assert {k: got.entries[k].shard.name for k in got.entries} == {
        k: want.entries[k].shard.name for k in want.entries
    }
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == json.loads((base / INDEX_NAME).read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        e.info.end - e.info.begin for e in got.entries.values()
    )
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert {"config.json", "tokenizer.json"} <= set(report.copied_files)
    for shard in got.shards:
        meta = got.shard_metadata[shard]
        assert meta["format"] == "pt"
        (record,) = json.loads(meta[RECORDS_KEY])
        assert record["op"] == "merge" and record["reversible"] == SIDECAR_NAME
        (entry,) = record["adapters"]
        assert entry["name"] == "a.safetensors" and entry["weight"] == 1.0
        assert entry["sha256"] == loratool.read_header(a).adapter.sha256
        assert entry["fingerprint"] == adapter.binding().fingerprint
        assert record["roundtrip"]["elements"] == report.summary()["roundtrip_off"]
        assert not any(str(tmp_path) in v for v in meta.values())  # no absolute paths
    from safetensors.torch import load_file

    for shard in got.shards:  # the reference reader agrees
        for k, v in load_file(str(shard)).items():
            assert torch.equal(v, got.read(k))


def test_merged_checkpoint_loads_in_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import transformers

    adapter = make_adapter(tiny_llama_dir)
    loratool.merge(tiny_llama_dir, [adapter], tmp_path / "m")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[key], tensors(tmp_path / "m")[key])


# -- CLI ------------------------------------------------------------------------------------


def test_cli_merge_unmerge_exit_codes_and_messages(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    base = str(tiny_sharded_llama_dir)
    a = str(save(make_adapter(tiny_sharded_llama_dir), tmp_path / "a.safetensors"))
    m, u = str(tmp_path / "m"), str(tmp_path / "u")
    runner = CliRunner()
    r = runner.invoke(cli, ["merge", base, a, "-o", m, "--reversible", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert (
        "merged a.safetensors ×1 into 14 weights" in r.stderr and "reversible sidecar" in r.stderr
    )
    r = runner.invoke(cli, ["merge", base, a, "-o", m])
    assert r.exit_code == 2 and r.stderr.startswith(
        f"error[output-exists]: output '{m}' already exists"
    )
    r = runner.invoke(
        cli, ["merge", base, a, "-o", str(tmp_path / "x"), "--weight", "1", "--weight", "2"]
    )
    assert r.exit_code == 2 and "error[weights]: 2 weights for 1 adapters" in r.stderr
    r = runner.invoke(cli, ["merge", base, a, "-o", str(tmp_path / "x"), "--device", "cuda"])
    if not torch.cuda.is_available():
        assert r.exit_code == 2 and "error[no-cuda]" in r.stderr
    r = runner.invoke(cli, ["unmerge", base, a, "-o", u])
    assert r.exit_code == 4 and "error[no-merge-record]" in r.stderr and "hint: " in r.stderr
    r = runner.invoke(cli, ["unmerge", m, a, "-o", u, "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["operation"] == "unmerge" and doc["exact"] == "verified"
    assert r.stderr == ""  # quiet under --json
    r = runner.invoke(cli, ["merge", str(tmp_path / "nope"), a, "-o", str(tmp_path / "y")])
    assert r.exit_code == 3 and "error[not-found]" in r.stderr


def test_cli_merge_json_report(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = str(
        save(
            make_adapter(tiny_llama_dir, ("q_proj",), std=0.004, rank=2), tmp_path / "a.safetensors"
        )
    )
    r = CliRunner().invoke(
        cli,
        ["merge", str(tiny_llama_dir), a, "-o", str(tmp_path / "m"), "--dtype", "bf16", "--json"],
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["operation"] == "merge" and doc["dtype"] == "bf16" and len(doc["targets"]) == 2
    assert doc["summary"]["lossy"] == 2 and doc["warnings"]
    assert {"retained", "error", "lossy", "roundtrip_off", "roundtrip_max_ulp"} <= set(
        doc["targets"][0]
    )
    assert doc["record"]["dtype_changes"]["model.norm.weight"] == "F32"
    assert Checkpoint(tmp_path / "m").dtype("model.norm.weight") == "BF16"


def test_sidecar_index_encoding_round_trips() -> None:
    from loratool.merging import decode_corrections, encode_corrections

    value = torch.arange(4, dtype=torch.bfloat16)
    for index, kind in ((torch.tensor([0, 5, 65535, 70000]), "gaps"),
                        (torch.tensor([3, 70000, 70001, 3_000_000]), "index")):  # fmt: skip
        enc = encode_corrections("w", index, value)
        assert set(enc) == {f"w.{kind}", "w.value"}
        idx, val = decode_corrections("w", enc, enc.__getitem__)  # type: ignore[misc]
        assert torch.equal(idx, index) and val is value
    assert decode_corrections("x", enc, enc.__getitem__) is None


# -- the streaming writer -------------------------------------------------------------------


def test_stream_writer_round_trips_through_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    xs = {
        "b": torch.arange(5, dtype=torch.bfloat16),
        "a": torch.randn(3, 4),
        "c": torch.ones(2, 3, dtype=torch.int64),
    }
    specs = aligned_order(
        [
            TensorSpec(
                k,
                {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[v.dtype],
                tuple(v.shape),
            )
            for k, v in xs.items()
        ]
    )
    assert [s.name for s in specs] == ["c", "a", "b"]  # widest first: every tensor aligned
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}, reserve=64) as w:
        w.write("b", xs["b"])
        w.write_part("a", 32, xs["a"][2:])  # parts, any order
        w.write_part("a", 0, xs["a"][:2])
        w.write("c", xs["c"])
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in xs.items())
    rewrite_metadata(tmp_path / "x.safetensors", {"k": "v2", "more": "x" * 40})
    assert (
        Checkpoint(tmp_path / "x.safetensors").shard_metadata[tmp_path / "x.safetensors"]["k"]
        == "v2"
    )
    with pytest.raises(ValueError, match="more header bytes"):
        rewrite_metadata(tmp_path / "x.safetensors", {"k": "y" * 500})
    with (
        pytest.raises(ValueError, match="not written"),
        SafetensorsWriter(tmp_path / "y.safetensors", specs) as w,
    ):
        w.write("b", xs["b"])
    with SafetensorsWriter(tmp_path / "w.safetensors", specs) as w:
        w.write_part("a", 0, xs["a"][:2])
        with pytest.raises(ValueError, match="written twice"):
            w.write_part("a", 16, xs["a"][1:])  # overlaps row 1
        w.write_part("a", 32, xs["a"][2:])
        w.write("b", xs["b"])
        w.write("c", xs["c"])
    with pytest.raises(ValueError, match="header says"):
        SafetensorsWriter(tmp_path / "z.safetensors", specs).write("b", xs["a"])
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[1] == "model-00002-of-00003.safetensors"
    assert [len(g) for g in plan_shards(specs, 60)] == [1, 2]


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_merge_matches_cpu_and_unmerges_on_cpu_bit_exactly(
    tiny_sharded_llama_dir: Path, tmp_path: Path
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = tiny_sharded_llama_dir
    a = save(make_adapter(base, std=0.1), tmp_path / "a.safetensors")
    gpu = loratool.merge(base, [a], tmp_path / "g", device="cuda", reversible=True)
    cpu = loratool.merge(base, [a], tmp_path / "c", device="cpu", reversible=True)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    g, c = tensors(tmp_path / "g"), tensors(tmp_path / "c")
    assert all(torch.equal(g[k], c[k]) for k in g)  # fp64 products: the same bits
    loratool.unmerge(tmp_path / "g", [a], tmp_path / "u", device="cpu")
    want, got = Checkpoint(base), Checkpoint(tmp_path / "u")
    assert all(want.read_bytes(k) == got.read_bytes(k) for k in want.entries)
    loratool.merge(base, [a], tmp_path / "f", device="cuda")
    torch.testing.assert_close(
        tensors(tmp_path / "f")["model.layers.0.mlp.up_proj.weight"].float(),
        c["model.layers.0.mlp.up_proj.weight"].float(),
        rtol=0,
        atol=2**-7,
    )


# -- the fidelity lines: worst lossy weights first, --all lists every weight naturally ---------


def _weight_lines(text: str) -> list[str]:
    return [line.strip().split(":")[0] for line in text.splitlines() if "    layers." in line]


def test_cli_merge_report_cut_and_all_in_natural_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_file({f"layers.{i}.proj.weight": torch.randn(16, 16, generator=gen) for i in range(12)},
              str(base))  # fmt: skip
    targets = [
        Target.from_factors(
            f"layers.{i}.proj",
            torch.randn(2, 16, generator=gen) * 0.004,
            torch.randn(16, 2, generator=gen) * 0.004,
            alpha=2.0,
        )
        for i in range(12)
    ]
    a = str(save(Adapter.from_targets(targets), tmp_path / "a.safetensors"))
    merge = ["merge", str(base), a, "--dtype", "bf16"]
    r = CliRunner().invoke(cli, [*merge, "-o", str(tmp_path / "m.safetensors"), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["targets"]) == 12  # JSON always has every row
    lossy = doc["summary"]["lossy"]
    assert lossy > 5  # ΔW far below a bf16 ulp: every weight loses it
    r = CliRunner().invoke(cli, [*merge, "-o", str(tmp_path / "m2.safetensors")])
    assert r.exit_code == 0, r.stderr
    assert len(_weight_lines(r.stderr)) == 5
    assert f"… {lossy - 5} more lossy weights; --all to see every row" in r.stderr
    r = CliRunner().invoke(cli, [*merge, "-o", str(tmp_path / "m3.safetensors"), "--all"])
    assert r.exit_code == 0, r.stderr
    assert _weight_lines(r.stderr) == [f"layers.{i}.proj.weight" for i in range(12)]
    assert "more lossy" not in r.stderr
    un = ["unmerge", str(tmp_path / "m3.safetensors"), a, "-o", str(tmp_path / "u.safetensors")]
    r = CliRunner().invoke(cli, [*un, "--all"])
    assert r.exit_code == 0, r.stderr
    assert _weight_lines(r.stderr) == [f"layers.{i}.proj.weight" for i in range(12)]
