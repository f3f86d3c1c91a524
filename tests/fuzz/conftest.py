"""The fuzzing suite's shared pieces: its modules on sys.path, and the seed corpus built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory):
    """``(root, seeds)``: a session folder for cases and the built seeds, after one warm-up run per kind
    (so that lazy imports are not counted as a case's memory)."""
    from fuzz_corpus import SeedCache
    from fuzz_oracle import warm_up

    root = tmp_path_factory.mktemp("fuzz")
    (root / "seeds").mkdir()
    cache = SeedCache(root / "seeds")
    warm_up(root, cache)
    return root, cache
