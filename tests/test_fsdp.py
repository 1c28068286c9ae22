"""`train --fsdp`: two CPU processes (gloo) sharding the base give one process's losses; resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from loratool.format import load
from loratool.training import build_config, train

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _data(path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is two plus {i}?"},
                {"role": "assistant", "content": f"Two plus {i} is {i + 2}."},
            ]
        }
        for i in range(22)  # 22 rows, 8 a step: the last step is short, processes get unequal
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


COMMON: dict[str, Any] = {
    "rank": 4,
    "seq_len": 32,
    "dtype": "f32",
    "lr": 1e-2,
    "schedule": "constant",
    "packing": False,
}


def _flags(settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "loratool", "train", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _one(tmp_path: Path, model: Path, data: Path, name: str, **kw: Any) -> Any:
    settings = {**COMMON, "batch_size": 8, "save_every": 0, **kw}
    settings.update(model=str(model), data=str(data), output=str(tmp_path / name))
    return train(build_config({}, settings))


def _losses(metrics: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in metrics.read_text().splitlines() if "loss" in x]


def test_two_sharded_processes_equal_one_with_the_same_global_batch(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    data = _data(tmp_path / "chat.jsonl")
    one = _one(tmp_path, tiny_llama_dir, data, "one.safetensors", max_steps=3)
    out, metrics = tmp_path / "two.safetensors", tmp_path / "m.jsonl"
    args = ["--model", str(tiny_llama_dir), "--data", str(data), "-o", str(out)]
    args += _flags({**COMMON, "batch_size": 4, "max_steps": 3, "save_every": 0, "fsdp": True})
    r = _torchrun([*args, "--metrics", str(metrics)])
    assert r.returncode == 0, r.stderr[-3000:]
    # Each process holds half the base but the output head (and the embedding tied to it),
    # which the chunked loss reads outside any FSDP unit (FSDP pads a shard by a row at most).
    pattern = r"holds ([\d,]+) of the base's ([\d,]+) bytes \(the output head's ([\d,]+) whole"
    m = re.search(pattern, r.stderr)
    assert m is not None, r.stderr[-2000:]
    local, whole, head = (int(x.replace(",", "")) for x in m.groups())
    assert 0.45 < (local - head) / (whole - head) < 0.55
    torch.testing.assert_close(
        torch.tensor(_losses(metrics)), torch.tensor(one.losses), rtol=1e-5, atol=1e-5
    )
    a, b = load(out), load(tmp_path / "one.safetensors")
    assert a.provenance["training"]["fsdp"] is True
    for name, t in a.targets.items():
        torch.testing.assert_close(t.lora_B, b.targets[name].lora_B, rtol=1e-4, atol=1e-6)


def test_sharded_nf4_run_saves_and_resumes_like_one_process(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """--fsdp with --quantize nf4: the packed parts are sharded too; a resumed sharded run goes
    on exactly, and over the epoch's short last step (unequal micro-batches) too."""
    data = _data(tmp_path / "chat.jsonl")
    one = _one(tmp_path, tiny_llama_dir, data, "one.safetensors", max_steps=4, quantize="nf4")
    out, metrics = tmp_path / "two.safetensors", tmp_path / "m.jsonl"
    base = ["--model", str(tiny_llama_dir), "--data", str(data), "-o", str(out)]
    settings = {**COMMON, "batch_size": 4, "quantize": "nf4", "fsdp": True, "save_every": 1}
    first = _torchrun([*base, *_flags({**settings, "max_steps": 2}), "--metrics", str(metrics)])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun(
        [
            *base,
            *_flags({**settings, "max_steps": 4}),
            "--metrics",
            str(metrics),
            "--resume",
            "--force",
        ]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    torch.testing.assert_close(
        torch.tensor(_losses(metrics)), torch.tensor(one.losses), rtol=1e-5, atol=1e-5
    )
    q = load(out).provenance["training"]["quantization"]
    assert q["scheme"] == "nf4"
