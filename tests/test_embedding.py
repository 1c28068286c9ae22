"""LoRA for sentence encoders: pairs data, pooling, retrieval metrics, contrastive training, eval CLI.

Fast tests run on the tiny random BERT (sentence-transformers layout: mean pooling + Normalize);
the slow one trains all-MiniLM-L6-v2 on the bundled docstring set and shows the held-out gain.
BERT targets (query/key/value/dense) go end to end through merge, inspect, reduce-rank and
convert-to-PEFT here too.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from loratool import lora
from loratool import retrieval as R
from loratool.cli import cli
from loratool.errors import TrainingError, UsageError
from loratool.format import load
from loratool.training import embedding as E

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data" / "retrieval"
VOCABULARY = (
    "the capital of france is paris italy rome japan tokyo quick brown fox jumps over lazy dog "
    "cat sleeps warm afternoon sun mathematics physics chemistry biology history poetry"
)
WORDS = VOCABULARY.split()
BERT_TARGETS = ("query", "key", "value", "dense")


def _write_pairs(path: Path, n: int = 48, *, seed: int = 0, negatives: bool = True) -> Path:
    """Pairs whose positive repeats the query's words plus noise: learnable by a tiny encoder."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.sample(WORDS, 4))
            row: dict[str, Any] = {"query": q, "positive": q + " " + " ".join(rng.sample(WORDS, 5))}
            if negatives and i % 3 == 0:
                row["negative"] = " ".join(rng.sample(WORDS, 7))
            f.write(json.dumps(row) + "\n")
    return path


def _config(model: Path, data: Path, out: Path, **settings: Any) -> Any:
    defaults: dict[str, Any] = dict(
        model=str(model),
        data=str(data),
        output=str(out),
        rank=4,
        batch_size=8,
        lr=5e-3,
        max_steps=12,
        save_every=0,
        dtype="f32",
        seq_len=64,
        warmup=0,
    )
    return E.embedding_config(**{**defaults, **settings})


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- data ----------------------------------------------------------------------------------------


def test_read_pairs_accepts_negatives_lists_ids_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"query": "q1", "positive": "p1"}\n'
        "\n"
        '{"query": "q2", "positive": "p2", "negative": "n2", "id": 7}\n'
        '{"query": "q3", "positive": "p3", "negatives": ["a", "b"]}\n'
    )
    pairs = R.read_pairs(p)
    assert [(x.query, x.positive, x.negatives, x.line) for x in pairs] == [
        ("q1", "p1", (), 1),
        ("q2", "p2", ("n2",), 3),
        ("q3", "p3", ("a", "b"), 4),
    ]


def test_read_pairs_reports_every_bad_line_with_its_number(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"query": "fine", "positive": "fine"}\n'
        "not json\n"
        '{"query": "q"}\n'
        '{"query": "", "positive": "p"}\n'
        '["a list"]\n'
        '{"query": "q", "positive": "p", "negative": 3}\n'
        '{"query": "q", "positive": "p", "negative": "x", "negatives": ["y"]}\n'
    )
    with pytest.raises(TrainingError) as info:
        R.read_pairs(p)
    e = info.value
    assert e.code == "bad-data" and e.exit_code == 6
    assert [n for n, _ in e.problems] == [2, 3, 4, 5, 6, 7]  # type: ignore[attr-defined]
    text = str(e)
    assert "6 bad lines (lines 2-7)" in text
    assert "line 3: missing 'positive'" in text
    assert "line 4: 'query' must be a non-empty string" in text
    assert "line 5: expected a JSON object, got list" in text
    assert "negative" in (e.hint or "")


def test_read_pairs_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TrainingError, match="no pairs"):
        R.read_pairs(empty)
    with pytest.raises(UsageError, match="does not exist"):
        R.read_pairs(tmp_path / "nope.jsonl")


