"""Encoder-decoders (T5, BART): both graphs verified, the decoder step by step with its cache, and faults caught
where they are (encoder, decoder weights, the decoder's cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from llmconv.errors import UsageError
from llmconv.verification.outputs import compare_outputs
from tests.export import _exports

SEQ2SEQ_CHECKS = ["encoder.last_hidden_state", "logits", "decode.prefill", "decode.steps", "decode.consistency",
                  "decode.cache", "generation", "decode.cross_cache"]


@pytest.fixture(scope="session")
def t5_onnx(fixtures_dir, fx):
    return _exports.export(fixtures_dir, fx, "t5-hf")[0]


def _edit_graph(src: Path, dst: Path, name: str, edit) -> Path:
    """Copy the ONNX folder ``src`` to ``dst`` with ``edit(model)`` applied to its graph ``name``."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / name))
    edit(model)
    onnx.save(model, str(dst / name))
    return dst


def _scale_first_square(model, factor: float = 1.5) -> None:
    """Scale the first 64x64 float weight (a projection of the first layer)."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.shape == (64, 64):
            t.CopyFrom(numpy_helper.from_array(a * factor, t.name))
            return
    raise AssertionError("no 64x64 weight")


def test_hf_vs_export_passes_every_check(fx, t5_onnx):
    report = compare_outputs(fx("t5-hf"), t5_onnx, profile="fp32")
    assert report.passed, report.summary()
    assert [c.name for c in report.checks] == SEQ2SEQ_CHECKS
    by = {c.name: c for c in report.checks}
    assert by["encoder.last_hidden_state"].figures["max_abs"] < 1e-4
    assert by["decode.steps"].figures["top1_agreement"] == 1.0
    assert by["generation"].figures["identical"] == 4
    assert by["decode.cache"].figures["layers"] == 2
    meta = report.extra["decode"]
    assert meta["decoder_start_token_id"] == 0 and meta["right_padded"] == 3
    assert report.extra["graphs"]["candidate"] == ["encoder_model.onnx", "decoder_model_merged.onnx"]
    assert "text2text-generation" in report.extra["runners"]["candidate"]


def test_hf_vs_hf(fx):
    """Two T5 folders (what prune verifies): the same checks, in PyTorch on both sides."""
    report = compare_outputs(fx("t5-hf"), fx("t5-hf"), profile="exact")
    assert report.passed, report.summary()
    assert [c.name for c in report.checks] == SEQ2SEQ_CHECKS


def test_decoder_weight_fault_fails_the_decoder_not_the_encoder(fx, t5_onnx, tmp_path):
    bad = _edit_graph(t5_onnx, tmp_path / "bad", "decoder_model_merged.onnx", _scale_first_square)
    report = compare_outputs(fx("t5-hf"), bad, profile="fp32")
    by = {c.name: c for c in report.checks}
    assert not report.passed
    assert by["encoder.last_hidden_state"].passed
    assert not by["logits"].passed and not by["decode.steps"].passed
    assert by["decode.consistency"].passed  # the cache agrees with the candidate's own recomputation


def test_encoder_fault_is_named(fx, t5_onnx, tmp_path):
    bad = _edit_graph(t5_onnx, tmp_path / "bad", "encoder_model.onnx", _scale_first_square)
    report = compare_outputs(fx("t5-hf"), bad, profile="fp32")
    assert not {c.name: c for c in report.checks}["encoder.last_hidden_state"].passed


def test_swapped_cache_fails_only_the_cached_steps(fx, t5_onnx, tmp_path):
    """The decoder reads layer 1's past as layer 0's: its first step (no past) is right, every cached one wrong."""

    def swap(model):
        names = {i.name: i for i in model.graph.input}
        a, b = names["past_key_values.0.decoder.key"], names["past_key_values.1.decoder.key"]
        a.name, b.name = "past_key_values.1.decoder.key", "past_key_values.0.decoder.key"

        def rename(graph):
            for node in graph.node:
                node.input[:] = [{"past_key_values.0.decoder.key": "past_key_values.1.decoder.key",
                                  "past_key_values.1.decoder.key": "past_key_values.0.decoder.key"}.get(i, i)
                                 for i in node.input]
                for attr in node.attribute:
                    if attr.type == 5:
                        rename(attr.g)

        rename(model.graph)
        a.name, b.name = "past_key_values.0.decoder.key", "past_key_values.1.decoder.key"

    bad = _edit_graph(t5_onnx, tmp_path / "bad", "decoder_model_merged.onnx", swap)
    report = compare_outputs(fx("t5-hf"), bad, profile="fp32")
    by = {c.name: c for c in report.checks}
    assert by["encoder.last_hidden_state"].passed and by["logits"].passed and by["decode.prefill"].passed
    assert not by["decode.steps"].passed
    assert by["decode.steps"].figures["first_failing_step"] == 1
    assert not by["decode.consistency"].passed
    assert not by["decode.cache"].passed and by["decode.cache"].figures["first_failing"] == "present.0.decoder.key"


def test_no_cache_decoder_recomputes(fx, fixtures_dir):
    """``--task text2text-generation``: a decoder without past, run again over the whole sequence at each step."""
    folder, report = _exports.export(fixtures_dir, fx, "t5-hf", "text2text-generation")
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["decoder_model.onnx", "encoder_model.onnx"]
    assert report.verification.passed
    names = [c.name for c in report.verification.checks]
    assert "decode.steps" in names and "decode.cache" not in names
    assert any("recomputed the whole sequence" in n for n in report.verification.notes)


def test_refusals(fx, t5_onnx, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4\n")
    with pytest.raises(UsageError, match="needs a causal language model; this is an encoder-decoder"):
        compare_outputs(fx("t5-hf"), t5_onnx, text=text)
    with pytest.raises(UsageError, match="the other model is an encoder-decoder and this one is not"):
        compare_outputs(fx("gpt2-hf"), t5_onnx)
    with pytest.raises(UsageError, match="one graph of an encoder-decoder"):
        compare_outputs(fx("t5-hf"), t5_onnx / "encoder_model.onnx")


def test_prompts_from_the_tokenizer(fx, t5_onnx, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6 w7\nw8\n")
    report = compare_outputs(fx("t5-hf"), t5_onnx, prompts=prompts, generate=3, decode_steps=2)
    assert report.passed, report.summary()
    assert report.extra["decode"]["prompt_ids"] == [[8, 9, 10], [11]]
    assert report.extra["decode"]["source"].startswith("--prompts")
