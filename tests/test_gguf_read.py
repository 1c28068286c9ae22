"""GGUF import (convert/gguf_read.py): ours → GGUF → ours keeps ΔW, the Q/K permutation undone
with the base's head counts and the file's alpha unfolded; q/k wait for --base; bad files fail
cleanly; a GGUF written by llama.cpp's own converter imports with PEFT's ΔW (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loratool
from loratool.convert.core import convert
from loratool.errors import LoratoolError
from loratool.sources import open_adapter

pytest.importorskip("gguf")

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_adapter(base: Path, out: Path, **config: object) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **config)
    )
    model.save_pretrained(out)


def _assert_same_delta(a: loratool.Adapter, b: loratool.Adapter) -> None:
    assert sorted(a.targets) == sorted(b.targets)
    for name, t in a.targets.items():
        want, got = t.delta(torch.float64), b.targets[name].delta(torch.float64)
        rel = float((got - want).norm() / want.norm())
        assert rel <= 1e-6, (name, rel)
        assert b.targets[name].kind == t.kind


def test_ours_to_gguf_and_back_keeps_delta(tmp_path: Path, tiny_llama_dir: Path) -> None:
    _peft_adapter(
        tiny_llama_dir,
        tmp_path / "peft",
        r=4,
        lora_alpha=8,
        use_rslora=True,  # folded scales: the file alpha is unfolded per module on the way back
        target_modules=[*LLAMA, "embed_tokens"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 5},
    )
    convert(tmp_path / "peft", tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf", base=tiny_llama_dir)
    opened = open_adapter(tmp_path / "a.gguf")  # inspect/verify read it without a base
    assert opened.format == "gguf"
    with pytest.raises(LoratoolError, match="convert with --base"):
        convert(tmp_path / "a.gguf", tmp_path / "nobase.safetensors")  # q/k still permuted
    report = convert(tmp_path / "a.gguf", tmp_path / "b.safetensors", base=tiny_llama_dir)
    assert report["source_format"] == "gguf"
    a, b = loratool.load(tmp_path / "a.safetensors"), loratool.load(tmp_path / "b.safetensors")
    _assert_same_delta(a, b)
    assert b.binding().fingerprint == a.binding().fingerprint
    # and GGUF -> PEFT directly
    convert(tmp_path / "a.gguf", tmp_path / "p", to="peft", base=tiny_llama_dir)
    convert(tmp_path / "p", tmp_path / "c.safetensors")
    _assert_same_delta(a, loratool.load(tmp_path / "c.safetensors"))


def test_gguf_without_qk_needs_no_base(tmp_path: Path, tiny_llama_dir: Path) -> None:
    _peft_adapter(tiny_llama_dir, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["v_proj"])
    convert(tmp_path / "peft", tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf", base=tiny_llama_dir)
    convert(tmp_path / "a.gguf", tmp_path / "b.safetensors")
    a, b = loratool.load(tmp_path / "a.safetensors"), loratool.load(tmp_path / "b.safetensors")
    _assert_same_delta(a, b)
    assert {t.alpha for t in b.targets.values()} == {16.0}


def _gguf_file(path: Path, tensors: dict[str, torch.Tensor], **kv: object) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, arch=str(kv.pop("arch", "llama")))
    w.add_type(str(kv.pop("type", "adapter")))
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(kv.pop("alpha", 8.0)))
    for name, x in tensors.items():
        w.add_tensor(name, x.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("model-file", "unknown-format"),
        ("arch", "gguf-architecture"),
        ("lone-a", "missing-tensor"),
        ("rank", "rank-mismatch"),
        ("name", "gguf-name"),
        ("not-lora", "unexpected-tensor"),
    ],
)
def test_bad_gguf_adapters_fail_cleanly(tmp_path: Path, case: str, code: str) -> None:
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    good = {"blk.0.attn_v.weight.lora_a": a, "blk.0.attn_v.weight.lora_b": b}
    tensors, kv = dict(good), {}
    if case == "model-file":
        kv = {"type": "model"}
    elif case == "arch":
        kv = {"arch": "gpt2"}
    elif case == "lone-a":
        del tensors["blk.0.attn_v.weight.lora_b"]
    elif case == "rank":
        tensors["blk.0.attn_v.weight.lora_b"] = torch.randn(64, 3)
    elif case == "name":
        tensors = {k.replace("attn_v", "attn_zz"): v for k, v in good.items()}
    elif case == "not-lora":
        tensors["blk.0.attn_v.weight"] = torch.randn(64, 64)
    path = _gguf_file(tmp_path / "x.gguf", tensors, **kv)
    with pytest.raises(LoratoolError) as e:
        open_adapter(path)
    assert e.value.code == code, e.value


LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is tested
CACHE = Path(__file__).resolve().parents[1] / ".cache"
# what convert_lora_to_gguf.py runs on, inside the sdist's vendor/llama.cpp
LCPP_PARTS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def _llama_cpp() -> Path:
    """llama.cpp's converter source: LORATOOL_LLAMA_CPP (an unpacked sdist's vendor/llama.cpp),
    else the llama-cpp-python sdist fetched once into .cache/sdist with pip and its converter
    files unpacked into .cache/llama.cpp-<version>; skips only when that cannot be had."""
    import tarfile

    env = os.environ.get("LORATOOL_LLAMA_CPP")
    if env:
        if not (Path(env) / "convert_lora_to_gguf.py").is_file():
            pytest.skip(f"LORATOOL_LLAMA_CPP={env} has no convert_lora_to_gguf.py")
        return Path(env)
    dest = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (dest / "convert_lora_to_gguf.py").is_file():
        return dest
    sdist = CACHE / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdist.parent)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist not downloadable: {e}")
        if not sdist.is_file():
            pytest.skip(f"pip download left no {sdist.name}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix) :] if m.name.startswith(prefix) else ""
            if (m.isfile() or m.isdir()) and rel and rel.startswith(LCPP_PARTS):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")  # no links, nothing outside tmp
    tmp.rename(dest)  # whole, or not at all: a killed unpack leaves only the .part folder
    return dest


@pytest.mark.slow
def test_llama_cpp_converter_output_imports_with_peft_delta(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """llama.cpp's own convert_lora_to_gguf.py on a PEFT adapter of SmolLM2 (q/k permuted by
    its LlamaModel, alpha in the file), read back with --base: PEFT's ΔW for every module.

    The converter comes from the llama-cpp-python sdist (``_llama_cpp``: downloaded by pip into
    .cache/ unless LORATOOL_LLAMA_CPP points at an unpacked one); it needs only torch,
    transformers and numpy.
    """
    LCPP = _llama_cpp()
    _peft_adapter(smollm2_dir, tmp_path / "peft", r=8, lora_alpha=16, target_modules=LLAMA)
    # its own gguf-py and conversion package, as llama.cpp runs it
    env = {**os.environ, "PYTHONPATH": f"{LCPP / 'gguf-py'}{os.pathsep}{LCPP}"}
    cmd = [sys.executable, str(LCPP / "convert_lora_to_gguf.py"), str(tmp_path / "peft")]
    cmd += ["--base", str(smollm2_dir), "--outfile", str(tmp_path / "l.gguf"), "--outtype", "f32"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    convert(tmp_path / "peft", tmp_path / "want.safetensors")
    convert(tmp_path / "l.gguf", tmp_path / "got.safetensors", base=smollm2_dir)
    want = loratool.load(tmp_path / "want.safetensors")
    _assert_same_delta(want, loratool.load(tmp_path / "got.safetensors"))
    # --outtype q8_0: lora_a rows of 32 are Q8_0 (lora_b stays float); dequantised exactly as
    # gguf-py does, ΔW within 8-bit quantisation error
    cmd[cmd.index("f32")] = "q8_0"
    cmd[cmd.index(str(tmp_path / "l.gguf"))] = str(tmp_path / "q.gguf")
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    convert(tmp_path / "q.gguf", tmp_path / "q.safetensors", base=smollm2_dir)
    got = loratool.load(tmp_path / "q.safetensors")
    import gguf

    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    q8 = {t.name: t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0}
    assert q8
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}  # fmt: skip
    for name, t in q8.items():  # lora_a is not permuted: compare it as stored
        _, layer, short, *_ = name.split(".")
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(got.targets[f"model.layers.{layer}.{hf[short]}"].lora_A, ref), name
    for n, target in want.targets.items():
        d = target.delta(torch.float64)
        rel = float((got.targets[n].delta(torch.float64) - d).norm() / d.norm())
        assert rel <= 1e-2, (n, rel)


def _raw(
    version: int = 3, kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_t: int = 0
) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + kv + tensors


def _s(text: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(text)) + text


def _kv_adapter() -> tuple[bytes, int]:
    import struct

    kv = _s(b"general.type") + struct.pack("<I", 8) + _s(b"adapter")
    kv += _s(b"adapter.type") + struct.pack("<I", 8) + _s(b"lora")
    kv += _s(b"general.architecture") + struct.pack("<I", 8) + _s(b"llama")
    return kv, 3


@pytest.mark.parametrize(
    "case",
    ["version", "string-length", "value-type", "dims", "ggml-type", "outside", "alignment"],
)
def test_crafted_gguf_headers_fail_cleanly(tmp_path: Path, case: str) -> None:
    """Each bound of the header parser, on a struct-packed file: a FormatError, never a crash."""
    import struct

    kv, n_kv = _kv_adapter()
    info = _s(b"blk.0.attn_v.weight.lora_a") + struct.pack("<I", 2) + struct.pack("<QQ", 8, 2)
    info += struct.pack("<IQ", 0, 0)
    data = _raw(kv=kv, n_kv=n_kv, tensors=info, n_t=1)  # claims 64 bytes of data it lacks
    if case == "version":
        data = _raw(version=7)
    elif case == "string-length":
        data = _raw(kv=struct.pack("<Q", 2**40) + b"x", n_kv=1)
    elif case == "value-type":
        data = _raw(kv=_s(b"k") + struct.pack("<I", 99), n_kv=1)
    elif case == "dims":
        bad = _s(b"t") + struct.pack("<I", 9) + struct.pack("<Q", 1) * 9 + struct.pack("<IQ", 0, 0)
        data = _raw(kv=kv, n_kv=n_kv, tensors=bad, n_t=1)
    elif case == "ggml-type":
        bad = _s(b"t") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 2, 0)
        data = _raw(kv=kv, n_kv=n_kv, tensors=bad, n_t=1)
    elif case == "alignment":
        kv2 = kv + _s(b"general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 3)
        data = _raw(kv=kv2, n_kv=n_kv + 1, tensors=info, n_t=1)
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(LoratoolError) as e:
        open_adapter(path)
    assert e.value.code == "bad-gguf", e.value
