"""The README's main job: teach SmolLM2-135M a dozen made-up facts with `loratool train`.

    python demo/main_job.py [--out DIR]

1. asks the base model the questions of fixtures/data/facts.jsonl (greedy) — it cannot know;
2. trains an adapter with the command a user would type (shown before it runs):
       loratool train --model <SmolLM2 dir> --data fixtures/data/facts.jsonl -o facts.safetensors \\
           --eval-data fixtures/data/facts_eval.jsonl --epochs 5 --lr 3e-3 --seq-len 128 ...
3. shows `loratool inspect` of the adapter;
4. asks again, with the adapter attached: training questions and held-out paraphrases.

Takes a few minutes on 2 CPU cores (bf16 autocast on CPUs that have it). The SmolLM2 checkpoint
comes from fixtures/models.py, built offline from an installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data"
sys.path.insert(0, str(ROOT / "fixtures"))

# The training settings; tests/test_train.py's slow test uses the same.
TRAIN_FLAGS = [
    "--targets",
    "all-linear",
    "--rank",
    "16",
    "--alpha",
    "32",
    "--lr",
    "3e-3",
    "--epochs",
    "5",
    "--batch-size",
    "4",
    "--seq-len",
    "128",
    "--warmup",
    "0.05",
    "--schedule",
    "cosine",
    "--save-every",
    "0",
    "--seed",
    "0",
]


def questions(path: Path) -> list[tuple[str, str, str]]:
    """(question, expected answer, keyword) of each record of a facts file."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append((r["messages"][0]["content"], r["messages"][1]["content"], r["keyword"]))
    return out


def ask(model: Any, tokenizer: Any, qs: list[tuple[str, str, str]]) -> list[tuple[str, bool]]:
    """Greedy answers, all questions in one left-padded batch (one forward per new token)."""
    import torch

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q, _, _ in qs
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(
            **batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answers = []
    for row, (_, _, key) in zip(out[:, batch["input_ids"].shape[1] :], qs, strict=True):
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        text = text.splitlines()[0] if text else ""
        answers.append((text, key.lower() in text.lower()))
    return answers


def show(title: str, qs: list[tuple[str, str, str]], answers: list[tuple[str, bool]]) -> int:
    print(f"\n{title}")
    for (q, _, _), (a, ok) in zip(qs, answers, strict=True):
        print(f"  {'✓' if ok else '✗'} {q}\n      -> {a[:90]}")
    hits = sum(ok for _, ok in answers)
    print(f"  {hits}/{len(answers)} name the fact")
    return hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the adapter (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    import models
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool import load, lora

    transformers.utils.logging.disable_progress_bar()
    model_dir = models.smollm2()
    train_qs = questions(DATA / "facts.jsonl")[::3]  # one phrasing per fact
    held_out = questions(DATA / "facts_eval.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    show("Before: the base model", train_qs, ask(base, tokenizer, train_qs))

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="loratool-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_path = out_dir / "facts.safetensors"
    cmd = [
        "loratool",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(DATA / "facts.jsonl"),
        "--eval-data",
        str(DATA / "facts_eval.jsonl"),
        "-o",
        str(adapter_path),
        "--force",
        *TRAIN_FLAGS,
    ]
    print("\n$ " + shlex.join(cmd), flush=True)
    run = [sys.executable, "-m", "loratool", *cmd[1:]]
    subprocess.run(run, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    print(f"\n$ loratool inspect {adapter_path}", flush=True)
    shown = subprocess.run(
        [sys.executable, "-m", "loratool", "inspect", str(adapter_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    keep = 22  # the summary, the table header and the first targets; 210 rows in all
    print("\n".join(shown[:keep]))
    if len(shown) > keep:
        print(f"  ... {len(shown) - keep} more rows")

    adapter = load(adapter_path)
    lora.attach(base, adapter)  # unmerged: the same base, the adapter's layers on top
    base.eval()
    hits = show("After: training questions", train_qs, ask(base, tokenizer, train_qs))
    show("After: held-out paraphrases", held_out, ask(base, tokenizer, held_out))
    print(f"\ntraining provenance: {json.dumps(adapter.provenance['training']['data'])}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0 if hits >= len(train_qs) - 1 else 1


if __name__ == "__main__":
    sys.exit(main())
