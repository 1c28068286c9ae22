"""Before/after table for a MiniLM retrieval adapter on the bundled docstring set's held-out split.

Trains a LoRA adapter on all-MiniLM-L6-v2 with `fixtures/data/retrieval/train.jsonl`
(`loratool train --task embedding`'s library call), then scores `test.jsonl` three ways in one
run: the base encoder, base + adapter (injected in memory), and the merged checkpoint written by
`loratool merge`. Prints recall@1/5/10, MRR and MRR@10 side by side with deltas and ratios, and
the training cost: steps, pairs, wall and CPU seconds, tokens/s, peak RSS. The adapter is kept
in benchmarks/out/retrieval-adapter.safetensors.

    python benchmarks/retrieval.py [--steps 52] [--batch-size 32] [--lr 3e-4] [--seed 0]
                                   [--rank 16] [--dtype auto] [--threads 2] [--json OUT]
                                   [--adapter PATH]   # evaluate a saved adapter, no training

CPU time is reported next to wall time because this machine is shared: wall time inflates with
the load of other work, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))
DATA = ROOT / "fixtures" / "data" / "retrieval"
ROWS = (("recall@1", "recall@1"), ("recall@5", "recall@5"), ("recall@10", "recall@10"),
        ("MRR", "mrr"), ("MRR@10", "mrr@10"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=52)  # one epoch of 1679 pairs
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "f32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", help="Also write the results here.")
    ap.add_argument("--adapter", help="Evaluate this adapter instead of training one.")
    args = ap.parse_args()

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import models
    import torch

    from loratool import retrieval as R
    from loratool.format import load
    from loratool.merging import merge
    from loratool.training import TrainEvent
    from loratool.training.embedding import embedding_config, train_embedding

    torch.set_num_threads(args.threads)
    base_dir = models.minilm()
    test = DATA / "test.jsonl"
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else out_dir / "retrieval-adapter.safetensors"
    result = None
    wall = cpu = peak_mb = 0.0
    if not args.adapter:
        config = embedding_config(
            model=str(base_dir),
            data=str(DATA / "train.jsonl"),
            output=str(adapter),
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            rank=args.rank,
            seed=args.seed,
            dtype=args.dtype,
            save_every=0,
            force=True,
        )

        def report_step(e: TrainEvent) -> None:
            if e.kind == "step" and (e.step % 10 == 0 or e.step == e.total_steps):
                print(f"  step {e.step}/{e.total_steps} loss {e.loss:.4f} "
                      f"{e.elapsed_s:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = train_embedding(config, on_event=report_step)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"trained {result.steps} steps in {wall:.1f} s wall, {cpu:.1f} s CPU -> {adapter}",
              file=sys.stderr, flush=True)  # fmt: skip
    training = load(adapter).provenance["training"]

    report = R.evaluate_retrieval(base_dir, test, adapter=adapter)
    mrg: dict[str, float] | None = None
    gap = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = Path(tmp) / "merged"
        try:
            merge(base_dir, [adapter], merged_dir)
        except Exception as e:  # the merge is checked here, not assumed
            print(f"merge failed: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            merged = R.evaluate_retrieval(merged_dir, test)
            assert merged.base is not None
            mrg = merged.base.to_json()
            enc_a = R.load_encoder(base_dir)
            R.apply_adapter(enc_a.model, load(adapter))
            texts = [p.positive for p in R.read_pairs(test)[:64]]
            merged_enc = R.load_encoder(merged_dir)
            gap = float((R.encode(enc_a, texts) - R.encode(merged_enc, texts)).abs().max())

    assert report.base is not None and report.adapted is not None
    base, after = report.base.to_json(), report.adapted.to_json()
    print(
        f"all-MiniLM-L6-v2 on {report.base.queries} held-out queries, corpus {report.base.corpus} "
        f"passages (fixtures/data/retrieval/test.jsonl)"
    )
    print(f"{'metric':<10} {'base':>8} {'+adapter':>9} {'merged':>8} {'Δ':>8} {'ratio':>7}")
    for label, key in ROWS:
        d = after[key] - base[key]
        print(
            f"{label:<10} {base[key]:>8.4f} {after[key]:>9.4f} "
            f"{mrg[key] if mrg else float('nan'):>8.4f} {d:>+8.4f} "
            f"{after[key] / base[key]:>6.2f}x"
        )
    hp = training["hyperparameters"]
    print(
        f"\ntraining: seed {hp['seed']}, {training['steps']} steps × {hp['batch_size']} pairs "
        f"({training['epochs']:.2f} epochs of {training['data']['pairs']} pairs), rank {hp['rank']}, "
        f"alpha {hp['alpha']:g}, lr {hp['lr']:g}, τ {hp['temperature']}, {training['precision']}, "
        f"{args.threads} threads, final loss {training['final_loss']:.4f}"
    )
    if result is not None:
        print(
            f"cost: {wall:.1f} s wall, {cpu:.1f} s CPU ({cpu / wall:.2f} cores busy), "
            f"{result.tokens / wall:,.0f} tokens/s ({result.tokens:,} tokens), "
            f"peak RSS {peak_mb:,.0f} MB"
        )
    print(f"merged vs base + adapter: max |Δ embedding| = {gap:.2e} over 64 passages")
    if args.json_out:
        doc = {
            "base": base,
            "adapter": after,
            "merged": mrg,
            "training": training,
            "threads": args.threads,
            "train_wall_s": wall,
            "train_cpu_s": cpu,
            "peak_rss_mb": peak_mb,
            "losses": result.losses if result else None,
            "merged_max_abs_diff": gap,
        }
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
