"""push / pull / hf:// against a Hub-compatible server on loopback (tests/hub_server.py).

The Hub client runs in subprocesses (`python -m loratool ...`), each with an environment built
here: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import,
and tests/conftest.py sets HF_HUB_OFFLINE=1 in this process; PEFT calls hf_hub_download without an
endpoint, so only HF_ENDPOINT set before its import points it at the server. Both upload modes
run: xet disabled with the server answering "lfs" (the LFS batch API), and xet enabled with the
server answering "regular" (bytes inline in the commit).

Nothing may leave loopback: every subprocess gets HTTP(S)_PROXY pointing at a recording trap on
loopback (NO_PROXY exempts 127.0.0.1), so a request to any other host lands in the trap and
fails the test, even one the client would swallow (telemetry, agent detection).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub_server import READ_TOKEN, USER, WRITE_TOKEN, HubServer

ROOT = Path(__file__).resolve().parents[1]
BASE_HUB_ID = "tester/tiny-llama-base"


# ---------------------------------------------------------------------------------------------
# Fixtures: the server, the off-loopback trap, a client runner


class Trap:
    """A TCP listener that records every connection (what a proxy would be asked) and closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "<no data>"
                self.hits.append(first)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = HubServer(upload_mode="lfs").start()
    yield server
    server.stop()


