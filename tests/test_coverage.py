"""The coverage matrix (llmconv/coverage.py) is a test: every pair listed is exported and verified here, every
pair refused is shown refused, and the CLI and the README list exactly these."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmconv.coverage import MODELS, REFUSED, markdown
from tests.export import _exports


@pytest.mark.parametrize("case", MODELS, ids=lambda c: c.id)
def test_listed_pair_exports_and_verifies(case, fixtures_dir, fx):
    # The task a checkpoint's class is for is what an export picks by itself; another one is asked for.
    auto = case.family != "vision" or case.task == "image-classification"
    folder, report = _exports.export(fixtures_dir, fx, case.fixture, None if auto else case.task)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == case.model_type
    assert config["architectures"] == [case.architecture]
    assert report.extra["task"] == case.task and report.extra["exporter"] == case.exporter
    assert report.verification is not None and report.verification.passed, report.verification.summary()
    assert report.verification.profile == "fp32"


@pytest.mark.slow
@pytest.mark.parametrize("case,why", REFUSED, ids=[c.id for c, _ in REFUSED])
def test_refused_pair_fails_honestly(case, why, fx, tmp_path, cli):
    dst = tmp_path / "out"
    r = cli("convert", fx(case.fixture), dst, "--to", "onnx")
    assert r.exit_code == 1, r.output
    assert "does not run in onnxruntime" in r.output and case.model_type in r.output
    assert str(dst) in r.output and "scratch" not in r.output
    assert not dst.exists()


def test_cli_lists_the_matrix(cli):
    r = cli("formats", "--models", "--json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert [(m["model_type"], m["task"]) for m in body["models"]] == [(c.model_type, c.task) for c in MODELS]
    assert {m["model_type"] for m in body["refused"]} == {c.model_type for c, _ in REFUSED}
    r = cli("formats", "--models")
    assert r.exit_code == 0
    for c in MODELS:
        assert c.architecture in r.output


def test_readme_shows_the_matrix():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown() in readme, "README's coverage matrix is stale: paste llmconv.coverage.markdown() into it"
