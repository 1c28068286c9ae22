"""push/pull with spec 1.1 parts, against the loopback Hub of test_hub.py: the PEFT twin carries
DoRA, modules_to_save and trainable tokens so ``PeftModel.from_pretrained(repo)`` computes the
trained model's outputs; pulling a PEFT-only repo of such an adapter converts it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import USER
from test_hub import BASE_HUB_ID, Client, client, hub, trap  # noqa: F401 - fixtures

from loratool import lora

pytest.importorskip("peft")

IDS = [[1, 5, 7, 9, 11, 13, 2, 30]]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DoRA + modules_to_save + trainable-tokens adapter and the logits it gives."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora.inject(
        model, targets="q_proj,v_proj", rank=4, alpha=8, dora=True,
        modules_to_save=["model.norm"], trainable_tokens=[5, 7],
    )  # fmt: skip
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        logits = model.eval()(torch.tensor(IDS)).logits
    out = tmp_path_factory.mktemp("spec11")
    lora.extract_adapter(model, hub_id=BASE_HUB_ID).save(out / "a.safetensors")
    torch.save(logits, out / "logits.pt")
    return out / "a.safetensors", out / "logits.pt"


def test_push_twin_loads_in_peft_and_pull_converts(
    client: Client,  # noqa: F811
    tiny_llama_dir: Path,
    trained: tuple[Path, Path],
) -> None:
    adapter, logits = trained
    repo = f"{USER}/spec11"
    r = client.run("push", str(adapter), repo)
    assert r.returncode == 0, r.stderr
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {repo!r}).eval()
cfg = model.peft_config["default"]
with torch.no_grad():
    got = model(torch.tensor({IDS!r})).logits
want = torch.load({str(logits)!r})
print(json.dumps({{"diff": (got - want).abs().max().item(), "dora": cfg.use_dora,
                  "saved": sorted(cfg.modules_to_save), "tokens": cfg.trainable_token_indices}}))
"""
    r = client.script(code)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["diff"] <= 1e-5 and doc["dora"] is True and doc["saved"] == ["model.norm"], doc
    r = client.run("pull", repo, "-o", "pulled.safetensors")
    assert r.returncode == 0, r.stderr
    from loratool.format import load

    got, want = load(client.work / "pulled.safetensors"), load(adapter)
    assert got.requires == want.requires == ["dora", "full", "tokens"]
    for key, x in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], x), key


def test_pull_peft_only_repo_with_features(
    client: Client,  # noqa: F811
    hub: object,  # noqa: F811
    tiny_llama_dir: Path,
    trained: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """A PEFT-only repo (DoRA + modules_to_save + tokens) pulls into a loratool file; the
    tokens' vocabulary, which a PEFT file does not hold, comes from --base when given."""
    from loratool.convert.core import convert
    from loratool.format import load

    adapter, _ = trained
    convert(adapter, tmp_path / "peft", to="peft")
    repo = f"{USER}/spec11-peft-only"
    hub.seed(  # type: ignore[attr-defined]
        repo,
        {
            n: (tmp_path / "peft" / n).read_bytes()
            for n in ("adapter_config.json", "adapter_model.safetensors", "README.md")
        },
    )
    r = client.run("pull", repo, "-o", "nobase.safetensors")
    assert r.returncode != 0 and "--base" in r.stderr, r.stderr
    r = client.run("pull", repo, "-o", "p.safetensors", "--base", str(tiny_llama_dir))
    assert r.returncode == 0, r.stderr
    got, want = load(client.work / "p.safetensors"), load(adapter)
    for key, x in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], x), key


def test_push_twin_of_trained_biases_needs_the_base(
    client: Client,  # noqa: F811
    tiny_bert_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """PEFT stores trained biases as values: push --base writes them (base + delta) and
    PeftModel.from_pretrained(repo) computes the trained outputs; without a base, refused."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(tiny_bert_dir)
    lora.inject(model, targets="query,value", rank=2, bias="all")
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        hidden = model.eval()(torch.tensor(IDS)).last_hidden_state
    out = tmp_path_factory.mktemp("bias")
    lora.extract_adapter(model, hub_id="tester/tiny-bert").save(out / "b.safetensors")
    torch.save(hidden, out / "hidden.pt")
    repo = f"{USER}/spec11-bias"
    r = client.run("push", str(out / "b.safetensors"), repo)
    assert r.returncode != 0 and "--base" in r.stderr and "--no-peft" in r.stderr, r.stderr
    r = client.run("push", str(out / "b.safetensors"), repo, "--base", str(tiny_bert_dir))
    assert r.returncode == 0, r.stderr
    code = f"""
import json, torch
from transformers import AutoModel
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModel.from_pretrained({str(tiny_bert_dir)!r}), {repo!r})
with torch.no_grad():
    got = model.eval()(torch.tensor({IDS!r})).last_hidden_state
want = torch.load({str(out / "hidden.pt")!r})
print(json.dumps({{"diff": (got - want).abs().max().item(), "bias": model.peft_config["default"].bias}}))
"""
    r = client.script(code)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["diff"] <= 1e-5 and doc["bias"] == "all", doc
