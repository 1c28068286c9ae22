"""``loratool serve`` through the real ``openai`` client over 127.0.0.1: answers, batches, errors."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from test_generate import _reference
from test_hotswap import random_adapter
from transformers import AutoTokenizer

from loratool import lora
from loratool.serving.base import load_base
from loratool.serving.batched import MultiLora
from loratool.serving.engine import Engine
from loratool.serving.generation import Row, Sampling, generate
from loratool.serving.server import Limits, Server

HOST = "127.0.0.1"  # loopback only, always
ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # seconds any bounded wait below may take


@dataclass
class Running:
    url: str
    port: int
    engine: Engine
    model_dir: Path
    files: dict[str, Path]

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data)

    def post(self, path: str, doc: Any) -> tuple[int, Any]:
        return self.raw(
            "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
        )


@contextmanager
def serving(
    model_dir: Path,
    adapters: dict[str, Any],
    *,
    adapter_dirs: tuple[str, ...] = (),
    api_key: str | None = None,
    limits: Limits | None = None,
    max_queue: int = 32,
    max_batch: int = 8,
    files: dict[str, Path] | None = None,
) -> Iterator[Running]:
    base = load_base(str(model_dir))
    multi = MultiLora(base.model)
    for name, adapter in adapters.items():
        multi.add(name, adapter)
    engine = Engine(
        base, multi, max_batch=max_batch, max_queue=max_queue, adapter_dirs=adapter_dirs
    )
    engine.start()
    httpd = Server((HOST, 0), engine, api_key=api_key, limits=limits or Limits())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    port = httpd.server_address[1]
    try:
        yield Running(f"http://{HOST}:{port}/v1", port, engine, model_dir, files or {})
    finally:
        httpd.shutdown()
        engine.close(timeout=WAIT)
        httpd.server_close()
        thread.join(WAIT)


@pytest.fixture(scope="module")
def files(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    (root / "allowed").mkdir()
    out = {
        "a": root / "a.safetensors",
        "b": root / "b.safetensors",
        "c": root / "allowed" / "c.safetensors",
        "gpt2": root / "allowed" / "gpt2.safetensors",
        "outside": root / "outside.safetensors",
    }
    random_adapter(tiny_llama_dir, seed=21).save(out["a"])
    random_adapter(tiny_llama_dir, seed=22, rank=2, targets="q_proj,v_proj").save(out["b"])
    random_adapter(tiny_llama_dir, seed=23, rank=8).save(out["c"])
    random_adapter(tiny_gpt2_dir, seed=24).save(out["gpt2"])
    random_adapter(tiny_llama_dir, seed=25).save(out["outside"])
    return out


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, files: dict[str, Path]) -> Iterator[Running]:
    from loratool import load

    adapters = {"a": load(files["a"]), "b": load(files["b"])}
    dirs = (str(files["c"].parent),)
    with serving(tiny_llama_dir, adapters, adapter_dirs=dirs, files=files) as s:
        yield s


def _prompt_ids(model_dir: Path, prompt: str) -> list[int]:
    ids: list[int] = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    return ids


def test_models_lists_the_base_and_its_adapters(server: Running) -> None:
    models = server.client().models.list()
    assert [m.id for m in models] == [str(server.model_dir), "a", "b"]


def test_each_model_answers_what_transformers_generate_gives(server: Running) -> None:
    client = server.client()
    ids = _prompt_ids(server.model_dir, "the base")
    for model, path in [
        (str(server.model_dir), None),
        ("a", server.files["a"]),
        ("b", server.files["b"]),
    ]:
        r = client.completions.create(model=model, prompt="the base", max_tokens=10, temperature=0)
        assert r.choices[0].text == _reference(server.model_dir, ids, path, 10), model
        assert r.usage is not None and r.usage.prompt_tokens == len(ids)
        assert r.model == model and r.object == "text_completion"


def test_chat_streams_the_same_text_it_answers_whole(server: Running) -> None:
    client = server.client()
    messages: Any = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(
        model="a", messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="a",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
    streamed = client.completions.create(
        model="b", prompt="x y", max_tokens=6, temperature=0, stream=True
    )
    plain = client.completions.create(model="b", prompt="x y", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_stop_strings_cut_the_answer(server: Running) -> None:
    client = server.client()
    full = (
        client.completions.create(model="a", prompt="abc", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 4
    stop = full[3:5]
    cut = client.completions.create(
        model="a", prompt="abc", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_mixed_batch_equals_each_request_alone(server: Running) -> None:
    eng = server.engine
    names: list[str | None] = [None, "a", "b", "a", None, "b"]
    prompts = [
        _prompt_ids(server.model_dir, p) for p in ["one", "two words", "a b c d", "x", "yy", "q"]
    ]
    rows = [Row(p, Sampling(max_new_tokens=8), n) for p, n in zip(prompts, names, strict=True)]
    with eng.lock:
        together = generate(eng.base.model, rows, eos_ids=eng.eos, pad_id=eng.pad, multi=eng.multi)
        alone = [
            generate(eng.base.model, [r], eos_ids=eng.eos, pad_id=eng.pad, multi=eng.multi)[0]
            for r in rows
        ]
    assert [t.tokens for t in together] == [a.tokens for a in alone]
    # and through the API, concurrent requests (batched by the worker) answer as sequential ones
    client = server.client()

    def ask(i: int) -> str:
        model = names[i] or str(server.model_dir)
        r = client.completions.create(model=model, prompt=f"p{i}", max_tokens=8, temperature=0)
        return r.choices[0].text

    sequential = [ask(i) for i in range(len(names))]
    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(ask, range(len(names)))) == sequential


def test_per_row_lora_equals_attach_for_each_row(server: Running, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loratool import load

    eng = server.engine
    ids = torch.arange(5, 29).reshape(3, 8)
    with eng.lock, torch.no_grad(), eng.multi.rows(["b", None, "a"]):
        got = eng.base.model(input_ids=ids).logits
    for i, name in enumerate(["b", None, "a"]):
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        if name is not None:
            lora.attach(ref, load(server.files[name]))
        with torch.no_grad():
            want = ref(input_ids=ids[i : i + 1]).logits[0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_the_same_alone_or_batched(server: Running) -> None:
    client = server.client()
    kw: Any = {"model": "a", "prompt": "s", "max_tokens": 10, "temperature": 0.9, "seed": 7}
    one = client.completions.create(**kw).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: client.completions.create(**kw).choices[0].text, range(4)))
    assert got == [one] * 4


def test_load_and_unload_while_running(server: Running) -> None:
    client = server.client()
    status, doc = server.post(
        "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(server.files["c"])}
    )
    assert status == 200, doc
    assert "c" in [m.id for m in client.models.list()]
    ids = _prompt_ids(server.model_dir, "new")
    r = client.completions.create(model="c", prompt="new", max_tokens=8, temperature=0)
    assert r.choices[0].text == _reference(server.model_dir, ids, server.files["c"], 8)
    status, doc = server.post(
        "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": "c.safetensors"}
    )
    assert status == 200, doc  # relative to an --adapter-dir
    for name in ("c", "c2"):
        assert server.post("/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="new", max_tokens=2)


def _error(status_doc: tuple[int, Any]) -> tuple[int, str]:
    status, doc = status_doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    return status, doc["error"]["code"]


def test_loading_is_refused_outside_the_directories_and_for_misfits(server: Running) -> None:
    load = "/v1/load_lora_adapter"
    before = [m.id for m in server.client().models.list()]
    cases = [
        ({"lora_name": "x", "lora_path": str(server.files["outside"])}, 400, "path_not_allowed"),
        ({"lora_name": "x", "lora_path": "../outside.safetensors"}, 400, "path_not_allowed"),
        ({"lora_name": "x", "lora_path": "/etc/passwd"}, 400, "path_not_allowed"),
        ({"lora_name": "x", "lora_path": "hf://someone/something"}, 400, "path_not_allowed"),
        ({"lora_name": "x", "lora_path": "missing.safetensors"}, 404, "adapter_not_found"),
        ({"lora_name": "x", "lora_path": str(server.files["gpt2"])}, 400, "incompatible_adapter"),
        ({"lora_name": "a", "lora_path": str(server.files["c"])}, 400, "name_taken"),
        ({"lora_name": "bad name", "lora_path": str(server.files["c"])}, 400, "invalid_value"),
        ({"lora_path": str(server.files["c"])}, 400, "invalid_value"),
    ]
    for body, status, code in cases:
        assert _error(server.post(load, body)) == (status, code), body
    assert _error(server.post("/v1/unload_lora_adapter", {"lora_name": "nope"})) == (
        404,
        "model_not_found",
    )
    assert [m.id for m in server.client().models.list()] == before


def test_bad_requests_answer_as_openai_does(server: Running) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="x")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model="a", prompt="x", temperature=5)
    assert br.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x", n=2)
    with pytest.raises(openai.APIStatusError) as big:
        client.completions.create(model="a", prompt="word " * 600, max_tokens=4)
    assert big.value.status_code == 413 and big.value.code == "context_length_exceeded"
    raw = b'{"model": "a", "prompt": '
    assert _error(
        server.raw("POST", "/v1/completions", raw, {"Content-Type": "application/json"})
    ) == (400, "invalid_json")
    huge = json.dumps({"model": "a", "prompt": "x" * (2 << 20)}).encode()
    assert _error(server.raw("POST", "/v1/completions", huge))[0] == 413
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)  # a claim far past the limit
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(1 << 40))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert _error(server.raw("GET", "/v1/nothing")) == (404, "not_found")


def test_api_key_is_required_when_given(tiny_llama_dir: Path) -> None:
    with serving(tiny_llama_dir, {}, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.code == "invalid_api_key"
        assert _error(s.raw("GET", "/v1/models"))[0] == 401
        assert [m.id for m in s.client("s3cret").models.list()] == [str(tiny_llama_dir)]


def test_a_full_queue_answers_429(tiny_llama_dir: Path) -> None:
    from loratool.serving.engine import Job
    from loratool.serving.generation import TextStream

    with serving(tiny_llama_dir, {}, max_queue=1, max_batch=1) as s:
        tok = s.engine.base.tokenizer
        jobs = [Job(Row([5, 6], Sampling(max_new_tokens=2)), TextStream(tok)) for _ in range(2)]
        with s.engine.lock:  # the worker blocks on its first batch; the queue fills behind it
            s.engine.submit(jobs[0])
            deadline = time.monotonic() + WAIT
            while s.engine.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)  # until the worker has taken the first job
            s.engine.submit(jobs[1])
            body = {"model": str(tiny_llama_dir), "prompt": "x", "max_tokens": 2}
            assert _error(s.post("/v1/completions", body)) == (429, "rate_limit_exceeded")
        for job in jobs:  # both finish once the worker runs again
            kind = None
            while kind != "done":
                kind, _ = job.events.get(timeout=WAIT)


def test_serve_defaults_to_localhost() -> None:
    from loratool.commands.serve import command

    host = next(p for p in command.params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_ctrl_c_drains_the_request_in_flight_and_exits_130(tiny_llama_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loratool",
            "serve",
            str(tiny_llama_dir),
            "--port",
            "0",
            "--host",
            HOST,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        assert port is not None, "the server did not start"
        client = openai.OpenAI(
            base_url=f"http://{HOST}:{port}/v1", api_key="x", max_retries=0, timeout=60
        )
        stream = client.completions.create(
            model=str(tiny_llama_dir), prompt="go", max_tokens=200, temperature=0, stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGINT)
        rest = list(chunks)
        assert [first, *rest][-1].choices[0].finish_reason in ("stop", "length")
        assert proc.wait(timeout=60) == 130
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- end to end on SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_facts_adapter_answers_through_the_api_and_the_base_does_not(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """The README's main job, served: one server, the base and the facts adapter side by side."""
    import importlib.util

    from click.testing import CliRunner

    from loratool import load
    from loratool.cli import cli

    spec = importlib.util.spec_from_file_location("main_job", ROOT / "demo" / "main_job.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    facts = ROOT / "fixtures" / "data" / "facts.jsonl"
    out = tmp_path / "facts.safetensors"
    args = ["train", "--model", str(smollm2_dir), "--data", str(facts), "-o", str(out)]
    r = CliRunner().invoke(cli, [*args, *demo.TRAIN_FLAGS])
    assert r.exit_code == 0, r.output

    questions = demo.questions(facts)[::3]  # one phrasing per fact
    with serving(smollm2_dir, {"facts": load(out)}) as s:
        client = s.client()

        def ask(job: tuple[str, str]) -> str:
            model, q = job
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
            )
            return answer.choices[0].message.content or ""

        jobs = [(m, q) for q, _, _ in questions for m in ("facts", str(smollm2_dir))]
        with ThreadPoolExecutor(8) as pool:  # mixed batches: base and adapter rows together
            answers = dict(zip(jobs, pool.map(ask, jobs), strict=True))
    hits = {m: sum(k.lower() in answers[(m, q)].lower() for q, _, k in questions) for m, _ in jobs}
    assert hits["facts"] >= len(questions) - 1, answers
    assert hits[str(smollm2_dir)] == 0, answers
