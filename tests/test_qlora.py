"""QLoRA: the NF4/int8 codec against its references, QuantLinear, the quantised load, merge modes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from loratool import lora
from loratool.checkpoint import Checkpoint
from loratool.cli import cli
from loratool.format import load
from loratool.quant import codec
from loratool.quant.linear import QuantLinear
from loratool.quant.merging import weight_errors
from loratool.quant.model import load_quantized, quantize_model

# torchao and bitsandbytes are references, not dependencies (importing either slows and clutters
# every transformers/PEFT import): the two anchor tests run where this names a folder they were
# installed into (`pip install --no-deps --target DIR torchao bitsandbytes`).
ANCHORS = os.environ.get("LORATOOL_QUANT_ANCHORS")


# -- the codec ------------------------------------------------------------------------------------


def test_nf4_costs_about_a_quarter_of_bf16_and_keeps_the_shape() -> None:
    torch.manual_seed(0)
    w = torch.randn(1536, 576)
    p = codec.quantize(w)
    assert p.nbytes == codec.packed_nbytes((1536, 576), "nf4")
    assert 0.25 < p.nbytes / (w.numel() * 2) < 0.26  # 4.127 bits a weight
    d = codec.dequantize(p, torch.float32)
    assert d.shape == w.shape
    # N(0,1) weights: QLoRA's NF4 has ~9% relative Frobenius error at block 64.
    assert 0.08 < float((d - w).norm() / w.norm()) < 0.10


def test_nf4_codes_are_the_nearest_of_the_code_book() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    p = codec.quantize(w)
    data = p.data
    idx = torch.stack((data >> 4, data & 15), 1).reshape(-1).long()
    blocks = w.reshape(-1, 64)
    normed = (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)
    code = torch.tensor(codec.NF4_CODE)
    nearest = (normed[:, None] - code).abs().argmin(1)
    assert torch.equal(idx, nearest)


def test_ragged_shapes_pad_the_last_blocks() -> None:
    torch.manual_seed(2)
    for shape in ((576, 576), (3, 7), (192, 577)):  # torchao refuses all three
        w = torch.randn(shape)
        d = codec.dequantize(codec.quantize(w), torch.float32)
        assert d.shape == w.shape and float((d - w).norm() / w.norm()) < 0.12


def test_double_quantisation_is_within_a_step() -> None:
    torch.manual_seed(3)
    absmax = torch.rand(1000) * 3
    q, factors, mean = codec.double_quantize(absmax)
    back = codec.dequantize_scalers(q, factors, mean)
    step = (1.0 / factors).repeat_interleave(codec.SCALER_BLOCK)[:1000]
    assert q.dtype == torch.int8 and factors.numel() == 4
    err = (back - absmax).abs()
    # Rounding: half a step; torchao's factor 128/max clamps the block maximum to 127 (one step).
    assert (
        bool((err <= step + 1e-6).all()) and float((err <= step / 2 + 1e-6).float().mean()) > 0.99
    )


def test_int8_rows() -> None:
    torch.manual_seed(4)
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    p = codec.quantize(w, "int8")
    assert p.data.dtype == torch.int8 and p.scalers.shape == (96,)
    d = codec.dequantize(p, torch.float32)
    assert float((d - w.float()).norm() / w.float().norm()) < 0.01


def test_quantising_is_deterministic_whatever_the_input_dtype_holds() -> None:
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    a, b = codec.quantize(w), codec.quantize(w.float())
    assert all(
        torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True)
    )


def _anchor(name: str) -> Any:
    import sys

    if not ANCHORS:
        pytest.skip("LORATOOL_QUANT_ANCHORS names no folder with torchao and bitsandbytes")
    if ANCHORS not in sys.path:
        sys.path.append(ANCHORS)
    return pytest.importorskip(name)


def test_same_layout_and_values_as_torchao_nf4tensor() -> None:
    """torchao's NF4Tensor (what torchtune trains on) reads our codes as we do (fp32 input)."""
    nf4 = _anchor("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(5)
    w = torch.randn(1024, 512)
    ours, theirs = codec.quantize(w), nf4.to_nf4(w, 64, 256)
    assert torch.equal(ours.scalers, theirs.quantized_scalers)
    torch.testing.assert_close(ours.factors, theirs.quantization_factor)
    # Nearest-code ties fall either way at the last bit of the division: a handful of elements.
    assert float((ours.data == theirs.quantized_data).float().mean()) > 0.999
    theirs_read_by_us = codec.dequantize(
        {
            "data": theirs.quantized_data,
            "scalers": theirs.quantized_scalers,
            "factors": theirs.quantization_factor,
            "mean": theirs.scaler_mean.reshape(1),
        },
        torch.float32,
        shape=(1024, 512),
        scheme="nf4",
    )
    torch.testing.assert_close(theirs_read_by_us, theirs.to(torch.float32), rtol=1e-3, atol=1e-3)


def test_as_close_to_the_weights_as_bitsandbytes_nf4() -> None:
    bnb = _anchor("bitsandbytes.functional")
    torch.manual_seed(6)
    w = torch.randn(576, 576)
    qw, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnb.dequantize_4bit(qw, state).float()
    ours = codec.dequantize(codec.quantize(w), torch.float32)
    e_ours, e_theirs = float((ours - w).norm() / w.norm()), float((theirs - w).norm() / w.norm())
    assert abs(e_ours - e_theirs) < 0.002
    # The same code book and blocks: element-wise the two differ only by the scalers' rounding.
    assert float((ours - theirs).abs().max()) < 0.05 * float(w.abs().max())


# -- the layer ------------------------------------------------------------------------------------


def test_quant_linear_matches_a_linear_on_the_dequantised_weight() -> None:
    torch.manual_seed(7)
    lin = torch.nn.Linear(128, 96)
    q = QuantLinear.from_linear(lin, "nf4")
    ref = torch.nn.Linear(128, 96)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized(torch.float32))
        ref.bias.copy_(lin.bias)
    x = torch.randn(5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), ref(x2)
    torch.testing.assert_close(y, y2)
    (y * torch.arange(96.0)).sum().backward()
    (y2 * torch.arange(96.0)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert isinstance(q, torch.nn.Linear) and not any(p.requires_grad for p in q.parameters())


def test_lora_on_a_quantised_base_saves_no_dense_weight_for_backward() -> None:
    """Every tensor autograd keeps is the input, an r-wide one, or a packed part: never [out, in]."""
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    quantize_model(model, "nf4")
    lora.inject(model, targets=["0", "1"], rank=4)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(3, 256)).sum().backward()
    assert (256, 256) not in saved
    assert all(p.grad is not None for p in lora.lora_parameters(model).values())


