"""`loratool train`: data validation and masks, packing, the loop, checkpoints, resume, DDP, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from loratool import TrainingError, UsageError, lora
from loratool.cli import cli
from loratool.format import load
from loratool.training import BadDataError, TrainConfig, build_config, read_config_file, train
from loratool.training import data as D
from loratool.training import loop as L
from loratool.training import runtime as R
from loratool.training import state as S
from loratool.training.attention import use_packed_attention

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "fixtures" / "data" / "facts.jsonl"
FACTS_EVAL = ROOT / "fixtures" / "data" / "facts_eval.jsonl"


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"What is two plus {i}?"},
            {"role": "assistant", "content": f"Two plus {i} is {i + 2}."},
        ]
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def chat_data(tmp_path: Path) -> Path:
    return _write(tmp_path / "chat.jsonl", [_chat(i) for i in range(24)])


def _config(model: Path, data: Path, out: Path, **kw: Any) -> TrainConfig:
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
    )
    base.update(kw)
    return TrainConfig(**base)


# -- data: validation -----------------------------------------------------------------------------


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"text": "fine"},
            "{not json",
            "[1, 2]",
            {"id": 3},
            {"text": "a", "messages": []},
            "",  # blank lines are allowed
            {"prompt": "p", "completion": ""},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "user"}]},
            {"prompt": "p"},
            {"completion": "c"},
            {"text": ""},
            {"prompt": "q", "completion": "fine"},
        ],
    )
    with pytest.raises(BadDataError) as e:
        D.read_jsonl(path)
    lines = [n for n, _ in e.value.problems]
    assert lines == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    assert e.value.exit_code == 6 and e.value.code == "bad-data"
    assert "10 bad lines (lines 2-5, 7-12)" in e.value.message
    why = dict(e.value.problems)
    assert "not valid JSON" in why[2]
    assert "expected a JSON object, got list" in why[3]
    assert "ambiguous" in why[5]
    assert "no assistant turn" in why[8]
    assert "'content'" in why[9]


def test_bad_data_stops_the_cli_before_training(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _write(tmp_path / "d.jsonl", [{"text": "ok"}, "oops", {"x": 1}])
    out = tmp_path / "a.safetensors"
    r = CliRunner().invoke(
        cli, ["train", "--model", str(tiny_llama_dir), "--data", str(data), "-o", str(out)]
    )
    assert r.exit_code == 6, r.output
    assert "  line 2: not valid JSON" in r.stderr
    assert "  line 3: no 'text'" in r.stderr
    assert "error[bad-data]:" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_records_without_any_trained_token_are_errors(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path / "d.jsonl", [{"prompt": "word " * 100, "completion": " x"}])
    with pytest.raises(BadDataError) as e:
        D.tokenize(D.read_jsonl(path), tokenizer, seq_len=16, path=str(path))
    assert e.value.problems[0][0] == 1 and "seq-len 16" in e.value.problems[0][1]


# -- data: masks ----------------------------------------------------------------------------------


def _trained_text(tokenizer: Any, doc: D.Doc) -> str:
    return str(tokenizer.decode([t for t in doc.targets if t != D.IGNORE]))


def test_completion_only_masking(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(
        tmp_path / "d.jsonl", [{"prompt": "The capital of France is", "completion": " Paris."}]
    )
    (doc,) = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=64, path="d").docs
    prompt_len = len(tokenizer("The capital of France is")["input_ids"])
    assert _trained_text(tokenizer, doc) == " Paris.<|im_end|>"
    # Targets sit one position before the token they predict: nothing before the prompt's end.
    assert all(t == D.IGNORE for t in doc.targets[: prompt_len - 1])
    assert doc.targets[prompt_len - 1] == doc.ids[prompt_len]
    assert doc.ids[-1] == tokenizer.eos_token_id and doc.targets[-1] == D.IGNORE


def test_chat_masking_trains_assistant_turns_only(tmp_path: Path, tokenizer: Any) -> None:
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
        ]
    }
    path = _write(tmp_path / "d.jsonl", [conv])
    (doc,) = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=256, path="d").docs
    rendered = tokenizer.apply_chat_template(conv["messages"], tokenize=False)
    assert tokenizer.decode(doc.ids) == rendered
    assert _trained_text(tokenizer, doc) == "Hello!<|im_end|>\nFour.<|im_end|>\n"
    # The prediction of each assistant reply starts right after "<|im_start|>assistant\n".
    prefix = tokenizer.apply_chat_template(
        conv["messages"][:2], tokenize=False, add_generation_prompt=True
    )
    n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert doc.targets[n - 2] == D.IGNORE and doc.targets[n - 1] == doc.ids[n]


def test_conversational_prompt_completion(tmp_path: Path, tokenizer: Any) -> None:
    rec = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello!"}],
    }
    path = _write(tmp_path / "d.jsonl", [rec])
    (doc,) = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=64, path="d").docs
    assert _trained_text(tokenizer, doc) == "Hello!<|im_end|>\n"


def test_long_texts_are_split_into_windows_that_lose_no_prediction(
    tmp_path: Path, tokenizer: Any
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    path = _write(tmp_path / "d.jsonl", [{"text": text}])
    tok = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=32, path="d")
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(tok.docs) > 1 and all(len(d.ids) <= 32 for d in tok.docs)
    predicted = [t for d in tok.docs for t in d.targets if t != D.IGNORE]
    assert predicted == ids[1:]


# -- packing --------------------------------------------------------------------------------------


def test_pack_places_every_document_once_within_seq_len() -> None:
    lengths = [5, 60, 33, 17, 64, 2, 40, 31, 9, 25]
    rows = D.pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) == 5  # 286 tokens: best-fit decreasing reaches the minimum of ⌈286/64⌉


def test_packed_batch_restarts_positions_per_document(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path / "d.jsonl", [_chat(i) for i in range(3)])
    docs = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=128, path="d").docs
    b = D.make_batch(docs, [[0, 1], [2]], packed=True)
    n0, n1, n2 = (len(d.ids) for d in docs)
    assert b.attention_mask is None and b.tokens == n0 + n1 + n2
    assert b.position_ids[0, :n0].tolist() == list(range(n0))
    assert b.position_ids[0, n0 : n0 + n1].tolist() == list(range(n1))
    # The last token of a document never predicts the first of the next one.
    assert b.targets[0, n0 - 1] == D.IGNORE
    assert int((b.targets != D.IGNORE).sum()) == sum(d.num_targets for d in docs)


def test_packed_loss_equals_unpacked_loss(
    tmp_path: Path, tiny_llama_dir: Path, tokenizer: Any
) -> None:
    """No attention across packed documents: the packed row's loss is the documents' losses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora.inject(model, targets="all-linear", rank=4)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    body, head = R.body_and_head(model)
    assert R.check_packing_isolation(body, 512, torch.device("cpu"))
    path = _write(
        tmp_path / "d.jsonl", [_chat(i) for i in range(5)] + [{"text": "Paris is known."}]
    )
    docs = D.tokenize(D.read_jsonl(path), tokenizer, seq_len=256, path="d").docs

    trainer = L._Trainer.__new__(L._Trainer)
    trainer.device, trainer.dtype, trainer.body = torch.device("cpu"), torch.float32, body
    trainer.head_loss = L.HeadLoss(head, model.config, torch.float32)
    sums = {}
    # Both routes: transformers' SDPA with the block mask it derives from restarting position
    # ids, then loratool's per-document attention (what training uses).
    for route in ("sdpa", "packed"):
        if route == "packed":
            assert use_packed_attention(model)
            assert R.check_packing_isolation(body, 512, torch.device("cpu"))
        trainer.packed_attention = route == "packed"
        packed = trainer._loss_sum(D.make_batch(docs, [list(range(6))], packed=True))
        two_rows = trainer._loss_sum(D.make_batch(docs, [[0, 3, 5], [1, 2, 4]], packed=True))
        alone = sum(trainer._loss_sum(D.make_batch(docs, [[i]], packed=True)) for i in range(6))
        padded = trainer._loss_sum(D.make_batch(docs, [[i] for i in range(6)], packed=False))
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(two_rows, alone, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-4)
        sums[route] = float(alone)
    alone = torch.tensor(sums["packed"])
    # And the reference: transformers' own loss on each document alone.
    ref = 0.0
    for d in docs:
        labels = torch.tensor([[D.IGNORE] + [d.targets[i - 1] for i in range(1, len(d.ids))]])
        out = model(input_ids=torch.tensor([d.ids]), labels=labels)
        ref += float(out.loss.detach()) * d.num_targets
    assert abs(float(alone) - ref) < 1e-3