@dataclass
class Client:
    """Runs `loratool` (or a Python script) in a fresh process pointed at the server."""

    hub: HubServer
    trap: Trap
    home: Path
    work: Path

    def env(
        self,
        *,
        mode: str = "lfs",
        token: str | None = WRITE_TOKEN,
        xet: bool | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """The client's environment; xet is on for the "regular" mode, off for "lfs"."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        }
        proxy = f"http://127.0.0.1:{self.trap.port}"
        env.update(
            PYTHONPATH=str(ROOT),
            HF_ENDPOINT=self.hub.url,
            HF_HOME=str(self.home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            HTTP_PROXY=proxy,
            HTTPS_PROXY=proxy,
            ALL_PROXY=proxy,
            NO_PROXY="127.0.0.1,localhost",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        if not (xet if xet is not None else mode == "regular"):
            env["HF_HUB_DISABLE_XET"] = "1"
        if token:
            env["HF_TOKEN"] = token
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        mode: str = "lfs",
        token: str | None = WRITE_TOKEN,
        xet: bool | None = None,
        **extra: str,
    ) -> subprocess.CompletedProcess[str]:
        self.hub.upload_mode = mode
        r = subprocess.run(
            [sys.executable, "-m", "loratool", *args],
            env=self.env(mode=mode, token=token, xet=xet, **extra),
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert self.trap.hits == [], f"a request left loopback: {self.trap.hits}"
        return r

    def script(self, code: str, **extra: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env(**extra),
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert self.trap.hits == [], f"a request left loopback: {self.trap.hits}"
        return r


@pytest.fixture(scope="module")
def client(hub: HubServer, trap: Trap, tmp_path_factory: pytest.TempPathFactory) -> Client:
    home = tmp_path_factory.mktemp("hf-home")
    work = tmp_path_factory.mktemp("work")
    return Client(hub, trap, home, work)


def _one_error(r: subprocess.CompletedProcess[str], code: str) -> str:
    """Exit 5, one ``error[code]`` line and a hint, no traceback; returns the error line."""
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error[")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error[{code}]: "), r.stderr
    assert any(ln.startswith("hint: ") for ln in lines), r.stderr
    return errors[0]


def _front_matter(readme: str) -> dict[str, Any]:
    import yaml

    assert readme.startswith("---\n")
    block = readme[4:].split("\n---\n", 1)[0]
    meta = yaml.safe_load(block)
    assert isinstance(meta, dict)
    return meta


# ---------------------------------------------------------------------------------------------
# Adapters


def _tiny_adapter(base_dir: Path, *, hub_id: str | None, seed: int = 0) -> Any:
    """An adapter on every attention and MLP projection of the tiny Llama: mixed ranks and alphas
    (so PEFT needs rank_pattern / alpha_pattern), a training section in the provenance."""
    import torch
    from safetensors import safe_open

    from loratool.adapter import Adapter, Target

    g = torch.Generator().manual_seed(seed)
    targets = []
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        for key in sorted(f.keys()):
            if not key.endswith("_proj.weight"):
                continue
            out_f, in_f = f.get_slice(key).get_shape()
            name = key[: -len(".weight")]
            rank, alpha = (2, 3.0) if "mlp" in name else (4, 8.0)
            a = torch.randn(rank, in_f, generator=g) * 0.2
            b = torch.randn(out_f, rank, generator=g) * 0.2
            targets.append(Target.from_factors(name, a, b, alpha=alpha))
    provenance = {
        "training": {
            "data": "chat.jsonl",
            "steps": 120,
            "final_loss": 1.234,
            "hyperparameters": {"lr": 0.0002, "rank": 4, "schedule": "cosine"},
        }
    }
    return Adapter.from_targets(targets, hub_id=hub_id, provenance=provenance)


@pytest.fixture(scope="module")
def adapter_file(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapters") / "tiny.safetensors"
    _tiny_adapter(tiny_llama_dir, hub_id=BASE_HUB_ID).save(path)
    return path


MODES = ("lfs", "regular")


@pytest.fixture(scope="module")
def pushed(client: Client, adapter_file: Path) -> dict[str, dict[str, Any]]:
    """The adapter pushed once per upload mode to ``tester/rt-<mode>``."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        repo = f"{USER}/rt-{mode}"
        mark = client.hub.mark()
        r = client.run("push", str(adapter_file), repo, mode=mode)
        assert r.returncode == 0, r.stderr
        out[mode] = {"repo": repo, "result": r, "requests": client.hub.since(mark)}
    return out


# ---------------------------------------------------------------------------------------------
# Push and pull, both upload modes


@pytest.mark.parametrize("mode", MODES)
def test_push_uploads_one_commit_in_both_modes(
    mode: str, pushed: dict[str, dict[str, Any]], hub: HubServer, adapter_file: Path
) -> None:
    repo, r, reqs = pushed[mode]["repo"], pushed[mode]["result"], pushed[mode]["requests"]
    assert "created repo" in r.stderr and "pushed" in r.stderr
    history = hub.repos[repo].history("main")
    assert len(history) == 2  # the Hub's initial commit + ours
    head = history[0]
    assert set(head.files) == {
        ".gitattributes",
        "README.md",
        "adapter.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert head.files["adapter.safetensors"].data == adapter_file.read_bytes()
    paths = [f"{q.method} {q.path}" for q in reqs]
    commits = [p for p in paths if p.startswith(f"POST /api/models/{repo}/commit/main")]
    assert len(commits) == 1
    lfs = [p for p in paths if ".git/info/lfs" in p or p.startswith("PUT /_lfs/")]
    if mode == "lfs":
        assert head.files["adapter.safetensors"].lfs and head.files["adapter_model.safetensors"].lfs
        assert sum(p.startswith("PUT /_lfs/") for p in paths) == 2
        assert lfs
    else:
        assert not any(b.lfs for b in head.files.values())
        assert not lfs
    assert not any("xet" in p for p in paths)
    assert hub.unhandled == []


@pytest.mark.parametrize("mode", MODES)
def test_pull_round_trip_repush_and_offline(
    mode: str, pushed: dict[str, dict[str, Any]], client: Client, hub: HubServer, adapter_file: Path
) -> None:
    repo = pushed[mode]["repo"]
    original = adapter_file.read_bytes()

    r = client.run("pull", repo, "-o", f"pulled-{mode}.safetensors", mode=mode)
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stderr
    assert "%|" not in r.stderr + pushed[mode]["result"].stderr  # no tqdm bars off a TTY
    assert (client.work / f"pulled-{mode}.safetensors").read_bytes() == original

    # Re-push of the same adapter: preupload reports every oid unchanged -> no commit at all.
    commits_before = len(hub.repos[repo].history("main"))
    mark = hub.mark()
    r = client.run("push", str(adapter_file), repo, "--json", mode=mode)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["committed"] is False and report["changed"] == []
    assert report["commit"] == hub.head(repo).oid
    assert len(hub.repos[repo].history("main")) == commits_before
    again = [f"{q.method} {q.path}" for q in hub.since(mark)]
    assert not any("/commit/" in p for p in again)
    assert not any(p.startswith("PUT ") for p in again)

    # Offline: served from the cache, not a single request.
    mark = hub.mark()
    r = client.run(
        "pull", repo, "-o", f"offline-{mode}.safetensors", "--json", mode=mode, HF_HUB_OFFLINE="1"
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["offline"] is True and report["commit"] == hub.head(repo).oid
    assert report["source_format"] == "loratool" and not report["converted"]
    assert (client.work / f"offline-{mode}.safetensors").read_bytes() == original
    assert hub.since(mark) == []

    # The output is never overwritten without --force.
    r = client.run("pull", repo, "-o", f"offline-{mode}.safetensors", mode=mode, HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "error[output-exists]" in r.stderr


def test_push_falls_back_to_lfs_when_the_server_has_no_xet(
    client: Client, hub: HubServer, adapter_file: Path
) -> None:
    """xet enabled, server answering "lfs" without Xet storage: huggingface_hub alone fails
    (no fallback); push retries the same commit through the LFS batch API and says so."""
    repo = f"{USER}/no-xet"
    mark = hub.mark()
    r = client.run("push", str(adapter_file), repo, mode="lfs", xet=True)
    assert r.returncode == 0, r.stderr
    assert "does not accept Xet uploads" in r.stderr
    paths = [f"{q.method} {q.path}" for q in hub.since(mark)]
    assert any("/xet-write-token/" in p for p in paths)
    assert any(p.endswith(".git/info/lfs/objects/batch") for p in paths)  # the LFS route
    assert hub.file(repo, "adapter.safetensors").lfs
    assert hub.file(repo, "adapter.safetensors").data == adapter_file.read_bytes()
    assert len(hub.repos[repo].history("main")) == 2


def test_card_front_matter_and_body(pushed: dict[str, dict[str, Any]], hub: HubServer) -> None:
    readme = hub.file(pushed["lfs"]["repo"], "README.md").data.decode()
    meta = _front_matter(readme)
    assert meta == {
        "base_model": BASE_HUB_ID,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "loratool", "peft", f"base_model:adapter:{BASE_HUB_ID}"],
    }
    body = readme.split("\n---\n", 1)[1]
    # Target table: one row per projection (layers collapsed), with rank and alpha.
    assert "| `model.layers.{0-1}.self_attn.q_proj` | linear | 4 | 8 | 2 |" in body
    assert "| `model.layers.{0-1}.mlp.down_proj` | linear | 2 | 3 | 1.5 |" in body
    assert "| hyperparameters.lr | 0.0002 |" in body and "| steps | 120 |" in body
    assert f'PeftModel.from_pretrained(base, "{pushed["lfs"]["repo"]}")' in body
    assert f"loratool pull {pushed['lfs']['repo']}" in body
    config = json.loads(hub.file(pushed["lfs"]["repo"], "adapter_config.json").data)
    assert config["base_model_name_or_path"] == BASE_HUB_ID
    assert config["task_type"] == "CAUSAL_LM"


@pytest.mark.slow
def test_peft_from_pretrained_against_the_server(
    pushed: dict[str, dict[str, Any]],
    client: Client,
    hub: HubServer,
    tiny_llama_dir: Path,
    adapter_file: Path,
) -> None:
    """PEFT, pointed at the server only through HF_ENDPOINT, loads the pushed repo and computes
    the same logits as the base with every ΔW = scale·B·A added by hand."""
    repo = pushed["lfs"]["repo"]
    code = f"""
import json, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from peft import PeftModel
from loratool.format import load

ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])
ref = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, dtype=torch.float32).eval()
with torch.no_grad():
    plain = ref(ids).logits
    for t in load({str(adapter_file)!r}).targets.values():
        ref.get_submodule(t.name).weight += t.delta()
    expected = ref(ids).logits
base = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, {repo!r}).eval()
with torch.no_grad():
    got = model(ids).logits
print(json.dumps({{"diff": (got - expected).abs().max().item(),
                  "effect": (expected - plain).abs().max().item()}}))
"""
    mark = hub.mark()
    r = client.script(code)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["effect"] > 1e-2  # the adapter changes the logits, so agreement means something
    assert doc["diff"] < 1e-4, doc
    fetched = {q.path for q in hub.since(mark) if q.method == "GET" and "/resolve/" in q.path}
    assert any(p.endswith("/adapter_config.json") for p in fetched)
    assert any(p.endswith("/adapter_model.safetensors") for p in fetched)


# ---------------------------------------------------------------------------------------------
# Options: --private, --revision, --no-peft, --base-model


def test_branch_private_no_peft_and_base_model_override(
    client: Client, hub: HubServer, adapter_file: Path, tmp_path: Path
) -> None:
    from loratool.format import read_header

    repo = f"{USER}/options"
    r = client.run(
        "push",
        str(adapter_file),
        repo,
        "--private",
        "--revision",
        "dev",
        "--base-model",
        "org/other-base",
        "-m",
        "first version",
    )
    assert r.returncode == 0, r.stderr
    assert "created private repo" in r.stderr and "created branch dev" in r.stderr
    assert hub.repos[repo].private
    assert set(hub.head(repo, "main").files) == {".gitattributes"}  # main untouched
    dev = hub.head(repo, "dev")
    assert dev.title == "first version"
    assert "adapter_model.safetensors" in dev.files
    uploaded = tmp_path / "uploaded.safetensors"
    uploaded.write_bytes(dev.files["adapter.safetensors"].data)
    assert read_header(uploaded).adapter.binding().hub_id == "org/other-base"
    assert _front_matter(dev.files["README.md"].data.decode())["base_model"] == "org/other-base"

    # --no-peft on the same branch removes the PEFT twin of the previous push.
    r = client.run(
        "push",
        str(adapter_file),
        repo,
        "--revision",
        "dev",
        "--no-peft",
        "--base-model",
        "org/other-base",
    )
    assert r.returncode == 0, r.stderr
    dev = hub.head(repo, "dev")
    assert set(dev.files) == {".gitattributes", "README.md", "adapter.safetensors"}
    meta = _front_matter(dev.files["README.md"].data.decode())
    assert meta["library_name"] == "loratool" and "peft" not in meta["tags"]
    assert "PeftModel" not in dev.files["README.md"].data.decode()

    # The private branch pulls with a token, and is invisible without one (401, hint on auth).
    r = client.run("pull", f"{repo}@dev", "-o", "options.safetensors", token=READ_TOKEN)
    assert r.returncode == 0, r.stderr
    assert (
        read_header(client.work / "options.safetensors").adapter.binding().hub_id
        == "org/other-base"
    )
    r = client.run("pull", f"{repo}@dev", "-o", "nope.safetensors", token=None)
    line = _one_error(r, "repo-not-found")
    assert "401" in line and "HF_TOKEN" in r.stderr and "hf auth login" in r.stderr


def test_push_without_hub_id_leaves_base_model_out(
    client: Client, hub: HubServer, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from loratool.format import read_header

    # The binding names a local path: it must appear nowhere in the repo.
    local = str(tiny_llama_dir)
    path = tmp_path / "local-base.safetensors"
    _tiny_adapter(tiny_llama_dir, hub_id=local, seed=1).save(path)
    repo = f"{USER}/no-base"
    r = client.run("push", str(path), repo)
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "--base-model" in r.stderr
    head = hub.head(repo)
    readme = head.files["README.md"].data.decode()
    meta = _front_matter(readme)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert not any(t.startswith("base_model:") for t in meta["tags"])
    assert "Base model not named" in readme
    for blob in head.files.values():
        assert local.encode() not in blob.data
    assert json.loads(head.files["adapter_config.json"].data)["base_model_name_or_path"] is None
    uploaded = tmp_path / "uploaded.safetensors"
    uploaded.write_bytes(head.files["adapter.safetensors"].data)
    assert read_header(uploaded).adapter.binding().hub_id is None

    # A path given as --base-model is refused before any request.
    mark = hub.mark()
    r = client.run("push", str(path), repo, "--base-model", "./models/base")
    assert r.returncode == 2 and "error[bad-base-model]" in r.stderr
    assert hub.since(mark) == []


def test_server_validate_yaml_rejects_local_paths(hub: HubServer) -> None:
    """The fake Hub enforces what the real one does at commit time (peft PR #2124)."""

    def validate(readme: str) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"{hub.url}/api/validate-yaml",
            data=json.dumps({"content": readme, "repoType": "model"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    assert validate("---\nbase_model: org/base\nbase_model_relation: adapter\n---\n")[0] == 200
    status, doc = validate("---\nbase_model: /home/me/models/base\n---\n")
    assert status == 400 and "base_model" in doc["errors"][0]["message"]
    assert validate("---\nbase_model: ../base\n---\n")[0] == 400


# ---------------------------------------------------------------------------------------------
# Pulling other formats


def test_pull_peft_only_repo_converts(
    client: Client, hub: HubServer, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import torch

    from loratool.convert.peft import write_peft
    from loratool.format import load

    original = _tiny_adapter(tiny_llama_dir, hub_id=BASE_HUB_ID, seed=2)
    write_peft(original, tmp_path / "peft", base_model=BASE_HUB_ID, task_type="CAUSAL_LM")
    repo = f"{USER}/peft-only"
    hub.seed(
        repo,
        {
            n: (tmp_path / "peft" / n).read_bytes()
            for n in ("adapter_config.json", "adapter_model.safetensors", "README.md")
        },
    )
    r = client.run("pull", repo, "-o", "from-peft.safetensors")
    assert r.returncode == 0, r.stderr
    assert "converted from peft" in r.stderr
    r = client.run("inspect", f"hf://{repo}/adapter_model.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source_format"] == "peft" and doc["num_targets"] == len(original.targets)
    got = load(client.work / "from-peft.safetensors", verify=True)
    assert got.binding().hub_id == BASE_HUB_ID
    assert got.provenance["hub"]["repo_id"] == repo
    assert set(got.targets) == set(original.targets)
    for name, t in original.targets.items():
        g = got.targets[name]
        assert (g.rank, g.alpha, g.scale_rule) == (t.rank, t.alpha, t.scale_rule)
        assert torch.equal(g.lora_A, t.lora_A) and torch.equal(g.lora_B, t.lora_B)


def test_pull_kohya_file_converts(client: Client, hub: HubServer, tmp_path: Path) -> None:
    kohya = pytest.importorskip("loratool.convert.kohya")
    import torch
    from safetensors.torch import save_file

    a, b = torch.randn(4, 32), torch.randn(16, 4)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": a,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": b,
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    save_file(
        tensors, tmp_path / "style.safetensors", metadata={"ss_network_module": "networks.lora"}
    )
    repo = f"{USER}/kohya"
    hub.seed(repo, {"style.safetensors": (tmp_path / "style.safetensors").read_bytes()})
    r = client.run("pull", repo, "-o", "from-kohya.safetensors")
    assert r.returncode == 0, r.stderr
    assert "converted from kohya" in r.stderr, r.stderr
    from loratool.format import load

    got = load(client.work / "from-kohya.safetensors", verify=True)
    (t,) = got.targets.values()
    assert t.rank == 4 and t.alpha == 2.0
    assert torch.equal(t.lora_A, a) and torch.equal(t.lora_B, b)
    assert kohya is not None
    # Offline, the file is found in the cached snapshot (no listing needed).
    r = client.run("pull", repo, "-o", "kohya-offline.safetensors", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert (client.work / "kohya-offline.safetensors").read_bytes() == (
        client.work / "from-kohya.safetensors"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------
# Hostile servers and listings


def test_malicious_listing_never_becomes_a_path(
    client: Client, hub: HubServer, adapter_file: Path
) -> None:
    repo = f"{USER}/evil-listing"
    hub.seed(repo, {"adapter.safetensors": adapter_file.read_bytes()})
    names = [
        "../../escape.safetensors",
        "/abs.safetensors",
        "a\\b.safetensors",
        "sub/../../x.safetensors",
    ]
    hub.tree_override[repo] = [
        {"type": "file", "path": n, "size": 10, "oid": "0" * 40} for n in names
    ]
    try:
        r = client.run("pull", repo, "-o", "evil.safetensors")
        line = _one_error(r, "no-adapter")
        assert "4 listed names were unsafe" in line
        # With a safe name beside them, that one is chosen; the unsafe ones are ignored.
        hub.tree_override[repo].append(
            {"type": "file", "path": "adapter.safetensors", "size": 1, "oid": "0" * 40}
        )
        r = client.run("pull", repo, "-o", "evil.safetensors")
        assert r.returncode == 0, r.stderr
        assert (client.work / "evil.safetensors").read_bytes() == adapter_file.read_bytes()
    finally:
        del hub.tree_override[repo]
    for bad in ("escape.safetensors", "abs.safetensors", "x.safetensors"):
        for folder in (client.work, client.work.parent, client.home, client.home.parent):
            assert not (folder / bad).exists()
    # A --filename that climbs out is a usage error, refused before any request.
    mark = hub.mark()
    r = client.run("pull", repo, "--filename", "../adapter.safetensors", "-o", "x.safetensors")
    assert r.returncode == 2 and "error[unsafe-path]" in r.stderr
    assert hub.since(mark) == []


def test_pull_refuses_a_corrupt_file(client: Client, hub: HubServer, adapter_file: Path) -> None:
    data = bytearray(adapter_file.read_bytes())
    data[-3] ^= 0x40  # one bit of tensor data: the header's sha256 no longer matches
    repo = f"{USER}/corrupt"
    hub.seed(repo, {"adapter.safetensors": bytes(data)})
    r = client.run("pull", repo, "-o", "corrupt.safetensors")
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"error[integrity]: {repo}@main/adapter.safetensors: ")
    assert "Traceback" not in r.stderr
    assert not (client.work / "corrupt.safetensors").exists()


def test_hostile_etag_cannot_escape_the_cache(
    client: Client, hub: HubServer, adapter_file: Path
) -> None:
    """huggingface_hub 2.4 joins the ETag into the blob path unchecked; pull checks it first."""
    repo = f"{USER}/evil-etag"
    hub.seed(repo, {"adapter.safetensors": adapter_file.read_bytes()})
    hub.bad_etag = "../../../../escaped-blob"
    try:
        r = client.run("pull", repo, "-o", "etag.safetensors")
    finally:
        hub.bad_etag = None
    _one_error(r, "unsafe-server")
    assert not (client.work / "etag.safetensors").exists()
    for folder in (client.home, client.home.parent, client.work, client.work.parent):
        assert not (folder / "escaped-blob").exists()


# ---------------------------------------------------------------------------------------------
# hf:// in inspect: the header by range requests, no download


def test_inspect_hf_uri_reads_only_the_header(
    pushed: dict[str, dict[str, Any]], client: Client, hub: HubServer, adapter_file: Path
) -> None:
    import struct

    repo = pushed["regular"]["repo"]
    uri = f"hf://{repo}/adapter.safetensors"
    mark = hub.mark()
    r = client.run("inspect", uri, "--json", mode="regular")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    local = json.loads(client.run("inspect", str(adapter_file), "--json").stdout)
    assert remote["path"] == uri
    assert {**remote, "path": None} == {**local, "path": None}
    reqs = [q for q in hub.since(mark) if "/resolve/" in q.path]
    data = adapter_file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert all(q.method == "GET" and q.range for q in reqs)
    assert sum(q.body_bytes for q in reqs) == 8 + n < len(data)

    # --stats reads each tensor with its own range request and matches the local numbers.
    r = client.run("inspect", uri, "--json", "--stats", mode="regular")
    assert r.returncode == 0, r.stderr
    stats = {t["name"]: t["delta_norm"] for t in json.loads(r.stdout)["targets"]}
    local_stats = json.loads(client.run("inspect", str(adapter_file), "--json", "--stats").stdout)
    for t in local_stats["targets"]:
        assert stats[t["name"]] == pytest.approx(t["delta_norm"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 5, no traceback, no token


def test_missing_repo_revision_and_file(pushed: dict[str, dict[str, Any]], client: Client) -> None:
    repo = pushed["lfs"]["repo"]
    line = _one_error(
        client.run("pull", f"{USER}/does-not-exist", "-o", "a.safetensors"), "repo-not-found"
    )
    assert f"{USER}/does-not-exist" in line
    line = _one_error(
        client.run("pull", f"{repo}@no-such-branch", "-o", "b.safetensors"), "revision-not-found"
    )
    assert "no-such-branch" in line
    line = _one_error(
        client.run("pull", repo, "--filename", "missing.safetensors", "-o", "c.safetensors"),
        "file-not-found",
    )
    assert "missing.safetensors" in line


def test_auth_errors_never_show_the_token(client: Client, adapter_file: Path) -> None:
    bad = "hf_thisIsNotAValidTokenButLooksLikeOne123"
    r = client.run("push", str(adapter_file), f"{USER}/auth", "--token", bad, token=None)
    line = _one_error(r, "unauthorized")
    assert "401" in line and "token was refused" in line
    assert "HF_TOKEN" in r.stderr and "hf auth login" in r.stderr
    assert bad not in r.stderr + r.stdout
    r = client.run("push", str(adapter_file), f"{USER}/auth", token=READ_TOKEN)
    _one_error(r, "forbidden")
    assert READ_TOKEN not in r.stderr + r.stdout
    r = client.run("push", str(adapter_file), f"{USER}/auth", token=None)
    assert "no token was sent" in _one_error(r, "unauthorized")


def test_server_errors_and_dropped_connections(
    pushed: dict[str, dict[str, Any]], client: Client, hub: HubServer, adapter_file: Path
) -> None:
    repo = pushed["lfs"]["repo"]
    try:
        # A persistent 500 where the client does not retry: push and pull fail at once.
        hub.fail(rf"^GET /api/models/{repo}(/revision/main)?$", status=500)
        line = _one_error(client.run("push", str(adapter_file), repo), "server-error")
        assert "500 Internal Server Error" in line
        line = _one_error(client.run("pull", repo, "-o", "e1.safetensors"), "server-error")
        assert "500" in line
        hub.clear_faults()
        # hf:// reads fail the same way.
        hub.fail(r"/resolve/", status=503)
        _one_error(client.run("inspect", f"hf://{repo}/adapter.safetensors"), "server-error")
        hub.clear_faults()
        # The connection dropped without an answer: pull's first request, push's commit.
        hub.fail(rf"^GET /api/models/{repo}/revision/", drop=True)
        line = _one_error(client.run("pull", repo, "-o", "e2.safetensors"), "network")
        assert "dropped" in line
        hub.clear_faults()
        hub.fail(r"^POST /api/models/.*/commit/", drop=True)
        _one_error(client.run("push", str(adapter_file), f"{USER}/dropped"), "network")
        hub.clear_faults()
        # A transient 500 on a request the client retries (the listing) is absorbed.
        hub.fail(r"^GET /api/models/.*/tree/", status=500, times=1)
        r = client.run("pull", repo, "-o", "e3.safetensors")
        assert r.returncode == 0, r.stderr
        assert (client.work / "e3.safetensors").read_bytes() == adapter_file.read_bytes()
    finally:
        hub.clear_faults()
    assert not (client.work / "e1.safetensors").exists()
    assert not (client.work / "e2.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Nothing leaves loopback


def test_trap_catches_requests_to_other_hosts(client: Client, trap: Trap) -> None:
    """The proxy trap works: a request for any other host lands in it (then is cleared)."""
    code = "import httpx2\ntry:\n    httpx2.get('http://example.invalid/x', timeout=5)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=client.env(), timeout=60, check=True)
    assert any("example.invalid" in h for h in trap.hits), trap.hits
    trap.hits.clear()


def test_every_request_went_to_the_server(hub: HubServer, trap: Trap) -> None:
    assert hub.requests, "the tests above made requests"
    host = hub.url.removeprefix("http://")
    assert {q.host for q in hub.requests} == {host}
    assert trap.hits == []
    assert hub.unhandled == []


# ---------------------------------------------------------------------------------------------
# Library pieces, in process (no network)


def test_refs_uris_and_repo_paths() -> None:
    from loratool.errors import UsageError
    from loratool.hub import check_repo_path, parse_hf_uri, split_ref

    assert split_ref("a/b") == ("a/b", None)
    assert split_ref("a/b@dev") == ("a/b", "dev")
    assert parse_hf_uri("hf://a/b@refs%2Fpr%2F1/sub/x.safetensors") == (
        "a/b",
        "refs/pr/1",
        "sub/x.safetensors",
    )
    for bad in ("a", "a/b/c", "/a/b", "a/../b", "a/b@"):
        with pytest.raises(UsageError):
            split_ref(bad)
    for bad in ("hf://a/b", "hf://a/b/../x", "hf://a//x"):
        with pytest.raises(UsageError):
            parse_hf_uri(bad)
    for bad in ("../x", "/x", "a/../x", "a\\x", "C:x", "", "a//b", "./x"):
        with pytest.raises(UsageError):
            check_repo_path(bad)
    assert check_repo_path("sub/adapter.safetensors") == "sub/adapter.safetensors"


def test_local_paths_do_not_import_the_hub_client(adapter_file: Path) -> None:
    code = (
        "import contextlib, io, sys\n"
        "from loratool.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main(['inspect', {str(adapter_file)!r}, '--json'])\n"
        "print('huggingface_hub' in sys.modules, 'loratool.hub' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_endpoint_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from loratool.errors import UsageError
    from loratool.hub import resolve_endpoint

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1/")
    assert resolve_endpoint() == "http://127.0.0.1:1"
    assert resolve_endpoint("https://mirror.example") == "https://mirror.example"
    monkeypatch.setenv("HF_ENDPOINT", "ftp://nope")
    with pytest.raises(UsageError):
        resolve_endpoint()


def test_card_is_deterministic_and_never_names_a_path(tiny_llama_dir: Path) -> None:
    from loratool.card import CardFiles, front_matter, is_hub_id, render_card

    adapter = _tiny_adapter(tiny_llama_dir, hub_id=BASE_HUB_ID)
    kw: dict[str, Any] = dict(
        repo_id="me/x",
        base_model=BASE_HUB_ID,
        library_name="peft",
        task_type="CAUSAL_LM",
        files=CardFiles("adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"),
    )
    assert render_card(adapter, **kw) == render_card(adapter, **kw)
    for path in ("/home/me/base", "./base", "~/base", "C:\\base", "a/b/c", "org/../x"):
        assert not is_hub_id(path)
        with pytest.raises(ValueError):
            front_matter(base_model=path, library_name="peft", task_type=None, peft=True)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("gpt2")


def test_error_mapping_and_masking() -> None:
    import httpx2
    from huggingface_hub import errors as E

    from loratool.errors import HubError
    from loratool.hub.errors import CallContext as _Ctx
    from loratool.hub.errors import Secrets as _Secrets
    from loratool.hub.errors import hub_errors as _hub_errors

    secret = "hf_SuperSecretValue1234567890"
    ctx = _Ctx("http://hub", "a/b", "main", "f.safetensors", "download", _Secrets(secret), True)

    def mapped(exc: BaseException) -> HubError:
        with pytest.raises(HubError) as info, _hub_errors(ctx):
            raise exc
        return info.value

    req = httpx2.Request("GET", "http://hub/api/models/a/b")
    resp = httpx2.Response(500, request=req)
    e = mapped(E.HfHubHTTPError(f"boom {secret}", response=resp, server_message=f"echo {secret}"))
    assert e.code == "server-error" and secret not in e.message and "***" in e.message
    assert (
        mapped(E.RepositoryNotFoundError("x", response=httpx2.Response(404, request=req))).code
        == "repo-not-found"
    )
    assert (
        mapped(E.RevisionNotFoundError("x", response=httpx2.Response(404, request=req))).code
        == "revision-not-found"
    )
    assert (
        mapped(E.RemoteEntryNotFoundError("x", response=httpx2.Response(404, request=req))).code
        == "file-not-found"
    )
    assert mapped(httpx2.ConnectError("refused")).code == "network"
    assert mapped(E.LocalEntryNotFoundError("not cached")).code == "not-cached"
    with pytest.raises(KeyError), _hub_errors(ctx):  # bugs keep their traceback
        raise KeyError("bug")
