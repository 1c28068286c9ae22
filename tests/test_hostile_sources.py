"""Hostile sources, every reader: mutated inputs end in a clean LoratoolError, within a time bound.

Property-based (hypothesis), one suite per reader, each starting from a valid file and mutating
it: PEFT ``adapter_config.json`` (wrong types, huge numbers, deep nesting, unknown peft_type,
regexes built to backtrack), PEFT / kohya / diffusers tensor files (mismatched shapes and
names, wrong dtypes, headers that lie about sizes), and GGUF files (bad counts, types, offsets)
given to the same entry point every command uses (``sources.open_adapter``), the tensors then
read in full. A case passes when it opens cleanly or raises a ``LoratoolError``; any other
exception is a reader bug, and every case must finish within ``BOUND_S`` seconds (an interval
timer stops a hang, which also counts as a failure). ``CASES`` is the number of examples per suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loratool.console import print_error  # noqa: E402
from loratool.errors import LoratoolError  # noqa: E402
from loratool.sources import open_adapter  # noqa: E402

BOUND_S = 5.0  # per case, wall clock: generous for a loaded 2-core CI runner
CASES = 150
SETTINGS = settings(
    max_examples=CASES,
    deadline=None,  # our own timer below is the bound (hypothesis' deadline is flaky under load)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same cases on every run: a CI failure can be reproduced
)


class Hang(Exception):
    pass


@contextmanager
def bounded(seconds: float = BOUND_S) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_fully(path: Path) -> str:
    """Open through the common entry point and read every tensor; "ok" or the error code."""
    with bounded():
        try:
            opened = open_adapter(path)
            for t in opened.adapter.targets.values():
                t.lora_A, t.lora_B  # noqa: B018 - materialise lazy factors
            opened.adapter.state_dict()
        except LoratoolError as e:
            # A hostile name can put control characters in the message; the CLI's one error
            # boundary escapes them, so what a user sees is always one line (plus the hint).
            assert e.message and e.code, e
            shown = io.StringIO()
            with contextlib.redirect_stderr(shown):
                print_error(e)
            lines = shown.getvalue().splitlines()
            assert len(lines) == (2 if e.hint else 1), lines
            assert all(line.isprintable() for line in lines), lines
            return e.code
    return "ok"


# -- values a hostile JSON can hold ---------------------------------------------------------------

CATASTROPHIC = [
    "(a+)+$",
    "((a+))+$",
    "(a|aa)+$",
    "(a|a?)+$",
    "(.*a){20}",
    "(x+x+)+y",
    "(\\w+\\s?)+$",
    "^(([a-z])+.)+[A-Z]([a-z])+$",
    ".*.*.*.*.*.*.*.*.*.*=",
    "(?:q|q_)+proj$",
    "(" * 500 + ")" * 500,
    "a{1000000}",
    "[" * 3,
    "x" * 100_000,
    ".*" * 300 + "!",
    "(\\1)",
    "(?P<a>x)(?P=a)",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1, 0, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(CATASTROPHIC)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
CONFIG_KEYS = [
    "r", "lora_alpha", "target_modules", "peft_type", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "fan_in_fan_out", "base_model_name_or_path", "revision",
    "task_type", "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save",
    "init_lora_weights", "bias", "lora_dropout", "lora_bias", "trainable_token_indices",
    "layer_replication", "use_qalora",
]  # fmt: skip


def deep(n: int) -> str:
    return "[" * n + "]" * n


# -- fixtures: one valid file per reader ------------------------------------------------------


def _factors(rank: int = 2, dim: int = 8) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rank, dim, generator=g), torch.randn(dim, rank, generator=g)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: Any) -> Path:
    d = tmp_path_factory.mktemp("peft")
    a, b = _factors()
    tensors = {}
    for m in ("q_proj", "v_proj"):
        tensors[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"] = b.clone()
    save_file(tensors, d / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "some/model",
        "task_type": "CAUSAL_LM",
    }
    (d / "adapter_config.json").write_text(json.dumps(config))
    assert read_fully(d) == "ok"
    return d


def test_valid_fixtures_open(peft_dir: Path) -> None:
    assert read_fully(peft_dir) == "ok"


def _peft_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- adapter_config.json ------------------------------------------------------------------------

config_mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), values),
    st.tuples(st.just("drop"), st.sampled_from(CONFIG_KEYS), st.none()),
    st.tuples(st.just("regex"), st.sampled_from(["target_modules", "exclude_modules", "layers_pattern", "modules_to_save"]), st.sampled_from(CATASTROPHIC)),
    st.tuples(st.just("pattern-key"), st.sampled_from(["rank_pattern", "alpha_pattern"]), st.sampled_from(CATASTROPHIC)),
    st.tuples(st.just("raw"), st.just(""), st.sampled_from([
        "", "{", "[]", "null", "1e999999", '{"r": NaN}', '{"r": 1, "r": 2}', deep(100_000),
        '{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", '{"a": "\\ud800"}', "\ufeff{}",
        '{"peft_type": "LORA", "target_modules": ' + deep(5000) + "}", "x" * (17 << 20),
    ])),
    st.tuples(st.just("bytes"), st.just(""), st.binary(max_size=200)),
)  # fmt: skip


@SETTINGS
@given(mutation=config_mutations)
def test_mutated_adapter_config(peft_dir: Path, tmp_path_factory: Any, mutation: Any) -> None:
    kind, key, value = mutation
    d = _peft_copy(peft_dir, tmp_path_factory.mktemp("m"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    path = d / "adapter_config.json"
    if kind == "set":
        cfg[key] = value
        path.write_text(json.dumps(cfg))
    elif kind == "drop":
        cfg.pop(key, None)
        path.write_text(json.dumps(cfg))
    elif kind == "regex":
        cfg[key] = value
        path.write_text(json.dumps(cfg))
    elif kind == "pattern-key":
        cfg[key] = {value: 4}
        path.write_text(json.dumps(cfg))
    elif kind == "raw":
        path.write_text(value)
    else:
        path.write_bytes(value)
    read_fully(d)


# -- tensor files: PEFT, kohya, diffusers -------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.float64]
shapes = st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=4).map(tuple)


def _tensor(shape: tuple[int, ...], dtype: Any) -> Any:
    return torch.zeros(shape, dtype=dtype)


PEFT_NAME = "base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight"
KOHYA_NAME = "lora_unet_down_blocks_0_attentions_0_{m}.{part}"
DIFFUSERS_NAME = "unet.down_blocks.0.attentions.0.{m}.lora_{ab}.weight"


def tensor_sets(template: str) -> Any:
    names = st.sampled_from(["q_proj", "v_proj", "to_q", "x"]).flatmap(
        lambda m: st.sampled_from(
            [
                template.format(m=m, ab="A", part="lora_down.weight"),
                template.format(m=m, ab="B", part="lora_up.weight"),
                template.format(m=m, ab="A", part="alpha"),
                template.format(m=m, ab="magnitude", part="dora_scale"),
            ]
        )
    ) | st.text(min_size=1, max_size=30)
    return st.dictionaries(
        names, st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=6
    )


def _write_tensors(
    path: Path, spec: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    save_file({k: _tensor(s, d) for k, (s, d) in spec.items()}, path, metadata=metadata)


@SETTINGS
@given(spec=tensor_sets(PEFT_NAME))
def test_peft_tensor_files(peft_dir: Path, tmp_path_factory: Any, spec: dict[str, Any]) -> None:
    d = _peft_copy(peft_dir, tmp_path_factory.mktemp("t"))
    (d / "adapter_model.safetensors").unlink()
    _write_tensors(d / "adapter_model.safetensors", spec)
    read_fully(d)


@SETTINGS
@given(spec=tensor_sets(KOHYA_NAME))
def test_kohya_tensor_files(tmp_path_factory: Any, spec: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("k") / "lora.safetensors"
    _write_tensors(path, spec, {"ss_network_dim": "2", "ss_network_alpha": "4"})
    read_fully(path)


@SETTINGS
@given(spec=tensor_sets(DIFFUSERS_NAME), meta=values)
def test_diffusers_tensor_files(tmp_path_factory: Any, spec: dict[str, Any], meta: Any) -> None:
    path = tmp_path_factory.mktemp("d") / "pytorch_lora_weights.safetensors"
    lora = json.dumps(
        {
            "unet": {"r": 2, "lora_alpha": 4, "target_modules": ["to_q"], "peft_type": "LORA"}
            if meta is None
            else meta
        }
    )
    _write_tensors(path, spec, {"lora_adapter_metadata": lora})
    read_fully(path)


def _lying_header(path: Path, name: str, shape: list[int], offsets: list[int], data: int) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * data)


@SETTINGS
@given(
    template=st.sampled_from([PEFT_NAME, KOHYA_NAME, DIFFUSERS_NAME]),
    shape=st.lists(st.sampled_from([0, 1, 2, 8, 2**31, 2**62, 2**64 - 1, -1]), max_size=3),
    offsets=st.lists(st.sampled_from([0, 4, 16, 64, 2**40, 2**63, -8]), min_size=0, max_size=3),
    data=st.sampled_from([0, 16, 64]),
)
def test_headers_that_lie_about_sizes(
    peft_dir: Path,
    tmp_path_factory: Any,
    template: str,
    shape: list[int],
    offsets: list[int],
    data: int,
) -> None:
    d = tmp_path_factory.mktemp("h")
    name = template.format(m="q_proj", ab="A", part="lora_down.weight")
    if template is PEFT_NAME:
        d = _peft_copy(peft_dir, d)
        (d / "adapter_model.safetensors").unlink()
        _lying_header(d / "adapter_model.safetensors", name, shape, offsets, data)
        read_fully(d)
    else:
        _lying_header(d / "lora.safetensors", name, shape, offsets, data)
        read_fully(d / "lora.safetensors")


# -- GGUF ---------------------------------------------------------------------------------------

GGUF_TYPES = [*range(16), 99, 2**32 - 1]


def _gguf_string(s: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(s) if length is None else length) + s


@st.composite
def gguf_files(draw: Callable[..., Any]) -> bytes:
    version = draw(st.sampled_from([1, 2, 3, 4, 0, 2**32 - 1]))
    n_tensors = draw(st.sampled_from([0, 1, 2, 2**31, 2**63, 2**64 - 1]))
    n_kv = draw(st.sampled_from([0, 1, 3, 2**40, 2**64 - 1]))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    for _ in range(draw(st.integers(0, 3))):
        key_len = draw(st.sampled_from([None, 0, 2**40, 2**64 - 1]))
        out += _gguf_string(b"general.architecture", key_len)
        out += struct.pack("<I", draw(st.sampled_from(GGUF_TYPES)))
        out += _gguf_string(b"llama", draw(st.sampled_from([None, 2**50])))
    for _ in range(draw(st.integers(0, 2))):
        out += _gguf_string(b"blk.0.attn_q.weight.lora_a")
        dims = draw(st.lists(st.sampled_from([1, 8, 2**40]), max_size=5))
        out += struct.pack("<I", draw(st.sampled_from([0, 1, 5, 4, 2**31]))) + b"".join(
            struct.pack("<Q", x) for x in dims
        )
        out += struct.pack(
            "<IQ", draw(st.sampled_from(GGUF_TYPES)), draw(st.sampled_from([0, 32, 2**63]))
        )
    return out + draw(st.binary(max_size=64))


@SETTINGS
@given(data=gguf_files(), suffix=st.sampled_from([".gguf", ".safetensors", ""]))
def test_gguf_files(tmp_path_factory: Any, data: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("g") / f"lora{suffix}"
    path.write_bytes(data)
    code = read_fully(path)
    assert code != "ok"  # loratool reads no GGUF adapter: it must say so, not crash


# -- byte-level damage to a valid file of each format -------------------------------------------


@SETTINGS
@given(
    fmt=st.sampled_from(["peft", "kohya"]),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_flipped_bytes(
    peft_dir: Path, tmp_path_factory: Any, fmt: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    d = tmp_path_factory.mktemp("b")
    if fmt == "peft":
        d = _peft_copy(peft_dir, d)
        target = d / "adapter_model.safetensors"
    else:
        target = d / "lora.safetensors"
        a, b = _factors()
        save_file(
            {"lora_unet_x_to_q.lora_down.weight": a, "lora_unet_x_to_q.lora_up.weight": b}, target
        )
    raw = bytearray(target.read_bytes())
    for pos, byte in flips:
        if pos < len(raw):
            raw[pos] = byte
    target.write_bytes(bytes(raw[: max(0, len(raw) - cut)]))
    read_fully(d if fmt == "peft" else target)


# -- resource bounds and their overrides --------------------------------------------------------


def test_limits_refuse_with_the_variable_to_raise(
    peft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in (
        ("LORATOOL_MAX_TARGETS", "1"),
        ("LORATOOL_MAX_JSON_BYTES", "20"),
        ("LORATOOL_MAX_ADAPTER_BYTES", "100"),
        ("LORATOOL_MAX_JSON_DEPTH", "0"),
    ):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            if var == "LORATOOL_MAX_JSON_DEPTH":
                m.setenv(var, "1")
                cfg = json.loads((peft_dir / "adapter_config.json").read_text())
                d = _peft_copy(peft_dir, tmp_path / "deep")
                (d / "adapter_config.json").write_text(json.dumps({**cfg, "x": [[1]]}))
            else:
                d = peft_dir
            with pytest.raises(LoratoolError) as e:
                open_adapter(d)
            assert e.value.code == "too-large" and var in (e.value.hint or ""), (var, e.value)
    assert read_fully(peft_dir) == "ok"  # defaults again


def test_a_bad_limit_value_is_a_usage_error(
    peft_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORATOOL_MAX_TARGETS", "lots")
    with pytest.raises(LoratoolError) as e:
        open_adapter(peft_dir)
    assert e.value.code == "bad-limit" and e.value.exit_code == 2
