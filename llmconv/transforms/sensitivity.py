"""Which quantized nodes cost the most accuracy: measured by running the graphs, not guessed from names.

Each candidate node is measured by leaving it alone in float32 (everything else quantized with the
same setting) and scoring the outputs against the float graph with the verifier's metrics and
profile, on the verifier's inputs: its *gain* is how much closer to the profile the outputs come.
That counts what a node's error does downstream (an early layer's error travels through every later
one), which a node's local error does not.

Leave-one-out costs one quantization and one run per node; when a graph has more than
``MAX_MEASURED`` candidates, the ones measured are those whose outputs drift most beyond their
inputs' drift in the fully quantized graph (one run of each graph with every node's input and output
exposed: onnxruntime's quantizers keep those tensor names).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmconv import progress

MEASURE_BATCH = 2
MEASURE_SEQ_LEN = 16
MEASURE_SAMPLES = 2
MAX_MEASURED = 64


@dataclass(frozen=True)
class NodeGain:
    """One quantizable node and what keeping it in float32 is worth.

    Attributes:
        node: the node's name in the float graph (as ``name_nodes`` names it).
        op: ``MatMul``, ``Gemm`` or ``Gather``.
        gain: the drop of the outputs' shortfall (see ``quantize.shortfall``) when it alone stays float.
        shortfall: the outputs' shortfall with it in float32.
    """

    node: str
    op: str
    gain: float
    shortfall: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "gain": round(self.gain, 6), "shortfall": round(self.shortfall, 6)}


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


def leave_one_out(reference: Path, base: Path, nodes: list[tuple[str, str, str | None, str]],
                  make: Callable[[tuple[str, ...]], Path], *, profile: str, inputs: Path | None = None,
                  limit: int = MAX_MEASURED) -> tuple[list[NodeGain], float]:
    """Each node's gain when it alone is left in float32, largest first.

    Args:
        reference: the float32 ONNX graph.
        base: the graph quantized with the setting measured (every node quantized).
        nodes: from :func:`quantizable_nodes` on the reference.
        make: quantizes the reference with the same setting but the given nodes left in float32, and
            returns the file (removed by the caller's scratch folder).
        profile: the outputs profile the gains are measured against.
        inputs: an ``.npz`` of inputs (the verifier's ``--inputs``); seeded synthetic ones otherwise.
        limit: at most this many nodes are measured (those that drift most, see the module's text).
    Returns:
        (gains, seconds spent).
    """
    t0 = time.perf_counter()
    feeds = _feeds(reference, inputs)
    progress.note("running the float and the quantized graph")
    ref_outputs, names = _run_all(reference, feeds)
    base_short = _shortfall(ref_outputs, _run_all(base, feeds, names)[0], names, profile)
    if len(nodes) > limit:
        progress.note("ranking the nodes by drift")
        ranked = drift_ranking(reference, base, nodes, feeds)
        nodes = [n for n in nodes if n[0] in set(ranked[:limit])]
    gains = []
    for i, (name, op, _, _) in enumerate(nodes):
        progress.step(i + 1, len(nodes), "node")
        path = make((name,))
        short = _shortfall(ref_outputs, _run_all(path, feeds, names)[0], names, profile)
        gains.append(NodeGain(name, op, base_short - short, short))
        _remove_model(path)
    gains.sort(key=lambda g: (-g.gain, g.node))
    return gains, time.perf_counter() - t0


def drift_ranking(reference: Path, candidate: Path, nodes: list[tuple[str, str, str | None, str]],
                  feeds: list[dict[str, Any]]) -> list[str]:
    """Node names by how much their output drifts beyond their input's drift in ``candidate``, largest first."""
    names = sorted({t for _, _, i, o in nodes for t in (i, o) if t})
    ref, _ = _run_all(reference, feeds, names, expose=True)
    cand, _ = _run_all(candidate, feeds, names, expose=True)
    added = []
    for name, _, inp, out in nodes:
        d_in = _drift(ref.get(inp), cand.get(inp)) if inp else 0.0
        added.append((max(_drift(ref.get(out), cand.get(out)) - d_in, 0.0), name))
    return [n for _, n in sorted(added, key=lambda a: (-a[0], a[1]))]


def _feeds(reference: Path, inputs: Path | None) -> list[dict[str, Any]]:
    from llmconv.verification.inputs import load_inputs, plan_for, synthetic_inputs
    from llmconv.verification.runners import describe

    sig = describe(reference)
    plan = plan_for(sig)
    if inputs is not None:
        feeds, _ = load_inputs(inputs, plan)
        return feeds[:MEASURE_SAMPLES]
    seq_len = MEASURE_SEQ_LEN if not sig.max_positions else min(MEASURE_SEQ_LEN, sig.max_positions)
    # One shape, as the ranking was measured: the 1-token sample verification adds would reorder the nodes.
    return synthetic_inputs(plan, batch=MEASURE_BATCH, seq_len=seq_len, samples=MEASURE_SAMPLES, seed=0,
                            edge_shapes=False)


def _run_all(path: Path, feeds: list[dict[str, Any]], names: list[str] | None = None, *,
             expose: bool = False) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """The graph's outputs (``names``, or all of them) over the feeds; with ``expose``, ``names`` are inner
    tensors made outputs first (those the graph does not have are skipped)."""
    import onnx
    import onnxruntime as ort

    from llmconv.transforms.graph import load_model

    model = load_model(path, with_data=False)
    if expose:
        produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
        present = {o.name for o in model.graph.output}
        wanted = [n for n in names or [] if n in produced]
        for n in wanted:
            if n not in present:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    else:
        wanted = list(names) if names is not None else [o.name for o in model.graph.output]
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
    return values, wanted


def _shortfall(ref: dict[str, list[np.ndarray]], cand: dict[str, list[np.ndarray]], names: list[str],
               profile: str) -> float:
    """The verifier's figures and the profile's limits on these outputs, as one number (``quantize.shortfall``)."""
    from llmconv.transforms.quantize import shortfall
    from llmconv.verification.metrics import OutputComparison
    from llmconv.verification.profiles import outputs_profile
    from llmconv.verification.report import VerifyReport

    prof = outputs_profile(profile)
    checks = []
    for name in names:
        comp = OutputComparison(name, profile=prof, logits=name in ("logits", "start_logits", "end_logits"))
        for r, c in zip(ref[name], cand[name], strict=True):
            comp.add(r, c)
        checks.append(comp.check())
    report = VerifyReport(mode="outputs", profile=prof.name, reference="", candidate="", checks=checks)
    report.extra["thresholds"] = prof.thresholds()
    return shortfall(report)


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


def _remove_model(path: Path) -> None:
    import shutil

    shutil.rmtree(path.parent, ignore_errors=True)
