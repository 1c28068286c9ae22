"""Benchmark: `loratool train` against PEFT + Trainer and TRL's SFTTrainer, side by side.

The configuration of issue 17: SmolLM2-135M, LoRA r=16 α=32 on q/k/v/o_proj, dropout 0.05,
64 short documents (≤256 tokens), batch 8, 1 epoch, AdamW lr 2e-4, cosine, no warm-up, seed 0.
Each side runs as its own process; sides alternate in rounds, because the machine is shared.

    python benchmarks/train.py [--rounds 2] [--sides loratool,peft-f32,peft-bf16,trl]
    python benchmarks/train.py --memory [--shape short|long] [--tokens 2048,4096,8192]

Sides and their precision:
- ``loratool``: ``--dtype auto``: where the CPU does bf16 natively (AVX512-BF16 or AMX), bf16
  frozen weights and bf16 autocast, fp32 LoRA + AdamW; elsewhere all fp32. 8 packed rows of ≤256
  tokens per step (documents never attend to each other), so fewer steps.
- ``peft-f32`` / ``peft-bf16``: PEFT + transformers ``Trainer``, fp32 (its CPU default) or
  ``bf16=True`` (autocast over fp32 weights); 8 documents per step, padded to the longest.
- ``trl``: TRL ``SFTTrainer`` with ``peft_config``, its defaults where we set nothing
  (``bf16=True``, ``gradient_checkpointing=True``); ``trl-f32`` the same with ``bf16=False``.
  8 documents per step, padded.

The default sides follow the machine: ``loratool,peft-f32,peft-bf16,trl`` where bf16 is native;
elsewhere bf16 is emulated (on an AVX2-only CPU a bf16 linear runs ~8x slower than fp32), so
``loratool,peft-f32,trl-f32``, the sides a user there would run; ``--sides`` picks any.

Reported per side: non-padding tokens/s over steps 2..N (step 1 pays one-off warm-up), peak RSS
of the whole process (ru_maxrss from wait4), the final training loss (mean of the last step's
tokens), and an evaluation loss on 32 held-out documents computed afterwards by one common
evaluator (the adapter merged into an fp32 base), so the losses compare whatever each side does.

Utilisation: the useful FLOPs of the data set are counted from the model's shapes, per document
(frozen base: 2·N·tokens forward and 2·N·tokens backward for the activation gradients, no weight
gradients; LoRA 6·r·(in+out) per token and adapted module; attention 12·n²·d per layer and
document of n tokens (the full square, as the kernels compute it); the head 4·d·V per target:
its forward and the gradient computed with it). Achieved FLOP/s = tokens/s × FLOPs per token,
against the peak of the side's precision measured in the same run (``F.linear`` of a [2048, 576]
input by a [1536, 576] weight in fp32 and in bf16, as shared/notes/machine.md describes), before
and after the sides run.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
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

SEQ_LEN, BATCH = 256, 8
RANK, ALPHA, DROPOUT, LR, SEED = 16, 32, 0.05, 2e-4, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_TRAIN, N_EVAL = 64, 32
DEFAULT_SIDES = "loratool,peft-f32,peft-bf16,trl"
DEFAULT_SIDES_F32 = "loratool,peft-f32,trl-f32"
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


def build_data(folder: Path, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl: {"text": "module.name\\n\\ndocstring"}, ≤900 characters each."""
    records = []
    for m in MODULES:
        mod = importlib.import_module(m)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 200:
                records.append({"text": f"{m}.{name}\n\n{doc[:900]}"})
    random.Random(SEED).shuffle(records)
    evals, train = records[:n_eval], records[N_EVAL:]
    train = (train * (1 + n_train // len(train)))[:n_train]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(folder / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return folder / "train.jsonl", folder / "eval.jsonl"


def _docs(model_dir: str, data: str) -> list[Any]:
    from transformers import AutoTokenizer

    from loratool.training import data as D

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(D.tokenize(D.read_jsonl(data), tokenizer, seq_len=SEQ_LEN, path=data).docs)


def _rows(docs: list[Any]) -> list[dict[str, list[int]]]:
    """The same ids as loratool's; labels are the ids with -100 where loratool has no target."""
    return [
        {
            "input_ids": d.ids,
            "attention_mask": [1] * len(d.ids),
            "labels": [-100]
            + [d.ids[i] if d.targets[i - 1] != -100 else -100 for i in range(1, len(d.ids))],
        }
        for d in docs
    ]


# -- the PEFT + Trainer and TRL sides (each in its own process) ----------------------------------


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def _callbacks(log: list[dict[str, float]]) -> list[Any]:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.append({"t": time.perf_counter(), "step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                log.append({"loss": float(logs["loss"]), "step": state.global_step})

    return [Timer()]


def _common_args() -> dict[str, Any]:
    return {
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": SEED,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def run_hf(kind: str, model_dir: str, data: str, out: str, report: str) -> None:
    """``kind``: peft-f32, peft-bf16 (Trainer), trl or trl-f32 (SFTTrainer + peft_config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = _docs(model_dir, data)
    rows = _rows(docs)
    tokens: list[int] = []
    log: list[dict[str, float]] = []
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # Pre-tokenised (the same ids): SFTTrainer skips its own tokenisation for input_ids.
        ds = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
        extra = {"bf16": False} if kind == "trl-f32" else {}
        args = SFTConfig(output_dir=out + "-trainer", max_length=SEQ_LEN, **extra, **_common_args())
        trainer: Any = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=_lora_config(),
            callbacks=_callbacks(log),
        )
        inner = trainer.data_collator
        pad_id = tokenizer.pad_token_id

        def count(batch: list[dict[str, Any]]) -> Any:
            b = inner(batch)
            mask = b["attention_mask"] if "attention_mask" in b else b["input_ids"] != pad_id
            tokens.append(int(mask.sum()))
            return b

        trainer.data_collator = count
    else:
        from peft import get_peft_model
        from transformers import Trainer, TrainingArguments

        model = get_peft_model(model, _lora_config())
        pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

        def collate(batch: list[dict[str, Any]]) -> Any:
            b = pad(batch)
            tokens.append(int(b["attention_mask"].sum()))
            return b

        targs = TrainingArguments(
            output_dir=out + "-trainer",
            bf16=kind == "peft-bf16",
            remove_unused_columns=False,
            **_common_args(),
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=rows,
            data_collator=collate,
            callbacks=_callbacks(log),
        )
    trainer.train()
    trainer.model.save_pretrained(out)
    times = [e["t"] for e in log if "t" in e]
    losses = [e["loss"] for e in log if "loss" in e]
    steps = len(times)
    Path(report).write_text(
        json.dumps(
            {
                "tokens_after_first": sum(tokens[1:steps]),
                "time_after_first": times[-1] - times[0],
                "losses": losses,
                "steps": steps,
            }
        )
    )


# -- the loratool side ---------------------------------------------------------------------------


def loratool_cmd(model_dir: str, data: str, out: str, metrics: str, extra: list[str]) -> list[str]:
    flags = {
        "--model": model_dir,
        "--data": data,
        "-o": out,
        "--epochs": "1",
        "--rank": str(RANK),
        "--alpha": str(ALPHA),
        "--dropout": str(DROPOUT),
        "--targets": ",".join(TARGETS),
        "--lr": str(LR),
        "--schedule": "cosine",
        "--warmup": "0",
        "--seq-len": str(SEQ_LEN),
        "--batch-size": str(BATCH),
        "--seed": str(SEED),
        "--metrics": metrics,
        "--save-every": "0",
    }
    cmd = [sys.executable, "-m", "loratool", "train"]
    for k, v in flags.items():
        cmd += [k, v]
    return [*cmd, "--force", "-q", *extra]


# -- the harness ---------------------------------------------------------------------------------


def _spawn(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; (wall seconds, peak RSS bytes of the process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.stderr.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"{cmd[:4]} failed with status {status}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024  # KiB on Linux


def run_side(side: str, model_dir: str, data: str, work: Path) -> dict[str, Any]:
    out = str(work / f"{side}.adapter")
    report = str(work / f"{side}.json")
    if side.startswith("loratool"):
        extra = ["--no-packing"] if side == "loratool-unpacked" else []
        cmd = loratool_cmd(model_dir, data, out + ".safetensors", report, extra)
    else:
        cmd = [sys.executable, __file__, "--child", side, model_dir, data, out, report]
    wall, peak = _spawn(cmd)
    if side.startswith("loratool"):
        rows = [json.loads(x) for x in Path(report).read_text().splitlines()]
        rows = [x for x in rows if "loss" in x]
        tps = (rows[-1]["tokens"] - rows[0]["tokens"]) / (
            rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
        )
        losses, steps = [x["loss"] for x in rows], len(rows)
    else:
        r = json.loads(Path(report).read_text())
        tps = r["tokens_after_first"] / r["time_after_first"]
        losses, steps = r["losses"], r["steps"]
    return {
        "side": side,
        "tokens_per_s": tps,
        "peak_rss": peak,
        "wall_s": wall,
        "final_loss": losses[-1],
        "steps": steps,
        "adapter": out,
    }


def common_eval(side: str, adapter: str, model_dir: str, eval_path: str) -> float:
    """Mean next-token CE on the held-out documents, the adapter merged into an fp32 base."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from loratool import lora

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if side.startswith("loratool"):
        from loratool.format import load

        lora.attach(model, load(adapter + ".safetensors"))
        lora.remove(model, merge=True)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for d in _docs(model_dir, eval_path):
            logits = model(input_ids=torch.tensor([d.ids])).logits[0].float()
            tgt = torch.tensor(d.targets)
            keep = tgt != -100
            total += float(
                torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum")
            )
            count += int(keep.sum())
    return total / count


def matmul_peak(dtype: str, seconds: float = 3.0) -> float:
    """FLOP/s of ``F.linear`` on a [2048, 576] input and a [1536, 576] weight in ``dtype``.

    The op the models' projections run, on this process's threads; timed for ``seconds`` or at
    least three calls (a CPU without native bf16 takes a quarter of a second a call).
    """
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(2048, 576, dtype=dt)
    w = torch.randn(1536, 576, dtype=dt)
    for _ in range(2):
        torch.nn.functional.linear(a, w)
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        torch.nn.functional.linear(a, w)
        n += 1
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start)


def native_bf16() -> bool:
    """What ``loratool train --dtype auto`` decides on this CPU (bf16 only where it is native)."""
    import torch

    from loratool.training.runtime import resolve_dtype

    return resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


def precision(side: str, bf16: bool) -> str:
    """The precision a side's matmuls run in: loratool's follows --dtype auto (``bf16``: native
    here); ``*-f32`` sides fp32; ``peft-bf16`` and ``trl`` (its default bf16=True) bf16."""
    if side.startswith("loratool"):
        return "bf16" if bf16 else "f32"
    return "f32" if side.endswith("f32") else "bf16"


def useful_flops(model_dir: str, docs: list[Any]) -> tuple[float, int]:
    """(FLOPs of one pass of training over ``docs``, their tokens), counted from the shapes."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
    )
    hd = cfg.get("head_dim") or d // heads
    vocab = cfg["vocab_size"]
    shapes = {  # (in, out) of each linear of a layer
        "q_proj": (d, heads * hd),
        "k_proj": (d, kv * hd),
        "v_proj": (d, kv * hd),
        "o_proj": (heads * hd, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    n_linear = sum(i * o for i, o in shapes.values())
    n_lora = sum(RANK * (shapes[t][0] + shapes[t][1]) for t in TARGETS)
    total, tokens = 0.0, 0
    for doc in docs:
        n = len(doc.ids)
        targets = sum(1 for t in doc.targets if t != -100)
        per_layer = 4 * n_linear * n + 6 * n_lora * n + 12 * n * n * heads * hd
        total += layers * per_layer + 4 * d * vocab * targets
        tokens += n
    return total, tokens


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def compare(args: argparse.Namespace) -> None:
    import models

    model_dir = str(models.smollm2())
    bf16 = native_bf16()
    sides = (args.sides or (DEFAULT_SIDES if bf16 else DEFAULT_SIDES_F32)).split(",")
    print(f"load average before: {load()}", flush=True)
    kinds = ["bf16", "f32"]  # both peaks, whichever the sides use
    peak0 = {k: matmul_peak(k) for k in kinds}
    if not bf16 and not args.sides:
        print(
            f"no native bf16 on this CPU (bf16 linear {peak0['bf16'] / 1e9:.0f} GFLOP/s against "
            f"{peak0['f32'] / 1e9:.0f} in fp32): loratool's --dtype auto trains in fp32, so the "
            "sides are the fp32 ones (--sides peft-bf16,trl runs the others)",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="loratool-bench-") as tmp:
        work = Path(tmp)
        data, eval_path = build_data(work, n_train=args.docs, n_eval=args.eval_docs)
        docs = _docs(model_dir, str(data))
        flops, n_tokens = useful_flops(model_dir, docs)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                res = run_side(side, model_dir, str(data), work)
                results[side].append(res)
                print(
                    f"round {r + 1} {side:>17}: {res['tokens_per_s']:7.1f} tok/s  "
                    f"peak RSS {res['peak_rss'] / 1e9:5.2f} GB  final loss "
                    f"{res['final_loss']:.4f} ({res['steps']} steps)  wall {res['wall_s']:.0f} s  "
                    f"load {load()}",
                    flush=True,
                )
        evals = {}
        if not args.no_eval:
            for side in sides:
                evals[side] = common_eval(
                    side, results[side][-1]["adapter"], model_dir, str(eval_path)
                )
    peak1 = {k: matmul_peak(k) for k in kinds}
    peak = {k: max(peak0[k], peak1[k]) for k in kinds}
    per_token = flops / n_tokens
    print(f"load average after: {load()}")
    print()
    print(
        f"SmolLM2-135M, r={RANK} α={ALPHA} {'/'.join(TARGETS)}, dropout {DROPOUT}, {args.docs} "
        f"documents ({n_tokens} tokens, ≤{SEQ_LEN} each), batch {BATCH}, 1 epoch; "
        f"best of {args.rounds} rounds (tok/s: max, RSS: min)"
    )
    print(
        f"useful work: {per_token / 1e6:.0f} MFLOP per token; linear peak "
        + ", ".join(
            f"{k} {peak0[k] / 1e9:.0f} GFLOP/s before, {peak1[k] / 1e9:.0f} after" for k in kinds
        )
    )
    print(
        f"{'side':<19}{'dtype':>6}{'tok/s':>8}{'GFLOP/s':>9}{'of peak':>8}{'peak RSS':>10}"
        f"{'steps':>6}{'final loss':>11}{'eval loss':>10}"
    )
    best = {}
    for side in sides:
        rs = results[side]
        tps = max(x["tokens_per_s"] for x in rs)
        best[side] = tps
        ev = f"{evals[side]:.4f}" if side in evals else "-"
        kind = precision(side, bf16)
        print(
            f"{side:<19}{kind:>6}{tps:>8.1f}{tps * per_token / 1e9:>9.1f}"
            f"{tps * per_token / peak[kind]:>8.1%}"
            f"{min(x['peak_rss'] for x in rs) / 1e9:>8.2f}GB{rs[-1]['steps']:>6}"
            f"{rs[-1]['final_loss']:>11.4f}{ev:>10}"
        )
    print()
    for ours in [s for s in sides if s.startswith("loratool")]:
        for ref in [s for s in sides if not s.startswith("loratool")]:
            # Ratios per round (same round = similar machine load), then the median.
            pairs = list(zip(results[ours], results[ref], strict=True))
            tps_r = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
            rss_r = sorted(a["peak_rss"] / b["peak_rss"] for a, b in pairs)
            print(
                f"{ours} vs {ref}: tokens/s ×{statistics.median(tps_r):.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' for x in tps_r)}), "
                f"peak RSS ×{statistics.median(rss_r):.2f}"
            )


def long_text(tokens: int) -> str:
    """One document of about ``tokens`` tokens: standard-library docstrings, one after another."""
    parts, chars = [], 0
    for m in MODULES:
        for name, obj in sorted(vars(importlib.import_module(m)).items()):
            doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
            if doc and not name.startswith("_"):
                parts.append(f"{m}.{name}: {doc}")
                chars += len(parts[-1])
                if chars > 5 * tokens:  # ~3.5 characters per token here: enough to be cut
                    return "\n\n".join(parts)
    return "\n\n".join(parts) * (1 + 5 * tokens // max(chars, 1))


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of loratool train against tokens per step, and the 8 GB sequence by a linear fit.

    ``short``: rows of 256 tokens packed with the benchmark's documents, tokens/256 rows a step.
    ``long``: one document of that many tokens a step (--seq-len = tokens, batch 1), which is
    what "the longest sequence that trains in 8 GB" asks; attention on a CPU runs SDPA's flash
    kernel there (linear memory in the length), so peak RSS is linear in tokens and the fit
    extrapolates.
    """
    import models

    model_dir = str(models.smollm2())
    print(f"load average before: {load()}", flush=True)
    points: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="loratool-mem-") as tmp:
        work = Path(tmp)
        for tokens in (int(x) for x in args.tokens.split(",")):
            if args.shape == "short":
                rows, seq = tokens // SEQ_LEN, SEQ_LEN
                data, _ = build_data(work, n_train=max(N_TRAIN, 2 * rows))
            else:
                rows, seq = 1, tokens
                data = work / "long.jsonl"
                data.write_text(json.dumps({"text": long_text(tokens)}) + "\n")
            report = str(work / "m.jsonl")
            cmd = loratool_cmd(model_dir, str(data), str(work / "m.safetensors"), report, [])
            cmd[cmd.index("--batch-size") + 1] = str(rows)
            cmd[cmd.index("--seq-len") + 1] = str(seq)
            cmd += ["--max-steps", "2"]
            wall, peak = _spawn(cmd)
            step_tokens = json.loads(Path(report).read_text().splitlines()[0])
            points.append((int(step_tokens["tokens"]), peak))
            print(
                f"{points[-1][0]:>6} tokens/step ({rows} × {seq}): peak RSS {peak / 1e9:.2f} GB"
                f"  wall {wall:.0f} s  load {load()}",
                flush=True,
            )
    if len(points) >= 2:
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        base = my - slope * mx
        print(
            f"fit: peak RSS ≈ {base / 1e9:.2f} GB + {slope / 1e3:.0f} KB × tokens/step; "
            f"8 GB at ≈ {(8e9 - base) / slope:,.0f} tokens/step ({args.shape})"
        )
    print(f"load average after: {load()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_hf(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sides",
        default="",
        help=f"comma list [{DEFAULT_SIDES} where bf16 is native, else {DEFAULT_SIDES_F32}]",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the common evaluation")
    parser.add_argument("--docs", type=int, default=N_TRAIN, help="training documents [64]")
    parser.add_argument("--eval-docs", type=int, default=N_EVAL, help="held-out documents [32]")
    parser.add_argument("--memory", action="store_true", help="peak RSS against tokens per step")
    parser.add_argument("--tokens", default="2048,4096,8192")
    parser.add_argument("--shape", choices=("short", "long"), default="short")
    args = parser.parse_args()
    memory(args) if args.memory else compare(args)


if __name__ == "__main__":
    main()