def test_bad_data_through_the_cli_is_exit_6_with_line_numbers(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    r = CliRunner().invoke(cli, ["eval-retrieval", "--model", str(tiny_bert_dir), "--data", str(p)])
    assert r.exit_code == 6, r.output
    assert "error[bad-data]" in r.stderr and "line 2: missing 'positive'" in r.stderr
    assert "Traceback" not in r.output


def test_bundled_split_is_disjoint_and_documented() -> None:
    train = R.read_pairs(DATA / "train.jsonl")
    test = R.read_pairs(DATA / "test.jsonl")
    assert 1000 <= len(train) <= 3000 and 200 <= len(test) <= 600
    assert not {p.query for p in train} & {p.query for p in test}
    assert not {p.positive for p in train} & {p.positive for p in test}
    assert not {p.query for p in train + test} & {p.positive for p in train + test}
    size = (DATA / "train.jsonl").stat().st_size + (DATA / "test.jsonl").stat().st_size
    assert size < 2_000_000
    readme = (DATA / "README.md").read_text()
    assert f"{len(train)}" in readme and f"{len(test)}" in readme


@pytest.mark.skipif(
    sys.version_info[:3] != (3, 11, 7), reason="the committed set was built from Python 3.11.7"
)
def test_bundled_set_regenerates_identically() -> None:
    r = subprocess.run(
        [sys.executable, str(DATA / "build_retrieval.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


# -- the sentence-transformers configuration and pooling -----------------------------------------


def test_sentence_config_follows_modules_json(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = R.sentence_config(tiny_bert_dir)
    assert (cfg.pooling, cfg.normalize, cfg.source) == (("mean",), True, "modules.json")

    d = tmp_path / "enc"
    (d / "pool").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "pool" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True})
    )
    (d / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "dot"}))
    cfg = R.sentence_config(d)
    assert (cfg.pooling, cfg.normalize, cfg.similarity) == (("cls", "max"), False, "dot")

    modules.append(
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UsageError, match="Dense") as info:
        R.sentence_config(d)
    assert info.value.code == "unsupported-encoder"

    plain = tmp_path / "plain"
    plain.mkdir()
    assert R.sentence_config(plain) == R.SentenceConfig()  # mean + normalize by default


def test_pool_modes_on_a_hand_made_batch() -> None:
    h = torch.tensor(
        [[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    def pooled(*modes: str, normalize: bool = False) -> torch.Tensor:
        return R.pool(h, mask, R.SentenceConfig(pooling=modes, normalize=normalize))

    assert torch.equal(pooled("mean"), torch.tensor([[2.0, 2.0], [0.0, 2.0]]))
    assert torch.equal(pooled("cls"), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(pooled("max"), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert torch.allclose(
        pooled("mean_sqrt_len"), torch.tensor([[4 / 2**0.5, 4 / 2**0.5], [0.0, 2.0]])
    )
    assert torch.equal(pooled("lasttoken"), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert pooled("cls", "mean").shape == (2, 4)
    unit = pooled("mean", normalize=True)
    assert torch.allclose(unit, torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 1.0]]))


def test_encode_is_independent_of_batching_and_padding(tiny_bert_dir: Path) -> None:
    enc = R.load_encoder(tiny_bert_dir)
    texts = [
        "the cat",
        "paris is the capital of france and the quick brown fox",
        "rome",
        "tokyo sun",
    ]
    together = R.encode(enc, texts, batch_size=4)
    alone = torch.cat([R.encode(enc, [t], batch_size=1) for t in texts])
    assert together.shape == (4, 64)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(4))  # Normalize


# -- metrics -------------------------------------------------------------------------------------


def test_recall_and_mrr_exact_values() -> None:
    # Query 0: relevant column 0 ranks first. Query 1: column 2 is relevant, two columns score
    # higher -> rank 3. Query 2: a tie with another column counts against it -> rank 2.
    # Query 3: relevant is last of 12 -> rank 12.
    scores = torch.zeros(4, 12)
    scores[0] = torch.linspace(1, 0, 12)
    scores[1, :3] = torch.tensor([0.9, 0.8, 0.7])
    scores[2, 4] = scores[2, 5] = 0.5
    scores[3] = torch.linspace(1, 0, 12)
    ranks = R.ranks_of(scores, [0, 2, 5, 11])
    assert ranks == [1, 3, 2, 12]
    m = R.metrics_from_ranks(ranks, corpus=12)
    assert m.recall == {1: 0.25, 5: 0.75, 10: 0.75}
    assert m.mrr == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 12) / 4, abs=1e-15)
    assert m.mrr_at_10 == pytest.approx((1 + 1 / 3 + 1 / 2) / 4, abs=1e-15)
    assert m.to_json()["recall@5"] == 0.75


