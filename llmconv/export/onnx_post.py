"""After an exporter ran: one external data file beside the model, an IR version onnxruntime loads, and the
name record (which initializer holds which checkpoint tensor, :func:`match_checkpoint`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv.errors import Unsupported
from llmconv.formats.onnx import TENSOR_MAP_KEY, NameRecord, import_onnx, iter_graphs, load_graph, load_proto

if TYPE_CHECKING:
    from llmconv.checkpoint import TensorSource

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


def finalize(path: Path, *, data_name: str, external_data: bool, checkpoint: TensorSource | None = None,
             no_record: str | None = None) -> dict[str, Any]:
    """Make the exported model at ``path`` one a user can ship and onnxruntime loads.

    - External data, when there is any, ends up in one file named ``data_name`` beside the model.
    - ``external_data`` moves inline weights out; so does a model too large for one protobuf.
    - An IR version above what the installed onnxruntime loads is lowered to its maximum, when
      the model's opsets allow it.
    - With ``checkpoint``, the name record: which initializer holds each of its tensors
      (:func:`match_checkpoint`), with its config.json.

    Args:
        path: the ``.onnx`` file, changed in place.
        data_name: the name the external data file must have (``<model file name>_data``).
        external_data: store the weights in ``data_name`` even if they would fit inline.
        checkpoint: the checkpoint exported, to record the names of its tensors.
        no_record: instead, record why this graph carries no names (one part of an encoder-decoder).
    Returns:
        ``ir_version``, ``external_data`` (file names), ``ir_lowered_from`` (None if unchanged),
        ``initializers`` and ``parameters`` (their element count), ``name_record`` (None, or ``tensors``,
        ``transposed`` and the ``absent`` names).
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
    summary = None
    if checkpoint is not None or no_record is not None:
        record = match_checkpoint(path, checkpoint) if checkpoint is not None else NameRecord(unavailable=no_record)
        write_name_record(path, record)
        model, inline = _structure(path)
        if checkpoint is not None:
            summary = record.summary()
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
            "initializers": len(names), "parameters": parameters, "name_record": summary}


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


# ---- the name record ----------------------------------------------------------------------------------------------

def match_checkpoint(path: Path, checkpoint: TensorSource) -> NameRecord:
    """Which initializer of the graph at ``path`` holds each tensor of ``checkpoint`` (the weights it was exported
    from), found by hashing: the same bytes as they are, or transposed (``x @ W.T`` folded by the exporter).

    Floating-point checkpoint tensors are compared as float32, the dtype the export runs in. Several checkpoint
    names may share one initializer (tied weights; identical all-ones norm weights the exporter stored once);
    a tensor held by several initializers (GPT-2's embedding, also the transposed head) lists them all, the
    one held as it is first. One tensor at a time is read or transposed: memory stays bounded.

    Args:
        path: the exported ``.onnx`` file.
        checkpoint: the checkpoint exported (its ``config`` is recorded too).
    Returns:
        The NameRecord; tensors no initializer holds are listed with no holder.
    """
    import torch

    from llmconv.checkpoint import dtype_name
    from llmconv.formats.onnx import Holder, RecordedTensor, exported_dtype, open_model

    # Only an initializer of a checkpoint tensor's dtype and shape (as it is, or transposed) can hold it: the others
    # (the graph's own constants) are not read or hashed.
    wanted = {(exported_dtype(i.dtype), tuple(i.shape)) for n, i in checkpoint.infos.items()
              if n not in checkpoint.aliases}
    table: dict[tuple[bytes, torch.dtype, tuple[int, ...]], list[Holder]] = {}
    with open_model(path) as graph:
        for name in graph.names():
            info = graph.infos[name]
            shape = tuple(info.shape)
            as_is, transposed = (info.dtype, shape) in wanted, len(shape) == 2 and (info.dtype, shape[::-1]) in wanted
            if not (as_is or transposed):
                continue
            t = graph.tensor(name)
            if as_is:
                table.setdefault((_digest(t), t.dtype, shape), []).append(Holder(name, "identity"))
            if transposed and t.numel() > 1:
                tt = t.t().contiguous()
                table.setdefault((_digest(tt), t.dtype, tuple(tt.shape)), []).append(Holder(name, "transpose"))
                del tt
            del t
    record = NameRecord(config=checkpoint.config, metadata=dict(checkpoint.metadata),
                        aliases=dict(checkpoint.aliases))
    by_dtype: dict[str, int] = {}
    for name, info in checkpoint.infos.items():
        if name in checkpoint.aliases:
            continue
        t = checkpoint.tensor(name)
        want = exported_dtype(t.dtype)
        as_exported = t.to(want) if t.dtype != want else t
        found = table.get((_digest(as_exported), want, tuple(t.shape)), [])
        del t, as_exported
        # One held as it is before one held transposed; of those, the one carrying the checkpoint's own name
        # first, then the others as the graph lists them (the first is the one a restore reads).
        holders = sorted(found, key=lambda h: (h.transform != "identity", h.initializer != name))
        record.tensors[name] = RecordedTensor(name, dtype_name(info.dtype), tuple(info.shape), tuple(holders))
        if info.dtype.is_floating_point:
            by_dtype[dtype_name(info.dtype)] = by_dtype.get(dtype_name(info.dtype), 0) + info.nbytes
    record.dtype = max(sorted(by_dtype), key=lambda d: by_dtype[d]) if by_dtype else None
    return record


