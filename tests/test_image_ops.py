"""Every command on image-model adapters: a kohya LoCon file (Linear + 3×3/1×1 Conv2d) and
LyCORIS-layout LoHa/LoKr files over the tiny SD UNet — convert, merge, extract, reduce-rank,
combine, inspect --stats, verify — with the ΔW each must keep."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from loratool.cli import cli
from loratool.sources import open_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")  # the fixture builder
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import image_models  # noqa: E402

SD_MODULES = (
    "down_blocks.0.resnets.0.conv1",  # 3×3
    "down_blocks.0.downsamplers.0.conv",  # 3×3, stride 2
    "down_blocks.1.resnets.0.conv_shortcut",  # 1×1
    "down_blocks.1.attentions.0.proj_in",  # 1×1 (SD 1.5's conv proj_in)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
)


def cli_ok(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _shapes() -> dict[str, tuple[int, ...]]:
    from loratool.checkpoint import Checkpoint

    ckpt = Checkpoint(image_models.unet_dir())
    return {m: tuple(ckpt.shape(m + ".weight")) for m in SD_MODULES}


def write_locon(path: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}
    for m, w in _shapes().items():
        k = "lora_unet_" + m.replace(".", "_")
        sd[k + ".lora_down.weight"] = torch.randn(rank, *w[1:], generator=g) * 0.1
        up = (w[0], rank, 1, 1) if len(w) == 4 else (w[0], rank)
        sd[k + ".lora_up.weight"] = torch.randn(*up, generator=g) * 0.1
        sd[k + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})


def write_loha(path: Path, *, rank: int = 3) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd: dict[str, Any] = {}
    for m, w in _shapes().items():
        k = "lora_unet_" + m.replace(".", "_")
        fan = int(torch.tensor(w[1:]).prod())
        for side in ("1", "2"):
            sd[f"{k}.hada_w{side}_a"] = torch.randn(w[0], rank, generator=g) * 0.3
            sd[f"{k}.hada_w{side}_b"] = torch.randn(rank, fan, generator=g) * 0.3
        sd[k + ".alpha"] = torch.tensor(1.5)
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})


def deltas(path: str | Path) -> dict[str, Any]:
    adapter = open_adapter(str(path)).adapter
    return {n: t.delta(torch.float64) for n, t in adapter.targets.items()}


def close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.fixture(scope="module")
def locon(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("locon")
    write_locon(d / "locon.safetensors")
    cli_ok(
        "convert",
        str(d / "locon.safetensors"),
        "-o",
        str(d / "a.safetensors"),
        "--base",
        str(image_models.unet_dir()),
    )
    return {"kohya": d / "locon.safetensors", "loratool": d / "a.safetensors", "dir": d}


def test_locon_reads_as_conv2d_and_linear_targets(locon: dict[str, Path]) -> None:
    adapter = open_adapter(str(locon["loratool"])).adapter
    kinds = {n: t.kind for n, t in adapter.targets.items()}
    assert set(kinds) == set(SD_MODULES)
    assert kinds["down_blocks.0.resnets.0.conv1"] == "conv2d"
    assert kinds["down_blocks.1.attentions.0.proj_in"] == "conv2d"
    assert kinds["mid_block.attentions.0.transformer_blocks.0.ff.net.2"] == "linear"
    t = adapter.targets["down_blocks.0.resnets.0.conv1"]
    assert t.fields["kernel"] == (3, 3) and t.scale == 0.5
    doc = json.loads(cli_ok("inspect", str(locon["loratool"]), "--json"))
    assert doc  # a loratool 1.1 file that names its kinds in loratool.requires
    cli_ok("verify", str(locon["loratool"]))
    cli_ok("verify", str(locon["kohya"]))


def test_kohya_locon_round_trips_through_loratool(locon: dict[str, Path]) -> None:
    out = locon["dir"] / "back.safetensors"
    cli_ok("convert", str(locon["loratool"]), "-o", str(out), "--to", "kohya")
    a, b = deltas(locon["kohya"]), deltas(out)  # b: module paths (loratool's name map)
    assert set(b) == set(SD_MODULES)
    for m in SD_MODULES:
        assert close(b[m], a["lora_unet_" + m.replace(".", "_")], 1e-7)


def test_loha_file_round_trips_and_merges(tmp_path: Path) -> None:
    write_loha(tmp_path / "loha.safetensors")
    lt, back = tmp_path / "loha-lt.safetensors", tmp_path / "loha-back.safetensors"
    cli_ok(
        "convert",
        str(tmp_path / "loha.safetensors"),
        "-o",
        str(lt),
        "--base",
        str(image_models.unet_dir()),
    )
    adapter = open_adapter(str(lt)).adapter
    assert {t.kind for t in adapter.targets.values()} == {"loha"}
    assert adapter.targets["down_blocks.0.resnets.0.conv1"].fields["kernel"] == (3, 3)
    cli_ok("convert", str(lt), "-o", str(back), "--to", "kohya")
    src = deltas(tmp_path / "loha.safetensors")
    for name, d in deltas(back).items():
        ref = src["lora_unet_" + name.replace(".", "_")]
        assert close(d.reshape(ref.shape), ref, 1e-7)
    from loratool.checkpoint import Checkpoint

    cli_ok(
        "merge", str(image_models.unet_dir()), str(lt), "-o", str(tmp_path / "m"), "--reversible"
    )
    merged, base = Checkpoint(tmp_path / "m"), Checkpoint(image_models.unet_dir())
    for name, t in adapter.targets.items():
        got = merged.read(name + ".weight").double() - base.read(name + ".weight").double()
        assert close(got, t.delta(torch.float64), 1e-5)
    cli_ok("unmerge", str(tmp_path / "m"), str(lt), "-o", str(tmp_path / "u"))
    back = Checkpoint(tmp_path / "u")
    assert all(base.read_bytes(k) == back.read_bytes(k) for k in base.entries)


def test_extract_recovers_conv_and_linear_deltas(locon: dict[str, Path]) -> None:
    """Merge the LoCon into unet/, extract the difference at rank 4: the same ΔW, convs included."""
    from loratool.checkpoint import Checkpoint

    d = locon["dir"]
    cli_ok("merge", str(image_models.unet_dir()), str(locon["loratool"]), "-o", str(d / "ft"))
    cli_ok(
        "extract",
        str(image_models.unet_dir()),
        str(d / "ft"),
        "-o",
        str(d / "x.safetensors"),
        "--rank",
        "4",
    )
    got = open_adapter(str(d / "x.safetensors")).adapter
    want = deltas(locon["loratool"])
    base, ft = Checkpoint(image_models.unet_dir()), Checkpoint(d / "ft")
    for name, delta in want.items():
        t = got.targets[name]
        assert t.kind == ("conv2d" if delta.dim() == 4 else "linear")
        stored = ft.read(name + ".weight").double() - base.read(name + ".weight").double()
        assert close(t.delta(torch.float64), stored, 1e-5)


def test_reduce_rank_of_locon_is_the_best_approximation(locon: dict[str, Path]) -> None:
    out = locon["dir"] / "r2.safetensors"
    cli_ok("reduce-rank", str(locon["loratool"]), "-o", str(out), "--rank", "2")
    src, got = deltas(locon["loratool"]), open_adapter(str(out)).adapter
    for name, d in src.items():
        t = got.targets[name]
        assert t.rank == 2 and t.kind == ("conv2d" if d.dim() == 4 else "linear")
        m = d.reshape(d.shape[0], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert close(t.delta(torch.float64).reshape(m.shape), best, 1e-5)
    # combine of two conv adapters is exact by concatenation
    cli_ok("combine", str(locon["loratool"]), str(out), "-o", str(locon["dir"] / "c.safetensors"))
    comb = deltas(locon["dir"] / "c.safetensors")
    two = deltas(out)
    for name in src:
        assert close(comb[name], src[name] + two[name], 1e-5)


def test_inspect_stats_gives_conv_spectra(locon: dict[str, Path]) -> None:
    text = cli_ok("inspect", str(locon["loratool"]), "--stats", "--json")
    doc = json.loads(text)
    assert "conv1" in text and doc


def test_verify_and_inspect_read_lyco_files(tmp_path: Path) -> None:
    write_loha(tmp_path / "loha.safetensors")
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "loha.safetensors")])
    assert result.exit_code == 0, result.output
    assert "lycoris.kohya" in result.output and "all values finite" in result.output
    doc = json.loads(cli_ok("inspect", str(tmp_path / "loha.safetensors"), "--stats", "--json"))
    assert "loha" in json.dumps(doc)


def test_image_adapters_are_published_for_diffusers(locon: dict[str, Path]) -> None:
    """push's card says library_name: diffusers for image adapters (diffusers names or kinds)."""
    from loratool.convert.sd_names import is_image_adapter

    assert is_image_adapter(open_adapter(str(locon["loratool"])).adapter.targets.values())
    assert is_image_adapter(open_adapter(str(locon["kohya"])).adapter.targets.values())
    golden = Path(__file__).resolve().parents[1] / "fixtures" / "valid" / "golden.safetensors"
    assert not is_image_adapter(open_adapter(str(golden)).adapter.targets.values())


