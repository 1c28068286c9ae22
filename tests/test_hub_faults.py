"""pull against a misbehaving Hub (tests/hub_faults_server.py): bounded, retried, verified.

Every fault ends in one ``error[...]`` line with exit 5 (7 for a full disk, 3 for a refused
pickle) and no traceback, within the client's bounds, which the tests set small: a 1 s
timeout per request, 2 retries, 0.05 s first backoff, so a persistent stall costs about
3 × 1 s. A fault that clears after one answer is absorbed by a retry (a dropped or stalled
download resumes with a Range request; damaged bytes are fetched again from the first byte).
After any failure the cache holds no blob and no ``.incomplete`` file for the file, and the
output does not exist. The client runs in subprocesses pointed at the loopback server, with the
off-loopback trap of tests/test_hub.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import debris, make_adapter, skip_without, small_tmpfs
from hub_faults_server import FaultyHub
from hub_server import USER
from test_hub import Client, Trap, _one_error

RETRIES = 2
FAST = {
    "LORATOOL_HUB_TIMEOUT": "1",
    "LORATOOL_HUB_RETRIES": str(RETRIES),
    "LORATOOL_HUB_BACKOFF": "0.05",
}


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


@pytest.fixture(scope="module")
def hub() -> Iterator[FaultyHub]:
    server = FaultyHub(upload_mode="lfs").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(hub: FaultyHub, trap: Trap, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(hub, trap, tmp_path_factory.mktemp("hf-home"), tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def adapter_bytes(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "a.safetensors").read_bytes()


@pytest.fixture(autouse=True)
def _no_faults_left(hub: FaultyHub) -> Iterator[None]:
    yield
    hub.clear_faults()


def pull(client: Client, repo: str, out: str, *args: str, **env: str) -> Any:
    return client.run("pull", repo, "-o", out, *args, **{**FAST, **env})


def seeded(hub: FaultyHub, name: str, data: bytes, file: str = "adapter.safetensors") -> str:
    repo = f"{USER}/{name}"
    hub.seed(repo, {file: data})
    return repo


def cache_of(client: Client, repo: str) -> Path:
    return client.home / "hub" / f"models--{repo.replace('/', '--')}"


def blobs(client: Client, repo: str) -> list[str]:
    """The blob names in ``repo``'s cache (temporary ``.incomplete`` files included)."""
    folder = cache_of(client, repo) / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def gets(hub: FaultyHub, mark: int, repo: str) -> list[Any]:
    return [q for q in hub.since(mark) if q.method == "GET" and f"/{repo}/resolve/" in q.path]


def assert_failed_clean(client: Client, repo: str, out: str) -> None:
    assert blobs(client, repo) == [], "a failed download left something in the cache"
    assert not (client.work / out).exists() and debris(client.work) == []


# -- stalls, drops, truncation ------------------------------------------------------------------


