"""The opt-in pickle reader: real torch.save files load; malicious or broken pickles are refused.

Every malicious file tries to create a marker file when unpickled (``os.system``, ``eval``,
``exec``, ``subprocess``, ``open``, nested ``pickle.loads``...). Each must end in a
``FormatError`` with the marker absent. The pickle programs are written with raw opcodes, so
the attack does not depend on a class that exists only in this test.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loratool.errors import FormatError  # noqa: E402
from loratool.unpickle import load_pickled_tensors  # noqa: E402


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def reduce_call(module: str, name: str, *args: str) -> bytes:
    """A protocol-2 pickle program: ``module.name(*args)`` at load time."""
    body = b"".join(_str(a) for a in args)
    return b"\x80\x02" + _global(module, name) + b"(" + body + b"tR."


def with_data_pkl(template: Path, data_pkl: bytes, out: Path, *, compress: bool = False) -> Path:
    """A copy of a real torch.save zip with its ``data.pkl`` record replaced."""
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else src.read(info)
            kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            dst.writestr(info.filename, data, compress_type=kind)
    return out


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "adapter_model.bin"
    torch.save(
        {
            "base_model.model.q_proj.lora_A.weight": torch.randn(4, 16),
            "base_model.model.q_proj.lora_B.weight": torch.zeros(16, 4),
        },
        path,
    )
    return path


def test_real_torch_save_loads(template: Path) -> None:
    got = load_pickled_tensors(template)
    assert sorted(got) == [
        "base_model.model.q_proj.lora_A.weight",
        "base_model.model.q_proj.lora_B.weight",
    ]
    assert got["base_model.model.q_proj.lora_A.weight"].shape == (4, 16)


def test_kohya_style_state_dict_with_metadata_loads(tmp_path: Path) -> None:
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, "epoch": 3}, path)
    assert list(load_pickled_tensors(path)) == ["lora_unet_x.lora_down.weight"]


def _marker_programs(marker: Path) -> dict[str, bytes]:
    m = str(marker)
    return {
        "os.system": reduce_call("os", "system", f"touch {m}"),
        "posix.system": reduce_call("posix", "system", f"touch {m}"),
        "builtins.eval": reduce_call("builtins", "eval", f"open({m!r}, 'w')"),
        "builtins.exec": reduce_call("builtins", "exec", f"open({m!r}, 'w')"),
        "__builtin__.eval": reduce_call("__builtin__", "eval", f"open({m!r}, 'w')"),
        "builtins.open": reduce_call("builtins", "open", m, "w"),
        "builtins.getattr": reduce_call("builtins", "getattr", "x", "y"),
        "subprocess.Popen": b"\x80\x02"
        + _global("subprocess", "Popen")
        + b"(("
        + _str("touch")
        + _str(m)
        + b"ltR.",
        "subprocess.run": b"\x80\x02"
        + _global("subprocess", "run")
        + b"(("
        + _str("touch")
        + _str(m)
        + b"ltR.",
        "nested pickle.loads": b"\x80\x02"
        + _global("pickle", "loads")
        + b"(C"
        + bytes([len(reduce_call("os", "system", f"touch {m}"))])
        + reduce_call("os", "system", f"touch {m}")
        + b"tR.",
        "importlib.import_module": reduce_call("importlib", "import_module", "os"),
        "torch.load via global": reduce_call("torch", "load", m),
        "copyreg._reconstructor": b"\x80\x02"
        + _global("copyreg", "_reconstructor")
        + b"("
        + _global("os", "_wrap_close")
        + _global("builtins", "object")
        + b"NtR.",
        "STACK_GLOBAL os.system": b"\x80\x04"
        + b"\x8c\x02os\x94\x8c\x06system\x94\x93"
        + b"\x8c"
        + bytes([len(f"touch {m}")])
        + f"touch {m}".encode()
        + b"\x85R.",
        "INST os.system": b"(" + _str(f"touch {m}") + b"ios\nsystem\n.",
        "OBJ builtins.exec": b"\x80\x02("
        + _global("builtins", "exec")
        + _str(f"open({m!r},'w')")
        + b"o.",
        "BUILD __setstate__ on an allowed type": b"\x80\x02"
        + _global("collections", "OrderedDict")
        + b")R}"
        + _str("__class__")
        + _global("os", "system")
        + b"sb.",
    }


MALICIOUS = sorted(_marker_programs(Path("/nonexistent")))
# Those that do create the marker under a plain ``pickle.loads`` (the others attack differently).
ACTIVE = [
    n
    for n in MALICIOUS
    if "system" in n
    or "eval" in n
    or "exec" in n
    or "open" in n
    or "subprocess" in n
    or "nested" in n
]


def test_the_attacks_are_real(tmp_path: Path) -> None:
    """Control: an unrestricted unpickler runs every active program (in a throwaway process)."""
    import subprocess
    import sys

    for name in ACTIVE:
        marker = tmp_path / f"m-{len(name)}-{abs(hash(name))}"
        program = _marker_programs(marker)[name]
        code = "import pickle, sys, time; pickle.loads(sys.stdin.buffer.read()); time.sleep(0.2)"
        subprocess.run([sys.executable, "-c", code], input=program, capture_output=True, timeout=60)
        assert marker.exists(), f"control: {name} did not run under pickle.loads"


@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_pickle_in_a_torch_zip_is_refused(
    template: Path, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "PWNED"
    program = _marker_programs(marker)[name]
    evil = with_data_pkl(template, program, tmp_path / "evil.bin")
    with pytest.raises(FormatError) as e:
        load_pickled_tensors(evil)
    assert e.value.code in ("pickle-refused", "bad-pickle")
    assert not marker.exists(), f"{name} ran code"


@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_raw_pickle_is_never_unpickled(tmp_path: Path, name: str) -> None:
    """The pre-zip format is refused unread, whatever it holds."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "adapter_model.bin"
    evil.write_bytes(_marker_programs(marker)[name])
    with pytest.raises(FormatError) as e:
        load_pickled_tensors(evil)
    assert e.value.code == "bad-pickle" and "raw pickle" in e.value.message
    assert not marker.exists()