def test_diffusers_file_round_trips(locon: dict[str, Path]) -> None:
    out = locon["dir"] / "diffusers.safetensors"
    cli_ok("convert", str(locon["loratool"]), "-o", str(out), "--to", "diffusers")
    opened = open_adapter(str(out))
    assert opened.format == "diffusers"
    want = deltas(locon["loratool"])
    got = {n.partition(".")[2]: t.delta(torch.float64) for n, t in opened.adapter.targets.items()}
    assert set(got) == set(want)
    for name, d in want.items():
        assert close(got[name], d, 1e-7)


def test_conv_dora_merges_reversibly(tmp_path: Path) -> None:
    """A LoCon with DoRA (LyCORIS dora_scale, per output channel): merge --reversible, unmerge
    gives the base back bit for bit; the merged weight is m ⊙ V/‖V‖ per output channel."""
    from safetensors.torch import load_file, save_file

    from loratool.checkpoint import Checkpoint

    write_locon(tmp_path / "locon.safetensors")
    sd = load_file(str(tmp_path / "locon.safetensors"))
    base = Checkpoint(image_models.unet_dir())
    m = "down_blocks.0.resnets.0.conv1"
    w = base.read(m + ".weight").double()
    k = "lora_unet_" + m.replace(".", "_")
    norm = w.reshape(w.shape[0], -1).norm(dim=1)
    sd[k + ".dora_scale"] = (norm * 1.1).reshape(-1, 1, 1, 1).float()
    save_file(sd, str(tmp_path / "dora.safetensors"))
    a = str(tmp_path / "a.safetensors")
    cli_ok(
        "convert",
        str(tmp_path / "dora.safetensors"),
        "-o",
        a,
        "--base",
        str(image_models.unet_dir()),
    )
    cli_ok("merge", str(image_models.unet_dir()), a, "-o", str(tmp_path / "m"), "--reversible")
    merged = Checkpoint(tmp_path / "m").read(m + ".weight").double()
    t = open_adapter(a).adapter.targets[m]
    v = w + t.delta(torch.float64)
    want = v * (norm * 1.1 / v.reshape(v.shape[0], -1).norm(dim=1)).reshape(-1, 1, 1, 1)
    assert close(merged, want, 1e-6)
    cli_ok("unmerge", str(tmp_path / "m"), a, "-o", str(tmp_path / "u"))
    back = Checkpoint(tmp_path / "u")
    assert all(base.read_bytes(key) == back.read_bytes(key) for key in base.entries)