def test_corpus_is_the_distinct_positives() -> None:
    pairs = [R.Pair("a", "x"), R.Pair("b", "y"), R.Pair("c", "x")]
    assert R.corpus_of(pairs) == (["x", "y"], [0, 1, 0])


# -- the loss ------------------------------------------------------------------------------------


def test_info_nce_matches_cross_entropy_by_hand() -> None:
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    cfg = R.SentenceConfig()
    loss = E.info_nce(q, c, temperature=0.05, config=cfg)
    logits = (q @ c.T) / 0.05
    expected = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(3)) / 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_duplicate_candidates_are_not_negatives() -> None:
    rows = [R.Pair("q", "p"), R.Pair("q", "p2"), R.Pair("r", "p", ("p",))]
    candidates = [r.positive for r in rows] + ["p"]
    mask = E.duplicates(rows, candidates)
    assert mask.tolist() == [
        [False, True, True, True],  # same query as row 1; "p" again in columns 2 and 3
        [True, False, False, False],  # same query as row 0
        [True, False, False, True],  # its positive's text is in columns 0 and 3
    ]


# -- training on the tiny BERT -------------------------------------------------------------------


def _capture_encoder(monkeypatch: pytest.MonkeyPatch) -> list[R.Encoder]:
    made: list[R.Encoder] = []
    real = R.load_encoder

    def spy(*args: Any, **kwargs: Any) -> R.Encoder:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(R, "load_encoder", spy)
    return made


def test_training_lowers_the_loss_and_changes_only_lora(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_pairs(tmp_path / "d.jsonl")
    out = tmp_path / "a.safetensors"
    made = _capture_encoder(monkeypatch)
    events: list[Any] = []
    result = E.train_embedding(
        _config(tiny_bert_dir, data, out, max_steps=24, metrics=str(tmp_path / "m.jsonl")),
        on_event=events.append,
    )
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.7 * first, result.losses

    trained = made[0].model
    base = R.load_encoder(tiny_bert_dir).model.state_dict()
    changed = []
    for name, tensor in trained.state_dict().items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, base[name.replace(".base.", ".")]), name
    for name, p in lora.lora_parameters(trained).items():
        if name.endswith(".lora_B") and p.abs().max() > 0:
            changed.append(name)
    assert len(changed) == 12  # B starts at zero: every target learned something

    adapter = load(out, verify=True)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapter.targets}) == sorted(BERT_TARGETS)
    assert len(adapter.targets) == 2 * 6 and not any("pooler" in n for n in adapter.targets)
    training = adapter.provenance["training"]
    assert training["task"] == "embedding" and training["steps"] == 24
    assert training["final_loss"] == pytest.approx(result.losses[-1])
    assert training["data"]["sha256"] == E.D.file_sha256(data)
    assert training["hyperparameters"]["temperature"] == 0.05
    assert training["sentence_config"]["pooling"] == ["mean"]

    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all({"step", "loss", "lr", "tokens", "elapsed_s"} <= set(r) for r in rows)
    assert all(b["tokens"] > a["tokens"] for a, b in itertools.pairwise(rows))
    assert [e.kind for e in events].count("step") == 24 and events[-1].kind == "done"


def test_adapter_binds_the_hub_id_recorded_beside_the_model(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, model)
    (model / "loratool_source.json").write_text(json.dumps({"hub_id": "tester/tiny-bert"}))
    out = tmp_path / "a.safetensors"
    E.train_embedding(_config(model, _write_pairs(tmp_path / "d.jsonl"), out, max_steps=2))
    adapter = load(out)
    assert adapter.base is not None and adapter.base.hub_id == "tester/tiny-bert"
    assert adapter.provenance["training"]["base_model"] == "tester/tiny-bert"


