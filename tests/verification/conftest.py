"""Session fixtures for the export tests: verified ONNX exports of the tiny models, built once."""

from __future__ import annotations

import pytest

from tests.export import _exports


@pytest.fixture(scope="session")
def exported(fixtures_dir, fx):
    """``exported(name, task=None)`` -> (ONNX folder, ConvertReport) of hf fixture ``name``, export verified."""
    return lambda name, task=None: _exports.export(fixtures_dir, fx, name, task)
