"""No false verdicts (issue 8, item 4): RoBERTa's own positions, BERT without a pooler, CUDA that did not start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import verdict_models
from llmconv.errors import Unsupported, UsageError
from llmconv.verification.inputs import InputPlan, synthetic_inputs
from llmconv.verification.runners import OrtRunner, TorchRunner, _failure_reason, _tied_keys, describe
from tests.export import _exports

ROBERTA_FAMILY = ["roberta-fill-mask-hf", "roberta-hf", "xlm-roberta-fill-mask-hf", "xlm-roberta-hf"]
CUDA_MESSAGE = "onnxruntime could not start the CUDA execution provider: "
NOTHING_ON_GPU = "; nothing was verified on the GPU"


@pytest.fixture(scope="session")
def model(fixtures_dir):
    return lambda name: verdict_models.build(fixtures_dir, name)


@pytest.fixture(scope="session")
def export(fixtures_dir, model):
    """``export(name)`` -> (hf folder, ONNX folder, ConvertReport); the same exports as test_verdict_independent."""
    def get(name: str):
        out, report = _exports.export(fixtures_dir, model, name)
        return model(name), out, report

    return get


# ---- RoBERTa / XLM-RoBERTa: positions counted inside the model ----------------------------------------------

@pytest.mark.parametrize("name", ROBERTA_FAMILY)
def test_roberta_family_exports_and_verifies(name, export):
    _, _, report = export(name)
    check = report.verification.checks[0]
    assert report.verification.passed and check.figures["max_abs"] < 1e-5  # was 0.6 (logits), 2.9 (hidden states)
    task = report.extra["task"]
    assert report.verification.extra["runners"] == {"reference": f"torch ({task})",
                                                    "candidate": f"onnxruntime (CPUExecutionProvider, {task})"}


def test_roberta_convert_exits_0(model, cli, tmp_path):
    r = cli("convert", model("xlm-roberta-fill-mask-hf"), tmp_path / "out", "--to", "onnx", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"]["checks"][0]["passed"] is True


def test_positions_fed_from_outside_were_the_cause(model):
    """The root cause, shown: position ids 0..L-1 given to RoBERTa change its outputs; left to the model, the
    verifier feeds none, because neither the hf folder nor the graph asks for them."""
    import torch
    import transformers

    folder = model("roberta-hf")
    m = transformers.AutoModel.from_pretrained(str(folder), trust_remote_code=False).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        own = m(input_ids=ids).last_hidden_state
        counted_from_0 = m(input_ids=ids, position_ids=torch.arange(6)[None]).last_hidden_state
    assert float((own - counted_from_0).abs().max()) > 0.1
    sig = describe(folder)
    assert "position_ids" not in sig.inputs and sig.pad_token_id == 1


def test_synthetic_inputs_follow_the_pad_convention():
    plan = InputPlan(wants={"input_ids", "attention_mask"}, vocab_size=6, pad_token_id=1)
    *feeds, one_token = synthetic_inputs(plan, batch=3, seq_len=40, samples=2, seed=0)
    for feed in feeds:
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert "position_ids" not in feed
        assert (ids[mask == 0] == 1).all() and (mask == 0).any()  # padded tail: the pad token
        assert (ids[mask == 1] != 1).all()  # elsewhere never the pad token ...
        assert set(np.unique(ids[mask == 1])) == {0, 2, 3, 4, 5}  # ... and every other id can be drawn
    assert one_token["attention_mask"].tolist() == [[1]] and one_token["input_ids"][0, 0] != 1  # never padded
    # Without a pad id the draw is what it always was.
    no_pad = synthetic_inputs(InputPlan(wants={"input_ids"}, vocab_size=6), batch=2, seq_len=8, samples=1, seed=0)
    assert np.array_equal(no_pad[0]["input_ids"], np.random.default_rng(0).integers(0, 6, size=(2, 8)))


def test_a_sequence_past_robertas_positions_is_a_usage_error(export, cli):
    hf, onnx_dir, _ = export("roberta-fill-mask-hf")
    r = cli("verify", hf, onnx_dir, "--seq-len", "129")  # 130 rows of position embedding, 128 positions
    assert r.exit_code == 2
    assert "an input of 129 tokens, but the model has 128 positions: its position embeddings start after " \
           "pad_token_id 1 (use --seq-len 128 or less)" in r.stderr


# ---- BertModel without a pooler -----------------------------------------------------------------------------

def test_bert_without_pooler_exports_and_verifies(model, cli, tmp_path):
    r = cli("convert", model("bert-no-pooler-hf"), tmp_path / "enc", "--to", "onnx", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["verification"]["checks"][0]["name"] == "last_hidden_state"
    assert (tmp_path / "enc" / "model.onnx").is_file()


def test_tied_keys_of_any_shape():
    class M:
        pass

    m = M()
    for value, expected in ((None, set()), (["lm_head.weight"], {"lm_head.weight"}),
                            ({"lm_head.weight": "model.embed_tokens.weight"}, {"lm_head.weight"})):
        m._tied_weights_keys = value
        assert _tied_keys(m) == expected


def test_weights_the_output_needs_are_still_refused(model):
    """The pooler is left out of the question because last_hidden_state does not depend on it; a missing
    head that the logits do depend on is still refused."""
    sig = describe(model("bert-no-pooler-hf"))
    with pytest.raises(UsageError, match=r"no weights for \d+ tensors that AutoModelForMaskedLM \(fill-mask\) needs"):
        TorchRunner(sig, task="fill-mask")
    runner = TorchRunner(sig, task="feature-extraction")
    runner.close()


# ---- CUDA asked for, CPU running ----------------------------------------------------------------------------

def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_verify_with_cuda_that_is_not_there_exits_2(export, cli):
    hf, onnx_dir, _ = export("roberta-hf")
    r = cli("verify", hf, onnx_dir, "--provider", "cuda")
    assert r.exit_code == 2 and r.stdout == ""
    line = _one_line(r.stderr)
    assert CUDA_MESSAGE + "this onnxruntime has no CUDA execution provider (available: " in line
    assert NOTHING_ON_GPU in line and "Traceback" not in line
    r = cli("verify", hf, onnx_dir, "--provider", "cuda", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == 2
    r = cli("verify", hf, hf, "--mode", "outputs", "--provider", "cuda")  # PyTorch on both sides: never the GPU
    assert r.exit_code == 2 and "nothing would be verified on the GPU" in _one_line(r.stderr)


def test_convert_with_cuda_writes_nothing(model, tmp_path):
    from llmconv.export import to_onnx

    dst = tmp_path / "out"
    with pytest.raises(Unsupported, match=CUDA_MESSAGE):
        to_onnx(model("roberta-hf"), dst, src_format="hf", dtype="keep", verify=True, force=False, provider="cuda")
    assert not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["hf", "onnx"])
def test_quantize_for_gpu_with_cuda_writes_nothing(source, export, cli, tmp_path):
    hf, onnx_dir, _ = export("roberta-hf")
    dst = tmp_path / "q.onnx"
    r = cli("quantize", hf if source == "hf" else onnx_dir, dst, "--target", "gpu", "--provider", "cuda")
    assert r.exit_code == 2, r.output
    assert CUDA_MESSAGE in _one_line(r.stderr) and NOTHING_ON_GPU in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_session_that_fell_back_to_the_cpu_is_refused(export, monkeypatch):
    """onnxruntime-gpu without the CUDA libraries lists the CUDA provider, then runs on the CPU: the session is
    created for real here (this onnxruntime falls back the same way) and its providers read back."""
    import onnxruntime

    _, onnx_dir, _ = export("roberta-hf")
    sig = describe(onnx_dir)
    real = onnxruntime.get_available_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    with pytest.raises(Unsupported) as e:
        OrtRunner(sig, provider="cuda")
    assert str(e.value).startswith(CUDA_MESSAGE + "onnxruntime ran the graph on CPUExecutionProvider instead"
                                   + NOTHING_ON_GPU)
    runner = OrtRunner(sig, provider="cpu")
    assert runner.provider == "CPUExecutionProvider"
    assert runner.label == "onnxruntime (CPUExecutionProvider, feature-extraction)"
    runner.close()


def test_the_reason_is_what_onnxruntime_logged():
    log = ("2026-01-05 10:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:1992 TryGetProviderInfo_CUDA] "
           "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1637 onnxruntime::Provider& "
           "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
           "libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file\n")
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _failure_reason(both, "CUDAExecutionProvider", "CPUExecutionProvider", log) == (
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open "
        "shared object file")
    banner = ("*************** EP Error ***************\nEP Error CUDA failure 35: CUDA driver version is insufficient "
              "when using ['CUDAExecutionProvider', 'CPUExecutionProvider']\nFalling back to ['CPUExecutionProvider'] "
              "and retrying.\n****************************************\n")
    assert _failure_reason(both, "CUDAExecutionProvider", "CPUExecutionProvider", banner) == (
        "CUDA failure 35: CUDA driver version is insufficient when using ['CUDAExecutionProvider', "
        "'CPUExecutionProvider']")
    assert _failure_reason(["CPUExecutionProvider"], "CUDAExecutionProvider", None, "") == (
        "this onnxruntime has no CUDA execution provider (available: CPUExecutionProvider)")


def test_quantize_says_cuda_only_when_the_session_ran_on_it(export, cli, tmp_path, monkeypatch):
    _, onnx_dir, _ = export("roberta-hf")
    r = cli("quantize", onnx_dir, tmp_path / "a.onnx", "--target", "gpu", "--method", "fp16", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "verified on the CPU execution provider" in out["notes"]
    assert "CPUExecutionProvider" in out["verification"]["runners"]["candidate"]
    # The note follows the provider the session reports, not the flag.
    init = OrtRunner.__init__

    def on_cuda(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.label = self.label.replace("CPUExecutionProvider", "CUDAExecutionProvider")

    monkeypatch.setattr(OrtRunner, "__init__", on_cuda)
    r = cli("quantize", onnx_dir, tmp_path / "b.onnx", "--target", "gpu", "--method", "fp16", "--json")
    assert r.exit_code == 0 and "verified on the CUDA execution provider" in json.loads(r.stdout)["notes"]