def test_chunked_cross_entropy_matches_full_logits() -> None:
    from loratool.training.loss import HeadLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True).requires_grad_(False)
    h = torch.randn(70, 16, requires_grad=True)
    t = torch.randint(0, 300, (70,))
    import loratool.training.loss as LS

    old = LS.CHUNK_ELEMENTS
    LS.CHUNK_ELEMENTS = 16 * 300  # several chunks
    try:
        loss = HeadLoss(head, None, torch.float32)(h, t)
    finally:
        LS.CHUNK_ELEMENTS = old
    loss.backward()
    g = h.grad.clone()  # type: ignore[union-attr]
    h.grad = None
    ref = torch.nn.functional.cross_entropy(head(h), t, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, h.grad)


# -- the loop -------------------------------------------------------------------------------------


def test_loss_decreases_and_only_lora_changes(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "a.safetensors"
    events: list[L.TrainEvent] = []
    result = train(_config(tiny_llama_dir, chat_data, out, max_steps=30), on_event=events.append)
    losses = result.losses
    assert len(losses) == 30
    # The tiny model's output head is tiny (random init, std 0.02), which caps how far its loss
    # can fall below ln(512) = 6.24; a steady fall of over half a nat is learning.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 31))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trained = result.model
    lora.remove(trained)
    for (name, p), (name2, q) in zip(
        trained.state_dict().items(), base.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(p, q), name
    adapter = load(out, verify=True)
    assert len(adapter.targets) == 14 and adapter.dtypes == ["F32"]
    moved = [t for t in adapter.targets.values() if torch.count_nonzero(t.lora_B) > 0]
    assert len(moved) == 14


def test_adapter_records_binding_and_training_provenance(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "loratool_source.json").write_text(json.dumps({"hub_id": "org/tiny-llama"}))
    out = tmp_path / "a.safetensors"
    metrics = tmp_path / "m.jsonl"
    result = train(_config(model_dir, chat_data, out, metrics=str(metrics), eval_split=0.25))
    adapter = load(out)
    assert adapter.base is not None and adapter.base.hub_id == "org/tiny-llama"
    tr = adapter.provenance["training"]
    assert tr["base_model"] == "org/tiny-llama"
    assert tr["data"]["sha256"] == D.file_sha256(chat_data) and tr["data"]["records"] == 18
    assert tr["steps"] == 6 and tr["final_loss"] == result.final_loss
    assert tr["tokens"] == result.tokens > 0
    assert tr["hyperparameters"]["rank"] == 4 and tr["hyperparameters"]["alpha"] == 8.0
    assert tr["eval"]["loss"] == result.eval_loss and tr["precision"] == "f32"
    assert str(tmp_path) not in json.dumps(adapter.provenance)  # no local paths leak
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= set(steps[0])
    assert steps[-1]["tokens"] == result.tokens and steps[0]["tokens"] < steps[1]["tokens"]
    assert rows[-1] == {"step": 6, "eval_loss": result.eval_loss}


def test_grad_checkpointing_and_bf16_run(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    a = train(_config(tiny_llama_dir, chat_data, tmp_path / "a.safetensors", max_steps=3))
    b = train(
        _config(
            tiny_llama_dir,
            chat_data,
            tmp_path / "b.safetensors",
            max_steps=3,
            grad_checkpointing=True,
        )
    )
    for x, y in zip(a.losses, b.losses, strict=True):
        assert abs(x - y) < 1e-4
    c = train(
        _config(tiny_llama_dir, chat_data, tmp_path / "c.safetensors", max_steps=3, dtype="bf16")
    )
    assert all(abs(x - y) < 0.05 for x, y in zip(a.losses, c.losses, strict=True))
    assert load(tmp_path / "c.safetensors").dtypes == ["F32"]  # LoRA weights stay fp32


def test_resume_continues_exactly(tmp_path: Path, tiny_llama_dir: Path, chat_data: Path) -> None:
    # Dropout makes the RNG state part of what resume must restore.
    kw: dict[str, Any] = dict(max_steps=8, dropout=0.1, schedule="cosine", warmup=2)
    full = train(_config(tiny_llama_dir, chat_data, tmp_path / "full.safetensors", **kw))

    out = tmp_path / "part.safetensors"
    calls = iter(range(100))
    first = train(
        _config(tiny_llama_dir, chat_data, out, metrics=str(tmp_path / "m.jsonl"), **kw),
        should_stop=lambda: next(calls) == 3,  # "Ctrl-C" during step 4
    )
    assert first.interrupted and first.steps == 4 and not out.exists()
    assert first.checkpoint is not None and first.checkpoint.name == "step-00000004"
    second = train(
        _config(
            tiny_llama_dir, chat_data, out, metrics=str(tmp_path / "m.jsonl"), resume="latest", **kw
        )
    )
    assert second.steps == 8
    torch.testing.assert_close(
        torch.tensor(second.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6
    )
    a, b = load(out), load(tmp_path / "full.safetensors")
    for name, t in a.targets.items():
        torch.testing.assert_close(t.lora_A, b.targets[name].lora_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t.lora_B, b.targets[name].lora_B, rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_resume_refuses_other_data_or_settings(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    out = tmp_path / "a.safetensors"
    train(_config(tiny_llama_dir, chat_data, out, max_steps=2, save_every=1))
    ckpt = tmp_path / "a-checkpoints"
    assert [p.name for p in S.list_checkpoints(ckpt)] == ["step-00000001", "step-00000002"]
    with pytest.raises(TrainingError) as e:
        train(_config(tiny_llama_dir, chat_data, out, rank=8, resume="latest", force=True))
    assert e.value.code == "resume-mismatch" and "rank" in e.value.message
    other = _write(tmp_path / "other.jsonl", [_chat(i) for i in range(30)])
    with pytest.raises(TrainingError) as e:
        train(_config(tiny_llama_dir, other, out, resume=str(ckpt), force=True))
    assert e.value.code == "resume-mismatch"
    with pytest.raises(TrainingError) as e:
        train(_config(tiny_llama_dir, chat_data, out, resume=str(tmp_path), force=True))
    assert e.value.code == "bad-checkpoint"
    # A fresh run does not silently mix with an earlier run's checkpoints.
    with pytest.raises(UsageError) as e2:
        train(_config(tiny_llama_dir, chat_data, tmp_path / "a.safetensors", force=False))
    assert e2.value.code == "output-exists"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    class Poisoned(L.HeadLoss):  # the loss of the 4th micro-batch is NaN
        def __call__(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            loss = super().__call__(h, targets)
            return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(L, "HeadLoss", Poisoned)
    out = tmp_path / "a.safetensors"
    args = [
        "train",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(chat_data),
        "-o",
        str(out),
        "--rank",
        "4",
        "--max-steps",
        "10",
        "--save-every",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--dtype",
        "f32",
        "--keep-checkpoints",
        "1",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 6, r.output
    assert "error[non-finite-loss]: the loss became nan at step 4; stopping" in r.stderr
    assert "hint: the last good checkpoint is" in r.stderr and "step-00000002" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    (ckpt,) = S.list_checkpoints(tmp_path / "a-checkpoints")
    assert S.load(ckpt).state["step"] == 2  # verified and finite: the writer refuses NaN


# -- config and CLI -------------------------------------------------------------------------------


def test_config_files_and_flag_precedence(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(
        "model: m\ndata: d.jsonl\noutput: out.safetensors\nrank: 8\nmax-steps: 5\n"
        "targets: [q_proj, v_proj]\npacking: false\nlr: 1e-3\n"
    )
    values = read_config_file(tmp_path / "run.yaml")
    assert values["targets"] == "q_proj,v_proj" and values["max_steps"] == 5
    assert values["data"] == str(tmp_path / "d.jsonl")  # relative to the file
    config = build_config(values, {"rank": 32})
    assert config.rank == 32 and config.max_steps == 5 and config.packing is False
    assert config.lr == 1e-3 and config.lora_alpha == 64
    (tmp_path / "run.toml").write_text('model = "m"\ndata = "d"\noutput = "o"\nseq_len = 128\n')
    assert read_config_file(tmp_path / "run.toml")["seq_len"] == 128
    (tmp_path / "bad.yaml").write_text("modle: m\n")
    with pytest.raises(UsageError) as e:
        read_config_file(tmp_path / "bad.yaml")
    assert "unknown key 'modle'" in e.value.message
    (tmp_path / "bad2.toml").write_text("rank = 'eight'\n")
    with pytest.raises(UsageError) as e:
        read_config_file(tmp_path / "bad2.toml")
    assert "key 'rank' must be int" in e.value.message
    with pytest.raises(UsageError):
        build_config({}, {"model": "m", "data": "d"})  # no output


def test_cli_config_file_with_overrides(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_llama_dir}\ndata: {chat_data}\noutput: a.safetensors\nrank: 4\n"
        "max-steps: 50\nseq-len: 64\ndtype: f32\nsave-every: 0\n"
    )
    r = CliRunner().invoke(
        cli, ["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "trainable params:" in r.stderr and "done: 2 steps" in r.stderr
    assert load(tmp_path / "a.safetensors").provenance["training"]["steps"] == 2
    r = CliRunner().invoke(
        cli, ["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "2"]
    )
    assert r.exit_code == 2 and "error[output-exists]" in r.stderr


def test_cli_refuses_unknown_targets_before_training(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(chat_data),
            "-o",
            str(tmp_path / "a.safetensors"),
            "--targets",
            "q_proj,qq_proj",
        ],
    )
    assert r.exit_code == 2
    assert "error[no-such-module]: target 'qq_proj' matches no module" in r.stderr


def test_train_command_imports_no_torch() -> None:
    code = "import sys, loratool.commands.train, loratool.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- processes: Ctrl-C and DDP --------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigint_saves_a_checkpoint_then_resume_finishes(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    out, metrics = tmp_path / "a.safetensors", tmp_path / "m.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "loratool",
        "train",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(chat_data),
        "-o",
        str(out),
        "--rank",
        "4",
        "--max-steps",
        "100000",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--dtype",
        "f32",
        "--save-every",
        "0",
        "--metrics",
        str(metrics),
    ]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after step" in err and "--resume" in err and "Traceback" not in err
    (ckpt,) = S.list_checkpoints(tmp_path / "a-checkpoints")
    step = S.load(ckpt).state["step"]
    assert step >= 3 and not out.exists()
    r = CliRunner().invoke(cli, [*cmd[3:-4], "--max-steps", str(step + 2), "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming with changed max_steps" in r.stderr
    assert load(out).provenance["training"]["steps"] == step + 2


def test_hub_id_loads_through_the_cache_and_binds_the_commit(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    """A Hub id goes through huggingface_hub's cache (offline here): bound with its commit."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "a.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "loratool",
        "train",
        "--model",
        "org/tiny-llama",
        "--data",
        str(chat_data),
        "-o",
        str(out),
        "--rank",
        "4",
        "--max-steps",
        "1",
        "--seq-len",
        "64",
        "--dtype",
        "f32",
        "-q",
    ]
    env = {**_env(), "HF_HUB_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = load(out)
    assert adapter.base is not None
    assert (adapter.base.hub_id, adapter.base.revision) == ("org/tiny-llama", commit)
    assert adapter.provenance["training"]["base_model"] == "org/tiny-llama"
    missing = subprocess.run(
        [*cmd[:5], "org/absent", *cmd[6:], "--force"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        missing.returncode == 2
        and "error[bad-model]: cannot load model 'org/absent'" in missing.stderr
    )


def test_two_processes_equal_one_with_the_same_global_batch(
    tmp_path: Path, tiny_llama_dir: Path, chat_data: Path
) -> None:
    common = [
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(chat_data),
        "--rank",
        "4",
        "--max-steps",
        "4",
        "--seq-len",
        "64",
        "--dtype",
        "f32",
        "--save-every",
        "0",
        "--lr",
        "1e-2",
        "--schedule",
        "constant",
    ]
    one = train(
        build_config(
            {},
            {
                "model": str(tiny_llama_dir),
                "data": str(chat_data),
                "rank": 4,
                "max_steps": 4,
                "seq_len": 64,
                "dtype": "f32",
                "save_every": 0,
                "lr": 1e-2,
                "schedule": "constant",
                "batch_size": 4,
                "output": str(tmp_path / "one.safetensors"),
            },
        )
    )
    two_out, metrics = tmp_path / "two.safetensors", tmp_path / "m.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "loratool",
        "train",
        *common,
        "--batch-size",
        "2",
        "-o",
        str(two_out),
        "--metrics",
        str(metrics),
    ]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("trainable params:") == 1  # only rank 0 reports
    losses = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    a, b = load(two_out), load(tmp_path / "one.safetensors")
    assert a.provenance["training"]["processes"] == 2
    for name, t in a.targets.items():
        torch.testing.assert_close(t.lora_B, b.targets[name].lora_B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t.lora_A, b.targets[name].lora_A, rtol=1e-4, atol=1e-6)


# -- end to end on SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_learns_new_facts(tmp_path: Path, smollm2_dir: Path) -> None:
    """The README's main job: wrong answers before, the made-up facts after (greedy)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("main_job", ROOT / "demo" / "main_job.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    questions = demo.questions(FACTS)[::3]  # one phrasing per fact
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    assert not any(ok for _, ok in demo.ask(model, tokenizer, questions))

    out = tmp_path / "facts.safetensors"
    args = ["train", "--model", str(smollm2_dir), "--data", str(FACTS), "-o", str(out)]
    r = CliRunner().invoke(cli, [*args, *demo.TRAIN_FLAGS])
    assert r.exit_code == 0, r.output
    adapter = load(out, verify=True)
    assert adapter.base is not None and adapter.base.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter.provenance["training"]["final_loss"] < 0.2
    lora.attach(model, adapter)
    answers = demo.ask(model.eval(), tokenizer, questions)
    assert sum(ok for _, ok in answers) >= len(questions) - 1, answers