def test_reduce_class_saved_by_torch_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    with pytest.raises(FormatError) as e:
        load_pickled_tensors(path)
    assert e.value.code == "pickle-refused" and not marker.exists()


def test_truncated_files_are_refused(template: Path, tmp_path: Path) -> None:
    data = template.read_bytes()
    cases = 0
    for cut in (0, 4, 30, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            load_pickled_tensors(bad)
        cases += 1
    program = pickle.dumps({"a": 1}, protocol=2)
    for cut in (1, 2, len(program) // 2, len(program) - 1):  # a data.pkl without its STOP
        bad = with_data_pkl(template, program[:cut], tmp_path / f"pkl{cut}.bin")
        with pytest.raises(FormatError):
            load_pickled_tensors(bad)
        cases += 1
    assert cases == 11


def test_deeply_nested_and_huge_pickles_are_refused(template: Path, tmp_path: Path) -> None:
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200k nested lists
    with pytest.raises(FormatError):
        load_pickled_tensors(with_data_pkl(template, deep, tmp_path / "deep.bin"))
    deep_dict = b"\x80\x02" + (b"}" + _str("k")) * 100_000 + b"s" * 99_999 + b"."
    with pytest.raises(FormatError):
        load_pickled_tensors(with_data_pkl(template, deep_dict, tmp_path / "deepd.bin"))
    not_a_dict = pickle.dumps([1, 2, 3], protocol=2)
    with pytest.raises(FormatError):
        load_pickled_tensors(with_data_pkl(template, not_a_dict, tmp_path / "list.bin"))


def test_compressed_archive_is_refused(template: Path, tmp_path: Path) -> None:
    """A deflated record could be a zip bomb; torch.save never compresses."""
    with zipfile.ZipFile(template) as z:
        pkl = next(z.read(i) for i in z.infolist() if i.filename.endswith("/data.pkl"))
    bomb = with_data_pkl(template, pkl, tmp_path / "bomb.bin", compress=True)
    with pytest.raises(FormatError) as e:
        load_pickled_tensors(bomb)
    assert "compressed" in e.value.message


def test_storage_larger_than_its_record_is_refused(template: Path, tmp_path: Path) -> None:
    """A tensor claiming 10^12 elements of a 64-byte record must not allocate them."""
    with zipfile.ZipFile(template) as z:
        pkl = next(z.read(i) for i in z.infolist() if i.filename.endswith("/data.pkl"))
    assert pkl.count(b"K@t") == 2  # BININT1 64 closing each storage tuple (4x16 and 16x4)
    trillion = b"\x8a\x05" + (10**12).to_bytes(5, "little")  # LONG1 10^12
    huge = pkl.replace(b"K@t", trillion + b"t", 1)
    with pytest.raises(FormatError):
        load_pickled_tensors(with_data_pkl(template, huge, tmp_path / "huge.bin"))
    # A tensor whose shape reaches far past its (honest) storage.
    assert pkl.count(b"K\x04K\x10\x86") == 1  # the (4, 16) size tuple
    wide = pkl.replace(b"K\x04K\x10\x86", b"J\x00\xca\x9a\x3bK\x10\x86", 1)  # (10^9, 16)
    with pytest.raises(FormatError):
        load_pickled_tensors(with_data_pkl(template, wide, tmp_path / "wide.bin"))


def test_limits_bound_the_file(template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATOOL_MAX_ADAPTER_BYTES", "100")
    with pytest.raises(FormatError) as e:
        load_pickled_tensors(template)
    assert e.value.code == "too-large" and "LORATOOL_MAX_ADAPTER_BYTES" in (e.value.hint or "")


def test_pickle_module_is_not_imported_by_the_core() -> None:
    """Importing loratool never imports the pickle reader (it is opt-in)."""
    import subprocess
    import sys

    code = "import sys, loratool, loratool.sources; print('loratool.unpickle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -- convert --allow-pickle ---------------------------------------------------------------------


def _peft_pickle_dir(tmp_path: Path, weights: dict[str, object] | None = None) -> Path:
    import json

    d = tmp_path / "peft-old"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = weights or {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            2, 8, generator=g
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            8, 2, generator=g
        ),
    }
    torch.save(tensors, d / "adapter_model.bin")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_convert_refuses_pickles_by_default_and_reads_them_with_the_flag(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loratool.cli import cli
    from loratool.format import load

    src = _peft_pickle_dir(tmp_path)
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out)])
    assert r.exit_code == 3 and r.stderr.startswith("error[pickle]") and not out.exists()
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--allow-pickle"])
    assert r.exit_code == 0, r.stderr
    # The same adapter as converting a safetensors twin of the folder.
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file(
        torch.load(src / "adapter_model.bin", weights_only=True), twin / "adapter_model.safetensors"
    )
    r = CliRunner().invoke(cli, ["convert", str(twin), "-o", str(tmp_path / "twin.safetensors")])
    assert r.exit_code == 0, r.stderr
    got, want = load(out).state_dict(), load(tmp_path / "twin.safetensors").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_convert_with_the_flag_still_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from loratool.cli import cli

    marker = tmp_path / "PWNED"
    src = _peft_pickle_dir(tmp_path)
    template = tmp_path / "template.bin"
    (src / "adapter_model.bin").rename(template)
    with_data_pkl(
        template, reduce_call("os", "system", f"touch {marker}"), src / "adapter_model.bin"
    )
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--allow-pickle"])
    assert r.exit_code == 3 and r.stderr.startswith("error[pickle-refused]"), r.stderr
    assert "Traceback" not in r.stderr and not marker.exists() and not out.exists()


