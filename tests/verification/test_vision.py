"""Image models (ViT, ResNet): export, pixel_values made as the image processor makes them, the verdict on
class scores and features, `verify --inputs` with pixel_values, quantize; and graphs that onnxruntime
cannot run at the shapes users hit (batch 1, one token), which now fail verification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmconv.errors import GraphRunError, UsageError
from llmconv.verification.inputs import (
    ImageSpec,
    InputPlan,
    feed_shapes,
    image_spec,
    load_inputs,
    synthetic_inputs,
)
from llmconv.verification.metrics import OutputComparison
from llmconv.verification.profiles import outputs_profile
from llmconv.verification.runners import describe
from tests.export import _exports


@pytest.fixture(scope="module")
def vision(fixtures_dir, fx):
    """``vision(kind, task=None)`` -> (hf folder, ONNX folder): the export is verified as it is made."""
    return lambda kind, task=None: (fx(f"{kind}-hf"), _exports.export(fixtures_dir, fx, f"{kind}-hf", task)[0])


@pytest.mark.parametrize("kind", _exports.VISION)
def test_onnxruntime_logits_equal_pytorch(vision, kind):
    """Outside llmconv: the exported graph in onnxruntime against AutoModelForImageClassification."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageClassification

    hf, onnx_dir = vision(kind)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["logits"], {"pixel_values": pixels})
    model = AutoModelForImageClassification.from_pretrained(hf, trust_remote_code=False).eval()
    with torch.inference_mode():
        theirs = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    assert ours.shape == (3, 5)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("kind", "mean", "std"), [("vit", 0.5, 0.5), ("resnet", 0.485, 0.229)])
def test_both_sides_describe_an_image_model(vision, kind, mean, std):
    hf, onnx_dir = vision(kind)
    ref, cand = describe(hf), describe(onnx_dir)
    assert ref.inputs == cand.inputs == {"pixel_values"}
    assert ref.task == cand.task == "image-classification"
    assert ref.vocab_size is None and cand.vocab_size is None
    for sig in (ref, cand):
        assert (sig.image.num_channels, sig.image.height, sig.image.width) == (3, 32, 32)
        assert sig.image.mean[0] == pytest.approx(mean) and sig.image.std[0] == pytest.approx(std)
    # ViT's config says its image size; ResNet's only its image processor does (shortest_edge 32).
    assert ref.image.size_from == ("config.json image_size" if kind == "vit" else "preprocessor_config.json")


def test_pixel_values_are_those_an_image_processor_makes(vision):
    plan = InputPlan(wants={"pixel_values"}, image=describe(vision("vit")[0]).image)
    feeds = synthetic_inputs(plan, batch=2, seq_len=16, samples=2, seed=4)
    assert feed_shapes(feeds) == [[2, 3, 32, 32], [1, 3, 32, 32]] and len(feeds) == 3  # then one image alone
    again = synthetic_inputs(plan, batch=2, seq_len=16, samples=2, seed=4)
    assert all(np.array_equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(feeds, again, strict=True))
    px = feeds[0]["pixel_values"]
    assert px.dtype == np.float32 and px.min() >= -1 and px.max() <= 1  # (x / 255 - 0.5) / 0.5
    pixels = (px.astype(np.float64) * 0.5 + 0.5) * 255  # back to whole pixel values, every one of 0..255 possible
    assert np.allclose(pixels, np.round(pixels), atol=1e-3) and pixels.min() < 5 and pixels.max() > 250
    assert not np.array_equal(px, synthetic_inputs(plan, batch=2, seq_len=16, samples=2, seed=5)[0]["pixel_values"])
    assert len(synthetic_inputs(plan, batch=1, seq_len=16, samples=2, seed=4)) == 2  # batch 1 asked for already


