"""The sentence-transformers side of `benchmarks/retrieval.py`: PEFT LoRA, MNRL, its trainer.

What a retrieval user runs today: `SentenceTransformer(model)`, `model.add_adapter(LoraConfig)`
(PEFT through transformers' adapter mixin), `MultipleNegativesRankingLoss` (scale = 1/τ) and
`SentenceTransformerTrainer`, on the same pairs, steps, batch, rank, alpha, targets, learning
rate, warm-up, cosine schedule, gradient clipping and precision as the loratool side. Then
`model.encode` embeds the test split, scored by loratool's own ranking code (the metric is not
what is being compared). Prints one JSON line on stdout: the metrics, the training tokens
(non-padding, counted in the trainer's collator), the wall and CPU seconds inside
`trainer.train()`.

Needs `datasets` importable (the trainer takes a `datasets.Dataset`); run by retrieval.py, or
alone:

    python benchmarks/retrieval_st.py --model DIR --train TRAIN.jsonl --test TEST.jsonl \
        --steps 52 --batch-size 32 --rank 16 --alpha 32 --lr 3e-4 --temperature 0.05 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Counting:
    """The trainer's collator, counting the non-padding tokens of every batch it builds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens = inner, 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
        return batch

    def __getattr__(self, name: str) -> Any:  # valid_label_columns and the rest
        return getattr(self.inner, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--temperature", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--targets", default="query,key,value,dense")
    ap.add_argument("--dtype", choices=["f32", "bf16"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig, TaskType
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from loratool import retrieval as R

    train = R.read_pairs(args.train)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = min(args.seq_len, model.max_seq_length)
    model.add_adapter(
        LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=args.targets.split(","),
        )
    )
    # An explicit fingerprint: datasets derives one by dill-pickling the arrow table, which
    # fails on some pyarrow builds (MonthDayNano); it only keys caches of .map(), unused here.
    dataset = Dataset(
        InMemoryTable.from_pydict(
            {"anchor": [p.query for p in train], "positive": [p.positive for p in train]}
        ),
        fingerprint="loratool-benchmark-train",
    )
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    with tempfile.TemporaryDirectory() as tmp:
        targs = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=math.ceil(args.warmup * args.steps),  # loratool's rounding
            weight_decay=0.0,
            max_grad_norm=1.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            bf16=args.dtype == "bf16",
            use_cpu=True,
            seed=args.seed,
            dataloader_drop_last=True,
            save_strategy="no",
            logging_steps=10,
            report_to=[],
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=targs, train_dataset=dataset, loss=loss
        )
        counter = _Counting(trainer.data_collator)
        trainer.data_collator = counter
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer.train()
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    model.eval()
    test = R.read_pairs(args.test)
    corpus, relevant = R.corpus_of(test)
    with torch.no_grad():
        q = model.encode([p.query for p in test], batch_size=64, convert_to_tensor=True)
        k = model.encode(corpus, batch_size=64, convert_to_tensor=True)
    scores = q.float() @ k.float().T  # the model's Normalize module: cosine = dot
    metrics = R.metrics_from_ranks(R.ranks_of(scores, relevant), len(corpus))
    doc = {
        "metrics": metrics.to_json(),
        "tokens": counter.tokens,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "steps": int(out.global_step),
        "final_loss": float(out.training_loss),
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
