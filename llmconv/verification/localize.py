"""Localization: the first place where two models that verify differently part.

Outputs mode says *that* two models differ; this module says *where*, by comparing what both
compute before their outputs, in the order it is computed, and naming the first tensor that leaves
the profile:

- **ONNX vs ONNX** (a graph and its quantized, cast or edited copy): every float tensor the two
  graphs produce under the same name is marked as an extra graph output, as Polygraphy's
  ``--onnx-outputs mark all`` does, without loading external weights twice (onnxruntime gets the
  changed proto from memory and reads the data files where they are). Each graph runs alone, and
  is released before the other loads; the candidate's nodes are then walked in topological order.
- **PyTorch vs ONNX** (either order): the transformers model's ``hidden_states`` are compared with
  the graph's residual stream at each decoder layer's boundary, found from the layer scopes the
  exporter writes into node names (``/model/layers.3/...``, ``/transformer/h.3/...``).
- **PyTorch vs PyTorch**: ``hidden_states`` layer by layer.

Every tensor is judged by :class:`llmconv.verification.metrics.OutputComparison` with the profile
outputs mode used, so "leaves the profile" means here what it means in the verdict.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmconv.errors import Unsupported, UsageError

if TYPE_CHECKING:
    from llmconv.verification.profiles import OutputsProfile
    from llmconv.verification.runners import Signature

# Element types compared (onnxruntime's names); bfloat16 cannot be fetched into numpy.
_FLOAT_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)"})
# A decoder layer's scope in the node names torch.onnx writes: one path segment per module, a ModuleList
# item as ``<list>.<index>`` (Llama family: /model/layers.3/..., GPT-2: /transformer/h.3/..., BART/T5:
# /model/decoder/layers.3/..., GPT-NeoX: /gpt_neox/layers.3/..., BERT: /bert/encoder/layer.3/...).
_SCOPE_RE = re.compile(r"(?:^|/)(?:decoder\.)?(?:layers|layer|h|blocks)\.(\d+)(?=/|$)")
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_FINAL_DEPTH = 4  # how many nodes up from the head's producer the final hidden state is looked for


@dataclass
class _Node:
    index: int
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class _Graph:
    """The structure of one ONNX graph (no weights), enough to pick and locate tensors."""

    path: Path
    nodes: list[_Node]
    initializers: set[str]
    outputs: list[str]
    producer: dict[str, _Node] = field(default_factory=dict)
    consumers: dict[str, list[_Node]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes:
            for t in node.outputs:
                if t:
                    self.producer[t] = node
            for t in node.inputs:
                if t:
                    self.consumers.setdefault(t, []).append(node)

    def made(self) -> set[str]:
        """Tensors computed by a node (what can be marked as an output), initializers excluded."""
        return {t for t in self.producer if t not in self.initializers}


@dataclass
class _Point:
    """One place compared: a tensor of a graph, a hidden state of a PyTorch model, or an output."""

    key: str
    where: str
    layer: int | None
    tensor: str
    node: str | None = None
    op_type: str | None = None
    position: int | None = None
    hidden_state: str | None = None


def localize(ref_sig: Signature, cand_sig: Signature, feeds: list[tuple[str, dict[str, np.ndarray]]], *,
             profile: OutputsProfile, provider: str = "cpu",
             valid: list[np.ndarray | None] | None = None) -> dict[str, Any]:
    """Name the first tensor (ONNX vs ONNX) or decoder layer (PyTorch vs either) where two models part.

    Feeds are tried in order; the first one on which some compared tensor leaves the profile is the
    answer's feed, and the tensors are walked in the order the candidate computes them.

    Args:
        ref_sig: the reference's ``runners.Signature`` (``runners.describe``).
        cand_sig: the candidate's.
        feeds: ``(label, inputs)`` pairs; inputs are named as an ONNX graph takes them (``input_ids``,
            ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``/``.value``). Each side gets
            only the inputs it takes; a PyTorch model gets non-empty past as a ``DynamicCache``.
        profile: the ``OutputsProfile`` outputs mode judged the models by.
        provider: onnxruntime execution provider, ``cpu`` or ``cuda``.
        valid: per feed, a [batch, seq] 0/1 array of the positions holding real tokens (or None):
            tensors whose first two dimensions are [batch, seq] are compared at those positions only.
    Returns:
        A JSON-ready dict: ``method`` (``shared tensors`` or ``decoder layers``), ``reference``,
        ``candidate``, ``profile``, ``feed`` (label of the feed that showed the difference, or None),
        ``feeds_tried``, ``compared`` and ``skipped`` (tensors compared, and left out because their
        shapes differ, on the last feed tried), ``first`` (the first place outside the profile: where,
        tensor, node, op_type, position, figures, reason; or None), ``notes`` and ``summary`` (one
        sentence).
    Raises:
        Unsupported: nothing can be compared (the graphs share no computed tensor; no decoder-layer
            boundary can be found in the graph's node names).
        UsageError: no feeds, or ``valid`` not one per feed.
    Example:
        >>> from llmconv.verification.profiles import outputs_profile
        >>> from llmconv.verification.runners import describe
        >>> out = localize(describe(Path("m.onnx")), describe(Path("m-int8.onnx")), [("prefill", feed)],
        ...                profile=outputs_profile("int8"))
        >>> out["first"]["node"]
        '/model/layers.1/mlp/down_proj/MatMul_quant_output_scale_mul'
    """
    if not feeds:
        raise UsageError("localization needs at least one input to run both models on")
    if valid is not None and len(valid) != len(feeds):
        raise UsageError(f"valid holds {len(valid)} masks for {len(feeds)} feeds: give one per feed (None for "
                         "a feed whose positions are all real)")
    masks = [_current_mask(valid[i] if valid is not None else None, feed) for i, (_, feed) in enumerate(feeds)]
    if ref_sig.kind == "onnxruntime" and cand_sig.kind == "onnxruntime":
        return _shared_tensors(ref_sig, cand_sig, feeds, masks, profile=profile, provider=provider)
    return _decoder_layers(ref_sig, cand_sig, feeds, masks, profile=profile, provider=provider)


# --- comparing one tensor ---------------------------------------------------------------------------------


def _current_mask(mask: np.ndarray | None, feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, seq] mask of the feed's own tokens: a mask over past + new positions keeps its last columns."""
    if mask is None:
        return None
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        return None
    ids = feed.get("input_ids")
    seq = np.shape(ids)[1] if ids is not None and np.ndim(ids) == 2 else None
    if seq is not None and mask.shape[1] > seq:
        mask = mask[:, -seq:]
    return None if mask.all() else mask


def _masked(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None and arr.ndim >= 2 and arr.shape[:2] == mask.shape:
        return arr[mask]
    return arr


def _judge(name: str, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None, profile: Any) -> Any:
    """The profile's verdict on one tensor (a ``Check``), or None when nothing is left to compare."""
    from llmconv.verification.metrics import OutputComparison

    ref, cand = _masked(ref, mask), _masked(cand, mask)
    if not ref.size:
        return None
    # NaN on both sides at the same place is agreement (a fully masked softmax row): the metric would
    # count it against the candidate, and name the first such tensor as where the models part.
    both = np.isnan(ref) & np.isnan(cand)
    if both.any():
        ref, cand = np.where(both, 0.0, ref), np.where(both, 0.0, cand)
    # The logits keep the top-k and KL tests verify applied to them, so that what failed there fails here.
    cmp = OutputComparison(name, profile=profile, logits=name == "logits")
    cmp.add(ref, cand)
    return cmp.check()


# --- ONNX graphs ------------------------------------------------------------------------------------------


def _read_graph(mfile: Path) -> _Graph:
    """The structure of the graph in ``mfile``, read without its weights."""
    from llmconv.formats.onnx import load_graph

    view = load_graph(mfile)
    try:
        g = view.model.graph
        nodes = [_Node(i, n.name, n.op_type, list(n.input), list(n.output)) for i, n in enumerate(g.node)]
        return _Graph(path=mfile, nodes=nodes, initializers={t.name for t in g.initializer},
                      outputs=[o.name for o in g.output])
    finally:
        view.close()


class _MarkedSession:
    """An onnxruntime session on a graph with extra tensors marked as outputs, built from memory.

    The proto is read without its external data, the outputs are appended, and onnxruntime gets the
    bytes with the model's own folder as the place its external data lies: no weight is loaded twice,
    and no copy of the model is written anywhere. (A copy in a temporary folder with links to the data
    files does not work: onnxruntime resolves links and refuses data outside the model's folder.)
    Options, providers and errors are those of ``runners.OrtRunner``.
    """

    def __init__(self, graph: _Graph, names: list[str], *, provider: str) -> None:
        from onnx import helper

        from llmconv.formats.onnx import load_proto
        from llmconv.verification.runners import ort_session

        self.path = graph.path
        model = load_proto(graph.path)
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
        data = model.SerializeToString()
        del model
        self.session = ort_session(data, path=graph.path, provider=provider,
                                   what="the model with its tensors marked as outputs")
        self.types = {o.name: o.type for o in self.session.get_outputs()}

    def run(self, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The tensors ``names`` (as float32) for ``feed``, of which only the graph's inputs are given."""
        from llmconv.verification.runners import run_session

        out = run_session(self.session, feed, names, path=self.path)
        return {n: np.asarray(v, dtype=np.float32) for n, v in out.items()}

    def close(self) -> None:
        del self.session


def _run_graph(graph: _Graph, names: list[str], feeds: list[tuple[str, dict[str, np.ndarray]]], *,
               provider: str) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the float tensors among ``names`` as float32 arrays; the session lives while the caller reads."""
    session = _MarkedSession(graph, names, provider=provider)
    try:
        wanted = [n for n in names if session.types.get(n) in _FLOAT_TYPES]
        for _, feed in feeds:
            yield session.run(feed, wanted)
    finally:
        session.close()


def _shared_tensors(ref_sig: Any, cand_sig: Any, feeds: list[tuple[str, dict[str, np.ndarray]]],
                    masks: list[np.ndarray | None], *, profile: Any, provider: str) -> dict[str, Any]:
    """ONNX vs ONNX: the candidate's first node whose output, shared with the reference, leaves the profile."""
    ref_g, cand_g = _read_graph(ref_sig.model_path), _read_graph(cand_sig.model_path)
    ref_made = ref_g.made()
    shared = [t for node in cand_g.nodes for t in node.outputs
              if t and t in ref_made and t not in cand_g.initializers]
    if not shared:
        raise Unsupported(f"the two graphs compute no tensor under the same name ({ref_sig.model_path.name} and "
                          f"{cand_sig.model_path.name}): there is nothing to localize by", path=cand_sig.model_path,
                          hint="localize a graph against a copy derived from it (quantized, cast or edited), or "
                               "against the Hugging Face folder it was exported from")
    ref_runs = list(_run_graph(ref_g, shared, feeds, provider=provider))
    state = _Walk(profile=profile, method="shared tensors", ref_sig=ref_sig, cand_sig=cand_sig)
    with contextlib.closing(_run_graph(cand_g, shared, feeds, provider=provider)) as cand_runs:
        for i, cand_out in enumerate(cand_runs):
            ref_out, ref_runs[i] = ref_runs[i], {}
            state.start(feeds[i][0])
            for node in cand_g.nodes:
                for t in node.outputs:
                    if t in cand_out and t in ref_out:
                        point = _Point(key=t, where=f"node {node.name or '(unnamed)'}", layer=_layer_of(node.name),
                                       tensor=t, node=node.name, op_type=node.op_type, position=node.index)
                        if state.compare(point, ref_out[t], cand_out[t], masks[i]):
                            return state.result(nodes=len(cand_g.nodes))
    if not state.total:
        raise Unsupported("none of the tensors the two graphs share has a float type and the same shape on both "
                          "sides", path=cand_sig.model_path,
                          hint="localize a graph against a copy derived from it, of the same architecture")
    return state.result(nodes=len(cand_g.nodes))


# --- decoder layers ---------------------------------------------------------------------------------------


def _layer_of(name: str) -> int | None:
    m = _SCOPE_RE.search(name or "")
    return int(m.group(1)) if m else None


def _hidden_size(*configs: dict[str, Any] | None) -> int | None:
    for config in configs:
        for k in _HIDDEN_KEYS:
            v = (config or {}).get(k)
            if isinstance(v, int) and v > 0:
                return v
    return None


@dataclass
class _Boundaries:
    """Tensors of a graph that may carry the residual stream, by place (``embeddings``, ``layer.N``, ``final``)."""

    layers: int
    candidates: dict[str, list[str]]  # place -> tensor names, the likeliest first
    head: str | None  # the graph output compared with the PyTorch model's head output


def _boundaries(graph: _Graph) -> _Boundaries:
    """Where the residual stream crosses from one decoder layer's scope into the next's, in node names."""
    scope = {node.index: _layer_of(node.name) for node in graph.nodes}
    scoped = [s for s in scope.values() if s is not None]
    if not scoped:
        raise Unsupported("the graph's node names carry no decoder-layer scope (layers.N, h.N, layer.N, "
                          "blocks.N): its layer boundaries cannot be found", path=graph.path,
                          hint="localize against an ONNX export made by llmconv export or optimum (torch.onnx "
                               "names nodes after modules), or compare two graphs derived from each other")
    layers = max(scoped) + 1
    found: dict[str, list[tuple[int, str]]] = {}
    for node in graph.nodes:
        here = scope[node.index]
        for t in node.outputs:
            if not t or t in graph.initializers:
                continue
            later = {scope[c.index] for c in graph.consumers.get(t, [])}
            if here is None and 0 in later:
                found.setdefault("embeddings", []).append((node.index, t))
            elif here is not None and here + 1 in later and here + 1 < layers:
                found.setdefault(f"layer.{here}", []).append((node.index, t))
    # The residual stream leaves a layer last: the latest producer first.
    candidates = {k: [t for _, t in sorted(v, reverse=True)] for k, v in found.items()}
    head = "logits" if "logits" in graph.outputs else None
    if head is not None:
        candidates["final"] = _upstream(graph, head)
    elif "last_hidden_state" in graph.outputs:
        candidates["final"] = ["last_hidden_state"]
    return _Boundaries(layers=layers, candidates=candidates, head=head)


def _upstream(graph: _Graph, tensor: str) -> list[str]:
    """Computed tensors feeding the producer of ``tensor``, nearest first (the head's input: the final norm)."""
    out: list[str] = []
    seen = {tensor}
    frontier = [tensor]
    for _ in range(_FINAL_DEPTH):
        nxt: list[str] = []
        for t in frontier:
            node = graph.producer.get(t)
            for i in node.inputs if node is not None else []:
                if i and i not in seen and i in graph.producer and i not in graph.initializers:
                    seen.add(i)
                    out.append(i)
                    nxt.append(i)
        frontier = nxt
    return out


def _graph_points(sig: Any, feeds: list[tuple[str, dict[str, np.ndarray]]], hidden: int | None, *,
                  provider: str) -> Iterator[tuple[dict[str, np.ndarray], dict[str, _Point], int]]:
    """Per feed: the graph's tensor at each place, how each was found, and the graph's layer count."""
    graph = _read_graph(sig.model_path)
    b = _boundaries(graph)
    names = list(dict.fromkeys(t for ts in b.candidates.values() for t in ts))
    if b.head:
        names.append(b.head)
    if not any(k.startswith("layer.") or k == "final" for k in b.candidates):
        raise Unsupported(f"no tensor of the graph passes from one decoder layer's scope to the next among its "
                          f"{b.layers} layers", path=graph.path,
                          hint="localize against an ONNX export made by llmconv export or optimum")
    runs = _run_graph(graph, names, feeds, provider=provider)
    with contextlib.closing(runs):
        for (_, feed), out in zip(feeds, runs, strict=True):
            ids = feed.get("input_ids")
            lead = tuple(np.shape(ids)[:2]) if ids is not None and np.ndim(ids) == 2 else None
            width = hidden or _common_width(out, lead)
            arrays: dict[str, np.ndarray] = {}
            points: dict[str, _Point] = {}
            for place, tensors in b.candidates.items():
                pick = next((t for t in tensors if t in out and lead is not None
                             and out[t].shape == (*lead, width)), None)
                if pick is None:
                    continue
                node = graph.producer[pick]
                layer = (b.layers - 1 if place == "final" else
                         int(place.split(".")[1]) if place.startswith("layer.") else None)
                arrays[place] = out[pick]
                points[place] = _Point(key=place, where=_where(place, layer), layer=layer, tensor=pick,
                                       node=node.name, op_type=node.op_type, position=node.index)
            if b.head and b.head in out:
                node = graph.producer[b.head]
                arrays["head"] = out[b.head]
                points["head"] = _Point(key="head", where="the head", layer=None, tensor=b.head, node=node.name,
                                        op_type=node.op_type, position=node.index)
            if not any(k.startswith("layer.") or k == "final" for k in points):
                raise Unsupported(f"none of the tensors crossing the graph's decoder-layer boundaries has the "
                                  f"shape of a hidden state [batch, seq, {width or 'hidden'}]", path=graph.path,
                                  hint="localize against an ONNX export made by llmconv export or optimum, or "
                                       "compare two graphs derived from each other")
            yield arrays, points, b.layers


def _common_width(out: dict[str, np.ndarray], lead: tuple[int, ...] | None) -> int | None:
    """Without a config: the last dimension most [batch, seq, x] tensors share."""
    widths = [a.shape[2] for a in out.values() if lead is not None and a.ndim == 3 and a.shape[:2] == lead]
    return max(set(widths), key=widths.count) if widths else None


def _where(place: str, layer: int | None) -> str:
    if place == "embeddings":
        return "the embeddings"
    if place == "final":
        return f"layer {layer} (with the final norm)"
    if place == "head":
        return "the head"
    return f"layer {layer}"


def _torch_points(sig: Any, task: str, feeds: list[tuple[str, dict[str, np.ndarray]]], *,
                  provider: str) -> Iterator[tuple[dict[str, np.ndarray], dict[str, _Point], int]]:
    """Per feed: a PyTorch model's hidden state at each place (``output_hidden_states``), and its layer count."""
    import inspect

    import torch

    from llmconv.verification.runners import open_runner

    runner = open_runner(sig, task=task, provider=provider)
    try:
        model = runner.model
        params = inspect.signature(model.forward).parameters
        takes = [n for n in ("input_ids", "attention_mask", "position_ids", "token_type_ids") if n in params]
        for _, feed in feeds:
            kwargs: dict[str, Any] = {n: torch.from_numpy(np.ascontiguousarray(feed[n], dtype=np.int64))
                                      for n in takes if n in feed}
            cache = _dynamic_cache(feed, model, sig)
            if cache is not None:
                kwargs["past_key_values"] = cache
            if "use_cache" in params:
                kwargs["use_cache"] = cache is not None
            with torch.inference_mode():
                out = model(**kwargs, output_hidden_states=True, return_dict=True)
            states = out.hidden_states
            if not states:
                raise Unsupported(f"{type(model).__name__} gives no hidden states (output_hidden_states)",
                                  path=sig.path, hint="localize an architecture that returns hidden states")
            layers = len(states) - 1
            arrays: dict[str, np.ndarray] = {"embeddings": states[0].float().numpy()}
            points = {"embeddings": _Point("embeddings", "the embeddings", None, "hidden_states[0]")}
            for i in range(layers - 1):
                arrays[f"layer.{i}"] = states[i + 1].float().numpy()
                points[f"layer.{i}"] = _Point(f"layer.{i}", f"layer {i}", i, f"hidden_states[{i + 1}]")
            arrays["final"] = states[layers].float().numpy()
            points["final"] = _Point("final", _where("final", layers - 1), layers - 1, f"hidden_states[{layers}]")
            if runner.main_output != "last_hidden_state" and runner.main_output in out:
                arrays["head"] = out[runner.main_output].float().numpy()
                points["head"] = _Point("head", "the head", None, runner.main_output)
            del out, states
            yield arrays, points, layers
    finally:
        runner.close()


def _dynamic_cache(feed: dict[str, np.ndarray], model: Any, sig: Any) -> Any:
    """The feed's non-empty past key/values as a transformers ``DynamicCache``, or None."""
    import inspect

    import torch
    from transformers import DynamicCache

    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, arr in feed.items():
        m = _PAST_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = arr
    if not layers or all(np.ndim(kv.get("key")) == 4 and np.shape(kv["key"])[2] == 0 for kv in layers.values()):
        return None
    if sorted(layers) != list(range(len(layers))) or any(set(kv) != {"key", "value"} for kv in layers.values()):
        raise UsageError(f"the past key/values given are incomplete (layers {sorted(layers)}): each layer needs "
                         "past_key_values.N.key and .value", path=sig.path)
    # With the config, the cache knows which layers use a sliding window (Mistral, Gemma).
    cache = (DynamicCache(config=model.config) if "config" in inspect.signature(DynamicCache.__init__).parameters
             else DynamicCache())
    for i in sorted(layers):
        k, v = (torch.from_numpy(np.ascontiguousarray(layers[i][x], dtype=np.float32)) for x in ("key", "value"))
        cache.update(k, v, i)
    return cache


def _decoder_layers(ref_sig: Any, cand_sig: Any, feeds: list[tuple[str, dict[str, np.ndarray]]],
                    masks: list[np.ndarray | None], *, profile: Any, provider: str) -> dict[str, Any]:
    """PyTorch vs ONNX, or PyTorch vs PyTorch: the first decoder layer whose output leaves the profile."""
    from llmconv.verification.runners import settle_task

    tasks = dict(zip(("ref", "cand"), settle_task(ref_sig, cand_sig), strict=True))
    hidden = _hidden_size(ref_sig.config, cand_sig.config)

    def side(sig: Any, task: str) -> Iterator[tuple[dict[str, np.ndarray], dict[str, _Point], int]]:
        if sig.kind == "torch":
            return _torch_points(sig, task, feeds, provider=provider)
        return _graph_points(sig, feeds, hidden, provider=provider)

    ref_runs = list(side(ref_sig, tasks["ref"]))
    state = _Walk(profile=profile, method="decoder layers", ref_sig=ref_sig, cand_sig=cand_sig)
    with contextlib.closing(side(cand_sig, tasks["cand"])) as cand_runs:
        for i, (cand_arrays, cand_points, cand_layers) in enumerate(cand_runs):
            (ref_arrays, ref_points, ref_layers), ref_runs[i] = ref_runs[i], ({}, {}, 0)
            if ref_layers != cand_layers and i == 0:
                state.notes.append(f"the reference has {ref_layers} decoder layers, the candidate {cand_layers}: "
                                   "layers were compared by index, the last of each after its final norm")
            state.start(feeds[i][0])
            order = ["embeddings", *(f"layer.{n}" for n in range(max(ref_layers, cand_layers))), "final", "head"]
            for place in order:
                if place not in ref_arrays or place not in cand_arrays:
                    continue
                point = _merged(ref_points[place], cand_points[place])
                if state.compare(point, ref_arrays[place], cand_arrays[place], masks[i]):
                    return state.result()
    return state.result()


def _merged(ref: _Point, cand: _Point) -> _Point:
    """One description of a place from both sides: the graph's tensor and node when one side is a graph,
    with the PyTorch hidden state it was compared with."""
    graph = cand if cand.node is not None else ref if ref.node is not None else cand
    hidden = next((p.tensor for p in (ref, cand) if p.node is None and p.tensor.startswith("hidden_states[")), None)
    return replace(graph, where=cand.where, layer=cand.layer, hidden_state=hidden)


# --- the walk and its result ------------------------------------------------------------------------------


@dataclass
class _Walk:
    """The tensors compared so far, feed by feed, and the first one outside the profile."""

    profile: Any
    method: str
    ref_sig: Any
    cand_sig: Any
    feed: str | None = None
    feeds_tried: int = 0
    compared: int = 0
    skipped: int = 0
    skipped_names: list[str] = field(default_factory=list)
    first: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    total: int = 0

    def start(self, label: str) -> None:
        self.feed = label
        self.feeds_tried += 1
        self.compared = self.skipped = 0
        self.skipped_names = []

    def compare(self, point: _Point, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None) -> bool:
        """Fold one pair in; True when it left the profile (and is now ``first``)."""
        if ref.shape != cand.shape:
            self.skipped += 1
            self.skipped_names.append(f"{point.tensor} {list(ref.shape)} vs {list(cand.shape)}")
            return False
        check = _judge(point.tensor, ref, cand, mask, self.profile)
        if check is None:
            self.skipped += 1
            return False
        self.compared += 1
        self.total += 1
        if check.passed:
            return False
        self.first = {"where": point.where, "layer": point.layer, "tensor": point.tensor, "node": point.node,
                      "op_type": point.op_type, "position": point.position, "hidden_state": point.hidden_state,
                      "figures": check.figures, "reason": check.reason}
        return True

    def result(self, *, nodes: int | None = None) -> dict[str, Any]:
        if self.first is None:
            self.feed = None
        return {"method": self.method, "reference": str(self.ref_sig.path), "candidate": str(self.cand_sig.path),
                "profile": self.profile.name, "feed": self.feed, "feeds_tried": self.feeds_tried,
                "compared": self.compared, "skipped": self.skipped, "skipped_shapes": self.skipped_names[:20],
                "first": self.first, "notes": self.notes,
                "summary": self._summary(nodes)}

    def _summary(self, nodes: int | None) -> str:
        p = self.profile.name
        what = "shared tensors" if self.method == "shared tensors" else "places (embeddings, layers, head)"
        if self.first is None:
            shown = "; ".join(self.skipped_names[:4]) + (" ..." if len(self.skipped_names) > 4 else "")
            shapes = f", {self.skipped} skipped (shapes differ: {shown})" if self.skipped_names else (
                f", {self.skipped} skipped" if self.skipped else "")
            feeds = f"{self.feeds_tried} feed" + ("s" if self.feeds_tried != 1 else "")
            return f"nothing compared left the {p} profile: {self.compared} {what} agree on {feeds}{shapes}"
        f = self.first
        figs = _figures_text(f["figures"])
        if self.method == "shared tensors":
            at = f" (node {f['position'] + 1} of {nodes} in topological order)" if nodes else ""
            return (f"on feed '{self.feed}', the first tensor to leave the {p} profile is '{f['tensor']}', output "
                    f"of {f['op_type']} node '{f['node']}'{at}: {figs} ({f['reason']})")
        graph = f" (graph tensor '{f['tensor']}' from {f['op_type']} node '{f['node']}')" if f["node"] else ""
        if f["where"] == "the head":
            return (f"on feed '{self.feed}', every decoder layer compared agrees but the head's output "
                    f"'{f['tensor']}' leaves the {p} profile: {figs} ({f['reason']})")
        return (f"on feed '{self.feed}', {f['where']} is the first place to leave the {p} profile{graph}: {figs} "
                f"({f['reason']})")


def _figures_text(figs: dict[str, Any]) -> str:
    parts = [f"max abs diff {figs['max_abs']:.3g}"]
    if figs.get("cosine") is not None:
        parts.append(f"cosine {figs['cosine']:.6f}")
    if figs.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {figs['top1_agreement']:.4f}")
    return ", ".join(parts)