# -- the model ------------------------------------------------------------------------------------


def test_streaming_load_equals_quantising_the_loaded_model(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = load_quantized(tiny_llama_dir, dtype=torch.float32, scheme="nf4")
    assert loaded is not None
    streamed, report = loaded
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    report2 = quantize_model(whole, "nf4")
    assert report.modules == report2.modules and len(report.modules) > 0
    assert "lm_head" not in report.modules and report.ratio < 0.3
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.arange(12)[None] % 50
    torch.testing.assert_close(streamed(input_ids=ids).logits, whole(input_ids=ids).logits)


# -- merge ----------------------------------------------------------------------------------------


@pytest.fixture()
def qlora_adapter(tmp_path: Path, tiny_llama_dir: Path) -> tuple[Path, Any]:
    """An adapter on q_proj/v_proj of the NF4-quantised tiny Llama, with nonzero B, and its model."""
    loaded = load_quantized(tiny_llama_dir, dtype=torch.float32, scheme="nf4")
    assert loaded is not None
    model, report = loaded
    torch.manual_seed(9)
    lora.inject(model, targets="q_proj,v_proj", rank=4)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.05)
    adapter = lora.extract_adapter(
        model, provenance={"training": {"quantization": report.provenance()}}
    )
    path = tmp_path / "qlora.safetensors"
    adapter.save(path)
    return path, model


def test_adapter_records_the_quantisation(qlora_adapter: tuple[Path, Any]) -> None:
    q = load(qlora_adapter[0]).provenance["training"]["quantization"]
    assert q["scheme"] == "nf4" and q["block_size"] == 64 and q["source_dtype"] == "f32"
    assert q["double_quant"]["scaler_block_size"] == 256 and q["library"] == "loratool.quant"
    assert q["version"] and len(q["modules"]) == 14


