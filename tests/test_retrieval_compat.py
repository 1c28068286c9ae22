"""Adapters where retrieval users use them: sentence-transformers loads converted and merged output.

`loratool convert --to peft` output goes through `SentenceTransformer.load_adapter` (PEFT via
transformers' adapter mixin) and through PEFT on the model's `[0].auto_model`; `loratool merge`
into an encoder folder must stay a sentence-transformers model (modules.json, pooling,
normalisation) that `SentenceTransformer(merged)` loads. In every case the embeddings must be
the ones `eval-retrieval` computes (loratool's encoder + the adapter), to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool import lora
from loratool import retrieval as R
from loratool.cli import cli
from loratool.sources import open_adapter

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("peft")

TARGETS = "query,key,value,dense"
TEXTS = [
    "Return the number of items in a container.",
    "Open a file and return a stream; raise OSError upon failure.",
    "rome",
    "A quick brown fox jumps over the lazy dog, and then it jumps over it once more.",
]


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_adapter(model_dir: Path, out: Path, *, rank: int = 4, scale: float = 0.05) -> Path:
    """A LoRA on every BERT projection with random non-zero factors (B = 0 would prove nothing)."""
    model = R.load_encoder(model_dir).model
    torch.manual_seed(3)
    lora.inject(model, targets=TARGETS, rank=rank, alpha=2 * rank)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, scale)
    lora.extract_adapter(model).save(out)
    return out


def _loratool_embeddings(model_dir: Path, adapter: Path | None) -> torch.Tensor:
    """What eval-retrieval embeds: loratool's encoder (its pooling, normalisation), + adapter."""
    enc = R.load_encoder(model_dir)
    if adapter is not None:
        R.apply_adapter(enc.model, open_adapter(adapter).adapter)
    return R.encode(enc, TEXTS)


def _st_embeddings(model: object) -> torch.Tensor:
    out = model.encode(TEXTS, convert_to_tensor=True, batch_size=2)  # type: ignore[attr-defined]
    return out.float().cpu()


def _convert_to_peft(adapter: Path, out: Path) -> Path:
    r = CliRunner().invoke(cli, ["convert", str(adapter), "--to", "peft", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "adapter_config.json").is_file()
    return out


def _check_peft_paths(model_dir: Path, tmp_path: Path, scale: float) -> None:
    adapter = _random_adapter(model_dir, tmp_path / "a.safetensors", scale=scale)
    peft_dir = _convert_to_peft(adapter, tmp_path / "peft")
    expected = _loratool_embeddings(model_dir, adapter)
    base = _loratool_embeddings(model_dir, None)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the embeddings

    model = st.SentenceTransformer(str(model_dir), device="cpu")
    torch.testing.assert_close(_st_embeddings(model), base, rtol=0, atol=1e-5)
    model.load_adapter(str(peft_dir))
    torch.testing.assert_close(_st_embeddings(model), expected, rtol=0, atol=1e-5)

    from peft import PeftModel

    model = st.SentenceTransformer(str(model_dir), device="cpu")
    model[0].auto_model = PeftModel.from_pretrained(model[0].auto_model, str(peft_dir)).eval()
    torch.testing.assert_close(_st_embeddings(model), expected, rtol=0, atol=1e-5)


def _check_merge(model_dir: Path, tmp_path: Path, scale: float) -> None:
    adapter = _random_adapter(model_dir, tmp_path / "a.safetensors", scale=scale)
    merged = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", str(model_dir), str(adapter), "-o", str(merged)])
    assert r.exit_code == 0, r.output
    modules = json.loads((merged / "modules.json").read_text())
    assert modules == json.loads((model_dir / "modules.json").read_text())
    for m in modules:  # each module's folder and files, as in the encoder
        for f in sorted((model_dir / m["path"]).glob("*.json")) if m["path"] else []:
            assert json.loads((merged / m["path"] / f.name).read_text()) == json.loads(
                f.read_text()
            )
    if (model_dir / "sentence_bert_config.json").is_file():
        assert json.loads((merged / "sentence_bert_config.json").read_text()) == json.loads(
            (model_dir / "sentence_bert_config.json").read_text()
        )
    assert R.sentence_config(merged) == R.sentence_config(model_dir)

    expected = _loratool_embeddings(model_dir, adapter)
    model = st.SentenceTransformer(str(merged), device="cpu")
    names = [type(m).__name__ for m in model]
    original = [type(m).__name__ for m in st.SentenceTransformer(str(model_dir), device="cpu")]
    assert names == original, names  # pooling and normalisation kept
    torch.testing.assert_close(_st_embeddings(model), expected, rtol=0, atol=1e-5)


def test_st_load_adapter_and_peft_give_eval_retrieval_embeddings(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    _check_peft_paths(tiny_bert_dir, tmp_path, scale=0.3)


def test_merged_encoder_loads_in_sentence_transformers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    _check_merge(tiny_bert_dir, tmp_path, scale=0.3)


@pytest.mark.slow
def test_minilm_adapter_in_sentence_transformers(minilm_dir: Path, tmp_path: Path) -> None:
    """The same on all-MiniLM-L6-v2 (modules.json with Pooling and Normalize)."""
    for sub in ("peft-path", "merge-path"):
        (tmp_path / sub).mkdir()
    _check_peft_paths(minilm_dir, tmp_path / "peft-path", scale=0.02)
    _check_merge(minilm_dir, tmp_path / "merge-path", scale=0.02)
