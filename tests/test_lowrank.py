"""Exact low-rank algebra: reduce-rank, combine, extract, their rules, reports, CLI and spectra plot.

Every claim is checked against the dense reference (B·A formed in fp64, ``torch.linalg.svd``):
top-k singular values, Eckart–Young optimal errors, exact sums; the rank rules on adapters built
with known singular values, at their thresholds and 1e-5 either side.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loratool
from loratool import Adapter, CompatibilityError, Target, UsageError
from loratool.adapter import scale_for
from loratool.checkpoint import Checkpoint
from loratool.cli import cli
from loratool.lowrank import REL_TOL, make_rule, spectrum

F64 = torch.float64


def rand_target(
    name: str,
    m: int,
    n: int,
    r: int,
    *,
    alpha: float | None = None,
    rule: str = "standard",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    kind: str = "linear",
) -> Target:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g) / math.sqrt(n)
    B = torch.randn(m, r, generator=g) * 0.1
    return Target.from_factors(
        name, A.to(dtype), B.to(dtype), alpha=alpha, scale_rule=rule, kind=kind
    )


def known_target(
    name: str,
    svals: list[float],
    m: int,
    n: int,
    *,
    alpha: float | None = None,
    rule: str = "standard",
    seed: int = 0,
) -> Target:
    """A target whose ΔW has exactly the singular values ``svals`` (to fp32 rounding)."""
    g = torch.Generator().manual_seed(seed)
    r = len(svals)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64)).Q
    a = float(r) if alpha is None else alpha
    s = scale_for(a, r, rule)
    S = torch.tensor(svals, dtype=F64)
    B = U * S.sqrt() / s
    A = S.sqrt()[:, None] * V.T
    return Target.from_factors(name, A.float(), B.float(), alpha=a, scale_rule=rule)


def adapter_of(*targets: Target) -> Adapter:
    return Adapter.from_targets(targets, hub_id="org/base", revision="main")


def dense(t: Target) -> torch.Tensor:
    return t.delta(F64)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.to(F64) - y.to(F64)).norm() / max(float(y.to(F64).norm()), 1e-300))


def best_rank_k(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d.to(F64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


# ---------------------------------------------------------------------------------------------
# The QR core against the dense SVD


@pytest.mark.parametrize(("m", "n", "r", "k"), [(12, 9, 4, 2), (576, 1536, 16, 8)])
def test_top_k_singular_values_equal_dense_svd(m: int, n: int, r: int, k: int) -> None:
    t = rand_target("model.layers.0.mlp.up_proj", m, n, r, alpha=32)
    ref = torch.linalg.svdvals(dense(t))
    assert spectrum(t).singular_values == pytest.approx(ref[:r].tolist(), rel=1e-5)

    out, report = loratool.reduce_rank(adapter_of(t), rank=k)
    new = out.targets[t.name]
    assert new.rank == k and new.scale == pytest.approx(t.scale)
    got = torch.tensor(spectrum(new).singular_values, dtype=F64)
    torch.testing.assert_close(got, ref[:k], rtol=1e-5, atol=0)
    # Eckart–Young: the error is exactly that of the best rank-k approximation
    err = float((dense(new) - dense(t)).norm())
    assert err == pytest.approx(float(ref[k:].norm()), rel=1e-4)
    row = report.targets[0]
    assert row.largest_dropped_sv == pytest.approx(float(ref[k]), rel=1e-5)
    assert row.sv_max == pytest.approx(float(ref[0]), rel=1e-5)
    kept = float((ref[:k] ** 2).sum() / (ref**2).sum())
    assert row.retained_energy == pytest.approx(kept, rel=1e-6)


def test_reduce_to_same_rank_is_lossless() -> None:
    targets = [
        rand_target("a.q_proj", 40, 30, 8, alpha=16, seed=1),
        rand_target("a.k_proj", 40, 30, 8, alpha=3, seed=2),  # batched with q_proj
        rand_target("a.down_proj", 24, 64, 6, alpha=6, seed=3),
        rand_target("a.wide", 6, 50, 8, alpha=8, seed=4),  # r > out: capped, still exact
        rand_target("a.emb", 100, 12, 4, alpha=4, seed=5, kind="embedding"),
        rand_target("a.neg", 20, 20, 4, alpha=-2.0, seed=6),  # a negative scale
    ]
    src = adapter_of(*targets)
    out, report = loratool.reduce_rank(src, rank=8)
    for t in targets:
        new = out.targets[t.name]
        assert new.rank == min(8, t.rank, t.in_features, t.out_features)
        assert new.kind == t.kind and new.scale_rule == t.scale_rule
        assert new.scale == pytest.approx(t.scale)
        assert rel(dense(new), dense(t)) < 1e-6, t.name
    assert all(r.retained_energy == pytest.approx(1.0) for r in report.targets)
    assert out.binding() == src.binding()


def test_reduce_rslora_preserves_delta_and_rule() -> None:
    t = rand_target("m.v_proj", 48, 40, 16, alpha=8.0, rule="rslora")
    out, _ = loratool.reduce_rank(adapter_of(t), rank=16)
    new = out.targets[t.name]
    assert new.scale_rule == "rslora" and new.alpha == pytest.approx(8.0)
    assert rel(dense(new), dense(t)) < 1e-6
    out, _ = loratool.reduce_rank(adapter_of(t), rank=4)
    new = out.targets[t.name]
    assert new.scale_rule == "rslora"
    assert new.alpha == pytest.approx(t.scale * 2.0)  # α' = s·√k keeps s = α/√r
    assert rel(dense(new), best_rank_k(dense(t), 4)) < 1e-5


def test_reduce_keeps_dtype_binding_and_provenance(tmp_path: Path) -> None:
    t = rand_target("x.q_proj", 32, 32, 8, dtype=torch.bfloat16)
    src = Adapter.from_targets([t], hub_id="org/base", provenance={"training": {"steps": 3}})
    out, _ = loratool.reduce_rank(src, energy=0.5)
    new = out.targets[t.name]
    assert new.dtype == "BF16" and new.lora_A.dtype == torch.bfloat16
    assert out.provenance["training"] == {"steps": 3}
    assert out.provenance["operations"][-1]["operation"] == "reduce-rank"
    out.save(tmp_path / "r.safetensors")
    back = loratool.load(tmp_path / "r.safetensors", verify=True)
    assert back.binding().hub_id == "org/base"


# ---------------------------------------------------------------------------------------------
# Rules at their boundaries (σ = 3, 2, 1: Σσ² = 14, Σσ = 6)

D = 1e-5  # just above / below: far outside REL_TOL, far inside any other margin
BOUNDARIES = [
    ({"energy": 9 / 14}, 1),
    ({"energy": 9 / 14 + D}, 2),
    ({"energy": 13 / 14 - D}, 2),
    ({"energy": 13 / 14}, 2),
    ({"energy": 13 / 14 + D}, 3),
    ({"energy": 1.0}, 3),
    ({"sv_fro": math.sqrt(9 / 14)}, 1),
    ({"sv_fro": math.sqrt(13 / 14) - D}, 2),
    ({"sv_fro": math.sqrt(13 / 14)}, 2),
    ({"sv_fro": math.sqrt(13 / 14) + D}, 3),
    ({"sv_cumulative": 0.5 - D}, 1),
    ({"sv_cumulative": 0.5}, 1),  # kohya's off-by-one would keep 2 here
    ({"sv_cumulative": 0.5 + D}, 2),
    ({"sv_cumulative": 5 / 6}, 2),
    ({"sv_cumulative": 5 / 6 + D}, 3),
    ({"sv_ratio": 1.0}, 1),
    ({"sv_ratio": 1.5 * (1 - D)}, 1),  # 2 < 3 / P
    ({"sv_ratio": 1.5}, 2),  # 2 = 3 / 1.5: kept
    ({"sv_ratio": 3.0 * (1 - D)}, 2),
    ({"sv_ratio": 3.0}, 3),
    ({"rank": 2}, 2),
    ({"rank": 7}, 3),  # never above the input rank
    ({"energy": 1.0, "max_rank": 2}, 2),
    ({"energy": 0.1, "min_rank": 2}, 2),
    ({"sv_ratio": 1.0, "min_rank": 9}, 3),  # min_rank is still capped by the input rank
]


@pytest.mark.parametrize(("rule", "k"), BOUNDARIES, ids=[str(r) for r, _ in BOUNDARIES])
def test_rule_boundaries(rule: dict[str, float], k: int) -> None:
    t = known_target("b.q_proj", [3.0, 2.0, 1.0], 20, 15, alpha=6.0)
    out, report = loratool.reduce_rank(adapter_of(t), **rule)  # type: ignore[arg-type]
    assert out.targets[t.name].rank == k
    row = report.targets[0]
    assert row.new_rank == k and row.old_rank == 3
    kept = [9.0, 13.0, 14.0][k - 1] / 14.0
    assert row.retained_energy == pytest.approx(kept, rel=1e-6)
    assert row.largest_dropped_sv == pytest.approx([2.0, 1.0, 0.0][k - 1], rel=1e-5, abs=1e-6)


def test_rule_select_is_exact_on_plain_numbers() -> None:
    # the same rules without any factorisation in between: ties are met, 2·REL_TOL is not
    sv = [3.0, 2.0, 1.0]
    energy = make_rule(energy=13 / 14)
    assert energy is not None and energy.select(sv, cap=3) == 2
    above = make_rule(energy=13 / 14 * (1 + 2 * REL_TOL))
    assert above is not None and above.select(sv, cap=3) == 3
    ratio = make_rule(sv_ratio=1.5)
    assert ratio is not None and ratio.select(sv, cap=3) == 2


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({}, "no-rule"),
        ({"rank": 4, "energy": 0.9}, "rule-conflict"),
        ({"rank": 4, "max_rank": 8}, "rule-conflict"),
        ({"max_rank": 8}, "no-rule"),
        ({"rank": 0}, "bad-rule"),
        ({"rank": 2.5}, "bad-rule"),
        ({"energy": 0.0}, "bad-rule"),
        ({"energy": 1.5}, "bad-rule"),
        ({"energy": float("nan")}, "bad-rule"),
        ({"sv_fro": -0.1}, "bad-rule"),
        ({"sv_cumulative": 2.0}, "bad-rule"),
        ({"sv_ratio": 0.5}, "bad-rule"),
        ({"energy": 0.9, "min_rank": 4, "max_rank": 2}, "bad-rule"),
        ({"energy": 0.9, "max_rank": 0}, "bad-rule"),
    ],
)
def test_bad_rule_combinations_are_usage_errors(kwargs: dict[str, float], code: str) -> None:
    t = rand_target("u.q_proj", 8, 8, 2)
    with pytest.raises(UsageError) as e:
        loratool.reduce_rank(adapter_of(t), **kwargs)  # type: ignore[arg-type]
    assert (e.value.code == code and e.value.hint is not None) or code == "bad-rule"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 20),
    r=st.integers(1, 12),
    which=st.sampled_from(["rank", "energy", "sv_fro", "sv_cumulative", "sv_ratio"]),
    value=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
)
def test_any_rule_gives_an_optimal_rank_within_bounds(
    m: int, n: int, r: int, which: str, value: float, seed: int
) -> None:
    t = rand_target("h.q_proj", m, n, r, alpha=float(r), seed=seed)
    arg: float | int = max(1, round(value * 12)) if which == "rank" else value
    if which == "sv_ratio":
        arg = 1.0 / value
    out, report = loratool.reduce_rank(adapter_of(t), **{which: arg})  # type: ignore[arg-type]
    new = out.targets[t.name]
    assert 1 <= new.rank <= min(m, n, r)
    assert report.targets[0].new_rank == new.rank
    ref = torch.linalg.svdvals(dense(t))
    err = float((dense(new) - dense(t)).norm())
    assert err == pytest.approx(float(ref[new.rank :].norm()), rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Zero targets


def test_zero_target_is_kept_with_zero_factors_and_a_warning(tmp_path: Path) -> None:
    t = rand_target("z.q_proj", 16, 12, 4)
    zero = t.replace(lora_A=t.lora_A, lora_B=torch.zeros(16, 4))  # B right after init
    live = rand_target("z.v_proj", 16, 12, 4, seed=3)
    src = adapter_of(zero, live)
    for kwargs, k in (
        ({"energy": 0.9}, 1),
        ({"rank": 3}, 3),
        ({"sv_ratio": 2.0, "min_rank": 2}, 2),
    ):
        out, report = loratool.reduce_rank(src, **kwargs)  # type: ignore[arg-type]
        new = out.targets["z.q_proj"]
        assert new.rank == k
        assert torch.count_nonzero(new.lora_A) == 0 and torch.count_nonzero(new.lora_B) == 0
        row = {r.name: r for r in report.targets}["z.q_proj"]
        assert row.zero and row.retained_energy == 1.0 and row.largest_dropped_sv == 0.0
        assert any("z.q_proj" in w for w in report.warnings)
        json.dumps(report.to_json(), allow_nan=False)
    out.save(tmp_path / "z.safetensors")
    assert loratool.verify(tmp_path / "z.safetensors").ok
    alpha0 = rand_target("z.o_proj", 8, 8, 2, alpha=0.0)
    out, report = loratool.reduce_rank(adapter_of(alpha0), energy=0.5)
    assert report.targets[0].zero and out.targets["z.o_proj"].rank == 1


# ---------------------------------------------------------------------------------------------
# combine


def test_combine_halves_give_back_the_adapter() -> None:
    x = adapter_of(rand_target("c.q_proj", 32, 24, 8, alpha=16), rand_target("c.v_proj", 8, 24, 5))
    half, report = loratool.combine([x, x], weights=[0.5, 0.5])
    for name, t in x.targets.items():
        assert rel(dense(half.targets[name]), dense(t)) < 1e-6
    assert {r.method for r in report.targets} == {"concat", "qr-core"}  # v_proj: 2·5 > 8 = out
    assert half.targets["c.v_proj"].rank == 8
    cut, _ = loratool.combine([x, x], weights=[0.5, 0.5], rank=8)
    assert rel(dense(cut.targets["c.q_proj"]), dense(x.targets["c.q_proj"])) < 1e-5


def test_combine_difference_with_itself_is_zero() -> None:
    x = adapter_of(rand_target("c.q_proj", 32, 24, 8, alpha=16))
    for rule in ({}, {"rank": 4}, {"energy": 0.99}):
        out, report = loratool.combine([x, x], weights=[1.0, -1.0], **rule)  # type: ignore[arg-type]
        t = out.targets["c.q_proj"]
        assert float(dense(t).abs().max()) == 0.0
        assert report.targets[0].zero and t.rank == (4 if rule.get("rank") else 1)


def test_combine_is_the_dense_weighted_sum_across_ranks_alphas_rules_dtypes() -> None:
    a = adapter_of(
        rand_target("l.q_proj", 40, 32, 8, alpha=16, seed=1),
        rand_target("l.k_proj", 20, 32, 4, alpha=4, seed=2),
    )
    b = adapter_of(
        rand_target("l.q_proj", 40, 32, 16, alpha=8, rule="rslora", dtype=torch.bfloat16, seed=3),
        rand_target("l.o_proj", 32, 32, 2, alpha=1, seed=4),  # only in b
    )
    c = adapter_of(rand_target("l.q_proj", 40, 32, 4, alpha=2, dtype=torch.float16, seed=5))
    weights = [0.7, -1.3, 2.0]
    out, _ = loratool.combine([a, b, c], weights=weights)
    assert set(out.targets) == {"l.q_proj", "l.k_proj", "l.o_proj"}
    for name, t in out.targets.items():
        want = sum(
            w * dense(x.targets[name])
            for w, x in zip(weights, (a, b, c), strict=True)
            if name in x.targets
        )
        assert rel(dense(t), want) < 1e-6, name
    assert out.targets["l.q_proj"].dtype == "F32" and out.targets["l.q_proj"].rank == 28
    assert out.targets["l.q_proj"].scale == pytest.approx(1.0)
    assert out.binding().hub_id == "org/base"
    # with a rule: the best rank-k approximation of the same dense sum
    cut, _ = loratool.combine([a, b, c], weights=weights, rank=6)
    want = sum(w * dense(x.targets["l.q_proj"]) for w, x in zip(weights, (a, b, c), strict=True))
    assert rel(dense(cut.targets["l.q_proj"]), best_rank_k(want, 6)) < 1e-5
    got = torch.tensor(spectrum(cut.targets["l.q_proj"]).singular_values, dtype=F64)
    torch.testing.assert_close(got, torch.linalg.svdvals(want)[:6], rtol=1e-5, atol=0)


def test_combine_dtype_is_the_widest_input() -> None:
    bf = adapter_of(rand_target("d.q_proj", 8, 8, 2, dtype=torch.bfloat16))
    f16 = adapter_of(rand_target("d.q_proj", 8, 8, 2, dtype=torch.float16, seed=1))
    out, _ = loratool.combine([bf, bf])
    assert out.targets["d.q_proj"].dtype == "BF16"
    out, _ = loratool.combine([bf, f16])
    assert out.targets["d.q_proj"].dtype == "F32"


def test_combine_caps_rank_and_rejects_mismatched_targets() -> None:
    xs = [adapter_of(rand_target("e.q_proj", 6, 10, 4, seed=s)) for s in range(3)]
    out, _ = loratool.combine(xs)
    t = out.targets["e.q_proj"]
    assert t.rank == 6  # 3·4 = 12 > min(6, 10)
    want = sum(dense(x.targets["e.q_proj"]) for x in xs)
    assert rel(dense(t), want) < 1e-6
    out, _ = loratool.combine(xs, rank=50)
    assert out.targets["e.q_proj"].rank == 6
    other = adapter_of(rand_target("e.q_proj", 7, 10, 4))
    with pytest.raises(CompatibilityError) as e:
        loratool.combine([xs[0], other])
    assert e.value.code == "target-mismatch" and "e.q_proj" in e.value.message
    with pytest.raises(UsageError):
        loratool.combine(xs, weights=[1.0])
    with pytest.raises(UsageError):
        loratool.combine([])


# ---------------------------------------------------------------------------------------------
# extract


def _write_ckpt(folder: Path, tensors: dict[str, torch.Tensor], model_type: str = "llama") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def _low_rank(m: int, n: int, svals: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(svals), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, len(svals), generator=g, dtype=F64)).Q
    return ((U * torch.tensor(svals, dtype=F64)) @ V.T).float()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny base and a fine-tuned copy that differs by known low-rank deltas."""
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 16, generator=g),
        "model.layers.0.mlp.big_proj.weight": torch.randn(320, 300, generator=g),
        "model.norm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(50, 16, generator=g),
    }
    deltas = {
        "model.layers.0.self_attn.q_proj": _low_rank(16, 16, [0.5, 0.3, 0.1], 1),
        "model.layers.0.mlp.up_proj": _low_rank(40, 16, [0.4, 0.2], 2),
        "model.layers.0.mlp.big_proj": _low_rank(320, 300, [5.0, 4.0, 3.0, 2.0, 1.0], 3),
        "model.embed_tokens": _low_rank(50, 16, [1.0], 4),  # changed, but all-linear skips it
        "lm_head": _low_rank(50, 16, [1.0], 5),
    }
    ft = dict(base)
    for name, d in deltas.items():
        ft[name + ".weight"] = base[name + ".weight"] + d
    b = _write_ckpt(tmp_path / "base", base)
    (b / "loratool_source.json").write_text(json.dumps({"hub_id": "org/tiny", "source": "test"}))
    f = _write_ckpt(tmp_path / "ft", ft)
    return b, f, deltas