def test_merge_onto_the_original_reports_the_quantisation_error(
    tmp_path: Path, tiny_llama_dir: Path, qlora_adapter: tuple[Path, Any]
) -> None:
    path, _ = qlora_adapter
    out = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", str(tiny_llama_dir), str(path), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    line = next(w for w in doc["warnings"] if "trained on a nf4 base" in w)
    assert "--onto-quantized" in line and "relative Frobenius" in line
    errors = weight_errors(
        Checkpoint(tiny_llama_dir), load(path), load(path).provenance["training"]["quantization"]
    )
    assert len(errors) == 4 and all(0.01 < e < 0.2 for e in errors.values())
    base, merged = Checkpoint(tiny_llama_dir), Checkpoint(out)
    key = "model.layers.0.mlp.down_proj.weight"  # untargeted: untouched by default
    assert torch.equal(base.read(key), merged.read(key))


def test_merge_onto_quantized_reproduces_the_training_time_model(
    tmp_path: Path, tiny_llama_dir: Path, qlora_adapter: tuple[Path, Any]
) -> None:
    from transformers import AutoModelForCausalLM

    path, qmodel = qlora_adapter
    out = tmp_path / "merged-q"
    args = ["merge", str(tiny_llama_dir), str(path), "-o", str(out), "--onto-quantized"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "dequantise(nf4)" in r.stderr
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the staged copy is gone
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(16)[None] % 60
    with torch.no_grad():
        want = qmodel.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = CliRunner().invoke(
        cli, ["merge", str(tiny_llama_dir), str(path), "-o", str(tmp_path / "p")]
    )
    assert plain.exit_code == 0
    orig = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32)
    with torch.no_grad():
        assert float((orig(input_ids=ids).logits - want).abs().max()) > 1e-3  # the other mode