def test_convert_kohya_pt_with_the_flag(tmp_path: Path) -> None:
    from loratool.convert import convert

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "style.pt"
    torch.save(
        {
            "lora_unet_down_blocks_0_attentions_0_to_q.lora_down.weight": torch.randn(
                2, 8, generator=g
            ),
            "lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight": torch.randn(
                8, 2, generator=g
            ),
            "lora_unet_down_blocks_0_attentions_0_to_q.alpha": torch.tensor(2.0),
        },
        src,
    )
    report = convert(src, tmp_path / "out.safetensors", allow_pickle=True)
    assert report["source"] == str(src) and report["targets"] == 1
    assert any("restricted unpickler" in n for n in report["notes"])


def test_inspect_refuses_pickles_by_default_and_reads_them_with_the_flag(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from loratool.cli import cli

    src = _peft_pickle_dir(tmp_path)
    r = CliRunner().invoke(cli, ["inspect", str(src), "--json"])
    assert r.exit_code == 3 and r.stderr.startswith("error[pickle]")
    r = CliRunner().invoke(cli, ["inspect", str(src), "--json", "--stats", "--allow-pickle"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["path"] == str(src) and doc["source_format"] == "peft"
    assert [t["name"] for t in doc["targets"]] == ["model.layers.0.self_attn.q_proj"]
    assert doc["targets"][0]["rank"] == 2 and doc["targets"][0]["delta_norm"] > 0

    marker = tmp_path / "PWNED"
    template = tmp_path / "template.bin"
    (src / "adapter_model.bin").rename(template)
    with_data_pkl(
        template, reduce_call("os", "system", f"touch {marker}"), src / "adapter_model.bin"
    )
    r = CliRunner().invoke(cli, ["inspect", str(src), "--allow-pickle"])
    assert r.exit_code == 3 and r.stderr.startswith("error[pickle-refused]"), r.stderr
    assert not marker.exists()
