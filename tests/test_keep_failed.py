"""--keep-failed DIR (llmconv.io.keep_failed): an output that fails verification is kept outside DST, with its report.

Verification is made to fail for real: int8 graphs checked with atol 1e-9 or 1e-7, an fp16 cast with atol 0, a pruned
model held to top-1 agreement 1.0, an export of a model whose weights hold NaN.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import llmconv
from llmconv.errors import DestinationError, NotEquivalent, UsageError
from llmconv.io import keep_failed, onnx_named_files
from tests.transforms import _models


@pytest.fixture(scope="module")
def onnx_fx(fixtures_dir, fx):
    return lambda name: _models.exported(fixtures_dir, fx, name)


def _report(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _cast(src, dst, keep):
    """An fp16 cast of weights checked bit for bit (atol 0): always fails, cheaply."""
    with keep_failed(keep), pytest.raises(NotEquivalent) as e:
        llmconv.quantize(src, dst, target="gpu", method="fp16", atol=0.0, rtol=0.0)
    return e.value


def _two_matmuls(folder):
    """X[b, 64] -> MatMul -> Relu -> MatMul -> Y[b, 16], weights in model.onnx.data, and inputs for it: int8 cannot
    meet atol 1e-9 however many of its two nodes the fallback keeps in float (at most a quarter: one)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    folder.mkdir()
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (64, 64)), ("W2", (64, 16)))]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("MatMul", ["R", "W2"], ["Y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    np.savez(folder.parent / "x.npz", X=rng.standard_normal((8, 64)).astype(np.float32))
    return folder, folder.parent / "x.npz"


def test_quantize_keeps_the_closest_attempt_with_its_data_and_report(tmp_path):
    import onnx

    src, x = _two_matmuls(tmp_path / "two")
    dst, kept = tmp_path / "out" / "q.onnx", tmp_path / "kept"
    with keep_failed(kept), pytest.raises(NotEquivalent) as e:
        llmconv.quantize(src, dst, target="cpu", atol=1e-9, rtol=0.0, inputs=x)  # --method auto: the fallback chain
    err = e.value
    assert err.exit_code == 1 and err.kept == kept / "q.onnx"
    assert str(err).endswith(f"nothing was written; the failed output is kept at {kept / 'q.onnx'}, its report at "
                             f"{kept / 'q.onnx.report.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "two", "x.npz"]  # DST absent, no scratch left
    assert sorted(p.name for p in kept.iterdir()) == ["q.onnx", "q.onnx.data", "q.onnx.report.json"]
    assert onnx_named_files(kept / "q.onnx") == [kept / "q.onnx.data"]
    report = _report(kept / "q.onnx.report.json")
    assert report["ok"] is False and report["error"]["code"] == 1 and report["error"]["message"] == str(err)
    assert report["kept"]["for"] == str(dst.resolve()) and report["kept"]["output"] == str(kept / "q.onnx")
    attempts = report["attempts"]
    assert len(attempts) >= 3 and all(a["passed"] is False for a in attempts)
    assert len({a["summary"] for a in attempts}) > 1  # the attempts' graphs differ: which one is kept matters
    closest = str(err).split("(closest: ", 1)[1].split(")", 1)[0]
    [chosen] = [a for a in attempts if a["setting"] == closest]
    # The graph kept is the one the error reports on: it has that attempt's nodes left in float, and verified
    # again on the same inputs it gives that attempt's figures.
    graph = onnx.load(str(kept / "q.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMul" for n in graph.node) == len(chosen["kept_float"])
    again = llmconv.verify(src, kept / "q.onnx", profile="int8", atol=1e-9, rtol=0.0, inputs=x)
    assert not again.passed
    assert again.summary() == chosen["summary"]
    assert [c.figures["max_abs"] for c in again.checks] == [c["max_abs"] for c in report["checks"]]


def test_verify_keeps_its_report_and_the_inputs_that_rerun_the_failure(onnx_fx, cli, tmp_path):
    src = onnx_fx("llama-hf")
    cand = tmp_path / "q.onnx"
    llmconv.quantize(src, cand, target="cpu", method="int8-dynamic", verify=False)
    kept = tmp_path / "kept"
    with keep_failed(kept):
        report = llmconv.verify(src, cand, profile="int8", atol=1e-7, rtol=0.0, decode_steps=0, generate=0)
    assert not report.passed and report.failures()[0].name == "logits"
    shapes = report.inputs["shapes"]
    inputs = [kept / f"q.onnx.inputs-{i}.npz" for i in range(1, len(shapes) + 1)]
    assert sorted(kept.iterdir()) == sorted([kept / "q.onnx.report.json", *inputs])
    assert report.extra["kept"]["report"] == str(kept / "q.onnx.report.json")
    assert any(n.startswith(f"the report is kept at {kept / 'q.onnx.report.json'}") for n in report.notes)
    saved = _report(kept / "q.onnx.report.json")
    assert saved["ok"] is False and saved["kept"]["inputs"] == [str(p) for p in inputs]
    assert [list(np.load(p)["input_ids"].shape) for p in inputs] == shapes
    assert not any(k.startswith("past_key_values") for k in np.load(inputs[0]).files)
    # The first file reruns the failure through the CLI, on exactly those arrays.
    r = cli("verify", src, cand, "--profile", "int8", "--atol", "1e-7", "--rtol", "0", "--inputs", inputs[0],
            "--decode-steps", "0", "--generate", "0", "--json")
    assert r.exit_code == 1, r.output
    rerun = json.loads(r.stdout)
    assert rerun["inputs"]["file"] == str(inputs[0]) and rerun["inputs"]["shapes"][0] == shapes[0]
    assert next(c for c in rerun["checks"] if not c["passed"])["name"] == "logits"


def test_prune_of_an_hf_folder_keeps_the_folder(fx, tmp_path):
    dst, kept = tmp_path / "pruned", tmp_path / "kept"
    with keep_failed(kept), pytest.raises(NotEquivalent, match="fails the quality check") as e:
        llmconv.prune(fx("llama-hf"), dst, sparsity=0.5, pattern="rows", min_top1=1.0, decode_steps=0, generate=0)
    assert e.value.kept == kept / "pruned" and f"the failed output is kept at {kept / 'pruned'}" in str(e.value)
    assert not dst.exists() and sorted(p.name for p in kept.iterdir()) == ["pruned", "pruned.report.json"]
    assert (kept / "pruned" / "config.json").is_file() and (kept / "pruned" / "tokenizer.json").is_file()
    from safetensors.numpy import load_file

    w = load_file(kept / "pruned" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    zero_rows = int((~w.any(axis=1)).sum())
    assert zero_rows == w.shape[0] // 2  # the pruned weights, as the report judged them
    report = _report(kept / "pruned.report.json")
    assert report["profile"] == "quality" and report["kept"]["for"] == str(dst.resolve())


def test_convert_to_onnx_keeps_the_graph_and_its_data_file(fx, tmp_path):
    dst, kept = tmp_path / "nan.onnx", tmp_path / "kept"
    with keep_failed(kept), pytest.raises(NotEquivalent, match="outputs differ from PyTorch's") as e:
        llmconv.convert(fx("llama-hf-nan"), dst, external_data=True)  # the export's own check fails (NaN)
    assert e.value.kept == kept / "nan.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in kept.iterdir()) == ["nan.onnx", "nan.onnx.report.json", "nan.onnx_data"]
    assert onnx_named_files(kept / "nan.onnx") == [kept / "nan.onnx_data"]
    report = _report(kept / "nan.onnx.report.json")
    assert report["checks"][0]["nan"] > 0 and report["kept"]["files"] == ["nan.onnx", "nan.onnx_data",
                                                                           "nan.onnx.report.json"]


def test_a_second_failure_replaces_only_what_llmconv_kept_for_that_destination(fx, tmp_path):
    src, kept = fx("llama.safetensors"), tmp_path / "kept"
    dst = tmp_path / "a" / "m.safetensors"
    first = _cast(src, dst, kept)
    assert first.kept == kept / "m.safetensors" and not dst.exists()
    inode = (kept / "m.safetensors").stat().st_ino
    assert _cast(src, dst, kept).kept == kept / "m.safetensors"  # the same destination: replaced
    again = (kept / "m.safetensors").stat().st_ino
    assert again != inode
    assert sorted(p.name for p in kept.iterdir()) == ["m.safetensors", "m.safetensors.report.json"]
    # Another destination of the same name: what is in DIR was not kept for it, and stays.
    with keep_failed(kept), pytest.raises(DestinationError, match="m.safetensors is there, and llmconv did not "
                                                                  "keep it for") as e:
        llmconv.quantize(src, tmp_path / "b" / "m.safetensors", target="gpu", method="fp16", atol=0.0, rtol=0.0)
    assert e.value.exit_code == 2 and (kept / "m.safetensors").stat().st_ino == again
    # Nor is a file the user put there.
    (kept / "other.safetensors").write_bytes(b"mine")
    with keep_failed(kept), pytest.raises(DestinationError, match="other.safetensors is there"):
        llmconv.quantize(src, tmp_path / "other.safetensors", target="gpu", method="fp16")
    assert (kept / "other.safetensors").read_bytes() == b"mine"
    assert not (tmp_path / "b").exists() and not (tmp_path / "other.safetensors").exists()
    # A file that appears there during the run is not replaced either: the output is removed, as without the block.
    late = tmp_path / "c" / "late.safetensors"

    def put_a_file_there(_written):
        if not (kept / late.name).exists():
            (kept / late.name).write_bytes(b"theirs")

    with keep_failed(kept), pytest.raises(NotEquivalent) as e:
        llmconv.quantize(src, late, target="gpu", method="fp16", atol=0.0, rtol=0.0, progress=put_a_file_there)
    assert e.value.kept is None and (kept / late.name).read_bytes() == b"theirs"
    assert str(e.value).endswith(f"the failed output could not be kept in {kept}: {kept / late.name} is there, and "
                                 f"llmconv did not keep it for {late}")
    assert not (tmp_path / "c").exists() and not list(kept.glob(f"{late.name}.*"))


def test_folders_that_would_destroy_an_input_or_the_destination_are_refused(fx, fx_copy, tmp_path):
    src = fx_copy("llama-hf")  # a private copy: a wrong check would write into it
    st = fx_copy("llama.safetensors")
    dst = tmp_path / "out"
    cases = [
        (src, dst, src / "kept", "the folder for failed outputs lies inside the folder of the model"),
        (src, dst, src, "the folder for failed outputs is the model"),
        (src, dst, dst, "the folder for failed outputs is the destination"),
        (src, dst, dst / "kept", "the folder for failed outputs lies inside the destination"),
        (st, tmp_path / "x" / "y.safetensors", tmp_path / "x", "would be the destination"),
        # DIR/NAME would be the source itself.
        (st, tmp_path / "elsewhere" / st.name, st.parent, f"would replace a file the command reads: {st.name} is {st}"),
    ]
    for s, d, keep, message in cases:
        with keep_failed(keep), pytest.raises(DestinationError, match=re.escape(message)) as e:
            llmconv.prune(s, d, sparsity=0.5)
        assert e.value.exit_code == 2 and str(keep) in str(e.value)
    assert not (src / "kept").exists() and not dst.exists() and not (tmp_path / "elsewhere").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="--keep-failed takes a folder"), keep_failed(tmp_path / "file"):
        pass
    # verify: neither model may hold the folder.
    with keep_failed(src / "kept"), pytest.raises(DestinationError, match="lies inside the folder of the model"):
        llmconv.verify(src, st)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in fx("llama-hf").iterdir())


def test_other_failures_keep_nothing(onnx_fx, tmp_path):
    """A failure that is not a verdict (here bad --inputs, seen after the graph was made) removes the output as
    before; the folder made for keeping is removed again."""
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((1, 4), dtype=np.int64), surprise=np.zeros(3))
    kept = tmp_path / "kept" / "deeper"
    with keep_failed(kept), pytest.raises(UsageError, match="arrays the models do not take: surprise") as e:
        llmconv.quantize(onnx_fx("llama-hf"), tmp_path / "q.onnx", target="cpu", method="int8-dynamic", inputs=bad)
    assert e.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]
    # Outside a keep_failed block a failed verification keeps nothing, and says nothing of it.
    with pytest.raises(NotEquivalent) as e2:
        llmconv.quantize(onnx_fx("llama-hf"), tmp_path / "q.onnx", target="cpu", method="int8-dynamic",
                         atol=1e-7, rtol=0.0)
    assert e2.value.kept is None and "kept" not in str(e2.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]
