"""Merged decoders (optimum's ``decoder_model_merged.onnx``): one graph whose If node picks the first step (no
past) or a cached one, both branches reading the weights of the main graph.

Some of onnxruntime's tools do not handle the branches (its float16 converter renames a branch's producers but
not the branch outputs, and leaves branches reading Casts it put outside them). For those, the merged graph is
taken apart into the two decoders it was made of, each is transformed alone, and optimum's ``merge_decoders``
joins them again (it stores the weights the two share once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmconv.errors import Unsupported


def is_merged(model: Any) -> bool:
    """Whether ``model`` is a merged decoder: its main graph is one If node on ``use_cache_branch``."""
    nodes = list(model.graph.node)
    return (len(nodes) == 1 and nodes[0].op_type == "If" and list(nodes[0].input) == ["use_cache_branch"]
            and any(i.name == "use_cache_branch" for i in model.graph.input))


def split(model: Any) -> tuple[Any, Any]:
    """The decoder without past and the decoder with past that ``model`` (a merged decoder) holds.

    Each takes the main graph's inputs its branch reads (in the main graph's order) and the main graph's
    initializers it reads, and gives the branch's outputs under the main graph's output names.
    """
    import onnx

    if not is_merged(model):
        raise Unsupported("not a merged decoder (its main graph is not one If node on use_cache_branch)")
    node = model.graph.node[0]
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    inits = {t.name: t for t in model.graph.initializer}
    outer_inputs = [i for i in model.graph.input if i.name != "use_cache_branch"]

    def standalone(branch: Any, name: str) -> Any:
        produced = {o for n in branch.node for o in n.output} | {t.name for t in branch.initializer}
        read = {i for n in _all_nodes(branch) for i in n.input if i} - produced
        inputs = [i for i in outer_inputs if i.name in read]
        used = [inits[n] for n in sorted(read) if n in inits]
        outputs = []
        for main_out, out in zip(model.graph.output, branch.output, strict=True):
            value = onnx.ValueInfoProto()
            value.CopyFrom(main_out)
            value.name = out.name
            outputs.append(value)
        graph = onnx.helper.make_graph(list(branch.node), name, inputs, outputs,
                                       initializer=[*branch.initializer, *used])
        out_model = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        out_model.ir_version = model.ir_version
        return out_model

    return standalone(branches["else_branch"], "decoder"), standalone(branches["then_branch"], "decoder_with_past")


def _all_nodes(graph: Any) -> list[Any]:
    from llmconv.formats.onnx import iter_graphs

    return [n for g in iter_graphs(graph) for n in g.node]


def transform_branches(model: Any, fn: Callable[[Any], Any], *, scratch: Path) -> Any:
    """``fn`` applied to each decoder a merged decoder holds, and the results merged again (optimum's
    ``merge_decoders``, weights the two share stored once). optimum checks the merged model and writes it to
    ``scratch`` (its ``save_path`` is required in practice); the caller saves the returned model where it goes."""
    from optimum.onnx.graph_transformations import merge_decoders

    no_past, with_past = split(model)
    merged = merge_decoders(fn(no_past), fn(with_past), graph_name="merged", strict=False, save_path=scratch)
    for p in (scratch, scratch.with_name(scratch.name + "_data")):
        p.unlink(missing_ok=True)
    merged.ir_version = model.ir_version  # optimum writes 9; keep what the source had (onnxruntime loads it)
    return merged
