"""``generate`` and ``serve`` with ``hf://`` adapters, against the loopback Hub (tests/hub_server.py).

The commands run in subprocesses whose environment points huggingface_hub at the server
(``Client`` from test_hub.py: HF_ENDPOINT on 127.0.0.1, every other host trapped), so an adapter
is pushed there once, then used by id: downloaded once into the cache, verified, and answering
what the same file gives locally.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hub_server import USER, HubServer
from test_generate import _reference
from test_hotswap import random_adapter
from test_hub import Client, Trap
from transformers import AutoTokenizer

HOST = "127.0.0.1"
PROMPT = "the adapter"
REPO = f"{USER}/use-lora"
MISFIT = f"{USER}/use-gpt2"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = HubServer(upload_mode="lfs").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    trap = Trap()
    yield Client(hub, trap, tmp_path_factory.mktemp("hf-home"), tmp_path_factory.mktemp("work"))
    trap.close()


@pytest.fixture(scope="module")
def pushed(client: Client, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> dict[str, Any]:
    """One adapter for the tiny Llama and one for GPT-2 pushed; the Llama one's greedy text."""
    local = client.work / "a.safetensors"
    random_adapter(tiny_llama_dir, seed=31).save(local)
    misfit = client.work / "gpt2.safetensors"
    random_adapter(tiny_gpt2_dir, seed=32).save(misfit)
    for path, repo in ((local, REPO), (misfit, MISFIT)):
        r = client.run("push", str(path), repo)
        assert r.returncode == 0, r.stderr
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT)["input_ids"]
    return {"local": local, "want": _reference(tiny_llama_dir, ids, local, 8)}


def _downloads(hub: HubServer, mark: int, path: Path) -> int:
    """GETs since ``mark`` that carried the whole adapter file."""
    size = path.stat().st_size
    return sum(
        1
        for q in hub.since(mark)
        if q.method == "GET" and "/resolve/" in q.path and q.body_bytes >= size
    )


def test_generate_takes_hf_ids_through_the_cache(
    client: Client, hub: HubServer, pushed: dict[str, Any], tiny_llama_dir: Path
) -> None:
    mark = hub.mark()
    for spec in (f"hf://{REPO}", f"hf://{REPO}/adapter.safetensors", f"hf://{REPO}@main:1"):
        r = client.run(
            "generate",
            str(tiny_llama_dir),
            "--adapter",
            spec,
            "-p",
            PROMPT,
            "--max-new-tokens",
            "8",
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == pushed["want"] + "\n", spec
    assert _downloads(hub, mark, pushed["local"]) == 1  # the first run fetched it; then the cache

    r = client.run(
        "generate", str(tiny_llama_dir), "--adapter", f"hf://{MISFIT}", "-p", PROMPT, "--json"
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stdout == "" and "error[" in r.stderr


def _start(client: Client, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratool", "serve", *args, "--host", HOST, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=client.env(),
        cwd=client.work,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


def _post(port: int, path: str, doc: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return r.status, body


def test_serve_takes_hf_ids_at_start_and_while_running(
    client: Client, pushed: dict[str, Any], tiny_llama_dir: Path
) -> None:
    proc, port = _start(
        client, str(tiny_llama_dir), "--adapter", f"remote=hf://{REPO}", "--allow-hub"
    )
    try:
        api = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="x", max_retries=0)
        r = api.completions.create(model="remote", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == pushed["want"]
        base = api.completions.create(
            model=str(tiny_llama_dir), prompt=PROMPT, max_tokens=8, temperature=0
        )
        assert base.choices[0].text != pushed["want"]  # the adapter is what changed the answer

        uri = f"hf://{REPO}/adapter.safetensors"
        status, doc = _post(port, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": uri})
        assert status == 200, doc
        r = api.completions.create(model="late", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == pushed["want"]

        before = [m.id for m in api.models.list()]
        status, doc = _post(
            port, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": f"hf://{MISFIT}"}
        )
        assert (status, doc["error"]["code"]) == (400, "incompatible_adapter"), doc
        assert (
            [m.id for m in api.models.list()] == before == [str(tiny_llama_dir), "remote", "late"]
        )
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    assert client.trap.hits == []
