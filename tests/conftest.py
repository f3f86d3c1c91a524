"""Shared test fixtures: the seeded fixture models, built once per session under a tmp folder."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures import make_fixtures  # noqa: E402

# The tests assert on the CLI's tables and help, which rich lays out to the terminal's width. llmconv.cli.output's
# consoles read COLUMNS once, when they are built at import, and a width fixed then wins over a test's own
# COLUMNS: the developer's shell (COLUMNS=100, as in the README) must not reach the tests. FORCE_COLOR and
# TTY_COMPATIBLE would make them write escape codes, and typer colours its help whenever GITHUB_ACTIONS,
# FORCE_COLOR or PY_COLORS is set (at its import; _TYPER_FORCE_DISABLE_TERMINAL is how typer's own tests turn
# that off). All settled before any test module imports the CLI; subprocesses inherit the same environment.
for _var in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "PY_COLORS", "TERMINAL_WIDTH"):
    os.environ.pop(_var, None)
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"
# rich also decides colours when a console is built, from whether sys.stdout is a terminal then: under
# `pytest -s` it is, and every in-process run would print escape codes. Build the CLI's consoles off one.
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    import llmconv.cli.output  # noqa: E402, F401
# The width the CLI uses off a terminal (llmconv.cli.output): in-process runs get it whatever the terminal is.
CLI_COLUMNS = "120"


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where session fixtures are built (lazily, by name, through ``fx``)."""
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def fx(fixtures_dir: Path):
    """``fx(name)`` -> path of the named fixture from fixtures/make_fixtures.py (built on first use).

    Treat the returned path as read-only: copy it (``fx_copy``) before a test changes it.
    """

    def get(name: str) -> Path:
        return make_fixtures.build(fixtures_dir, [name])[name]

    return get


@pytest.fixture
def fx_copy(fx, tmp_path: Path):
    """``fx_copy(name)`` -> a private copy of a fixture under this test's tmp_path."""

    def get(name: str) -> Path:
        src = fx(name)
        dst = tmp_path / "copies" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    return get


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("convert", a, b)`` -> typer Result (exit_code, stdout, stderr).

    Output is laid out in ``CLI_COLUMNS`` columns, as off a terminal, unless ``env`` sets ``COLUMNS``.
    """
    from typer.testing import CliRunner

    from llmconv.cli.app import app

    runner = CliRunner()

    def run(*args: object, env: dict[str, str] | None = None):
        env = {"COLUMNS": CLI_COLUMNS, **(env or {})}
        return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)

    return run


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``tmpfs("1m")`` -> a real tmpfs of that size mounted at ``tmp_path/small`` (unmounted after the test);
    the test is skipped where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        small = tmp_path / "small"
        small.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(small)
        return small

    yield mount
    for small in mounted:
        subprocess.run(["umount", str(small)], capture_output=True)
