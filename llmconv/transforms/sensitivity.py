"""Which quantized nodes add the most error: measured by running both graphs, not guessed from names.

Both the float graph and a quantized one are run on the verifier's inputs with every linear layer's
input and output exposed (onnxruntime's quantizers keep those tensor names). A node's own share of the
error is how much its output drifts from the float graph beyond the drift already in its input:
``rel(out) - rel(in)``, with ``rel`` the relative L2 difference. An embedding (Gather) has exact
inputs, so its share is its output's drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEASURE_BATCH = 2
MEASURE_SEQ_LEN = 16
MEASURE_SAMPLES = 2


@dataclass(frozen=True)
class NodeError:
    """One quantizable node and the error it adds.

    Attributes:
        node: the node's name in the float graph (as ``name_nodes`` names it).
        op: ``MatMul``, ``Gemm`` or ``Gather``.
        input_drift: relative L2 difference of its activation input (0 for an embedding).
        output_drift: relative L2 difference of its output.
    """

    node: str
    op: str
    input_drift: float
    output_drift: float

    @property
    def added(self) -> float:
        return max(self.output_drift - self.input_drift, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "input_drift": round(self.input_drift, 6),
                "output_drift": round(self.output_drift, 6), "added": round(self.added, 6)}


def quantizable_nodes(model: Any, op_types: tuple[str, ...]) -> list[tuple[str, str, str | None, str]]:
    """(name, op, activation input or None, output) of the linear and embedding nodes of ``op_types``."""
    from llmconv.transforms.graph import linear_nodes, name_nodes

    name_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    found: list[tuple[str, str, str | None, str]] = []
    for ln in linear_nodes(model):
        if ln.op in op_types:
            node = by_name[ln.node]
            found.append((ln.node, ln.op, node.input[0], node.output[0]))
    if "Gather" in op_types:
        tables = {t.name for t in model.graph.initializer if t.data_type == 1 and len(t.dims) == 2}
        for node in model.graph.node:
            if node.op_type == "Gather" and node.input and node.input[0] in tables:
                found.append((node.name, "Gather", None, node.output[0]))
    return found


def measure(reference: Path, candidate: Path, nodes: list[tuple[str, str, str | None, str]], *,
            inputs: Path | None = None) -> list[NodeError]:
    """Run both graphs with the nodes' inputs and outputs exposed; the nodes, largest added error first.

    Args:
        reference: the float32 ONNX graph.
        candidate: the quantized graph made from it (same tensor names around quantized nodes).
        nodes: from :func:`quantizable_nodes` on the reference.
        inputs: an ``.npz`` of inputs (the verifier's ``--inputs``); seeded synthetic ones otherwise.
    """
    feeds = _feeds(reference, inputs)
    names = sorted({t for _, _, i, o in nodes for t in (i, o) if t})
    ref = _run_exposed(reference, names, feeds)
    cand = _run_exposed(candidate, names, feeds)
    errors = []
    for name, op, inp, out in nodes:
        if out not in ref or out not in cand:
            continue
        d_in = _drift(ref.get(inp), cand.get(inp)) if inp else 0.0
        errors.append(NodeError(name, op, d_in, _drift(ref[out], cand[out])))
    errors.sort(key=lambda e: (-e.added, e.node))
    return errors


def _feeds(reference: Path, inputs: Path | None) -> list[dict[str, Any]]:
    from llmconv.verification.inputs import InputPlan, load_inputs, synthetic_inputs
    from llmconv.verification.runners import describe

    sig = describe(reference)
    plan = InputPlan(wants=set(sig.inputs), vocab_size=sig.vocab_size or 0, max_positions=sig.max_positions,
                     past=sig.past, pad_token_id=sig.pad_token_id)
    if inputs is not None:
        feeds, _ = load_inputs(inputs, plan)
        return feeds[:MEASURE_SAMPLES]
    seq_len = MEASURE_SEQ_LEN if not sig.max_positions else min(MEASURE_SEQ_LEN, sig.max_positions)
    return synthetic_inputs(plan, batch=MEASURE_BATCH, seq_len=seq_len, samples=MEASURE_SAMPLES, seed=0)


def _run_exposed(path: Path, names: list[str], feeds: list[dict[str, Any]]) -> dict[str, list[np.ndarray]]:
    """Each exposed tensor's values over the feeds (tensors the graph does not have are skipped)."""
    import onnx
    import onnxruntime as ort

    from llmconv.transforms.graph import load_model

    model = load_model(path, with_data=False)
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    present = {o.name for o in model.graph.output}
    wanted = [n for n in names if n in produced]
    for n in wanted:
        if n not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    # The external data stays where it is: onnxruntime reads it from the model's own folder.
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    takes = {i.name for i in sess.get_inputs()}
    values: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    for feed in feeds:
        outs = sess.run(wanted, {k: v for k, v in feed.items() if k in takes})
        for n, v in zip(wanted, outs, strict=True):
            values[n].append(np.asarray(v))
    return values


def _drift(ref: list[np.ndarray] | None, cand: list[np.ndarray] | None) -> float:
    if not ref or not cand:
        return 0.0
    num = den = 0.0
    for r, c in zip(ref, cand, strict=False):
        if r.shape != c.shape:
            continue
        r64, c64 = r.astype(np.float64, copy=False), c.astype(np.float64, copy=False)
        num += float(np.square(c64 - r64).sum())
        den += float(np.square(r64).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))