def test_extract_recovers_known_low_rank_deltas(pair) -> None:  # type: ignore[no-untyped-def]
    base, ft, deltas = pair
    calls: list[tuple[int, int, str]] = []
    out, report = loratool.extract(
        base, ft, rank=5, device="cpu", progress=lambda d, t, n: calls.append((d, t, n))
    )
    assert set(out.targets) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.big_proj",
    }
    for name, t in out.targets.items():
        assert t.rank == 5 and t.scale == 1.0 and t.dtype == "F32"
        assert rel(t.delta(), deltas[name]) < 2e-6, name
    methods = {r.name: r.method for r in report.targets}
    assert methods["model.layers.0.mlp.big_proj"] == "randomized"
    assert methods["model.layers.0.self_attn.q_proj"] == "exact-svd"
    assert report.skipped == [{"name": "model.layers.0.self_attn.k_proj", "reason": "unchanged"}]
    assert all(r.retained_energy == pytest.approx(1.0, abs=1e-6) for r in report.targets)
    assert [c[0] for c in calls] == [1, 2, 3, 4] and {c[1] for c in calls} == {4}
    ckpt = Checkpoint(base)
    assert out.binding().fingerprint == ckpt.fingerprint_for(out)
    assert out.binding().hub_id == "org/tiny"
    assert set(ckpt.check_fits(out).values()) == {n + ".weight" for n in out.targets}


