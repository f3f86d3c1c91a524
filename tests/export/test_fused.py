"""llmconv.export.fused: which models get a fused graph, and the graph it writes on its own."""

from __future__ import annotations

import json

import onnx
import pytest

from llmconv.export import fused
from llmconv.export.tasks import transformers_view

pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize(("config", "reason"), [
    ({"architectures": ["LlamaForCausalLM"]}, None),
    ({"architectures": ["Qwen3ForCausalLM"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),
    ({"architectures": ["OlmoForCausalLM"]}, "OlmoForCausalLM is not among the architectures"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling 'yarn' is not fused"),
    ({"model_type": "gpt2"}, "gpt2 is not among"),
])
def test_unfused_reason(config, reason):
    got = fused.unfused_reason(config)
    assert (got is None) if reason is None else (reason in got)


def test_the_graph_alone_names_its_cache_shape_and_is_exact_against_pytorch(fx, tmp_path, cli):
    """No config.json beside it: the head size is in the cache's shapes; float32 within the fp32 profile,
    its prompts decoded one at a time."""
    src = fx("llama-hf")
    with transformers_view(src) as view:
        model = fused.build(view, tmp_path / "g", target="cpu", source=src)
    assert not (model.parent / "config.json").exists()
    past = next(i for i in onnx.load(str(model), load_external_data=False).graph.input
                if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[3].dim_value == 16
    r = cli("verify", src, model, "--profile", "fp32", "--json")
    assert r.exit_code == 0, r.stdout
    report = json.loads(r.stdout)
    cache = next(c for c in report["checks"] if c["name"] == "decode.cache")
    assert cache["passed"] and cache["shape"][0] == 40  # every prompt's cache (13 when only unpadded rows count)


def test_verify_takes_a_builder_folder_as_the_builder_writes_it(fx, tmp_path, cli):
    """The builder's own folder has genai_config.json and no config.json, and leaves the head size a symbol:
    verify reads the cache's shape from genai_config.json (users of the builder get a gate too)."""
    src = fx("llama-hf")
    with transformers_view(src) as view:
        model_path = fused.build(view, tmp_path / "b", target="cpu", source=src)
    model = onnx.load(str(model_path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(model, str(model_path))
    r = cli("verify", src, tmp_path / "b", "--profile", "fp32")
    assert r.exit_code == 0, r.stdout + r.stderr
    (tmp_path / "b" / "genai_config.json").unlink()
    r = cli("verify", src, tmp_path / "b", "--profile", "fp32")
    assert r.exit_code == 2 and "past key/values of unknown shape" in r.stderr


def test_decode_batched_catches_a_graph_that_ignores_the_mask_on_decode_steps(fx, tmp_path, cli):
    """Each prompt alone is right, a right-padded batch (how onnxruntime-genai batches) is wrong: on decode steps
    this graph takes every row's length as the batch's longest. Only decode.batched sees it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    src = fx("llama-hf")
    with transformers_view(src) as view:
        model_path = fused.build(view, tmp_path / "b", target="cpu", source=src)
    model = onnx.load(str(model_path))
    nodes = list(model.graph.node)
    sub = next(n for n in nodes if n.op_type == "Sub" and "attn_mask" in n.name)  # seqlens_k = sum(mask) - 1
    seqlens, sub.output[0] = sub.output[0], "seqlens_true"
    for name, value in (("k1", [1]), ("k1s", 1)):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    wrong = [
        helper.make_node("Shape", ["attention_mask"], ["am_shape"]),
        helper.make_node("ConstantOfShape", ["am_shape"], ["ones"], value=helper.make_tensor("v", TensorProto.INT64,
                                                                                              [1], [1])),
        helper.make_node("ReduceSum", ["ones", "k1"], ["total"], keepdims=0),
        helper.make_node("Sub", ["total", "k1s"], ["seqlens_all"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "k1s"], ["ids_len"], axis=0),
        helper.make_node("Equal", ["ids_len", "k1s"], ["is_decode"]),
        helper.make_node("Where", ["is_decode", "seqlens_all", "seqlens_true"], [seqlens]),
    ]
    at = nodes.index(sub) + 1
    for k, node in enumerate(wrong):
        model.graph.node.insert(at + k, node)
    (tmp_path / "b" / "model.onnx.data").unlink()
    onnx.save(model, str(model_path), save_as_external_data=True, location="model.onnx.data")
    r = cli("verify", src, tmp_path / "b", "--profile", "fp32", "--json")
    assert r.exit_code == 1, r.stdout
    failed = {c["name"] for c in json.loads(r.stdout)["checks"] if not c["passed"]}
    assert failed == {"decode.batched"}
