"""Side by side: loratool's retrieval LoRA vs sentence-transformers + PEFT, on the bundled set.

Both sides train a rank-r LoRA on all-MiniLM-L6-v2 with `fixtures/data/retrieval/train.jsonl`,
with the same steps, batch, rank, alpha, targets, learning rate, warm-up, cosine schedule,
gradient clipping, temperature (MNRL scale = 1/τ), precision and threads, then score
`test.jsonl` (corpus = its 301 passages) with the same ranking code:

- loratool: `loratool train --task embedding ...` (the CLI, one process), then
  `loratool eval-retrieval --adapter ...` (another process);
- sentence-transformers 6.2: `benchmarks/retrieval_st.py` (one process: `add_adapter(LoraConfig)`,
  `MultipleNegativesRankingLoss`, `SentenceTransformerTrainer`, then `model.encode`).

Runs alternate (loratool, st, st, loratool, ...) so drifting load on a shared machine hits both
alike; each figure is the median over `--repeats`. Speed is training tokens (non-padding, over
the batches each side consumed) per second inside the training loop, and per CPU-second of
training (steadier than wall time on a shared machine; loratool's counts its whole training
process, model load included, sentence-transformers' only `trainer.train()`); memory is the peak RSS of
the whole processes (`os.wait4`; loratool's train and eval-retrieval processes, the larger of
the two, against sentence-transformers' one); process wall and CPU seconds cover training and
evaluation on both sides. Ratios are loratool / sentence-transformers.

    python benchmarks/retrieval.py [--steps 52] [--batch-size 32] [--lr LR] [--rank 16]
        [--alpha 2·rank] [--temperature 0.05] [--dtype auto|f32|bf16] [--threads 1]
        [--repeats 1] [--sides loratool,st] [--json OUT]

`--lr` defaults to loratool's `--task embedding` default, so the benchmark measures what the
plain command does. The sentence-transformers side needs `datasets` (its trainer's input).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))
DATA = ROOT / "fixtures" / "data" / "retrieval"
OUT = ROOT / "benchmarks" / "out" / "retrieval"


def shipped_defaults() -> dict[str, Any]:
    """`loratool train --task embedding`'s defaults, wherever the trainer keeps them."""
    from loratool.training import embedding

    return dict(embedding.EMBEDDING_DEFAULTS)