def _digest(t: Any) -> bytes:
    """A hash of a tensor's bytes in row-major order.

    SHA-1 hashes 1.8 GB/s here, BLAKE2b 1.0: the bytes are the user's own export, matched with its own
    checkpoint (dtype and shape must agree too), so speed matters and collision resistance does not.
    """
    import hashlib

    import torch

    flat = t.contiguous().reshape(-1)
    return hashlib.sha1(flat.view(torch.uint8).numpy() if flat.numel() else b"", usedforsecurity=False).digest()


def write_name_record(path: Path, record: NameRecord) -> None:
    """Store ``record`` in the graph at ``path`` as its ``llmconv.tensor_map`` metadata entry.

    A ModelProto is a sequence of fields, and a repeated field may appear anywhere: the entry is appended
    to the file (nothing else is read or rewritten, whatever the model's size) unless the graph already
    has one, which is then replaced.
    """
    import json

    from llmconv.formats.onnx import _encode_varint

    value = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    view = load_graph(path)
    try:
        present = any(p.key == TENSOR_MAP_KEY for p in view.model.metadata_props)
    finally:
        view.close()
    if present:
        onnx = import_onnx()
        model = load_proto(path)  # external references are kept as they are
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != TENSOR_MAP_KEY]
        del model.metadata_props[:]
        for k, v in [*kept, (TENSOR_MAP_KEY, value)]:
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save_model(model, str(path))
        return
    key, text = TENSOR_MAP_KEY.encode(), value.encode("utf-8")
    entry = b"\x0a" + _encode_varint(len(key)) + key + b"\x12" + _encode_varint(len(text)) + text
    with open(path, "ab") as fh:
        fh.write(b"\x72" + _encode_varint(len(entry)) + entry)  # ModelProto field 14, metadata_props


def drop_name_record(path: Path, *, why: str) -> None:
    """Replace the name record of the graph at ``path`` (if it has one) by one saying why there is none.

    For a transform that replaces initializers (``llmconv quantize``): the record would name weights the graph
    no longer holds as they were, and a restore must say so rather than find out.
    """
    from llmconv.errors import CorruptInput
    from llmconv.formats.onnx import name_record_values, parse_name_record

    found = name_record_values(path)
    if not found:
        return
    try:
        if len(found) == 1 and parse_name_record(found[0], path=path).unavailable is not None:
            return  # it already says why
    except CorruptInput:
        pass  # a malformed record is replaced all the same
    write_name_record(path, NameRecord(unavailable=why))
