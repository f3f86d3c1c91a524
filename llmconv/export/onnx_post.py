"""After an exporter ran: one external data file beside the model, and an IR version onnxruntime loads."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmconv.errors import Unsupported
from llmconv.formats.onnx import import_onnx, iter_graphs, load_graph, load_proto

PROTOBUF_LIMIT = 2**31 - 1  # bytes: a ModelProto larger than this cannot be serialized
_EXTERNAL = 1
_SIZE_THRESHOLD = 1024  # tensors smaller than this stay inline (onnx's own default)


@functools.lru_cache(maxsize=1)
def ort_max_ir_version() -> int:
    """The highest ONNX IR version the installed onnxruntime loads, found by asking it.

    A one-node model is offered at decreasing IR versions (a few milliseconds in all); the
    onnxruntime release notes are not machine-readable, and a table here would go stale.
    """
    onnx = import_onnx()
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 3, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.InvalidProtobuf):
            continue
        return ir
    raise Unsupported("the installed onnxruntime loads no ONNX IR version from 4 up",
                      hint="reinstall onnxruntime: pip install -U onnxruntime")


def external_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model that may hold external data (initializers and Constant values)."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == 4:  # TENSOR
                    yield attr.t
                elif attr.type == 9:  # TENSORS
                    yield from attr.tensors


def external_locations(model: Any) -> set[str]:
    out = set()
    for t in external_tensors(model):
        if t.data_location == _EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    out.add(e.value)
    return out


def finalize(path: Path, *, data_name: str, external_data: bool) -> dict[str, Any]:
    """Make the exported model at ``path`` one a user can ship and onnxruntime loads.

    - External data, when there is any, ends up in one file named ``data_name`` beside the model.
    - ``external_data`` moves inline weights out; so does a model too large for one protobuf.
    - An IR version above what the installed onnxruntime loads is lowered to its maximum, when
      the model's opsets allow it.

    Args:
        path: the ``.onnx`` file, changed in place.
        data_name: the name the external data file must have (``<model file name>_data``).
        external_data: store the weights in ``data_name`` even if they would fit inline.
    Returns:
        ``ir_version``, ``external_data`` (file names), ``ir_lowered_from`` (None if unchanged),
        ``initializers`` and ``parameters`` (their element count).
    Example:
        >>> finalize(Path("out/model.onnx"), data_name="model.onnx_data", external_data=False)
    """
    onnx = import_onnx()
    folder = path.parent
    model, inline = _structure(path)
    locations = external_locations(model)
    if locations and locations != {data_name}:
        # Exporters may spread weights over one file per tensor, or name the file after a temporary
        # model name: gather them into the one file the model's name implies.
        full = load_proto(path, external=True)
        _save_external(onnx, full, path, data_name, threshold=0)  # what was external stays external
        del full
        for loc in locations - {data_name}:
            (folder / loc).unlink(missing_ok=True)
        model, inline = _structure(path)
        locations = external_locations(model)
    elif not locations and (external_data or inline >= PROTOBUF_LIMIT):
        full = load_proto(path)
        _save_external(onnx, full, path, data_name, threshold=_SIZE_THRESHOLD)
        del full
        model, inline = _structure(path)
        locations = external_locations(model)

    lowered_from = None
    max_ir = ort_max_ir_version()
    if model.ir_version > max_ir:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        if needed > max_ir:
            import onnxruntime as ort

            raise Unsupported(f"the exported model's opsets need ONNX IR version {needed}, but onnxruntime "
                              f"{ort.__version__} loads IR versions up to {max_ir}", path=path,
                              hint="export with a lower --opset, or upgrade onnxruntime")
        lowered_from = int(model.ir_version)
        full = load_proto(path)  # external references are kept as they are
        full.ir_version = max_ir
        onnx.save_model(full, str(path))
        del full
        model, inline = _structure(path)
    from llmconv.verification.runners import remember_graph

    remember_graph(path, model)
    names: set[str] = set()
    parameters = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.name not in names:
                names.add(t.name)
                n = 1
                for d in t.dims:
                    n *= int(d)
                parameters += n
    return {"ir_version": int(model.ir_version), "external_data": sorted(locations), "ir_lowered_from": lowered_from,
            "initializers": len(names), "parameters": parameters}


def _structure(path: Path) -> tuple[Any, int]:
    """The model's structure (no inline weight bytes) and how many inline weight bytes it holds."""
    view = load_graph(path)
    try:
        return view.model, sum(s[1] for s in view.spans if s is not None)
    finally:
        view.close()


def _save_external(onnx: Any, model: Any, path: Path, data_name: str, *, threshold: int) -> None:
    target = path.parent / data_name
    if target.exists() or target.is_symlink():
        os.unlink(target)  # onnx appends to an existing data file (or to what a link points at)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=threshold, convert_attribute=False)


def rename_model(path: Path, new_name: str) -> Path:
    """Rename an exported model file and its external data file (``<name>_data``) in its folder.

    Returns:
        The new path of the model.
    """
    if path.name == new_name:
        return path
    onnx = import_onnx()
    model = load_proto(path)
    new_path = path.with_name(new_name)
    locations = external_locations(model)
    if locations:
        data_name = f"{new_name}_data"
        if len(locations) == 1:
            (path.parent / next(iter(locations))).rename(path.parent / data_name)
            for t in external_tensors(model):
                if t.data_location == _EXTERNAL:
                    for e in t.external_data:
                        if e.key == "location":
                            e.value = data_name
            onnx.save_model(model, str(new_path))
            path.unlink()
            return new_path
        model = load_proto(path, external=True)
        _save_external(onnx, model, new_path, data_name, threshold=0)
        for loc in locations:
            (path.parent / loc).unlink(missing_ok=True)
        path.unlink()
        return new_path
    path.rename(new_path)
    return new_path
