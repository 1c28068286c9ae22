"""``loratool generate``: the text transformers' own greedy decode gives, streamed to stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from test_hotswap import random_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratool import lora
from loratool.cli import cli


def _run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin)


@pytest.fixture(scope="module")
def adapter_file(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "a.safetensors"
    random_adapter(tiny_llama_dir, seed=11).save(path)
    return path


def _reference(model_dir: Path, ids: list[int], adapter: Path | None, n: int) -> str:
    """transformers' ``generate`` (greedy), with the adapter attached by ``lora.attach``."""
    from loratool import load

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        lora.attach(model, load(adapter))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )
    text: str = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    return text


def test_prompt_greedy_equals_transformers_generate(
    tiny_llama_dir: Path, adapter_file: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = "the adapter"
    want = _reference(tiny_llama_dir, tok(prompt)["input_ids"], adapter_file, 12)
    r = _run(
        "generate",
        str(tiny_llama_dir),
        "--adapter",
        str(adapter_file),
        "-p",
        prompt,
        "--max-new-tokens",
        "12",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    assert "unmerged" in r.stderr and "tokens/s" in r.stderr
    merged = _run(
        "generate",
        str(tiny_llama_dir),
        "--adapter",
        str(adapter_file),
        "-p",
        prompt,
        "--max-new-tokens",
        "12",
        "--merged",
    )
    assert merged.exit_code == 0 and merged.stdout == want + "\n"
    base = _run("generate", str(tiny_llama_dir), "-p", prompt, "--max-new-tokens", "12")
    assert base.stdout == _reference(tiny_llama_dir, tok(prompt)["input_ids"], None, 12) + "\n"
    zero = _run(
        "generate",
        str(tiny_llama_dir),
        "--adapter",
        f"{adapter_file}:0",
        "-p",
        prompt,
        "--max-new-tokens",
        "12",
    )
    assert zero.stdout == base.stdout != r.stdout


def test_chat_turn_from_stdin_uses_the_chat_template(
    tiny_llama_dir: Path, adapter_file: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = _reference(tiny_llama_dir, ids, adapter_file, 8)
    r = _run(
        "generate",
        str(tiny_llama_dir),
        "--adapter",
        str(adapter_file),
        "--chat",
        "--max-new-tokens",
        "8",
        stdin="hello\n",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"


def test_json_is_one_document_on_stdout(tiny_llama_dir: Path, adapter_file: Path) -> None:
    r = _run(
        "generate",
        str(tiny_llama_dir),
        "--adapter",
        f"{adapter_file}:0.5",
        "-p",
        "x",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert r.exit_code == 0 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["adapters"] == [{"path": str(adapter_file), "weight": 0.5}]
    assert doc["completion_tokens"] <= 5 and doc["finish_reason"] in ("stop", "length")
    assert isinstance(doc["text"], str)


def test_seeded_sampling_is_reproducible(tiny_llama_dir: Path) -> None:
    args = [
        "generate",
        str(tiny_llama_dir),
        "-p",
        "a",
        "--temperature",
        "1.0",
        "--seed",
        "3",
        "--max-new-tokens",
        "10",
        "--json",
    ]
    one, two = json.loads(_run(*args).stdout), json.loads(_run(*args).stdout)
    assert one["text"] == two["text"]


def test_user_mistakes_are_one_line_errors(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    r = _run("generate", str(tiny_llama_dir))
    assert r.exit_code == 2 and r.stderr.startswith("error[no-prompt]:")
    r = _run("generate", str(tiny_llama_dir), "--adapter", str(tmp_path / "nope"), "-p", "x")
    assert r.exit_code == 2 and r.stderr.startswith("error[not-a-file]:")
    other = tmp_path / "gpt2.safetensors"
    random_adapter(tiny_gpt2_dir, seed=1).save(other)
    r = _run("generate", str(tiny_llama_dir), "--adapter", str(other), "-p", "x")
    assert r.exit_code == 4 and r.stderr.startswith("error[missing-module]:")
    r = _run("generate", str(tmp_path / "no-model"), "-p", "x")
    assert r.exit_code == 2 and r.stderr.startswith("error[bad-model]:")
    assert "Traceback" not in r.output