def test_image_spec_from_the_processor_or_the_defaults(tmp_path):
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    bare = image_spec({"num_channels": 3}, tmp_path)  # no image_size, no preprocessor_config.json
    assert (bare.height, bare.width, bare.fixed_size) == (224, 224, False)
    assert bare.mean == tuple(IMAGENET_DEFAULT_MEAN) and bare.std == tuple(IMAGENET_DEFAULT_STD)
    assert bare.rescale_factor == pytest.approx(1 / 255)
    proc = tmp_path / "preprocessor_config.json"
    proc.write_text(json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 200, "width": 180},
                                "image_mean": 0.4, "image_std": [0.2], "rescale_factor": 0.5}))
    cropped = image_spec({"num_channels": 3}, tmp_path)
    assert (cropped.height, cropped.width) == (200, 180) and cropped.mean == (0.4,) * 3 and cropped.std == (0.2,) * 3
    assert cropped.rescale_factor == 0.5
    proc.write_text(json.dumps({"size": {"height": 64, "width": 48}, "do_normalize": False, "do_rescale": False}))
    plain = image_spec({}, tmp_path, graph_dims=[None, 1, None, None])
    assert (plain.num_channels, plain.height, plain.width, plain.mean, plain.rescale_factor) == (1, 64, 48, None, None)
    assert image_spec({}, tmp_path, graph_dims=[None, 3, 40, 40]).fixed_size  # the graph's own static size wins
    proc.write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    with pytest.raises(UsageError, match="preprocessor_config.json: image_mean has 2 values for 3 channels"):
        image_spec({"num_channels": 3}, tmp_path)


def test_top5_is_not_judged_over_five_classes_or_fewer():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 5))
    cand = ref.copy()
    cand[0] = -ref[0]  # row 0's top class becomes its last
    cmp = OutputComparison("logits", profile=outputs_profile("int8"), logits=True)
    cmp.add(ref, cand)
    figs = cmp.check().figures
    assert figs["top1_agreement"] == 0.75 and figs["top5_agreement"] is None and figs["kl"] > 0
    assert "top-1 agreement 0.7500 < 0.9" in cmp.check().reason and "top-5" not in cmp.check().reason
    wide = OutputComparison("logits", profile=outputs_profile("int8"), logits=True)
    wide.add(rng.standard_normal((4, 6)), rng.standard_normal((4, 6)))
    assert wide.check().figures["top5_agreement"] is not None


