"""Calibration inputs for static int8 quantization: an .npz of inputs, text, or seeded synthetic batches.

Synthetic batches come from the verifier's input generator (``llmconv.verification.inputs``): token ids for
language models, ``pixel_values`` normalised as the image processor says for image models.
Text is tokenized with the model's own tokenizer (the tokenizer files beside the model). Inputs the
user does not give (attention mask, position ids, empty past key/values) are filled in to match
``input_ids``, the way a first forward pass would see them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv import progress
from llmconv.errors import CorruptInput, InputError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import onnx

# onnx.TensorProto element type -> numpy dtype name
_NP_TYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
             11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


@dataclass(frozen=True)
class FeedSpec:
    """One model input: name, numpy dtype name and dims (int, or a symbolic name)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


def input_specs(model: onnx.ModelProto) -> list[FeedSpec]:
    """The inputs a caller feeds (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                     for d in tt.shape.dim)
        specs.append(FeedSpec(i.name, _NP_TYPES.get(tt.elem_type, "float32"), dims))
    return specs


def vocab_size(model: onnx.ModelProto, config: dict[str, Any] | None = None) -> int:
    """The vocabulary size: from config.json, else the embedding that ``input_ids`` indexes, else 1000."""
    if config and isinstance(config.get("vocab_size"), int) and config["vocab_size"] > 0:
        return int(config["vocab_size"])
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids":
            t = inits.get(node.input[0])
            if t is not None and t.dims:
                return int(t.dims[0])
    for o in model.graph.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
                return int(dims[-1].dim_value)
    return 1000


def _dim(d: int | str, *, batch: int, seq: int, past: int) -> int:
    if isinstance(d, int):
        return d
    name = d.lower()
    if "past" in name and "+" in name:
        return past + seq
    if "past" in name:
        return past
    if "batch" in name:
        return batch
    if "seq" in name or "length" in name or "len" in name:
        return seq
    return 1


def feeds_for_ids(specs: list[FeedSpec], ids: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Every input of the model, given ``input_ids`` of shape [batch, seq] and no past.

    Args:
        specs: the model's inputs.
        ids: token ids, [batch, seq].
        seed: seed for any float input that is neither past key/values nor known.
    Returns:
        name -> array, ready for ``InferenceSession.run``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    batch, seq = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for s in specs:
        shape = [_dim(d, batch=batch, seq=seq, past=0) for d in s.dims]
        name = s.name.lower()
        if s.name == "input_ids":
            feeds[s.name] = ids.astype(s.dtype)
        elif "attention_mask" in name:
            feeds[s.name] = np.ones(shape, dtype=s.dtype)
        elif "position_ids" in name:
            feeds[s.name] = np.broadcast_to(np.arange(seq), shape).astype(s.dtype)
        elif s.dtype == "bool":
            feeds[s.name] = np.zeros(shape, dtype=bool)
        elif "past" in name or "cache" in name or not s.dtype.startswith("float"):
            feeds[s.name] = np.zeros(shape, dtype=s.dtype)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds


def synthetic_batches(model: onnx.ModelProto, model_path: Path, *, config: dict[str, Any] | None, batch: int,
                      seq_len: int, samples: int, seed: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Seeded synthetic feeds from the verifier's generator (``verification.inputs.synthetic_inputs``), so that
    the model is calibrated on the inputs it is then verified on: token ids (with masks, positions, empty past)
    for a language model, ``pixel_values`` normalised as its ``preprocessor_config.json`` says for an image model.

    Args:
        model: the float model.
        model_path: its ``.onnx`` file (config.json and preprocessor_config.json beside it).
        config: the model's config.json, if known (vocabulary size when the graph does not tell).
        batch: rows (or images) per feed.
        seq_len: tokens per row of the first feed; the others alternate with about half of it.
        samples: number of feeds.
        seed: the random seed.
    Returns:
        The feeds, and the ``calibration`` block of the report.
    Raises:
        UsageError: the model takes inputs the generator cannot make up.
    Example:
        >>> feeds, meta = synthetic_batches(model, Path("vit-onnx/model.onnx"), config=None, batch=1, seq_len=64,
        ...                                 samples=8, seed=0)
        >>> feeds[0]["pixel_values"].shape
        (1, 3, 32, 32)
    """
    from llmconv.verification.inputs import KNOWN_INPUTS, feed_shapes, plan_for, synthetic_inputs
    from llmconv.verification.runners import describe

    specs = input_specs(model)
    plan = plan_for(describe(model_path))  # the graph's own inputs, past layout, vocabulary and image layout
    hint = "pass --calibration FILE.npz (input name -> array) with the model's inputs"
    if "pixel_values" in plan.wants:
        other = sorted(plan.wants - {"pixel_values"})
        if other:
            raise UsageError(f"synthetic calibration images are made for models that take only pixel_values; this "
                             f"one also takes {', '.join(other)}", path=model_path, hint=hint)
    elif "input_ids" in plan.wants:
        # Other inputs a language model may take (not token inputs, not past) are filled in by feeds_for_ids.
        plan.wants &= set(KNOWN_INPUTS)
        plan.vocab_size = plan.vocab_size or vocab_size(model, config)
        if plan.max_positions:
            seq_len = min(seq_len, plan.max_positions)
    else:
        raise UsageError("synthetic calibration inputs need a model that takes input_ids or pixel_values; this one "
                         "takes " + ", ".join(s.name for s in specs), path=model_path, hint=hint)
    made = synthetic_inputs(plan, batch=batch, seq_len=seq_len, samples=samples, seed=seed, edge_shapes=False)
    feeds = [_as_graph_takes(specs, f, seed=seed + i) for i, f in enumerate(made)]
    described: dict[str, Any] = {"kind": "synthetic", "samples": len(feeds), "batch": batch}
    if "pixel_values" in plan.wants and plan.image is not None:
        image = plan.image
        described.update({"image": f"{image.num_channels}x{image.height}x{image.width}",
                          "mean": list(image.mean) if image.mean is not None else None,
                          "std": list(image.std) if image.std is not None else None})
    else:
        described.update({"seq_len": seq_len, "vocab": plan.vocab_size})
    described.update({"seed": seed, "shapes": feed_shapes(feeds)})
    return feeds, described


