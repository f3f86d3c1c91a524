"""The verifier's verdict and figures, held against an independent computation (issue 8, item 5).

For every architecture the suite has fixtures for (the decoders and BERT of make_fixtures, plus the
RoBERTa family and the pooler-less BERT of fixtures/verdict_models.py): the exported graph runs in
onnxruntime and the hf folder in PyTorch, directly, on the same inputs (one row right-padded with the
model's own pad token, positions left to the model), and llmconv verifies the same pair on the same
inputs (``--inputs``). Both must say "equivalent", with the same max abs diff; for a graph with one
weight changed, both must see the difference, and the CLI must exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures import verdict_models
from llmconv.verification.outputs import compare_outputs
from llmconv.verification.profiles import outputs_profile
from tests._lossy import _session
from tests.export import _exports

MODELS = [f"{a}-hf" for a in _exports.ARCHITECTURES] + list(verdict_models.BUILDERS)
FP32 = outputs_profile("fp32")
_CLASSES = {"text-generation": "AutoModelForCausalLM", "fill-mask": "AutoModelForMaskedLM",
            "feature-extraction": "AutoModel"}


@pytest.fixture(scope="session")
def get_model(fixtures_dir, fx):
    """``get_model(name)`` -> the hf folder of a make_fixtures or verdict_models fixture."""
    return lambda name: (verdict_models.build(fixtures_dir, name) if name in verdict_models.BUILDERS
                         else fx(name))


@pytest.fixture(scope="session")
def exported_pair(fixtures_dir, get_model):
    """``exported_pair(name)`` -> (hf folder, ONNX folder, ConvertReport), exported (and verified) once."""

    def get(name: str) -> tuple[Path, Path, Any]:
        out, report = _exports.export(fixtures_dir, get_model, name)
        return get_model(name), out, report

    return get


def _inputs(config: dict[str, Any], takes: set[str], *, length: int = 12) -> dict[str, np.ndarray]:
    """Two rows of token ids, the second right-padded with the model's pad token; ids avoid the pad id
    elsewhere. Token type ids and position ids (counted from 0) only where the graph takes them."""
    rng = np.random.default_rng(1234)
    vocab, pad = int(config["vocab_size"]), config.get("pad_token_id")
    ids = rng.integers(0, vocab, size=(2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, length - 3:] = 0
    if pad is not None:
        ids[ids == pad] = (pad + 1) % vocab
        ids[1, length - 3:] = pad
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in takes:
        feed["token_type_ids"] = np.zeros_like(ids)
    if "position_ids" in takes:
        feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
    return feed


def _run_onnx(onnx_file: Path, feed: dict[str, np.ndarray], output: str) -> np.ndarray:
    sess = _session(onnx_file)
    full = dict(feed)
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):  # an empty cache: [batch, heads, 0, head_dim]
            _, heads, _, head_dim = i.shape
            full[i.name] = np.zeros((feed["input_ids"].shape[0], heads, 0, head_dim), dtype=np.float32)
    return sess.run([output], {i.name: full[i.name] for i in sess.get_inputs()})[0]


def _run_torch(hf: Path, task: str, feed: dict[str, np.ndarray], output: str) -> np.ndarray:
    """The model in PyTorch as a user runs it: no position ids (it counts its own), no cache."""
    import torch
    import transformers

    base = task.removesuffix("-with-past")
    model = getattr(transformers, _CLASSES[base]).from_pretrained(str(hf), dtype=torch.float32,
                                                                  trust_remote_code=False).eval()
    kwargs = {k: torch.from_numpy(v) for k, v in feed.items() if k != "position_ids"}
    if base == "text-generation":
        kwargs["use_cache"] = False
    with torch.inference_mode():
        return model(**kwargs, return_dict=True)[output].float().numpy()


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _verdicts(hf: Path, onnx_dir: Path, task: str, tmp_path: Path) -> tuple[str, float, Any, Any, Path]:
    """(compared output, independent max abs diff, llmconv's report, its check of that output, the inputs file),
    both on the same inputs."""
    config = json.loads((hf / "config.json").read_text())
    onnx_file = onnx_dir / "model.onnx"
    sess = _session(onnx_file)
    takes = {i.name for i in sess.get_inputs()}
    output = next(o.name for o in sess.get_outputs() if o.name in ("logits", "last_hidden_state"))
    del sess
    feed = _inputs(config, takes)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **feed)
    independent = _max_abs(_run_torch(hf, task, feed, output), _run_onnx(onnx_file, feed, output))
    report = compare_outputs(hf, onnx_file, profile="fp32", inputs=npz)
    check = next(c for c in report.checks if c.name == output)
    return output, independent, report, check, npz


@pytest.mark.parametrize("name", MODELS)
def test_verdict_agrees_with_onnxruntime_and_pytorch_run_directly(name, exported_pair, tmp_path):
    hf, onnx_dir, export_report = exported_pair(name)
    assert export_report.verification.passed  # the export's own verdict, on llmconv's synthetic inputs
    task = export_report.extra["task"]
    output, independent, report, check, _ = _verdicts(hf, onnx_dir, task, tmp_path)
    assert independent <= FP32.atol, f"{name}: the graph itself differs from PyTorch by {independent}"
    assert report.passed and check.passed, f"{name}: llmconv says not equivalent: {report.summary()}"
    # The same inputs, the same runs: the same figure (both float32 on one thread, compared in float64).
    assert check.figures["max_abs"] == pytest.approx(independent, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("name", ["xlm-roberta-fill-mask-hf", "bert-no-pooler-hf", "llama-hf"])
def test_a_broken_graph_is_caught_by_both(name, exported_pair, tmp_path, cli):
    hf, onnx_dir, export_report = exported_pair(name)

    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]

    def perturb(arrays: dict[str, Any]) -> None:  # one feature of the token embedding, for every token
        key = next(k for k, a in arrays.items() if a.ndim == 2 and a.shape[0] == vocab)
        arrays[key][:, 3] += 1.0

    broken = _exports.edit_initializers(onnx_dir, tmp_path / "broken", perturb)
    output, independent, report, check, npz = _verdicts(hf, broken, export_report.extra["task"], tmp_path)
    assert independent > 100 * FP32.atol
    assert not report.passed and not check.passed
    assert check.figures["max_abs"] == pytest.approx(independent, rel=1e-3)
    r = cli("verify", hf, broken / "model.onnx", "--inputs", npz, "--profile", "fp32")
    assert r.exit_code == 1 and "NOT EQUIVALENT" in r.stdout
