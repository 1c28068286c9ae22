"""Shared test set-up: offline Hub, the base-model builder on the path, session-wide model fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

# Nothing in the tests may reach a hub; the loopback Hub tests set HF_ENDPOINT themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(FIXTURES))


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    import models

    return models.tiny("llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir() -> Path:
    import models

    return models.tiny("gpt2")


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    import models

    return models.tiny("bert")


@pytest.fixture(scope="session")
def tiny_sharded_llama_dir() -> Path:
    import models

    return models.tiny_sharded_llama()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    import models

    return models.smollm2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import models

    return models.minilm()