def _as_graph_takes(specs: list[FeedSpec], feed: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
    """``feed`` cut to the graph's inputs, in the graph's dtypes (int32 ids, ...), with any input the generator does
    not make filled in as ``feeds_for_ids`` does."""
    missing = [s for s in specs if s.name not in feed]
    filled = feeds_for_ids(missing, feed["input_ids"], seed=seed) if missing and "input_ids" in feed else {}
    return {s.name: (feed[s.name].astype(s.dtype, copy=False) if s.name in feed else filled[s.name])
            for s in specs}


def npz_batches(path: Path, specs: list[FeedSpec]) -> list[dict[str, np.ndarray]]:
    """Batches from an .npz of name -> array (one batch), or name -> [samples, ...] (several)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as e:
        raise CorruptInput(f"cannot read the .npz without unpickling objects ({e})", path=path,
                           hint="save plain numeric arrays with numpy.savez") from e
    except (OSError, EOFError) as e:
        raise CorruptInput(f"not a readable .npz file ({e})", path=path) from e
    by_name = {s.name: s for s in specs}
    unknown = [k for k in arrays if k not in by_name]
    if unknown:
        raise UsageError(f"calibration arrays {unknown} are not inputs of the model", path=path,
                         hint="the model takes " + ", ".join(by_name))
    if "input_ids" not in arrays and set(by_name) - set(arrays):
        missing = sorted(set(by_name) - set(arrays))
        raise UsageError(f"calibration file lacks inputs {missing}", path=path,
                         hint="give every input, or at least input_ids")
    rank = {k: len(by_name[k].dims) for k in arrays}
    for k, a in arrays.items():
        spec = by_name[k]
        dims = "[" + ", ".join(str(d) for d in spec.dims) + "]"
        if a.ndim not in (rank[k], rank[k] + 1):
            raise UsageError(f"calibration array {k!r} has shape {list(a.shape)}, but the model's {k} is {dims}",
                             path=path, hint=f"give {k} as {dims}, or a stack of them with a leading samples axis")
        if np.dtype(spec.dtype).kind in "iub" and a.dtype.kind not in "iub":
            raise UsageError(f"calibration array {k!r} holds {a.dtype} values, but the model's {k} takes "
                             f"{spec.dtype}", path=path, hint="token ids and masks must be integer arrays")
    stacked = {k: a.ndim == rank[k] + 1 for k, a in arrays.items()}
    if len(set(stacked.values())) > 1:
        raise UsageError("calibration arrays mix single batches and stacks of batches", path=path,
                         hint="give every array the model's rank, or every one an extra leading samples axis")
    many = next(iter(stacked.values()), False)
    count = len(next(iter(arrays.values()))) if many else 1
    if many and len({len(a) for a in arrays.values()}) > 1:
        raise UsageError("calibration arrays hold different numbers of samples: "
                         + ", ".join(f"{k} {len(a)}" for k, a in arrays.items()), path=path)
    batches = []
    for i in range(count):
        given = {k: (a[i] if many else a) for k, a in arrays.items()}
        feeds = feeds_for_ids(specs, given["input_ids"]) if "input_ids" in given else {}
        feeds.update({k: v.astype(by_name[k].dtype) for k, v in given.items()})
        batches.append(feeds)
    return batches


def load_tokenizer(folder: Path) -> Any:
    """The model's own tokenizer from ``folder`` (tokenizer.json or equivalent files)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        from llmconv.errors import MissingDependency

        raise MissingDependency("tokenizing text needs transformers", hint="pip install 'llmconv[onnx]'") from e
    if not any(folder.glob("tokenizer*")) and not (folder / "vocab.json").is_file():
        raise UsageError("no tokenizer files beside the model (tokenizer.json, tokenizer_config.json, ...)",
                         path=folder, hint="put the model's tokenizer files next to it, or calibrate with an .npz")
    from llmconv.export.tasks import open_tokenizer

    try:
        return open_tokenizer(folder)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load the tokenizer: {e}", path=folder) from e


def text_batches(path: Path, specs: list[FeedSpec], *, tokenizer_folder: Path, seq_len: int, batch: int,
                 samples: int) -> list[dict[str, np.ndarray]]:
    """Windows of ``seq_len`` tokens of the text at ``path``, ``batch`` per feed, at most ``samples`` feeds."""
    import numpy as np

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError("calibration text is not UTF-8", path=path) from e
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
    tok = load_tokenizer(tokenizer_folder)
    ids = np.asarray(tok(re.sub(r"\s+\n", "\n", text))["input_ids"], dtype=np.int64)
    windows = len(ids) // seq_len
    if windows < 1:
        raise UsageError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}", path=path,
                         hint="give a longer text")
    windows = min(windows, samples * batch)
    rows = ids[: windows * seq_len].reshape(windows, seq_len)
    return [feeds_for_ids(specs, rows[i:i + batch]) for i in range(0, windows, batch)]


