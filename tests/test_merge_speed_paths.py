"""The merge's fast paths give what the plain ones give: in-place blocks, byte copies, no GC."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_merge import make_adapter, save  # noqa: E402

import loratool  # noqa: E402
from loratool.checkpoint import Checkpoint  # noqa: E402
from loratool.errors import CompatibilityError, FormatError  # noqa: E402
from loratool.merging.delta import apply_delta  # noqa: E402
from loratool.stream import SafetensorsWriter  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 700), (3, 1 << 17), (1, 33), (5000, 24)])
def test_in_place_apply_is_the_separate_output_apply(
    dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """``out`` aliasing ``W`` (the pipeline's in-place merge): same bytes, sums, misses, sidecar."""
    g = torch.Generator().manual_seed(0)
    rows, cols = shape
    W = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    W[0, :3] = 0.0
    W[-1, -3:] = -0.0  # signed zeros: the round-trip counts compare bits
    left = torch.randn(rows, 8, generator=g) * 0.05
    right = torch.randn(8, cols, generator=g) / cols**0.5
    out = torch.empty_like(W)
    want = apply_delta(W, left, right, out, roundtrip=True, collect=True)
    inplace = W.clone()
    got = apply_delta(inplace, left, right, inplace, roundtrip=True, collect=True)
    assert torch.equal(inplace.view(torch.uint8), out.view(torch.uint8))
    assert got.sums == want.sums
    assert (got.off, got.max_ulp) == (want.off, want.max_ulp) and want.off > 0
    assert got.index is not None and want.index is not None
    assert got.value is not None and want.value is not None
    assert torch.equal(got.index, want.index)
    assert torch.equal(got.value.view(torch.uint8), want.value.view(torch.uint8))


def test_streamed_refusals_still_tell_a_broken_base_from_an_overflow(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The in-place merge overwrote W; a NaN in the base is still named as the base's fault."""
    ckpt = Checkpoint(tiny_llama_dir)
    state = {k: ckpt.read(k).clone() for k in ckpt.entries}
    key = "model.layers.1.self_attn.q_proj.weight"
    state[key][3, 4] = float("nan")
    broken = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(broken))
    a = make_adapter(tiny_llama_dir, ("q_proj",))
    with pytest.raises(FormatError) as e:
        loratool.merge(broken, [a], tmp_path / "out")
    assert e.value.code == "non-finite" and key in str(e.value)
    assert not (tmp_path / "out").exists()
    huge = make_adapter(tiny_llama_dir, ("q_proj",), std=300.0)  # |ΔW| ~ 1e5 > f16's 65504
    half = tmp_path / "half.safetensors"
    state[key][3, 4] = 0.0
    save_file({k: v.half() for k, v in state.items()}, str(half))
    with pytest.raises(CompatibilityError) as c:
        loratool.merge(half, [huge], tmp_path / "out")  # f16 in place: the result overflows
    assert c.value.code == "non-finite-result"


def test_untargeted_tensors_are_copied_as_bytes(
    tiny_sharded_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors no adapter touches go file to file (copy_from), never decoded and re-encoded."""
    copied: list[str] = []
    real = SafetensorsWriter.copy_from

    def spy(self: SafetensorsWriter, name: str, *args: object, **kwargs: object) -> None:
        copied.append(name)
        real(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SafetensorsWriter, "copy_from", spy)
    a = save(make_adapter(tiny_sharded_llama_dir, ("q_proj",)), tmp_path / "a.safetensors")
    report = loratool.merge(tiny_sharded_llama_dir, [a], tmp_path / "m")
    base, got = Checkpoint(tiny_sharded_llama_dir), Checkpoint(tmp_path / "m")
    targeted = {t.key for t in report.targets}
    assert sorted(copied) == sorted(set(base.entries) - targeted)
    for k in copied:
        assert got.read_bytes(k) == base.read_bytes(k)


def test_the_collector_is_back_on_after_a_merge(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a = make_adapter(tiny_llama_dir, ("q_proj",))
    assert gc.isenabled()
    loratool.merge(tiny_llama_dir, [a], tmp_path / "m")
    assert gc.isenabled()
    bad = make_adapter(tiny_llama_dir, ("q_proj",), std=300.0)
    with pytest.raises(CompatibilityError):
        loratool.merge(tiny_llama_dir, [bad], tmp_path / "m2", dtype="f16")
    assert gc.isenabled()