def test_sdxl_kohya_names_resolve_per_component(tmp_path: Path) -> None:
    """lora_unet_/lora_te1_/lora_te2_ against an SDXL pipeline folder: unet/, text_encoder/ and
    text_encoder_2/ (transformers 5 drops CLIP's text_model. level in one and not the other)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    names = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q": (64, 64),
        "lora_unet_down_blocks_1_attentions_0_proj_in": (64, 64),  # linear in SDXL
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (37, 32),
    }
    sd: dict[str, Any] = {}
    for k, (o, i) in names.items():
        sd[k + ".lora_down.weight"] = torch.randn(2, i, generator=g)
        sd[k + ".lora_up.weight"] = torch.randn(o, 2, generator=g)
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    out = tmp_path / "a.safetensors"
    root = image_models.build("tiny-sdxl")
    cli_ok("convert", str(tmp_path / "sdxl.safetensors"), "-o", str(out), "--base", str(root))
    got = sorted(open_adapter(str(out)).adapter.targets)
    assert got == [
        "text_encoder.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
        "unet.down_blocks.1.attentions.0.proj_in",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    ]
    # and back to kohya: the component prefixes return
    back = tmp_path / "k.safetensors"
    cli_ok("convert", str(out), "-o", str(back), "--to", "kohya")
    from loratool.convert._st import open_st

    keys = {k.rsplit(".", 2)[0] for k in open_st(back).tensors if k.endswith("lora_down.weight")}
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in keys
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in keys


def test_kohya_unet_and_text_encoder_merge_into_the_single_file(tmp_path: Path) -> None:
    """A kohya file with lora_unet_ and lora_te_ modules, bound to the SD single file (which
    holds both) and merged into it: each weight changes by its ΔW under its LDM name."""
    from safetensors.torch import load_file, save_file

    from loratool.layouts import unet_aliases

    write_locon(tmp_path / "locon.safetensors")
    sd = load_file(str(tmp_path / "locon.safetensors"))
    g = torch.Generator().manual_seed(4)
    te = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    sd[te + ".lora_down.weight"] = torch.randn(2, 32, generator=g)
    sd[te + ".lora_up.weight"] = torch.randn(32, 2, generator=g)
    save_file(sd, str(tmp_path / "both.safetensors"))
    single = image_models.single_file()
    a = str(tmp_path / "a.safetensors")
    cli_ok("convert", str(tmp_path / "both.safetensors"), "-o", a, "--base", str(single))
    cli_ok("merge", str(single), a, "-o", str(tmp_path / "m.safetensors"))
    before, after = load_file(str(single)), load_file(str(tmp_path / "m.safetensors"))
    names = unet_aliases(before)
    adapter = open_adapter(a).adapter
    assert len(adapter.targets) == len(SD_MODULES) + 1
    for name, t in adapter.targets.items():
        key = names[name + ".weight"]
        assert close((after[key].double() - before[key].double()), t.delta(torch.float64), 1e-5)


def test_kohya_files_merge_without_converting_first(locon: dict[str, Path]) -> None:
    """merge resolves kohya names against the base itself (one exact underscored match)."""
    from loratool.checkpoint import Checkpoint

    d = locon["dir"]
    cli_ok("merge", str(image_models.unet_dir()), str(locon["kohya"]), "-o", str(d / "mk"))
    cli_ok("merge", str(image_models.unet_dir()), str(locon["loratool"]), "-o", str(d / "ml"))
    a, b = Checkpoint(d / "mk"), Checkpoint(d / "ml")
    assert all(a.read_bytes(k) == b.read_bytes(k) for k in a.entries)


def test_hostile_lycoris_part_mixes_fail_cleanly(tmp_path: Path) -> None:
    """Random mixes of LoCon/LoHa/LoKr/DoRA parts with random shapes: a typed error or a
    target whose ΔW computes — never a crash."""
    import random

    from safetensors.torch import save_file

    from loratool.errors import LoratoolError

    parts = [
        *("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        *("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        *("lora_down.weight", "lora_up.weight", "lora_mid.weight", "dora_scale", "alpha"),
    ]
    rng = random.Random(0)
    for i in range(150):
        sd: dict[str, Any] = {}
        for part in rng.sample(parts, rng.randint(1, 5)):
            shape = [rng.choice([0, 1, 2, 3, 4, 6]) for _ in range(rng.randint(0, 4))]
            value = rng.choice([0.0, 2.0, float("nan")])
            sd[f"lora_unet_x.{part}"] = torch.randn(*shape) if shape else torch.tensor(value)
        path = tmp_path / f"{i}.safetensors"
        save_file(sd, str(path))
        try:
            for t in open_adapter(str(path)).adapter.targets.values():
                t.delta()
        except LoratoolError:
            pass


def test_dora_targets_round_trip_through_kohya_dora_scale(tmp_path: Path) -> None:
    """Linear and conv2d DoRA targets write LyCORIS' dora_scale and read back the same."""
    import loratool

    src = Path(__file__).resolve().parents[1] / "fixtures" / "valid" / "image.safetensors"
    adapter = loratool.load(src)
    keep = {n: t for n, t in adapter.targets.items() if t.kind == "conv2d"}
    from loratool.adapter import Adapter

    part = tmp_path / "conv.safetensors"
    Adapter.from_targets(keep.values()).save(part)
    out = tmp_path / "k.safetensors"
    cli_ok("convert", str(part), "-o", str(out), "--to", "kohya")
    back = open_adapter(str(out)).adapter.targets
    for name, t in keep.items():
        assert back[name].features == t.features
        assert torch.equal(back[name].delta(), t.delta())
        if t.features:
            assert torch.equal(back[name].part("magnitude"), t.part("magnitude"))


def test_lycoris_bare_model_names_map_to_module_paths(tmp_path: Path) -> None:
    """create_lycoris on a bare UNet names modules "lycoris_<path>": --base maps them too."""
    from safetensors.torch import load_file, save_file

    write_locon(tmp_path / "locon.safetensors")
    sd = {
        k.replace("lora_unet_", "lycoris_"): v
        for k, v in load_file(str(tmp_path / "locon.safetensors")).items()
    }
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    out = tmp_path / "a.safetensors"
    base = str(image_models.unet_dir())
    cli_ok("convert", str(tmp_path / "lyco.safetensors"), "-o", str(out), "--base", base)
    assert sorted(open_adapter(str(out)).adapter.targets) == sorted(SD_MODULES)
