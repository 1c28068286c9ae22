"""Hard-negative mining: the encoder's best-ranked passages that are not the query's answer.

The library function is checked against a brute-force ranking with the same encoder, the
exclusions (own positive, another answer to the same query, the query text, existing negatives)
one by one, and the command through CliRunner (the file it writes trains; errors are exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool import retrieval as R
from loratool.commands.mine_negatives import command
from loratool.errors import OutputExistsError, UsageError

VOCABULARY = (
    "the capital of france is paris italy rome japan tokyo quick brown fox jumps over lazy dog "
    "cat sleeps warm afternoon sun mathematics physics chemistry biology history poetry"
)
WORDS = VOCABULARY.split()


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> R.Encoder:
    return R.load_encoder(tiny_bert_dir)


def _pairs(n: int = 24) -> list[R.Pair]:
    import random

    rng = random.Random(2)
    out = []
    for i in range(n):
        q = " ".join(rng.sample(WORDS, 4))
        out.append(R.Pair(q, q + " " + " ".join(rng.sample(WORDS, 5)), line=i + 1))
    return out


def test_negatives_are_the_top_ranked_non_answers(encoder: R.Encoder) -> None:
    pairs = _pairs()
    mined, report = R.mine_negatives(encoder, pairs, k=3)
    corpus, relevant = R.corpus_of(pairs)
    scores = R.similarity(
        R.encode(encoder, [p.query for p in pairs]), R.encode(encoder, corpus), encoder.config
    )
    for i, (p, m) in enumerate(zip(pairs, mined, strict=True)):
        assert (m.query, m.positive, m.line) == (p.query, p.positive, p.line)
        order = [j for j in torch.argsort(scores[i], descending=True, stable=True).tolist()]
        expected = [corpus[j] for j in order if j != relevant[i]][:3]
        assert list(m.negatives) == expected
        assert p.positive not in m.negatives
    assert (report.pairs, report.corpus, report.added, report.short) == (24, 24, 72, 0)
    assert (
        report.mean_rank >= 2.0
    )  # three negatives rank at least 1, 2, 3 (often behind the positive)


def test_other_answers_to_the_same_query_the_query_and_old_negatives_are_excluded(
    encoder: R.Encoder,
) -> None:
    base = _pairs(12)
    q = base[0].query
    pairs = [
        base[0],
        R.Pair(q, base[1].positive + " alternative answer", line=99),  # a second answer to q
        R.Pair(base[2].query, q, line=100),  # q itself as a passage in the corpus
        R.Pair(base[3].query, base[3].positive, (base[4].positive,), line=101),
        *base[5:],
    ]
    mined, _ = R.mine_negatives(encoder, pairs, k=len(pairs))
    for m in mined[:2]:  # neither answer to q is a negative of q, nor q itself
        assert base[0].positive not in m.negatives
        assert base[1].positive + " alternative answer" not in m.negatives
        assert q not in m.negatives
    third = mined[3]
    assert third.negatives[0] == base[4].positive  # the existing negative stays, first
    assert third.negatives.count(base[4].positive) == 1  # and is not mined again


def test_skip_and_margin(encoder: R.Encoder) -> None:
    pairs = _pairs()
    top, _ = R.mine_negatives(encoder, pairs, k=3)
    skipped, _ = R.mine_negatives(encoder, pairs, k=1, skip=2)
    assert [m.negatives for m in skipped] == [(t.negatives[2],) for t in top]
    none, report = R.mine_negatives(encoder, pairs, k=1, margin=5.0)  # cosine ≤ 1: all pass over
    assert all(not m.negatives for m in none) and report.short == len(pairs)
    with pytest.raises(UsageError, match="-k must be at least 1"):
        R.mine_negatives(encoder, pairs, k=0)


def _write(path: Path, pairs: list[R.Pair]) -> Path:
    path.write_text("".join(json.dumps({"query": p.query, "positive": p.positive}) + "\n"
                            for p in pairs))  # fmt: skip
    return path


def test_command_writes_pairs_that_read_back_and_refuses_overwrite(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    data = _write(tmp_path / "d.jsonl", _pairs())
    out = tmp_path / "hard.jsonl"
    args = ["--model", str(tiny_bert_dir), "--data", str(data), "-o", str(out), "-k", "2"]
    r = CliRunner().invoke(command, [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["pairs"], doc["negatives_added"], doc["output"]) == (24, 48, str(out))
    back = R.read_pairs(out)
    assert [len(p.negatives) for p in back] == [2] * 24
    assert all(p.positive not in p.negatives for p in back)

    again = CliRunner().invoke(command, args)
    assert isinstance(again.exception, OutputExistsError)
    assert CliRunner().invoke(command, [*args, "--force", "-q"]).exit_code == 0


def test_command_refuses_bad_k_before_loading(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", _pairs(3))
    r = CliRunner().invoke(
        command, ["--model", "/nonexistent", "--data", str(data), "-o", str(tmp_path / "o"),
                  "-k", "0"],
    )  # fmt: skip
    assert isinstance(r.exception, UsageError) and "-k must be at least 1" in str(r.exception)
