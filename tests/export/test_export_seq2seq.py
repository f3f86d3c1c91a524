"""Encoder-decoders exported in optimum's layout, loaded by ORTModelForSeq2SeqLM, quantized graph by graph."""

from __future__ import annotations

import json
import warnings

import pytest

from llmconv.errors import Unsupported, UsageError
from tests.export import _exports

SEQ2SEQ = ("t5", "mt5", "bart", "mbart", "marian")


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_export_layout_verified_and_loaded_by_optimum(kind, fixtures_dir, fx):
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import AutoModelForSeq2SeqLM

    folder, report = _exports.export(fixtures_dir, fx, f"{kind}-hf")
    assert report.extra["task"] == "text2text-generation-with-past"
    assert report.extra["graphs"] == ["encoder_model.onnx", "decoder_model_merged.onnx"]
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert report.verification.passed, report.verification.summary()
    assert {c.name for c in report.verification.checks} >= {"encoder.last_hidden_state", "decode.steps",
                                                             "decode.cache", "generation"}
    # Outside llmconv: optimum's runtime class generates what PyTorch generates, greedily.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_model = ORTModelForSeq2SeqLM.from_pretrained(folder)
        pt_model = AutoModelForSeq2SeqLM.from_pretrained(fx(f"{kind}-hf")).eval()
    assert ort_model.decoder.is_merged
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False,
              "num_beams": 1}
    assert torch.equal(pt_model.generate(**kwargs), ort_model.generate(**kwargs))


def test_a_file_destination_is_refused(fx, tmp_path):
    from llmconv.export import to_onnx

    with pytest.raises(UsageError, match="t5 is an encoder-decoder: it exports to two graphs"):
        to_onnx(fx("t5-hf"), tmp_path / "t5.onnx", src_format="hf", dtype="keep", verify=False, force=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["int8-dynamic", "int4"])
def test_quantize_every_graph(method, fixtures_dir, fx, tmp_path):
    from llmconv.transforms.quantize import quantize

    src, _ = _exports.export(fixtures_dir, fx, "t5-hf")
    report = quantize(src, tmp_path / "q", target="cpu", method=method)
    assert report.verification is not None and report.verification.passed, report.verification.summary()
    assert report.options["graphs"] == ["encoder_model.onnx", "decoder_model_merged.onnx"]
    assert report.size_after < 0.7 * report.size_before
    assert sum(report.ops_quantized.values()) >= 20  # the encoder's and both decoder branches' projections
    out = tmp_path / "q"
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    assert (out / "config.json").is_file()
    from llmconv.verification.seq2seq import describe

    assert describe(out).quantization == ("int4" if method == "int4" else "int8")


def test_quantize_refuses_what_it_cannot_do(fixtures_dir, fx, tmp_path):
    from llmconv.transforms.quantize import quantize

    src, _ = _exports.export(fixtures_dir, fx, "t5-hf")
    with pytest.raises(Unsupported, match="float16 converter breaks the merged decoder"):
        quantize(src, tmp_path / "q16", target="gpu", method="fp16")
    with pytest.raises(Unsupported, match="int8-static needs calibration inputs for each graph"):
        quantize(src, tmp_path / "qs", target="cpu", method="int8-static")
    with pytest.raises(UsageError, match="need a folder"):
        quantize(src, tmp_path / "q.onnx", target="cpu", method="int4")
    assert not list(tmp_path.iterdir())


def test_cli_verify_and_prune_t5(cli, fixtures_dir, fx, tmp_path):
    src, _ = _exports.export(fixtures_dir, fx, "t5-hf")
    r = cli("verify", fx("t5-hf"), src, "--mode", "outputs", "--json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["ok"] and body["decode"]["decoder_start_token_id"] == 0
    r = cli("prune", fx("t5-hf"), tmp_path / "pruned", "--sparsity", "0.3")
    assert r.exit_code == 0, r.output
    assert "all 8 checks passed" in r.output