def test_a_stalled_download_times_out_after_bounded_retries(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    repo = seeded(hub, "stall", adapter_bytes)
    hub.break_file("stall", rf"/{repo}/resolve/", after=100)
    mark = hub.mark()
    line = _one_error(pull(client, repo, "stall.safetensors"), "network")
    assert "timed out trying to download" in line and "adapter.safetensors" in line
    tries = gets(hub, mark, repo)
    assert len(tries) == 1 + RETRIES  # the first GET, then one per retry
    # Each try resumes where the last stopped, and progress does not buy more tries (the Hub
    # client's own downloader resets its count on every byte: a trickle would never end).
    assert [q.range for q in tries] == [None] + [f"bytes={100 * i}-" for i in range(1, 1 + RETRIES)]
    assert_failed_clean(client, repo, "stall.safetensors")


def test_a_stall_that_clears_is_resumed(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    repo = seeded(hub, "stall-once", adapter_bytes)
    hub.break_file("stall", rf"/{repo}/resolve/", after=100, times=1)
    mark = hub.mark()
    r = pull(client, repo, "stall-once.safetensors")
    assert r.returncode == 0, r.stderr
    assert (client.work / "stall-once.safetensors").read_bytes() == adapter_bytes
    assert [q.range for q in gets(hub, mark, repo)] == [None, "bytes=100-"]
    assert blobs(client, repo) == [hashlib.sha256(adapter_bytes).hexdigest()]


def test_a_stalled_api_call_times_out_with_the_timeout_flag(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    """The Hub client sends its API calls with no timeout at all; ours bounds them."""
    repo = seeded(hub, "stall-api", adapter_bytes)
    hub.break_file("stall-headers", rf"^GET /api/models/{repo}/revision/")
    r = client.run("pull", repo, "-o", "api.safetensors", "--timeout", "0.5")
    line = _one_error(r, "network")
    assert "timed out trying to read" in line
    assert "--timeout" in r.stderr
    assert_failed_clean(client, repo, "api.safetensors")


@pytest.mark.parametrize("times", [1, None])
def test_a_dropped_download_is_resumed_or_fails_cleanly(
    client: Client, hub: FaultyHub, adapter_bytes: bytes, times: int | None
) -> None:
    repo = seeded(hub, f"drop-{times}", adapter_bytes)
    hub.break_file("drop", rf"/{repo}/resolve/", after=1000, times=times)
    mark = hub.mark()
    r = pull(client, repo, f"drop-{times}.safetensors")
    if times == 1:
        assert r.returncode == 0, r.stderr
        assert (client.work / f"drop-{times}.safetensors").read_bytes() == adapter_bytes
        assert [q.range for q in gets(hub, mark, repo)] == [None, "bytes=1000-"]
    else:
        _one_error(r, "network")
        assert len(gets(hub, mark, repo)) == 1 + RETRIES
        assert_failed_clean(client, repo, f"drop-{times}.safetensors")


def test_a_truncated_file_is_never_kept(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    """A complete answer that is shorter than the file (a truncated object behind a CDN)."""
    repo = seeded(hub, "short", adapter_bytes)
    hub.break_file("short", rf"/{repo}/resolve/", after=len(adapter_bytes) // 2)
    mark = hub.mark()
    line = _one_error(pull(client, repo, "short.safetensors"), "corrupt-download")
    assert f"{len(adapter_bytes) // 2} bytes arrived" in line and "nothing was kept" in line
    assert len(gets(hub, mark, repo)) == 1 + RETRIES
    assert_failed_clean(client, repo, "short.safetensors")


# -- lies about size and content ----------------------------------------------------------------


@pytest.mark.parametrize("delta", [-10, 10])
def test_a_lie_about_the_size_is_caught(
    client: Client, hub: FaultyHub, adapter_bytes: bytes, delta: int
) -> None:
    repo = seeded(hub, f"size{delta}", adapter_bytes)
    hub.break_file("size", rf"/{repo}/resolve/", methods=("HEAD",), delta=delta)
    line = _one_error(pull(client, repo, "size.safetensors"), "corrupt-download")
    assert str(len(adapter_bytes) + delta) in line
    assert_failed_clean(client, repo, "size.safetensors")


def test_a_lie_about_the_etag_is_caught_before_the_blob_moves_in(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    repo = seeded(hub, "etag-lie", adapter_bytes)
    hub.break_file("etag", rf"/{repo}/resolve/", methods=("HEAD", "GET"))
    line = _one_error(pull(client, repo, "etag.safetensors"), "corrupt-download")
    assert "the sha256 of what arrived is" in line
    assert_failed_clean(client, repo, "etag.safetensors")
    # Once the server tells the truth, the same pull works and caches the verified blob.
    hub.clear_faults()
    r = pull(client, repo, "etag.safetensors")
    assert r.returncode == 0, r.stderr
    assert blobs(client, repo) == [hashlib.sha256(adapter_bytes).hexdigest()]


def test_bytes_damaged_once_are_fetched_again_from_the_start(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    repo = seeded(hub, "flip-once", adapter_bytes)
    hub.break_file("flip", rf"/{repo}/resolve/", times=1)
    mark = hub.mark()
    r = pull(client, repo, "flip.safetensors")
    assert r.returncode == 0, r.stderr
    assert (client.work / "flip.safetensors").read_bytes() == adapter_bytes
    assert [q.range for q in gets(hub, mark, repo)] == [None, None]  # not resumed: restarted


def test_a_regular_file_is_checked_against_its_git_blob_id(
    client: Client, hub: FaultyHub, tmp_path: Path
) -> None:
    """Non-LFS files (the PEFT config) have a git sha1 ETag; damage to them is caught too."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2),
        },
        tmp_path / "w.safetensors",
    )
    repo = f"{USER}/flip-config"
    hub.seed(
        repo,
        {
            "adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
        },
    )
    hub.break_file("flip", rf"/{repo}/resolve/.*/adapter_config\.json$")
    line = _one_error(pull(client, repo, "cfg.safetensors"), "corrupt-download")
    assert "git blob id" in line and "adapter_config.json" in line
    assert_failed_clean(client, repo, "cfg.safetensors")


def test_a_corrupt_blob_already_in_the_cache_is_replaced(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    repo = seeded(hub, "bad-cache", adapter_bytes)
    r = pull(client, repo, "c1.safetensors")
    assert r.returncode == 0, r.stderr
    (blob,) = (cache_of(client, repo) / "blobs").iterdir()
    blob.write_bytes(adapter_bytes[:-1] + b"\0")  # bit rot, or an older client's bad copy
    r = pull(client, repo, "c2.safetensors")
    assert r.returncode == 0, r.stderr
    assert (client.work / "c2.safetensors").read_bytes() == adapter_bytes
    assert blob.read_bytes() == adapter_bytes


def test_an_integrity_failure_removes_the_cached_copy(
    client: Client, hub: FaultyHub, adapter_bytes: bytes
) -> None:
    """The server's ETag matches its bytes, but the adapter's own hash does not."""
    data = bytearray(adapter_bytes)
    data[-3] ^= 0x40
    repo = seeded(hub, "integrity", bytes(data))
    r = pull(client, repo, "integrity.safetensors")
    assert r.returncode == 3 and r.stderr.startswith("error[integrity]: "), r.stderr
    assert "Traceback" not in r.stderr
    assert_failed_clean(client, repo, "integrity.safetensors")


# -- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("methods", [("GET",), ("HEAD", "GET")])
def test_a_redirect_loop_fails_fast(
    client: Client, hub: FaultyHub, adapter_bytes: bytes, methods: tuple[str, ...]
) -> None:
    repo = seeded(hub, f"loop-{len(methods)}", adapter_bytes)
    hub.break_file("redirect", rf"/{repo}/resolve/", methods=methods)
    mark = hub.mark()
    line = _one_error(pull(client, repo, "loop.safetensors"), "redirect-loop")
    assert "redirected too many times" in line
    # Not retried: a loop is no transient failure. At most 21 hops (the client's own bound).
    assert len([q for q in hub.since(mark) if "/resolve/" in q.path]) <= 22
    assert_failed_clean(client, repo, "loop.safetensors")


# -- pickles from the Hub -----------------------------------------------------------------------


def _peft_pickle(tmp_path: Path) -> dict[str, bytes]:
    from test_pickle import _peft_pickle_dir

    d = _peft_pickle_dir(tmp_path)
    return {n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.bin")}


def test_pull_refuses_a_pickle_by_default_and_reads_it_with_the_flag(
    client: Client, hub: FaultyHub, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from loratool.format import load

    files = _peft_pickle(tmp_path)
    repo = f"{USER}/old-peft"
    hub.seed(repo, files)
    mark = hub.mark()
    r = pull(client, repo, "old.safetensors")
    line = _one_error(r, "pickle")
    assert "adapter_model.bin" in line and "--allow-pickle" in r.stderr
    assert gets(hub, mark, repo) == []  # refused from the listing: nothing downloaded
    r = pull(client, repo, "old.safetensors", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert "restricted unpickler" in r.stderr
    got = load(client.work / "old.safetensors", verify=True)
    want = torch.load(tmp_path / "peft-old" / "adapter_model.bin", weights_only=True)
    (t,) = got.targets.values()
    a = next(v for k, v in want.items() if "lora_A" in k)
    b = next(v for k, v in want.items() if "lora_B" in k)
    assert torch.equal(t.lora_A, a) and torch.equal(t.lora_B, b) and t.alpha == 4
    assert got.provenance["hub"]["repo_id"] == repo


def test_pull_reads_a_kohya_pt_with_the_flag(
    client: Client, hub: FaultyHub, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from loratool.format import load

    a, b = torch.randn(4, 32), torch.randn(16, 4)
    torch.save(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": a,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": b,
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        },
        tmp_path / "style.pt",
    )
    repo = f"{USER}/old-kohya"
    hub.seed(repo, {"style.pt": (tmp_path / "style.pt").read_bytes()})
    _one_error(pull(client, repo, "style.safetensors"), "pickle")
    r = pull(client, repo, "style.safetensors", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    (t,) = load(client.work / "style.safetensors", verify=True).targets.values()
    assert t.rank == 4 and t.alpha == 2.0 and torch.equal(t.lora_A, a)


def test_a_malicious_pickle_from_the_hub_runs_nothing(
    client: Client, hub: FaultyHub, tmp_path: Path
) -> None:
    from test_pickle import reduce_call, with_data_pkl

    files = _peft_pickle(tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "template.bin").write_bytes(files["adapter_model.bin"])
    evil = with_data_pkl(
        tmp_path / "template.bin",
        reduce_call("os", "system", f"touch {marker}"),
        tmp_path / "evil.bin",
    )
    repo = f"{USER}/evil-pickle"
    hub.seed(repo, {**files, "adapter_model.bin": evil.read_bytes()})
    r = pull(client, repo, "evil.safetensors", "--allow-pickle")
    assert r.returncode == 3 and r.stderr.startswith("error[pickle-refused]"), r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()
    assert not (client.work / "evil.safetensors").exists()
    # The refused pickle does not stay in the cache for another tool to load.
    assert all(len(b) != 64 for b in blobs(client, repo)), blobs(client, repo)


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "fs", 256) as mounted:
        skip_without(mounted)
        assert mounted is not None
        yield mounted


def _fill(fs: Path, leave: int) -> None:
    import os

    st = os.statvfs(fs)
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def _disk_full(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 7, (r.returncode, r.stderr)
    assert r.stderr.startswith("error[disk-full]: ") and r.stderr.count("error[") == 1
    assert "Traceback" not in r.stderr


def test_pull_onto_a_full_disk(
    client: Client, hub: FaultyHub, adapter_bytes: bytes, fs: Path
) -> None:
    repo = seeded(hub, "full-out", adapter_bytes)
    _fill(fs, 4096)
    out = fs / "out.safetensors"
    _disk_full(pull(client, repo, str(out)))
    assert not out.exists() and debris(fs) == [] and sorted(os_names(fs)) == ["filler"]


def test_pull_into_a_full_cache(
    client: Client, hub: FaultyHub, adapter_bytes: bytes, fs: Path, tmp_path: Path
) -> None:
    repo = seeded(hub, "full-cache", adapter_bytes)
    # The blob is written as the client fetches it (no up-front size check can see the filler
    # that another process writes meanwhile); leave room for the metadata, not the file.
    home = fs / "hf"
    home.mkdir()
    _fill(fs, 8192)
    out = tmp_path / "out.safetensors"
    _disk_full(pull(client, repo, str(out), HF_HOME=str(home)))
    assert not out.exists()
    leftovers = [p.name for p in home.rglob("*") if p.is_file()]
    assert not any(n.endswith(".incomplete") for n in leftovers), leftovers
    assert not any(len(n) == 64 for n in leftovers), leftovers  # no blob


def os_names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]