@pytest.mark.parametrize("method", ["auto", "exact", "randomized"])
def test_extract_energy_rule_finds_the_true_rank(pair, method: str) -> None:  # type: ignore[no-untyped-def]
    base, ft, deltas = pair
    out, report = loratool.extract(
        base, ft, energy=1.0, targets="big_proj,up_proj", method=method, device="cpu"
    )
    assert out.targets["model.layers.0.mlp.big_proj"].rank == 5
    assert out.targets["model.layers.0.mlp.up_proj"].rank == 2
    # 25+16+9 of 55 = 50/55 of the energy: k = 3 exactly at the threshold
    out, report = loratool.extract(base, ft, energy=50 / 55, targets="big_proj", method=method)
    row = report.targets[0]
    assert row.new_rank == 3 and row.retained_energy == pytest.approx(50 / 55, rel=1e-5)
    assert row.largest_dropped_sv == pytest.approx(2.0, rel=1e-4)
    d = deltas["model.layers.0.mlp.big_proj"]
    assert rel(out.targets["model.layers.0.mlp.big_proj"].delta(), best_rank_k(d, 3)) < 1e-5


def test_extract_caps_rank_and_handles_embedding_and_conv1d(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),  # Conv1D [in, out]
        "wte.weight": torch.randn(30, 8, generator=g),
    }
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b = _write_ckpt(tmp_path / "b", base, model_type="gpt2")
    f = _write_ckpt(tmp_path / "f", ft, model_type="gpt2")
    out, _ = loratool.extract(b, f, rank=100, targets="c_attn,wte", device="cpu")
    conv, emb = out.targets["h.0.attn.c_attn"], out.targets["wte"]
    assert (conv.kind, conv.in_features, conv.out_features, conv.rank) == ("conv1d", 8, 24, 8)
    assert (emb.kind, emb.in_features, emb.out_features, emb.rank) == ("embedding", 30, 8, 8)
    for t, key in ((conv, "h.0.attn.c_attn.weight"), (emb, "wte.weight")):
        assert rel(t.delta().T, ft[key] - base[key]) < 1e-5  # full rank kept: exact
    Checkpoint(b).check_fits(out)


