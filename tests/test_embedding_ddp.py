"""torchrun for ``--task embedding``: negatives gathered across processes equal one big batch.

Two CPU processes (gloo) with ``--batch-size 4`` must take the steps one process takes with
``--batch-size 8``: every process scores its queries against all 8 positives and every hard
negative of the step (an all-gather of the embeddings), and the gradient through that gather is
the one-process gradient once the processes' LoRA gradients are summed. Rows have 0, 1 or 2 hard
negatives so the processes gather different numbers of candidates. The encoder is the tiny BERT
with dropout off: each process draws its own dropout masks, so with dropout the runs agree only
in distribution, not to the last digit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from loratool.format import load
from loratool.training import embedding as E

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = (
    "the capital of france is paris italy rome japan tokyo quick brown fox jumps over lazy dog "
    "cat sleeps warm afternoon sun mathematics physics chemistry biology history poetry"
)
WORDS = VOCABULARY.split()


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bert_no_dropout(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update({k: 0.0 for k, v in config.items() if "dropout" in k and v})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _write_pairs(path: Path, n: int = 40) -> Path:
    rng = random.Random(5)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.sample(WORDS, 4))
            row: dict[str, Any] = {"query": q, "positive": q + " " + " ".join(rng.sample(WORDS, 5))}
            if i % 3:  # 0, 1 or 2 hard negatives: uneven candidate counts per process
                row["negative"] = [" ".join(rng.sample(WORDS, 6)) for _ in range(i % 3)]
            f.write(json.dumps(row) + "\n")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


SETTINGS: dict[str, Any] = {
    "rank": 4,
    "max_steps": 3,
    "seq_len": 64,
    "dtype": "f32",
    "save_every": 0,
    "lr": 1e-2,
    "schedule": "constant",
    "warmup": 0,
}


def _torchrun(tmp_path: Path, model: Path, data: Path, *flags: str) -> tuple[Path, list[float]]:
    out, metrics = tmp_path / "two.safetensors", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "loratool", "train", "--task", "embedding", "--model", str(model),
           "--data", str(data), "-o", str(out), "--metrics", str(metrics), "--rank", "4",
           "--max-steps", "3", "--seq-len", "64", "--dtype", "f32", "--save-every", "0",
           "--lr", "1e-2", "--schedule", "constant", "--warmup", "0", *flags]  # fmt: skip
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("trainable params:") <= 1  # only rank 0 reports
    losses = [json.loads(x)["loss"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    return out, losses


def _assert_same(two: Path, one: Path) -> None:
    a, b = load(two), load(one)
    assert a.provenance["training"]["processes"] == 2
    # The gradients agree to float summation order; AdamW divides by √v, so where a gradient
    # is near zero that order shows at ~1e-5 after a few steps at lr 1e-2 (as with GradCache).
    for name, t in a.targets.items():
        torch.testing.assert_close(t.lora_A, b.targets[name].lora_A, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(t.lora_B, b.targets[name].lora_B, rtol=1e-3, atol=1e-5)


def _one_process(model: Path, data: Path, tmp_path: Path) -> Any:
    """The reference: one process, the whole 8-pair batch, into ``one.safetensors``."""
    return E.train_embedding(
        E.embedding_config(
            model=str(model),
            data=str(data),
            output=str(tmp_path / "one.safetensors"),
            batch_size=8,
            **SETTINGS,
        )
    )


def test_two_processes_equal_one_with_the_same_global_batch(
    bert_no_dropout: Path, tmp_path: Path
) -> None:
    data = _write_pairs(tmp_path / "d.jsonl")
    one = _one_process(bert_no_dropout, data, tmp_path)
    two, losses = _torchrun(tmp_path, bert_no_dropout, data, "--batch-size", "4")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    _assert_same(two, tmp_path / "one.safetensors")


@pytest.mark.slow
def test_two_processes_with_grad_accum_equal_one_big_batch(
    bert_no_dropout: Path, tmp_path: Path
) -> None:
    """GradCache inside each process, the gather across them: still the 8-pair step."""
    data = _write_pairs(tmp_path / "d.jsonl")
    one = _one_process(bert_no_dropout, data, tmp_path)
    two, losses = _torchrun(
        tmp_path, bert_no_dropout, data, "--batch-size", "2", "--grad-accum", "2"
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    _assert_same(two, tmp_path / "one.safetensors")


def test_gather_rows_keeps_the_local_gradient_in_one_process() -> None:
    """With one process the gather is the identity, gradient included."""
    from loratool.training.contrastive import gather_rows
    from loratool.training.runtime import Dist

    x = torch.randn(3, 4, requires_grad=True)
    y = gather_rows(x, Dist())
    assert y is x