def calibration_batches(model: onnx.ModelProto, model_path: Path, calibration: Path | None, *,
                        config: dict[str, Any] | None, samples: int = 8, batch: int = 1, seq_len: int = 64,
                        seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The calibration feeds and a description of where they came from (for the report).

    Args:
        model: the float model.
        model_path: its ``.onnx`` file (its folder holds the tokenizer for text calibration).
        calibration: an .npz of inputs, a text file, or None for seeded synthetic inputs (token ids, or images
            for a model that takes pixel_values).
        config: the model's config.json, if known (vocabulary size, maximum positions).
        samples: number of feeds (text and synthetic).
        batch: rows per feed (text and synthetic).
        seq_len: tokens per row (text and synthetic token ids; synthetic feeds alternate it with about half).
        seed: seed of synthetic inputs.
    """
    max_pos = (config or {}).get("max_position_embeddings") or (config or {}).get("n_positions")
    if isinstance(max_pos, int) and max_pos > 0:
        seq_len = min(seq_len, max_pos)
    if calibration is None:
        return synthetic_batches(model, model_path, config=config, batch=batch, seq_len=seq_len, samples=samples,
                                 seed=seed)
    specs = input_specs(model)
    calibration = Path(calibration)
    if not calibration.is_file():
        raise InputError("calibration file not found", path=calibration)
    if calibration.suffix.lower() == ".npz":
        feeds = npz_batches(calibration, specs)
        return feeds, {"kind": "npz", "file": str(calibration), "samples": len(feeds)}
    if calibration.suffix.lower() in _TEXT_SUFFIXES or _looks_like_text(calibration):
        feeds = text_batches(calibration, specs, tokenizer_folder=model_path.parent, seq_len=seq_len, batch=batch,
                             samples=samples)
        return feeds, {"kind": "text", "file": str(calibration), "samples": len(feeds), "batch": batch,
                       "seq_len": seq_len}
    raise UsageError("calibration file is neither an .npz of inputs nor a text file", path=calibration,
                     hint="give FILE.npz (input name -> array) or a UTF-8 text file")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._next >= len(self._feeds):
            progress.note("computing the ranges, quantizing")
            return None
        self._next += 1
        progress.step(self._next, len(self._feeds), "calibration batch")
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0
