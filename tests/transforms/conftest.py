"""Session fixtures for the quantize and prune tests: ONNX exports of the tiny models, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.transforms import _models


@pytest.fixture(scope="session")
def onnx_fx(fixtures_dir, fx):
    """``onnx_fx(name)`` -> an ONNX folder (model.onnx, config, tokenizer) exported from hf fixture ``name``."""
    return lambda name: _models.exported(fixtures_dir, fx, name)


@pytest.fixture(scope="session")
def external_fx(fixtures_dir, fx):
    """``external_fx(name)`` -> the same, with every weight in ``model.onnx.data``."""
    return lambda name: _models.external_data(fixtures_dir, fx, name)


@pytest.fixture(scope="session")
def trained() -> Path:
    """The trained GPT-2 fixture (an hf folder with its tokenizer)."""
    if not (_models.TRAINED / "config.json").is_file():
        pytest.skip(f"the trained fixture is not built: run python fixtures/make_trained.py ({_models.TRAINED})")
    return _models.TRAINED


@pytest.fixture(scope="session")
def trained_onnx(trained, fixtures_dir, fx) -> Path:
    return _models.exported(fixtures_dir, fx, "trained-gpt2")


@pytest.fixture(scope="session")
def heldout() -> Path:
    return _models.HELDOUT