def run(cmd: list[str], threads: int) -> tuple[str, dict[str, float]]:
    """(stdout, {wall_s, cpu_s, peak_rss_mb}) of one whole child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return out, {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def loratool_side(args: argparse.Namespace, model: str, i: int) -> dict[str, Any]:
    from loratool.format import load

    adapter, metrics = OUT / f"loratool-{i}.safetensors", OUT / f"loratool-{i}.metrics.jsonl"
    py = [sys.executable, "-m", "loratool"]
    _, cost = run(
        [*py, "train", "--task", "embedding", "--model", model,
         "--data", str(DATA / "train.jsonl"), "-o", str(adapter), "--max-steps", str(args.steps),
         "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--rank", str(args.rank),
         "--alpha", str(args.alpha), "--temperature", str(args.temperature),
         "--dtype", args.dtype, "--seed", "0", "--save-every", "0", "--metrics", str(metrics),
         "--force", "-q"],
        args.threads,
    )  # fmt: skip
    training = load(adapter).provenance["training"]
    steps = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    train_s = float(steps[-1]["elapsed_s"])
    out, ev = run(
        [*py, "eval-retrieval", "--model", model, "--adapter", str(adapter),
         "--data", str(DATA / "test.jsonl"), "--skip-base", "--json", "-q"],
        args.threads,
    )  # fmt: skip
    doc = json.loads(out)
    return {
        "metrics": doc["adapter"],
        "tokens": int(training["tokens"]),
        "train_s": train_s,
        # The whole training process (model load included): a conservative CPU figure.
        "train_cpu_s": cost["cpu_s"],
        "final_loss": training["final_loss"],
        "precision": training["precision"],
        # The job as a whole, like the one sentence-transformers process: train + evaluate.
        "wall_s": cost["wall_s"] + ev["wall_s"],
        "cpu_s": cost["cpu_s"] + ev["cpu_s"],
        "peak_rss_mb": max(cost["peak_rss_mb"], ev["peak_rss_mb"]),
    }


def st_side(args: argparse.Namespace, model: str) -> dict[str, Any]:
    out, cost = run(
        [sys.executable, str(ROOT / "benchmarks" / "retrieval_st.py"), "--model", model,
         "--train", str(DATA / "train.jsonl"), "--test", str(DATA / "test.jsonl"),
         "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
         "--temperature", str(args.temperature), "--dtype", args.dtype,
         "--threads", str(args.threads)],
        args.threads,
    )  # fmt: skip
    doc = json.loads(out.strip().splitlines()[-1])
    return {**doc, **cost}


def median(runs: list[dict[str, Any]], key: str) -> float:
    if key in ("recall@1", "recall@10", "mrr"):
        return statistics.median(r["metrics"][key] for r in runs)
    if key == "tokens_per_s":
        return statistics.median(r["tokens"] / r["train_s"] for r in runs)
    if key == "tokens_per_cpu_s":
        return statistics.median(r["tokens"] / r["train_cpu_s"] for r in runs)
    return statistics.median(float(r[key]) for r in runs)


def main() -> None:
    defaults = shipped_defaults()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=52)  # one epoch of 1679 pairs at batch 32
    ap.add_argument("--batch-size", type=int, default=int(defaults["batch_size"]))
    ap.add_argument("--lr", type=float, default=float(defaults["lr"]))
    ap.add_argument("--rank", type=int, default=int(defaults.get("rank", 16)))
    ap.add_argument("--alpha", type=float, help="LoRA alpha [2 × rank, loratool's default].")
    ap.add_argument("--temperature", type=float, default=float(defaults.get("temperature", 0.05)))
    ap.add_argument("--dtype", default="auto", choices=["auto", "f32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sides", default="loratool,st")
    ap.add_argument("--json", dest="json_out", help="Also write the results here.")
    args = ap.parse_args()
    args.alpha = args.alpha or float(defaults.get("alpha") or 2 * args.rank)
    if args.dtype == "auto":  # both sides get the same precision: what loratool's auto picks
        import torch

        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        args.dtype = "bf16" if native else "f32"
    import importlib.util

    if "st" in args.sides.split(",") and importlib.util.find_spec("datasets") is None:
        raise SystemExit(
            "the sentence-transformers side needs `datasets` (its trainer's input): "
            "pip install datasets, or pass --sides loratool"
        )
    import models

    model = str(models.minilm())
    OUT.mkdir(parents=True, exist_ok=True)
    sides = args.sides.split(",")
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i in range(args.repeats):
        order = sides if i % 2 == 0 else sides[::-1]
        for side in order:
            print(f"run {i + 1}/{args.repeats}: {side}", file=sys.stderr, flush=True)
            r = loratool_side(args, model, i) if side == "loratool" else st_side(args, model)
            results[side].append(r)
            print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)

    rows = [("recall@1", "recall@1", "{:.4f}"), ("recall@10", "recall@10", "{:.4f}"),
            ("MRR", "mrr", "{:.4f}"), ("train tokens/s", "tokens_per_s", "{:,.0f}"),
            ("train tokens/CPU-s", "tokens_per_cpu_s", "{:,.0f}"),
            ("train loop s", "train_s", "{:.1f}"), ("process wall s", "wall_s", "{:.1f}"),
            ("process CPU s", "cpu_s", "{:.1f}"), ("peak RSS MB", "peak_rss_mb", "{:,.0f}")]  # fmt: skip
    print(
        f"all-MiniLM-L6-v2, {args.steps} steps × {args.batch_size} pairs, rank {args.rank}, "
        f"alpha {args.alpha:g}, lr {args.lr:g}, τ {args.temperature:g}, {args.dtype}, "
        f"{args.threads} thread(s), median of {args.repeats}; test.jsonl, 301 queries"
    )
    names = {"loratool": "loratool", "st": "ST+PEFT"}
    print(
        "| | " + " | ".join(names[s] for s in sides) + (" | ratio |" if len(sides) == 2 else " |")
    )
    print("|---" * (len(sides) + 1 + (len(sides) == 2)) + "|")
    summary: dict[str, dict[str, float]] = {}
    for label, key, fmt in rows:
        vals = [median(results[s], key) for s in sides]
        summary[key] = dict(zip(sides, vals, strict=True))
        cells = [fmt.format(v) for v in vals]
        if len(sides) == 2:
            cells.append(f"{vals[0] / vals[1]:.2f}×")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json_out:
        doc = {"settings": vars(args), "summary": summary, "runs": results}
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