def test_extract_streams_a_sharded_bf16_base(tiny_sharded_llama_dir: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(tiny_sharded_llama_dir)
    assert len(ckpt.shards) >= 3
    key = next(k for k in ckpt.entries if k.endswith("mlp.down_proj.weight"))
    w = ckpt.read(key).float()
    d = _low_rank(w.shape[0], w.shape[1], [0.5, 0.25], 7)
    ft = {k: ckpt.read(k) for k in ckpt.entries}
    ft[key] = (w + d).to(torch.bfloat16)
    f = _write_ckpt(tmp_path / "ft", ft)
    out, report = loratool.extract(tiny_sharded_llama_dir, f, energy=0.999)
    name = key[: -len(".weight")]
    assert set(out.targets) == {name}
    true = ft[key].float() - w  # d, plus the bf16 rounding of the fine-tuned weights
    row = report.targets[0]
    assert row.retained_energy >= 0.999 * (1 - 1e-6) and row.new_rank >= 2
    assert rel(out.targets[name].delta(), true) == pytest.approx(row.relative_error, rel=1e-3)
    assert len(report.skipped) > 3


def test_extract_errors(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, ft, _ = pair
    with pytest.raises(UsageError) as e:
        loratool.extract(base, ft, rank=2, targets="nope_proj")
    assert e.value.code == "no-match"
    with pytest.raises(UsageError) as e:
        loratool.extract(base, base, rank=2)
    assert e.value.code == "no-difference"
    with pytest.raises(UsageError) as e:
        loratool.extract(base, ft)
    assert e.value.code == "no-rule"
    with pytest.raises(UsageError):
        loratool.extract(base, ft, sv_cumulative=0.9, method="randomized")
    other = load_file(str(ft / "model.safetensors"))
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(41, 16)
    bad = _write_ckpt(tmp_path / "bad", other)
    with pytest.raises(CompatibilityError) as e2:
        loratool.extract(base, bad, rank=2)
    assert e2.value.code == "shape-mismatch"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError) as e:
            loratool.extract(base, ft, rank=2, device="cuda")
        assert e.value.code == "no-gpu"


# ---------------------------------------------------------------------------------------------
# CLI


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def adapter_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.safetensors"
    adapter_of(
        known_target("model.layers.0.self_attn.q_proj", [3.0, 2.0, 1.0], 20, 15, alpha=6.0),
        rand_target("model.layers.0.self_attn.v_proj", 20, 15, 8, alpha=16, rule="rslora"),
    ).save(path)
    return path


def test_cli_reduce_rank_json_and_exit_codes(adapter_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    r = run("reduce-rank", adapter_file, "-o", out, "--energy", str(13 / 14), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {t["name"]: t for t in doc["targets"]}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q["old_rank"], q["new_rank"]) == (3, 2)
    assert q["largest_dropped_sv"] == pytest.approx(1.0, rel=1e-5)
    assert doc["rule"] == {"name": "energy", "value": 13 / 14, "max_rank": None, "min_rank": None}
    assert doc["summary"]["params_after"] < doc["summary"]["params_before"]
    assert doc["output"] == str(out)
    assert loratool.verify(out).ok
    r = run("reduce-rank", adapter_file, "-o", out, "--rank", "2")
    assert r.exit_code == 2 and "error[output-exists]" in r.stderr
    r = run("reduce-rank", adapter_file, "-o", out, "--rank", "2", "--force")
    assert r.exit_code == 0 and r.stdout == "" and "q_proj" in r.stderr
    r = run("reduce-rank", adapter_file, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "error[no-rule]" in r.stderr and "hint:" in r.stderr
    r = run(
        "reduce-rank",
        adapter_file,
        "-o",
        tmp_path / "x.safetensors",
        "--rank",
        "2",
        "--energy",
        "0.5",
    )
    assert r.exit_code == 2 and "error[rule-conflict]" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    r = run(
        "reduce-rank",
        tmp_path / "missing.safetensors",
        "-o",
        tmp_path / "y.safetensors",
        "--rank",
        "2",
    )
    assert r.exit_code == 3


def test_cli_reads_a_peft_rslora_folder(tmp_path: Path) -> None:
    # any format convert reads: a PEFT folder with use_rslora, scale α/√r = 16/√8
    folder = tmp_path / "peft"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True,
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 32, generator=g), torch.randn(24, 8, generator=g)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B},
        str(folder / "adapter_model.safetensors"),
    )
    out = tmp_path / "r.safetensors"
    r = run("reduce-rank", folder, "-o", out, "--rank", "8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["input_format"] == "peft"
    t = loratool.load(out).targets["model.layers.0.self_attn.q_proj"]
    assert t.scale_rule == "rslora" and t.scale == pytest.approx(16 / math.sqrt(8))
    assert rel(t.delta(), (B @ A) * 16 / math.sqrt(8)) < 1e-6


def test_cli_combine(adapter_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    r = run(
        "combine",
        adapter_file,
        adapter_file,
        "-o",
        out,
        "--weight",
        "1",
        "--weight",
        "-1",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["summary"]["zero_targets"] == 2
    assert [i["weight"] for i in doc["inputs"]] == [1.0, -1.0]
    r = run(
        "combine", adapter_file, adapter_file, "-o", tmp_path / "d.safetensors", "--weight", "1"
    )
    assert r.exit_code == 2 and "error[weights]" in r.stderr
    r = run(
        "combine", adapter_file, adapter_file, "-o", tmp_path / "e.safetensors", "--sv-fro", "0.9"
    )
    assert r.exit_code == 0
    twice = loratool.load(tmp_path / "e.safetensors")
    src = loratool.load(adapter_file)
    for name, t in twice.targets.items():
        assert t.rank <= min(t.in_features, t.out_features)
        assert float((t.delta() - 2 * src.targets[name].delta()).norm()) <= (
            0.45 * float(2 * src.targets[name].delta().norm())
        )


def test_cli_extract(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, ft, _ = pair
    out = tmp_path / "x.safetensors"
    r = run("extract", base, ft, "-o", out, "--rank", "4", "--targets", "q_proj,big_proj",
            "--device", "cpu", "--dtype", "bf16", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {t["name"]: t["method"] for t in doc["targets"]} == {
        "model.layers.0.self_attn.q_proj": "exact-svd",
        "model.layers.0.mlp.big_proj": "randomized",
    }
    assert doc["device"] == "cpu"
    adapter = loratool.load(out, verify=True)
    assert adapter.dtypes == ["BF16"]
    r = run("extract", base, ft, "-o", tmp_path / "y.safetensors", "--rank", "2")
    assert r.exit_code == 0 and "skipped model.layers.0.self_attn.k_proj" in r.stderr
    if not torch.cuda.is_available():
        r = run(
            "extract", base, ft, "-o", tmp_path / "z.safetensors", "--rank", "2", "--device", "cuda"
        )
        assert r.exit_code == 2 and "error[no-gpu]" in r.stderr


# ---------------------------------------------------------------------------------------------
# inspect --plot


def test_inspect_plot_writes_an_image(adapter_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    r = run("inspect", adapter_file, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("inspect", adapter_file, "--plot", png)
    assert r.exit_code == 2 and "error[output-exists]" in r.stderr
    r = run("inspect", adapter_file, "--plot", png, "--force")
    assert r.exit_code == 0
    r = run("inspect", adapter_file, "--plot", tmp_path / "s.gif")
    assert r.exit_code == 2 and "error[plot-format]" in r.stderr


def test_inspect_plot_without_matplotlib_names_the_extra(
    adapter_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    r = run("inspect", adapter_file, "--plot", tmp_path / "s.png")
    assert r.exit_code == 2
    assert "error[missing-extra]" in r.stderr and "loratool[plot]" in r.stderr
    assert not (tmp_path / "s.png").exists()


# -- the target table: natural order, cut to the worst rows unless --all ----------------------


def _table_names(text: str) -> list[str]:
    """The target column of the rich table on stderr (rows whose first cell is a layer name)."""
    cells = [line.split("│")[0].strip() for line in text.splitlines() if "│" in line]
    return [c for c in cells if c.startswith("layers.")]


def test_cli_reduce_rank_table_is_natural_and_cut_unless_all(tmp_path: Path) -> None:
    # 25 targets: under --rank 1 target i keeps 9 / (9 + (0.1·i)²) of its energy, so the 20
    # that keep the least are layers.5 … layers.24; lexicographic order would put 10 before 5.
    path = tmp_path / "many.safetensors"
    adapter_of(
        *(known_target(f"layers.{i}.q", [3.0, 0.1 * i + 1e-3], 20, 15, seed=i) for i in range(25))
    ).save(path)
    r = run("reduce-rank", path, "-o", tmp_path / "r.safetensors", "--rank", "1")
    assert r.exit_code == 0, r.output
    assert _table_names(r.stderr) == [f"layers.{i}.q" for i in range(5, 25)]
    assert (
        "… 5 more rows (shown: the 20 that keep the least energy); --all to see every row"
        in r.stderr
    )
    r = run("reduce-rank", path, "-o", tmp_path / "r2.safetensors", "--rank", "1", "--all")
    assert r.exit_code == 0, r.output
    assert _table_names(r.stderr) == [f"layers.{i}.q" for i in range(25)]
    assert "more rows" not in r.stderr
    r = run("reduce-rank", path, "-o", tmp_path / "r3.safetensors", "--rank", "1", "--json")
    assert len(json.loads(r.stdout)["targets"]) == 25  # JSON always has every row


def test_cli_combine_and_extract_tables_are_natural(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "few.safetensors"
    adapter_of(*(rand_target(f"layers.{i}.q", 12, 10, 2, seed=i) for i in (10, 2, 1))).save(path)
    r = run("combine", path, path, "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.output
    assert _table_names(r.stderr) == ["layers.1.q", "layers.2.q", "layers.10.q"]
    assert "more rows" not in r.stderr
    base, ft, _ = pair
    r = run("extract", base, ft, "-o", tmp_path / "e.safetensors", "--rank", "2", "--all")
    assert r.exit_code == 0, r.output


def test_natural_key_orders_numbers_as_numbers() -> None:
    from loratool.naturalsort import natural_key

    names = ["layers.10.q", "layers.2.q", "layers.1.v", "layers.1.q", "9", "layers.02.q", "lm_head"]
    assert sorted(names, key=natural_key) == [
        "9",
        "layers.1.q",
        "layers.1.v",
        "layers.02.q",
        "layers.2.q",
        "layers.10.q",
        "lm_head",
    ]
