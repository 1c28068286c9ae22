"""Image-model adapters against outside code: LyCORIS, PEFT and diffusers on tiny diffusers bases.

* LyCORIS' own package writes LoCon (plain and Tucker, with DoRA), LoHa (plain, Tucker) and LoKr
  (full, factored, Tucker) files; loratool reads each module with the ΔW LyCORIS applies.
* PEFT LoRA (Conv2d included), LoHa and LoKr on the tiny UNet and the tiny Flux transformer
  convert PEFT → loratool → PEFT with identical outputs, and loratool's merge gives the
  outputs PEFT computes (≤ 1e-5 relative).
* diffusers' ``load_lora_weights`` + ``fuse_lora`` with a kohya LoCon file writes the weights
  loratool's merge writes, into a unet/ folder, a sharded one and the SD single file; unmerge
  with the sidecar gives the base back bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import image_models  # noqa: E402


def run_cli(*args: str) -> None:
    from click.testing import CliRunner

    from loratool.cli import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output


def rel(a: Any, b: Any) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        image_models.unet_dir(), local_files_only=True
    ).eval()


def _flux() -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(
        image_models.flux_dir(), local_files_only=True
    ).eval()


def _unet_out(model: Any) -> Any:
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10]), encoder_hidden_states=enc).sample


def _flux_out(model: Any) -> Any:
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 16, 5
    kw = dict(
        hidden_states=torch.randn(1, n_img, 4, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(n_img, 3),
        txt_ids=torch.zeros(n_txt, 3),
    )
    with torch.no_grad():
        return model(**kw).sample


UNET_TARGETS = ["to_q", "to_k", "proj_in", "conv1", "conv2", "conv_shortcut", "ff.net.2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"]


def _peft_configs(targets: list[str], conv: bool) -> list[Any]:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    out = [
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
        LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
    ]
    if conv:  # Tucker forms (PEFT's use_effective_conv2d) exist for 3×3 convs only
        out += [
            LoraConfig(
                r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=True
            ),
            LoHaConfig(
                r=4, alpha=8, target_modules=targets, init_weights=False, use_effective_conv2d=True
            ),
            LoKrConfig(
                r=2,
                alpha=8,
                target_modules=targets,
                init_weights=False,
                decompose_both=True,
                decompose_factor=4,
                use_effective_conv2d=True,
            ),
        ]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "flux"])
def test_peft_adapters_convert_and_merge_with_peft_outputs(model: str, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model

    load, out, folder = (
        (_unet, _unet_out, image_models.unet_dir())
        if model == "unet"
        else (_flux, _flux_out, image_models.flux_dir())
    )
    targets = UNET_TARGETS if model == "unet" else FLUX_TARGETS
    y0 = out(load())
    for i, cfg in enumerate(_peft_configs(targets, conv=model == "unet")):
        torch.manual_seed(i)
        pm = get_peft_model(load(), cfg)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.mul_(3.0)  # a visible effect
        y1 = out(pm)
        assert rel(y1, y0) > 0.1, cfg
        d = tmp_path / f"{i}"
        pm.save_pretrained(d / "peft")
        run_cli("convert", str(d / "peft"), "-o", str(d / "a.safetensors"), "--base", str(folder))
        run_cli("convert", str(d / "a.safetensors"), "-o", str(d / "peft2"), "--to", "peft")
        y2 = out(PeftModel.from_pretrained(load(), str(d / "peft2")))
        assert rel(y2, y1) <= 1e-5, type(cfg).__name__
        run_cli("merge", str(folder), str(d / "a.safetensors"), "-o", str(d / "merged"))
        merged = type(load()).from_pretrained(d / "merged", local_files_only=True).eval()
        assert rel(out(merged), y1) <= 1e-5, type(cfg).__name__


LYCORIS_CASES = [
    ("locon", {}),
    ("locon", {"use_tucker": True}),
    ("locon", {"dora_wd": True}),
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 4}),
    ("lokr", {"factor": 2}),
    ("lokr", {"factor": 2, "decompose_both": True, "use_tucker": True}),
    ("lokr", {"full_matrix": True}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "extra"), LYCORIS_CASES)
def test_lycoris_files_read_with_the_delta_lycoris_applies(
    algo: str, extra: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork, create_lycoris

    from loratool.sources import open_adapter

    unet = _unet()
    LycorisNetwork.apply_preset({"target_name": [".*proj_in", ".*to_q", ".*conv1", ".*ff.net.2"]})
    torch.manual_seed(0)
    net = create_lycoris(
        unet, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=3.0, algo=algo, **extra
    )
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    adapter = open_adapter(str(path)).adapter
    assert len(adapter.targets) == len(net.loras) > 0
    for m in net.loras:
        t = adapter.targets[m.lora_name]
        if algo == "locon":  # LoConModule.make_weight is ΔW / scale (gamma 1)
            ref = m.make_weight().double() * m.scale
        else:  # LoHa/LoKr get_weight is the ΔW the forward pass adds (scale once)
            ref = m.get_weight(m.shape).double()
        ours = t.delta(torch.float64)
        assert rel(ours.reshape(ref.shape), ref) <= 1e-6, m.lora_name
        if getattr(m, "wd", False):  # DoRA: the magnitude LyCORIS keeps, per output
            assert torch.equal(t.part("magnitude"), m.dora_scale.reshape(-1).float())
    net.restore()


def _kohya_locon(unet: Any, path: Path) -> int:
    """A kohya LoCon file (Linear + 3×3/1×1 Conv2d, alpha ≠ rank) over part of the tiny UNet."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(s in name for s in ("attentions.0", "resnets.0", "downsamplers", "upsamplers")):
            continue
        k, r, w = "lora_unet_" + name.replace(".", "_"), 4, mod.weight
        sd[k + ".lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g) * 0.1
        up = (w.shape[0], r, 1, 1) if w.dim() == 4 else (w.shape[0], r)
        sd[k + ".lora_up.weight"] = torch.randn(*up, generator=g) * 0.1
        sd[k + ".alpha"] = torch.tensor(2.0)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return len(sd) // 3


@pytest.mark.slow
def test_diffusers_fuse_lora_equals_loratool_merge(tmp_path: Path) -> None:
    """kohya LoCon → diffusers load_lora_into_unet + fuse_lora, against convert --base + merge
    into unet/, the sharded unet/ (then unmerge, bit-exact) and the SD single file."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from safetensors.torch import load_file

    from loratool.checkpoint import Checkpoint
    from loratool.layouts import unet_aliases

    unet = _unet()
    n = _kohya_locon(unet, tmp_path / "locon.safetensors")
    state, alphas = Loader.lora_state_dict(str(tmp_path / "locon.safetensors"))[:2]
    Loader.load_lora_into_unet(state, alphas, unet=unet)
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    ref = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    base = load_file(str(image_models.unet_dir() / "diffusion_pytorch_model.safetensors"))
    assert sum(not torch.equal(ref[k], base[k]) for k in ref) == n

    a = str(tmp_path / "a.safetensors")
    run_cli(
        "convert",
        str(tmp_path / "locon.safetensors"),
        "-o",
        a,
        "--base",
        str(image_models.build("tiny-sd")),
    )
    run_cli("merge", str(image_models.unet_dir()), a, "-o", str(tmp_path / "m"))
    got = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5

    run_cli("merge", str(image_models.single_file()), a, "-o", str(tmp_path / "m.safetensors"))
    single = load_file(str(tmp_path / "m.safetensors"))
    names = unet_aliases(single)
    assert max(float((single[names[k]] - ref[k]).abs().max()) for k in ref) <= 1e-5

    sharded = image_models.unet_dir("tiny-sd-sharded")
    run_cli("merge", str(sharded), a, "-o", str(tmp_path / "ms"), "--reversible")
    merged = Checkpoint(tmp_path / "ms")
    assert max(float((merged.read(k) - ref[k]).abs().max()) for k in ref) <= 1e-5
    # the output is a diffusers folder diffusers loads (its own index name, shards, config)
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "ms", local_files_only=True)
    assert all(torch.equal(v, merged.read(k)) for k, v in loaded.state_dict().items())
    run_cli("unmerge", str(tmp_path / "ms"), a, "-o", str(tmp_path / "back"))
    orig, back = Checkpoint(sharded), Checkpoint(tmp_path / "back")
    assert all(orig.read_bytes(k) == back.read_bytes(k) for k in orig.entries)


@pytest.mark.slow
def test_diffusers_loads_what_loratool_writes(tmp_path: Path) -> None:
    """convert --to diffusers, then diffusers' own loader + fuse_lora = loratool's merge."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from safetensors.torch import load_file

    unet = _unet()
    _kohya_locon(unet, tmp_path / "locon.safetensors")
    a, d = str(tmp_path / "a.safetensors"), str(tmp_path / "d.safetensors")
    run_cli(
        "convert",
        str(tmp_path / "locon.safetensors"),
        "-o",
        a,
        "--base",
        str(image_models.unet_dir()),
    )
    run_cli("convert", a, "-o", d, "--to", "diffusers")
    # what pipeline.load_lora_weights does: the header's LoRA config comes along
    state, alphas, metadata = Loader.lora_state_dict(d, return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    run_cli("merge", str(image_models.unet_dir()), a, "-o", str(tmp_path / "m"))
    got = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    ref = unet.state_dict()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5


def _kohya_flux(path: Path, *, linear1: bool = True) -> None:
    """A kohya Flux LoRA in BFL names: fused qkv and linear1 (q, k, v, MLP) split on reading."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    h, mlp, r = 32, 128, 4
    shapes = {
        "double_blocks_0_img_attn_qkv": (3 * h, h),
        "double_blocks_0_txt_attn_qkv": (3 * h, h),
        "double_blocks_0_img_attn_proj": (h, h),
        "double_blocks_0_img_mlp_0": (mlp, h),
        "double_blocks_0_txt_mlp_2": (h, mlp),
        "single_blocks_0_linear2": (h, h + mlp),
    }
    if linear1:
        shapes["single_blocks_0_linear1"] = (3 * h + mlp, h)
    sd: dict[str, Any] = {}
    for name, (o, i) in shapes.items():
        k = "lora_unet_" + name
        sd[k + ".lora_down.weight"] = torch.randn(r, i, generator=g) * 0.2
        sd[k + ".lora_up.weight"] = torch.randn(o, r, generator=g) * 0.2
        sd[k + ".alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))


@pytest.mark.slow
def test_kohya_flux_lora_splits_like_diffusers(tmp_path: Path) -> None:
    """BFL-named kohya Flux LoRA: diffusers' converter + fuse_lora = convert --base + merge."""
    from diffusers.loaders import FluxLoraLoaderMixin as Loader
    from safetensors.torch import load_file

    # diffusers' converter splits linear1 with Flux-dev's sizes (3072, 12288) whatever the model:
    # the tiny model's file leaves it out here, and the split is checked on its own below.
    _kohya_flux(tmp_path / "flux.safetensors", linear1=False)
    model = _flux()
    loaded = Loader.lora_state_dict(str(tmp_path / "flux.safetensors"), return_alphas=True)
    state, alphas = loaded[0], loaded[1]
    Loader.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    ref = model.state_dict()
    a = str(tmp_path / "a.safetensors")
    run_cli(
        "convert",
        str(tmp_path / "flux.safetensors"),
        "-o",
        a,
        "--base",
        str(image_models.flux_dir()),
    )
    run_cli("merge", str(image_models.flux_dir()), a, "-o", str(tmp_path / "m"))
    got = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(image_models.flux_dir() / "diffusion_pytorch_model.safetensors"))
    assert sum(not torch.equal(got[k], base[k]) for k in got) == 10  # 6 modules, 10 layers
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-5

    from loratool.sources import open_adapter

    _kohya_flux(tmp_path / "full.safetensors")
    b = str(tmp_path / "b.safetensors")
    run_cli(
        "convert",
        str(tmp_path / "full.safetensors"),
        "-o",
        b,
        "--base",
        str(image_models.flux_dir()),
    )
    fused = open_adapter(str(tmp_path / "full.safetensors")).adapter.targets
    fused_delta = fused["lora_unet_single_blocks_0_linear1"].delta(torch.float64)
    parts = open_adapter(b).adapter.targets
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    rows = [parts[f"single_transformer_blocks.0.{n}"].delta(torch.float64) for n in names]
    assert torch.equal(torch.cat(rows), fused_delta)


@pytest.mark.slow
def test_flux_back_to_kohya_is_bfl_fused_and_diffusers_reads_it(tmp_path: Path) -> None:
    """convert --to kohya of a diffusers-named Flux adapter fuses q/k/v back into BFL's qkv
    (rank 3r, exact); the same ΔW on every fused layer, and diffusers' converter loads it."""
    from diffusers.loaders import FluxLoraLoaderMixin as Loader
    from safetensors.torch import load_file

    from loratool.sources import open_adapter

    _kohya_flux(tmp_path / "flux.safetensors")
    a, k = str(tmp_path / "a.safetensors"), str(tmp_path / "k.safetensors")
    run_cli(
        "convert",
        str(tmp_path / "flux.safetensors"),
        "-o",
        a,
        "--base",
        str(image_models.flux_dir()),
    )
    run_cli("convert", a, "-o", k, "--to", "kohya")
    src = open_adapter(str(tmp_path / "flux.safetensors")).adapter.targets
    back = open_adapter(k).adapter.targets
    assert set(back) == set(src)
    for name, t in src.items():
        assert rel(back[name].delta(torch.float64), t.delta(torch.float64)) <= 1e-6, name
    assert back["lora_unet_double_blocks_0_img_attn_qkv"].rank == 12  # 3 × r

    # diffusers' kohya-Flux converter (linear1 left out: it assumes Flux-dev's sizes)
    sd = {kk: v for kk, v in load_file(k).items() if "linear1" not in kk}
    model = _flux()
    state, alphas = Loader.lora_state_dict(sd, return_alphas=True)[:2]
    Loader.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    base = load_file(str(image_models.flux_dir() / "diffusion_pytorch_model.safetensors"))
    ref = model.state_dict()
    ours = open_adapter(a).adapter.targets
    for name, t in ours.items():
        if name.startswith("single_transformer_blocks.0.") and "proj_out" not in name:
            continue  # linear1's parts
        got = ref[name + ".weight"].double() - base[name + ".weight"].double()
        assert rel(got, t.delta(torch.float64)) <= 1e-5, name