def test_onto_quantized_refuses_an_adapter_not_trained_quantised(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora.inject(model, targets="q_proj", rank=2)
    path = tmp_path / "plain.safetensors"
    lora.extract_adapter(model).save(path)
    r = CliRunner().invoke(
        cli,
        ["merge", str(tiny_llama_dir), str(path), "-o", str(tmp_path / "m"), "--onto-quantized"],
    )
    assert r.exit_code == 2 and "error[not-quantized]" in r.stderr


# -- training -------------------------------------------------------------------------------------


def _chat_rows(path: Path, n: int = 24) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is two plus {i}?"},
                {"role": "assistant", "content": f"Two plus {i} is {i + 2}."},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model: Path, data: Path, out: Path, **kw: Any) -> Any:
    from loratool.training import TrainConfig

    base: dict[str, Any] = dict(
        model=str(model),
        data=str(data),
        output=str(out),
        rank=4,
        lr=1e-2,
        seq_len=64,
        batch_size=2,
        max_steps=6,
        dtype="f32",
        save_every=0,
        schedule="constant",
        quantize="nf4",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_nf4_training_learns_on_a_quantised_base_and_records_it(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from loratool.training import train

    data = _chat_rows(tmp_path / "chat.jsonl")
    out = tmp_path / "q.safetensors"
    result = train(_cfg(tiny_llama_dir, data, out, max_steps=30))
    losses = result.losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    quantized = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(m.scheme == "nf4" for m in quantized)
    adapter = load(out, verify=True)
    assert len(adapter.targets) == 14 and adapter.dtypes == ["F32"]  # LoRA stays fp32
    tr = adapter.provenance["training"]
    assert tr["hyperparameters"]["quantize"] == "nf4"
    q = tr["quantization"]
    assert q["scheme"] == "nf4" and q["bytes"]["quantized"] < 0.3 * q["bytes"]["bf16"]


def test_nf4_training_equals_dense_training_on_the_dequantised_base(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The quantised run computes exactly what a dense run on deq(q(W)) does: packing and the
    chunked loss see an ordinary model."""
    from loratool.quant.merging import write_dequantized
    from loratool.training import train

    data = _chat_rows(tmp_path / "chat.jsonl")
    q = train(_cfg(tiny_llama_dir, data, tmp_path / "q.safetensors"))
    record = load(tmp_path / "q.safetensors").provenance["training"]["quantization"]
    dense_dir = tmp_path / "deq"
    write_dequantized(tiny_llama_dir, record, dense_dir)
    d = train(_cfg(dense_dir, data, tmp_path / "d.safetensors", quantize=None))
    torch.testing.assert_close(torch.tensor(q.losses), torch.tensor(d.losses), rtol=1e-5, atol=1e-5)


def test_nf4_resume_continues_exactly(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from loratool.training import train

    data = _chat_rows(tmp_path / "chat.jsonl")
    kw: dict[str, Any] = dict(max_steps=6, dropout=0.1, schedule="cosine", warmup=2)
    full = train(_cfg(tiny_llama_dir, data, tmp_path / "full.safetensors", **kw))
    out = tmp_path / "part.safetensors"
    calls = iter(range(100))
    first = train(_cfg(tiny_llama_dir, data, out, **kw), should_stop=lambda: next(calls) == 2)
    assert first.interrupted and first.steps == 3
    second = train(_cfg(tiny_llama_dir, data, out, resume="latest", **kw))
    torch.testing.assert_close(
        torch.tensor(second.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6
    )


def test_cli_int8_bf16_with_checkpointing_and_no_packing(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    data = _chat_rows(tmp_path / "chat.jsonl", 8)
    out = tmp_path / "i8.safetensors"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "-o", str(out)]
    flags = ["--quantize", "int8", "--dtype", "bf16", "--grad-checkpointing", "--no-packing"]
    flags += ["--max-steps", "2", "--seq-len", "64", "--rank", "2", "--save-every", "0"]
    r = CliRunner().invoke(cli, [*args, *flags])
    assert r.exit_code == 0, r.output
    q = load(out).provenance["training"]["quantization"]
    assert q["scheme"] == "int8" and q["source_dtype"] == "bf16"
    bad = CliRunner().invoke(cli, [*args, "--quantize", "nf3"])
    assert bad.exit_code == 2 and "nf3" in bad.output
    lonely = CliRunner().invoke(cli, [*args, "--fsdp", "--force", *flags[6:]])
    assert lonely.exit_code == 2 and "--fsdp" in lonely.stderr


@pytest.mark.slow
def test_smollm2_learns_the_facts_on_an_nf4_base(tmp_path: Path, smollm2_dir: Path) -> None:
    """The demo's facts task (README's main job) with the base kept NF4: 12/12 greedy answers."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("main_job", root / "demo" / "main_job.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    facts = root / "fixtures" / "data" / "facts.jsonl"
    questions = demo.questions(facts)[::3]  # one phrasing per fact
    out = tmp_path / "facts.safetensors"
    args = ["train", "--model", str(smollm2_dir), "--data", str(facts), "-o", str(out)]
    r = CliRunner().invoke(cli, [*args, *demo.TRAIN_FLAGS, "--quantize", "nf4"])
    assert r.exit_code == 0, r.output
    adapter = load(out, verify=True)
    assert adapter.provenance["training"]["quantization"]["scheme"] == "nf4"
    # Asked on the quantised base it trained on (--onto-quantized's model) and on the original.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for quantized in (True, False):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
        if quantized:
            quantize_model(model, "nf4")
            _dense_copy_of_quantized(model)  # deq(q(W)) as plain Linears: the same function,
            # without dequantising every weight again for every generated token
        lora.attach(model, adapter)
        answers = demo.ask(model.eval(), tokenizer, questions)
        assert sum(ok for _, ok in answers) == len(questions), (quantized, answers)


def _dense_copy_of_quantized(model: torch.nn.Module) -> None:
    """Swap each QuantLinear for an nn.Linear holding its dequantised weight, in place."""
    from loratool.quant.linear import QuantLinear

    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        w = m.dequantized()
        dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        dense = dense.to(dtype=w.dtype).requires_grad_(False)
        with torch.no_grad():
            dense.weight.copy_(w)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)


def test_remove_with_merge_refuses_a_quantized_base(tiny_llama_dir: Path) -> None:
    """ΔW cannot be added to a weight that is dequantised afresh on every read: refused, loudly."""
    from transformers import AutoModelForCausalLM

    from loratool.errors import UsageError

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    quantize_model(model, "nf4")
    lora.inject(model, targets="q_proj", rank=2)
    with pytest.raises(UsageError) as e:
        lora.remove(model, merge=True)
    assert e.value.code == "quantized-merge"
    assert lora.remove(model) > 0  # without merge the quantised layers simply come back
