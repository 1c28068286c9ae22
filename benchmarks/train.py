"""Benchmark: `loratool train` against PEFT + transformers Trainer on SmolLM2-135M, side by side.

Each side runs as its own process on the same data with the same LoRA and optimiser settings
(r=16, α=32, all-linear, dropout 0, AdamW lr 2e-4, cosine, no warm-up, seq-len 512, seed 0), for
the same number of optimizer steps; sides alternate, in rounds, because the machine is shared.

    python benchmarks/train.py [--steps 10] [--rounds 2] [--sides peft-f32,peft-bf16,loratool]

Data: prompt/completion records built from the docstrings of Python's standard library (real
English of varied length, reproducible offline), loss on the completion only, on both sides.
Batches: PEFT takes 8 records per step padded to the longest (DataCollatorForSeq2Seq, the usual
PEFT recipe; the `peft-bf16-grouped` side adds `group_by_length=True`, which batches records of
similar length and pads less); loratool takes 2 packed rows of ≤512 tokens per step, which hold
~9 records, so both see about the same records per step.

Reported per side: non-padding tokens/s over steps 2..N (step 1 pays one-off warm-up on both
sides), peak RSS of the whole process (ru_maxrss from wait4), the mean training loss of the last
3 steps, and an evaluation loss on 32 held-out records computed afterwards by one common
evaluator (the adapter merged into an fp32 copy of the base, plain transformers forward), so the
losses are comparable whatever each side does internally. Precision is stated per side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT))

SEQ_LEN = 512
RANK, ALPHA, LR, SEED = 16, 32, 2e-4, 0
PEFT_BATCH, LORATOOL_ROWS = 8, 2
N_EVAL = 32
MODULES = [
    "json",
    "os",
    "re",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "subprocess",
    "argparse",
    "random",
    "string",
    "textwrap",
    "shutil",
    "tempfile",
    "logging",
    "typing",
    "dataclasses",
    "inspect",
    "enum",
    "contextlib",
]


def build_data(folder: Path) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl: 'Explain X' -> X's docstring (cut at 1500 characters)."""
    import importlib

    records = []
    for m in MODULES:
        mod = importlib.import_module(m)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 80:
                records.append(
                    {
                        "prompt": f"Explain what {m}.{name} does in Python.\n",
                        "completion": doc[:1500],
                    }
                )
    import random

    random.Random(SEED).shuffle(records)
    train, evals = records[N_EVAL:], records[:N_EVAL]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(folder / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return folder / "train.jsonl", folder / "eval.jsonl"


# -- the PEFT + Trainer side (runs in its own process) -------------------------------------------


def run_peft(
    model_dir: str, data: str, out: str, steps: int, bf16: bool, grouped: bool, report: str
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from loratool.training import data as D

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = D.tokenize(D.read_jsonl(data), tokenizer, seq_len=SEQ_LEN, path=data).docs
    # The same ids as loratool's; labels are the ids with -100 where loratool has no target.
    rows = [
        {
            "input_ids": d.ids,
            "attention_mask": [1] * len(d.ids),
            "labels": [-100]
            + [d.ids[i] if d.targets[i - 1] != -100 else -100 for i in range(1, len(d.ids))],
        }
        for d in docs
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    tokens: list[int] = []
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(batch: list[dict[str, Any]]) -> Any:
        out = pad_collator(batch)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    log: list[dict[str, float]] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.append({"t": time.perf_counter(), "step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                log.append({"loss": float(logs["loss"]), "step": state.global_step})

    ds = rows  # a list is a map-style dataset; `datasets` is not needed
    targs = TrainingArguments(
        output_dir=out + "-trainer",
        per_device_train_batch_size=PEFT_BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        seed=SEED,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[Timer()]
    )
    trainer.train()
    model.save_pretrained(out)
    times = [e["t"] for e in log if "t" in e]
    losses = [e["loss"] for e in log if "loss" in e]
    # tokens[] counts batches as the data loader produced them; the first `steps` were trained on.
    Path(report).write_text(
        json.dumps(
            {
                "tokens_after_first": sum(tokens[1:steps]),
                "time_after_first": times[-1] - times[0],
                "losses": losses,
                "steps": len(times),
            }
        )
    )


# -- the loratool side ---------------------------------------------------------------------------


def loratool_cmd(
    model_dir: str, data: str, out: str, steps: int, metrics: str, dtype: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loratool",
        "train",
        "--model",
        model_dir,
        "--data",
        data,
        "-o",
        out,
        "--max-steps",
        str(steps),
        "--rank",
        str(RANK),
        "--alpha",
        str(ALPHA),
        "--targets",
        "all-linear",
        "--lr",
        str(LR),
        "--schedule",
        "cosine",
        "--warmup",
        "0",
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        str(LORATOOL_ROWS),
        "--seed",
        str(SEED),
        "--metrics",
        metrics,
        "--dtype",
        dtype,
        "--save-every",
        "0",
        "--force",
        "-q",
    ]


# -- the harness ---------------------------------------------------------------------------------


def run_side(side: str, model_dir: str, data: str, work: Path, steps: int) -> dict[str, Any]:
    out = str(work / f"{side}.adapter")
    report = str(work / f"{side}.json")
    if side.startswith("peft"):
        cmd = [
            sys.executable,
            __file__,
            "--child-peft",
            model_dir,
            data,
            out,
            str(steps),
            "1" if "bf16" in side else "0",
            "1" if side.endswith("grouped") else "0",
            report,
        ]
    else:
        dtype = "f32" if side == "loratool-f32" else "bf16"
        cmd = loratool_cmd(model_dir, data, out + ".safetensors", steps, report, dtype)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        sys.stderr.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"{side} failed with status {status}")
    peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
    if side.startswith("peft"):
        r = json.loads(Path(report).read_text())
        tps = r["tokens_after_first"] / r["time_after_first"]
        losses = r["losses"]
    else:
        rows = [json.loads(x) for x in Path(report).read_text().splitlines()]
        rows = [x for x in rows if "loss" in x]
        tps = (rows[-1]["tokens"] - rows[0]["tokens"]) / (
            rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
        )
        losses = [x["loss"] for x in rows]
    return {
        "side": side,
        "tokens_per_s": tps,
        "peak_rss": peak_rss,
        "wall_s": wall,
        "loss_last3": sum(losses[-3:]) / len(losses[-3:]),
        "adapter": out,
    }


def common_eval(side: str, adapter: str, model_dir: str, eval_path: str) -> float:
    """Mean completion CE on the held-out records, the adapter merged into an fp32 base."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool import lora
    from loratool.training import data as D

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if side.startswith("peft"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    else:
        from loratool.format import load

        lora.attach(model, load(adapter + ".safetensors"))
        lora.remove(model, merge=True)
    model.eval()
    docs = D.tokenize(D.read_jsonl(eval_path), tokenizer, seq_len=SEQ_LEN, path=eval_path).docs
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            logits = model(input_ids=torch.tensor([d.ids])).logits[0].float()
            tgt = torch.tensor(d.targets)
            keep = tgt != -100
            total += float(
                torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum")
            )
            count += int(keep.sum())
    return total / count


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-peft":
        a = sys.argv[2:]
        run_peft(a[0], a[1], a[2], int(a[3]), a[4] == "1", a[5] == "1", a[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sides", default="peft-f32,peft-bf16,peft-bf16-grouped,loratool,loratool-f32"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the common evaluation")
    args = parser.parse_args()
    import models

    model_dir = str(models.smollm2())
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        work = Path(tmp)
        data, eval_path = build_data(work)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                res = run_side(side, model_dir, str(data), work, args.steps)
                results[side].append(res)
                print(
                    f"round {r + 1} {side:>13}: {res['tokens_per_s']:7.1f} tok/s  "
                    f"peak RSS {res['peak_rss'] / 1e9:5.2f} GB  loss {res['loss_last3']:.4f}  "
                    f"wall {res['wall_s']:.0f} s",
                    flush=True,
                )
        evals = {}
        if not args.no_eval:
            for side in sides:
                evals[side] = common_eval(
                    side, results[side][-1]["adapter"], model_dir, str(eval_path)
                )
    precision = {
        "peft-f32": "fp32 weights + fp32 compute (Trainer default on CPU)",
        "peft-bf16": "fp32 weights, bf16 autocast (Trainer bf16=True)",
        "peft-bf16-grouped": "as peft-bf16, with group_by_length=True (less padding)",
        "loratool": "bf16 frozen weights, bf16 autocast, fp32 LoRA + AdamW (--dtype auto)",
        "loratool-f32": "fp32 everything (--dtype f32)",
    }
    print()
    print(
        f"SmolLM2-135M, {args.steps} steps, seq-len {SEQ_LEN}, r={RANK} all-linear; "
        f"best of {args.rounds} rounds (tok/s: max, RSS: min)"
    )
    header = (
        f"{'side':<19}{'tok/s':>9}{'peak RSS':>11}{'loss(last3)':>13}{'eval loss':>11}  precision"
    )
    print(header)
    best = {}
    for side in sides:
        rs = results[side]
        best[side] = {
            "tps": max(x["tokens_per_s"] for x in rs),
            "rss": min(x["peak_rss"] for x in rs),
            "loss": rs[-1]["loss_last3"],
        }
        ev = f"{evals[side]:.4f}" if side in evals else "-"
        print(
            f"{side:<19}{best[side]['tps']:>9.1f}{best[side]['rss'] / 1e9:>9.2f}GB"
            f"{best[side]['loss']:>13.4f}{ev:>11}  {precision.get(side, '')}"
        )
    print()
    for ours in [s for s in sides if s.startswith("loratool")]:
        for ref in [s for s in sides if s.startswith("peft")]:
            # Ratios per round (same round = similar machine load), then the median.
            pairs = list(zip(results[ours], results[ref], strict=True))
            tps = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
            rss = sorted(a["peak_rss"] / b["peak_rss"] for a, b in pairs)
            print(
                f"{ours} vs {ref}: tokens/s ×{statistics.median(tps):.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' for x in tps)}), "
                f"peak RSS ×{statistics.median(rss):.2f}"
            )


if __name__ == "__main__":
    main()