@pytest.mark.parametrize("kind", _exports.VISION)
def test_verify_json_judges_class_scores(vision, cli, kind):
    hf, onnx_dir = vision(kind)
    r = cli("verify", hf, onnx_dir, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    check, weights = out["checks"]  # then the graph's weights against the checkpoint's (its name record)
    assert weights["name"] == "weights" and weights["passed"] and weights["equal"]
    assert check["name"] == "logits" and check["passed"] and check["shape"] == [2, 5]
    assert check["top1_agreement"] == 1.0 and check["top5_agreement"] is None and check["max_abs"] < 1e-4
    assert out["runners"] == {"reference": "torch (image-classification)",
                              "candidate": "onnxruntime (CPUExecutionProvider, image-classification)"}


@pytest.mark.parametrize("kind", _exports.VISION)
def test_feature_extraction_compares_the_features(vision, cli, kind):
    hf, onnx_dir = vision(kind, "feature-extraction")
    r = cli("verify", hf, onnx_dir, "--json")
    assert r.exit_code == 0, r.output
    check, weights = json.loads(r.stdout)["checks"]
    assert weights["name"] == "weights" and weights["passed"]
    assert check["name"] == "last_hidden_state" and check["passed"] and check["top1_agreement"] is None
    assert check["shape"] == ([2, 17, 64] if kind == "vit" else [2, 32, 4, 4])  # 16 patches and [CLS]


def test_verify_inputs_takes_pixel_values(vision, cli, tmp_path):
    hf, onnx_dir = vision("resnet")
    path = tmp_path / "images.npz"
    np.savez(path, pixel_values=np.random.default_rng(1).standard_normal((3, 3, 40, 48)))  # float64: cast
    r = cli("verify", hf, onnx_dir, "--inputs", path, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # The user's images, then the first of them alone (every verification tries batch 1).
    assert out["inputs"] == {"batch": 3, "seq_len": None, "samples": 2, "seed": None, "file": str(path),
                             "shapes": [[3, 3, 40, 48], [1, 3, 40, 48]]}
    assert out["checks"][0]["shape"] == [3, 5]


@pytest.mark.parametrize(("arrays", "message"), [
    ({"pixel_values": np.zeros((2, 3, 32), np.float32)}, r"shape \[batch, channels, height, width\], not \[2, 3, 32\]"),
    ({"pixel_values": np.zeros((2, 1, 32, 32), np.float32)}, "has 1 channels but the model takes 3"),
    ({"pixel_values": np.zeros((2, 3, 32, 32), np.uint8)}, "pixel_values must be a float array"),
    ({"pixel_values": np.full((1, 3, 32, 32), np.nan, np.float32)}, "holds 3072 NaN or Inf values"),
    ({"pixel_values": np.zeros((1, 3, 64, 64), np.float32)},
     r"holds 64x64 images but the model takes 32x32 \(config.json image_size\)"),
    ({"input_ids": np.zeros((1, 4), np.int64)}, "arrays the models do not take: input_ids"),
])
def test_load_inputs_refuses_bad_pixel_values(tmp_path, arrays, message):
    plan = InputPlan(wants={"pixel_values"}, image=ImageSpec(3, 32, 32, fixed_size=True,
                                                             size_from="config.json image_size"))
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        load_inputs(tmp_path / "in.npz", plan)


def _quantize(cli, src, dst, method):
    r = cli("quantize", src, dst, "--target", "cpu", "--method", method, "--json")
    return r, json.loads(r.stdout)


@pytest.mark.parametrize(("kind", "method", "quantized_op"), [
    ("vit", "int8-dynamic", "MatMulInteger"), ("vit", "fp16", None), ("vit", "int4", "MatMulNBits"),
    ("resnet", "int8-dynamic", "MatMulInteger"), ("resnet", "fp16", None),
])
def test_quantize_vision_graphs(vision, cli, tmp_path, kind, method, quantized_op):
    r, out = _quantize(cli, vision(kind)[1], tmp_path / "q", method)
    assert r.exit_code == 0, r.output
    assert out["verified"] and out["verification"]["checks"][0]["top1_agreement"] == 1.0
    if quantized_op:
        assert out["ops_after"].get(quantized_op)


def test_int4_on_a_graph_of_convolutions_says_there_is_nothing_to_quantize(vision, cli, tmp_path):
    r, out = _quantize(cli, vision("resnet", "feature-extraction")[1], tmp_path / "q", "int4")
    assert r.exit_code == 2 and not (tmp_path / "q").exists()
    assert out["error"]["message"].endswith("the graph has no MatMul/Gemm node with a float32 weight for int4 to "
                                            "quantize (its weights feed Conv nodes) (use --method fp16)")


@pytest.fixture(scope="module")
def moe(fixtures_dir, fx):
    """MoE fixtures exported through torch.onnx with their routing baked in, not verified."""
    return lambda name: (fx(name), _exports.export(fixtures_dir, fx, name, verify=False)[0])


@pytest.mark.parametrize("name", ["mixtral-hf", "qwen2moe-hf"])
def test_a_graph_that_crashes_on_one_token_fails_verification(moe, cli, name):
    """A candidate that crashes is a failed verification (exit 1, the report's one check ``runs``)."""
    hf, onnx_dir = moe(name)
    r = cli("verify", hf, onnx_dir)
    assert r.exit_code == 1, r.output
    assert "the candidate does not run in onnxruntime: Split node /inner/model/layers.0/" in r.output
    assert "Split size 1 exceeds the remaining size" in r.output and "on inputs of shape [1, 1]" in r.output


def test_graph_run_error_names_op_node_and_shape(moe):
    from llmconv.verification.outputs import compare_outputs

    hf, onnx_dir = moe("mixtral-hf")
    with pytest.raises(GraphRunError) as caught:  # the graph as the reference: the user's input, an error
        compare_outputs(onnx_dir, hf, decode_steps=0, generate=0)
    e = caught.value
    assert e.op == "Split" and e.node == "/inner/model/layers.0/block_sparse_moe/Split" and e.shape == [1, 1]
    assert e.detail.startswith("Invalid value in 'split'. Split size 1 exceeds") and e.path.name == "model.onnx"
    bare = GraphRunError(op=None, node=None, detail="some failure", shape=None)
    assert str(bare) == "onnxruntime cannot run the graph: some failure"