def test_grad_accum_equals_one_big_batch(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GradCache: 2 micro-batches of 4 pairs give the step of one batch of 8, dropout included."""
    monkeypatch.setattr(E, "CHUNK_ROWS", 4)  # the same forward groups on both sides
    data = _write_pairs(tmp_path / "d.jsonl")
    big = E.train_embedding(_config(tiny_bert_dir, data, tmp_path / "a.safetensors", max_steps=4))
    cached = E.train_embedding(
        _config(
            tiny_bert_dir, data, tmp_path / "b.safetensors", max_steps=4, batch_size=4, grad_accum=2
        )
    )
    assert cached.losses == pytest.approx(big.losses, rel=1e-4, abs=1e-5)
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    for name, t in a.targets.items():
        torch.testing.assert_close(b.targets[name].lora_B, t.lora_B, rtol=1e-3, atol=1e-5)


def test_resume_continues_the_same_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "d.jsonl")
    full = E.train_embedding(
        _config(tiny_bert_dir, data, tmp_path / "full.safetensors", max_steps=8)
    )

    first = tmp_path / "part.safetensors"
    stop_at = iter([False, False, True])
    part = E.train_embedding(
        _config(tiny_bert_dir, data, first, max_steps=8, metrics=str(tmp_path / "m.jsonl")),
        should_stop=lambda: next(stop_at, False),
    )
    assert part.interrupted and part.steps == 3 and not first.exists()
    assert part.checkpoint is not None and part.checkpoint.name == "step-00000003"
    state = json.loads((part.checkpoint / "state.json").read_text())
    assert state["task"] == "embedding"

    resumed = E.train_embedding(
        _config(
            tiny_bert_dir,
            data,
            first,
            max_steps=8,
            resume="latest",
            metrics=str(tmp_path / "m.jsonl"),
        )
    )
    assert resumed.steps == 8
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    a, b = load(tmp_path / "full.safetensors"), load(first)
    for name, t in a.targets.items():
        torch.testing.assert_close(b.targets[name].lora_A, t.lora_A)
        torch.testing.assert_close(b.targets[name].lora_B, t.lora_B)
    steps = [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))

    with pytest.raises(TrainingError, match="other rank") as info:
        E.train_embedding(
            _config(
                tiny_bert_dir,
                data,
                tmp_path / "x.safetensors",
                max_steps=8,
                rank=2,
                resume=str(part.checkpoint),
            )
        )
    assert info.value.code == "resume-mismatch"


def test_non_finite_loss_stops_and_names_the_last_checkpoint(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = E.info_nce
    calls: list[int] = []

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(E, "info_nce", poisoned)
    out = tmp_path / "a.safetensors"
    with pytest.raises(TrainingError, match="loss became nan at step 3") as info:
        E.train_embedding(
            _config(tiny_bert_dir, _write_pairs(tmp_path / "d.jsonl"), out, save_every=1)
        )
    assert info.value.code == "non-finite-loss" and "step-00000002" in (info.value.hint or "")
    assert not out.exists()


def test_training_refuses_bad_settings_before_loading(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "d.jsonl")
    cfg = _config(tiny_bert_dir, data, tmp_path / "a.safetensors")
    with pytest.raises(UsageError, match="temperature"):
        E.train_embedding(cfg, temperature=0.0)
    with pytest.raises(UsageError, match="matches no module"):
        E.train_embedding(
            _config(tiny_bert_dir, data, tmp_path / "a.safetensors", targets="q_proj")
        )
    (tmp_path / "a.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists"):
        E.train_embedding(cfg)


def test_eval_split_reports_retrieval_metrics(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "d.jsonl", n=40)
    metrics = tmp_path / "m.jsonl"
    events: list[Any] = []
    result = E.train_embedding(
        _config(
            tiny_bert_dir,
            data,
            tmp_path / "a.safetensors",
            max_steps=4,
            eval_split=0.25,
            eval_every=2,
            metrics=str(metrics),
        ),
        on_event=events.append,
    )
    evals = [json.loads(x) for x in metrics.read_text().splitlines() if "eval_loss" in x]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(0 <= e["eval_recall@1"] <= e["eval_recall@10"] <= 1 for e in evals)
    assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    training = load(tmp_path / "a.safetensors").provenance["training"]
    assert training["eval"]["queries"] == 10 and training["data"]["pairs"] == 30
    assert any("eval recall@1" in e.message for e in events)


# -- eval-retrieval, merge and the other commands on BERT targets ---------------------------------


@pytest.fixture(scope="module")
def bert_adapter(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 adapter on every BERT projection with non-zero random factors (rank 2 in fact)."""
    model = R.load_encoder(tiny_bert_dir).model
    torch.manual_seed(1)
    lora.inject(model, targets=",".join(BERT_TARGETS), rank=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_A[2:].zero_()  # ΔW of exact rank 2: reduce-rank to 2 is lossless
            layer.lora_B.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("adapter") / "bert.safetensors"
    lora.extract_adapter(model).save(path)
    return path


TEXTS = ["the capital of france is paris", "a quick brown fox", "rome", "biology and poetry"]


def _embeddings(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    enc = R.load_encoder(model_dir)
    if adapter is not None:
        from loratool.sources import open_adapter

        R.apply_adapter(enc.model, open_adapter(adapter).adapter)
    return R.encode(enc, TEXTS)


def test_eval_retrieval_cli_table_and_json(
    tiny_bert_dir: Path, bert_adapter: Path, tmp_path: Path
) -> None:
    data = _write_pairs(tmp_path / "d.jsonl", n=20)
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "eval-retrieval",
            "--model",
            str(tiny_bert_dir),
            "--adapter",
            str(bert_adapter),
            "--data",
            str(data),
            "--json",
            "--batch-size",
            "8",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["queries"] == 20 and doc["corpus"] == 20
    assert doc["sentence_config"]["pooling"] == ["mean"]
    assert set(doc["base"]) == {"recall@1", "recall@5", "recall@10", "mrr", "mrr@10"}
    assert doc["adapter"]["format"] == "loratool"
    for k, v in doc["delta"].items():
        assert v == pytest.approx(doc["adapter"][k] - doc["base"][k])

    # The numbers are those of the library on the same encoder.
    pairs = R.read_pairs(data)
    expected = R.evaluate(R.load_encoder(tiny_bert_dir), pairs)
    assert doc["base"]["mrr"] == pytest.approx(expected.mrr)

    r = runner.invoke(cli, ["eval-retrieval", "--model", str(tiny_bert_dir), "--data", str(data)])
    assert r.exit_code == 0 and r.stdout == ""
    assert "recall@1" in r.stderr and "MRR" in r.stderr and "base" in r.stderr

    r = runner.invoke(
        cli, ["eval-retrieval", "--model", str(tmp_path / "nothing"), "--data", str(data)]
    )
    assert r.exit_code == 2 and "error[no-model]" in r.stderr


def test_eval_retrieval_refuses_an_adapter_for_another_model(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model = R.load_encoder(tiny_bert_dir).model
    lora.inject(model, targets="query", rank=2)
    adapter = lora.extract_adapter(model)
    renamed = type(adapter).from_targets(
        [
            t.replace(name=t.name.replace("encoder.layer", "encoder.block"))
            for t in adapter.targets.values()
        ]
    )
    path = tmp_path / "other.safetensors"
    renamed.save(path)
    data = _write_pairs(tmp_path / "d.jsonl", n=4)
    r = CliRunner().invoke(
        cli,
        [
            "eval-retrieval",
            "--model",
            str(tiny_bert_dir),
            "--adapter",
            str(path),
            "--data",
            str(data),
        ],
    )
    assert r.exit_code == 4 and "error[missing-module]" in r.stderr


def test_apply_adapter_tolerates_a_wrapper_prefix(
    tiny_bert_dir: Path, bert_adapter: Path, tmp_path: Path
) -> None:
    """An adapter trained on BertFor... (``bert.encoder...``) applies to the bare BertModel."""
    adapter = load(bert_adapter)
    prefixed = type(adapter).from_targets(
        [
            t.replace(name="bert." + t.name, lora_A=t.lora_A, lora_B=t.lora_B)
            for t in adapter.targets.values()
        ]
    )
    path = tmp_path / "prefixed.safetensors"
    prefixed.save(path)
    torch.testing.assert_close(
        _embeddings(tiny_bert_dir, path), _embeddings(tiny_bert_dir, bert_adapter), rtol=0, atol=0
    )


def test_merged_encoder_gives_base_plus_adapter_embeddings(
    tiny_bert_dir: Path, bert_adapter: Path, tmp_path: Path
) -> None:
    merged = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", str(tiny_bert_dir), str(bert_adapter), "-o", str(merged)])
    assert r.exit_code == 0, r.output
    assert (merged / "modules.json").is_file() and (merged / "1_Pooling" / "config.json").is_file()
    with_adapter = _embeddings(tiny_bert_dir, bert_adapter)
    base = _embeddings(tiny_bert_dir)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_embeddings(merged), with_adapter, rtol=0, atol=1e-5)


def test_inspect_and_reduce_rank_on_bert_targets(
    tiny_bert_dir: Path, bert_adapter: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", str(bert_adapter), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["num_targets"] == 12
    names = {t["name"] for t in doc["targets"]}
    assert "encoder.layer.1.attention.self.query" in names
    assert "encoder.layer.0.intermediate.dense" in names

    reduced = tmp_path / "r2.safetensors"
    r = runner.invoke(cli, ["reduce-rank", str(bert_adapter), "--rank", "2", "-o", str(reduced)])
    assert r.exit_code == 0, r.output
    assert {t.rank for t in load(reduced).targets.values()} == {2}
    torch.testing.assert_close(
        _embeddings(tiny_bert_dir, reduced),
        _embeddings(tiny_bert_dir, bert_adapter),
        rtol=0,
        atol=1e-5,
    )


def test_peft_loads_the_converted_adapter_with_the_same_embeddings(
    tiny_bert_dir: Path, bert_adapter: Path, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    r = CliRunner().invoke(cli, ["convert", str(bert_adapter), "--to", "peft", "-o", str(out)])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "adapter_config.json").read_text())
    modules = config["target_modules"]
    assert modules and all(m.rsplit(".", 1)[-1] in BERT_TARGETS for m in modules), modules

    enc = R.load_encoder(tiny_bert_dir)
    enc.model = peft.PeftModel.from_pretrained(enc.model, str(out)).eval()
    torch.testing.assert_close(
        R.encode(enc, TEXTS), _embeddings(tiny_bert_dir, bert_adapter), rtol=0, atol=1e-5
    )


def test_train_command_dispatches_task_embedding(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from loratool.commands.train import command

    if not any(p.name == "task" for p in command.params):
        pytest.skip("loratool train has no --task option yet (the lead wires it)")
    data = _write_pairs(tmp_path / "d.jsonl")
    out = tmp_path / "a.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--task",
            "embedding",
            "--model",
            str(tiny_bert_dir),
            "--data",
            str(data),
            "-o",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--rank",
            "2",
            "--temperature",
            "0.1",
            "--dtype",
            "f32",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    training = load(out).provenance["training"]
    assert training["task"] == "embedding" and training["hyperparameters"]["temperature"] == 0.1
    assert training["steps"] == 2


# -- the real encoder ----------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_adapter_improves_held_out_retrieval(minilm_dir: Path, tmp_path: Path) -> None:
    """The issue's done-when on the bundled set: recall@1 and MRR up on the held-out split."""
    torch.set_num_threads(2)
    out = tmp_path / "minilm-docs.safetensors"
    started, cpu = time.perf_counter(), time.process_time()
    result = E.train_embedding(
        E.embedding_config(
            model=str(minilm_dir),
            data=str(DATA / "train.jsonl"),
            output=str(out),
            **SLOW_RUN,
        )
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    adapter = load(out, verify=True)
    assert adapter.base is not None
    assert adapter.base.hub_id == "sentence-transformers/all-MiniLM-L6-v2"

    report = R.evaluate_retrieval(minilm_dir, DATA / "test.jsonl", adapter=out)
    assert report.base is not None and report.adapted is not None
    before, after = report.base, report.adapted
    print(
        f"\nMiniLM on {before.queries} held-out queries, seed {SLOW_RUN['seed']}, "
        f"{result.steps} steps × {SLOW_RUN['batch_size']} pairs, train {wall:.0f} s wall / "
        f"{cpu:.0f} s CPU: recall@1 {before.recall[1]:.4f} -> {after.recall[1]:.4f}, "
        f"MRR {before.mrr:.4f} -> {after.mrr:.4f}"
    )
    assert after.recall[1] >= before.recall[1] + 0.015
    assert after.mrr >= before.mrr + 0.02
    assert math.isfinite(result.losses[-1])


# 16 steps of 32 pairs (~0.3 epoch) at lr 5e-4: about a minute of training on 2 quiet cores.
# Measured: recall@1 0.3688 -> 0.3953, MRR 0.4944 -> 0.5288 (benchmarks/retrieval.py runs a
# whole epoch: recall@1 0.4086, MRR 0.5371).
SLOW_RUN: dict[str, Any] = {
    "max_steps": 16,
    "batch_size": 32,
    "lr": 5e-4,
    "seed": 0,
    "save_every": 0,
}
