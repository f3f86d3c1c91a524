"""Inputs for outputs mode: seeded synthetic batches, or the user's own arrays from an ``.npz`` file.

Synthetic inputs are deterministic for a seed: token ids drawn inside the vocabulary, an attention
mask with the last row of each batch right-padded (so a padded sample is always exercised), position
ids, token type ids and empty past key/values for graphs that take them. Samples alternate between
two sequence lengths, so dynamic axes are exercised at two sizes, and one more sample of one row and
one token follows them: the shape of every decode step, where graphs that run at larger shapes can
still fail.

Image models get ``pixel_values`` [batch, channels, height, width] as their image processor would
make them from real pictures: whole pixel values drawn uniformly in [0, 255], rescaled and normalised
with the ``preprocessor_config.json`` beside the model (``ImageSpec``), then one more sample of one image.

They follow the model's own conventions: the padded tail of a row holds the model's pad token, and
no other position does (RoBERTa and its kin count positions from the pad token: a pad id drawn
mid-row would shift every position after it). Position ids are made only for a graph that takes
them; a PyTorch model computes its own, as it does when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmconv.errors import CorruptInput, InputError, UsageError

# Inputs the verifier knows how to make; anything else a graph requires must come from `verify --inputs`.
KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values")
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_NPZ_HINT = ("give them with --inputs FILE.npz (numpy.savez(FILE, name=array, ...)); convert --to onnx takes no "
             "inputs: export with --no-verify, then run llmconv verify SRC DST --inputs FILE.npz")
DEFAULT_IMAGE_SIZE = 224  # what image processors resize to when nothing else says


@dataclass(frozen=True)
class PastSpec:
    """Past key/values a graph takes as inputs: ``past_key_values.{i}.key`` / ``.value``.

    Attributes:
        names: (key input name, value input name) per layer.
        num_heads: key/value heads (dimension 1).
        head_dim: size of one head (dimension 3).
        dtype: numpy dtype of the cache.
    """

    names: list[tuple[str, str]]
    num_heads: int
    head_dim: int
    dtype: str = "float32"


@dataclass(frozen=True)
class ImageSpec:
    """The images an image model takes, and how its image processor turns pixels into ``pixel_values``.

    Attributes:
        num_channels: channels (dimension 1).
        height: rows of pixels (dimension 2).
        width: columns of pixels (dimension 3).
        mean: per-channel mean subtracted after rescaling (None: not normalised).
        std: per-channel standard deviation divided by (None: not normalised).
        rescale_factor: what whole pixel values [0, 255] are multiplied by first (None: not rescaled).
        fixed_size: whether the model takes only this size (its config's ``image_size``, or the graph's
            static dimensions) rather than merely being made for it.
        size_from: where the size was read (for messages).
    """

    num_channels: int
    height: int
    width: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    rescale_factor: float | None = 1 / 255
    fixed_size: bool = False
    size_from: str = "the default"


@dataclass
class InputPlan:
    """What the inputs need to hold: the union of what both models take."""

    wants: set[str] = field(default_factory=set)
    vocab_size: int = 0
    max_positions: int | None = None
    past: PastSpec | None = None
    pad_token_id: int | None = None
    image: ImageSpec | None = None


def plan_for(*sigs: Any) -> InputPlan:
    """The inputs that run every model given (``runners.Signature``): the union of what they take, the
    smallest vocabulary and position count, the first past layout and pad id any of them names, and the
    image layout of the first that takes a fixed image size (else of the first image model)."""
    vocabs = [s.vocab_size for s in sigs if s.vocab_size]
    positions = [s.max_positions for s in sigs if s.max_positions]
    pads = [s.pad_token_id for s in sigs if s.pad_token_id is not None]
    images = sorted((s.image for s in sigs if getattr(s, "image", None) is not None),
                    key=lambda i: not i.fixed_size)
    return InputPlan(wants=set().union(*(s.inputs for s in sigs)), vocab_size=min(vocabs) if vocabs else 0,
                     max_positions=min(positions) if positions else None,
                     past=next((s.past for s in sigs if s.past), None), pad_token_id=pads[0] if pads else None,
                     image=images[0] if images else None)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _hw(value: Any) -> tuple[int, int] | None:
    """(height, width) from an image processor's or a config's size: an int, [h, w], or {height, width}."""
    if _positive_int(value):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(_positive_int(v) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        h, w = _positive_int(value.get("height")), _positive_int(value.get("width"))
        if h and w:
            return h, w
    return None


def _per_channel(value: Any, channels: int, *, key: str, path: Path) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int | float) and not isinstance(value, bool) else value
    if (not isinstance(values, list | tuple) or not values
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
        raise UsageError(f"{key} must be a number or a list of numbers, not {value!r}", path=path)
    if len(values) == 1:
        values = list(values) * channels
    if len(values) != channels:
        raise UsageError(f"{key} has {len(values)} values for {channels} channels", path=path)
    if key == "image_std" and any(v == 0 for v in values):
        raise UsageError("image_std holds a zero: normalising would divide by it", path=path)
    return tuple(float(v) for v in values)


def image_spec(config: dict[str, Any] | None, folder: Path | None, *,
               graph_dims: list[int | None] | None = None) -> ImageSpec:
    """How to make ``pixel_values`` for an image model, from its config, its ``preprocessor_config.json``
    and (for an ONNX graph) the graph's own static dimensions.

    The size is the graph's static height/width, else config.json's ``image_size``, else the image
    processor's (``crop_size`` when it crops, else ``size``: {height, width}, or a shortest edge made
    square), else 224. Normalisation is the image processor's (``rescale_factor``, ``image_mean``,
    ``image_std``, each switched off by its ``do_*`` flag), with transformers' ImageNet mean/std
    when it names none.

    Args:
        config: config.json, when there is one.
        folder: the folder that holds the model (and perhaps preprocessor_config.json).
        graph_dims: the graph's ``pixel_values`` dimensions (None where dynamic).
    Returns:
        An ImageSpec.
    Raises:
        UsageError: preprocessor_config.json names a mean/std of another channel count, or a zero std.
    Example:
        >>> image_spec({"image_size": 32, "num_channels": 3}, Path("vit-hf")).height
        32
    """
    from llmconv.checkpoint import read_json

    config = config or {}
    proc: dict[str, Any] = {}
    proc_path = folder / "preprocessor_config.json" if folder is not None else None
    if proc_path is not None and proc_path.is_file():
        parsed = read_json(proc_path, what="preprocessor_config.json")
        proc = parsed if isinstance(parsed, dict) else {}
    dims = list(graph_dims or [])
    dims += [None] * (4 - len(dims))
    channels = _positive_int(config.get("num_channels")) or _positive_int(dims[1]) or 3
    fixed = True
    if _positive_int(dims[2]) and _positive_int(dims[3]):
        (h, w), where = (int(dims[2]), int(dims[3])), "the graph's pixel_values"
    elif _hw(config.get("image_size")):
        (h, w), where = _hw(config.get("image_size")), "config.json image_size"  # type: ignore[misc]
    else:
        fixed = False
        size = proc.get("size")
        crop = _hw(proc.get("crop_size")) if proc.get("do_center_crop", True) is not False else None
        edge = _positive_int(size.get("shortest_edge")) if isinstance(size, dict) else None
        found = crop or _hw(size) or ((edge, edge) if edge else None)
        if found:
            (h, w), where = found, "preprocessor_config.json"
        else:
            h = w = DEFAULT_IMAGE_SIZE
            where = f"the default {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}"
    rescale = None
    if proc.get("do_rescale", True) is not False:
        factor = proc.get("rescale_factor", 1 / 255)
        rescale = float(factor) if isinstance(factor, int | float) and not isinstance(factor, bool) else 1 / 255
    mean = std = None
    if proc.get("do_normalize", True) is not False:
        where_proc = proc_path or Path("preprocessor_config.json")
        mean = _per_channel(proc.get("image_mean"), channels, key="image_mean", path=where_proc)
        std = _per_channel(proc.get("image_std"), channels, key="image_std", path=where_proc)
        if mean is None or std is None:
            from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

            if channels == len(IMAGENET_DEFAULT_MEAN):
                mean = mean or tuple(float(v) for v in IMAGENET_DEFAULT_MEAN)
                std = std or tuple(float(v) for v in IMAGENET_DEFAULT_STD)
            else:
                mean = std = None  # ImageNet's statistics are for RGB; leave other images as rescaled pixels
    return ImageSpec(num_channels=channels, height=h, width=w, mean=mean, std=std, rescale_factor=rescale,
                     fixed_size=fixed, size_from=where)


def synthetic_pixels(image: ImageSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``pixel_values`` [batch, channels, height, width] (float32) as the image processor makes them from
    pictures of whole pixel values drawn uniformly in [0, 255]."""
    x = rng.integers(0, 256, size=(batch, image.num_channels, image.height, image.width)).astype(np.float64)
    if image.rescale_factor is not None:
        x *= image.rescale_factor
    if image.mean is not None and image.std is not None:
        x = (x - np.asarray(image.mean)[:, None, None]) / np.asarray(image.std)[:, None, None]
    return x.astype(np.float32)


def main_shape(feed: dict[str, Any]) -> list[int] | None:
    """The shape of a feed's main input: ``input_ids``, else ``pixel_values``, else its first array."""
    main = next((feed[k] for k in ("input_ids", "pixel_values") if k in feed), None)
    if main is None:
        main = next(iter(feed.values()), None)
    return [int(d) for d in np.shape(main)] if main is not None else None


def feed_shapes(feeds: list[dict[str, Any]]) -> list[list[int]]:
    """The distinct shapes of the main input (:func:`main_shape`) the feeds were tried at, in order: the
    ``shapes`` of a report's ``inputs`` block.

    Example:
        >>> feed_shapes([{"input_ids": np.zeros((2, 8))}, {"input_ids": np.zeros((1, 1))}])
        [[2, 8], [1, 1]]
    """
    out: list[list[int]] = []
    for feed in feeds:
        shape = main_shape(feed) or []
        if shape not in out:
            out.append(shape)
    return out


def second_length(seq_len: int) -> int:
    """The other length dynamic axes are tried at: about half of ``seq_len`` (2 when it is 1)."""
    return max(1, (seq_len + 1) // 2) if seq_len > 2 else seq_len + 1


def synthetic_inputs(plan: InputPlan, *, batch: int, seq_len: int, samples: int, seed: int,
                     edge_shapes: bool = True) -> list[dict[str, Any]]:
    """Seeded synthetic feeds, one dict of numpy arrays per sample.

    Args:
        plan: what the models take (names, vocabulary, past layout, image layout).
        batch: rows per sample.
        seq_len: the first length; odd samples use ``second_length(seq_len)`` (token models).
        samples: how many feeds of ``batch`` rows.
        seed: the random seed; the same seed gives the same arrays.
        edge_shapes: add, after those, one feed of one row (of one token for token models) unless a
            sample has that shape already: the shape of a decode step, where a graph may fail that runs
            at larger ones. Benchmarks that time one shape turn it off.
    Returns:
        A list of feeds (name -> array).
    Example:
        >>> feeds = synthetic_inputs(InputPlan({"input_ids"}, vocab_size=100), batch=2, seq_len=8, samples=2, seed=0)
        >>> [f["input_ids"].shape for f in feeds]
        [(2, 8), (2, 4), (1, 1)]
    """
    if batch < 1 or seq_len < 1 or samples < 1:
        raise UsageError("--batch, --seq-len and --samples must be at least 1")
    unknown = sorted(plan.wants - set(KNOWN_INPUTS))
    if unknown:
        raise UsageError(f"the model takes inputs llmconv cannot make up: {', '.join(unknown)}", hint=_NPZ_HINT)
    if "pixel_values" in plan.wants:
        return _synthetic_images(plan, batch=batch, samples=samples, seed=seed, edge_shapes=edge_shapes)
    if plan.vocab_size < 1:
        raise UsageError("cannot tell the model's vocabulary size to draw token ids",
                         hint="give config.json beside the model, or your own inputs to `llmconv verify "
                              "--inputs FILE.npz`")
    lengths = [seq_len, second_length(seq_len)]
    if plan.max_positions is not None and max(lengths) > plan.max_positions:
        raise UsageError(f"--seq-len {seq_len} needs {max(lengths)} positions but the model has "
                         f"{plan.max_positions}", hint=f"use --seq-len {plan.max_positions} or less")
    pad = plan.pad_token_id
    if pad is not None and not (0 <= pad < plan.vocab_size and plan.vocab_size >= 2):
        pad = None  # a pad id outside the vocabulary (or the only id there is) is never drawn anyway
    rng = np.random.default_rng(seed)
    shapes = [(batch, lengths[s % 2]) for s in range(samples)]
    if edge_shapes and (1, 1) not in shapes:
        shapes.append((1, 1))  # last, so that the samples before it are drawn as they always were
    feeds = []
    for s, (rows, length) in enumerate(shapes):
        if pad is None:
            ids = rng.integers(0, plan.vocab_size, size=(rows, length), dtype=np.int64)
        else:  # uniform over the vocabulary without the pad id
            ids = rng.integers(0, plan.vocab_size - 1, size=(rows, length), dtype=np.int64)
            ids += ids >= pad
        mask = np.ones((rows, length), dtype=np.int64)
        pad_row = rows - 1 if rows >= 2 else (0 if s % 2 else None)
        if pad_row is not None and length >= 2:
            valid = max(1, length - max(1, length // 4))
            mask[pad_row, valid:] = 0  # right padding: every position still sees at least one token
            if pad is not None:
                ids[pad_row, valid:] = pad
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in plan.wants:
            feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length)).copy()
        if "token_type_ids" in plan.wants:
            feed["token_type_ids"] = np.zeros((rows, length), dtype=np.int64)
        feed.update(empty_past(plan.past, rows))
        feeds.append(feed)
    return feeds


def _synthetic_images(plan: InputPlan, *, batch: int, samples: int, seed: int,
                      edge_shapes: bool) -> list[dict[str, Any]]:
    """``samples`` feeds of ``batch`` images, then one of a single image (``edge_shapes``, batch > 1)."""
    image = plan.image or ImageSpec(num_channels=3, height=DEFAULT_IMAGE_SIZE, width=DEFAULT_IMAGE_SIZE)
    other = sorted(plan.wants - {"pixel_values"})
    if other:
        raise UsageError(f"the model takes pixel_values and {', '.join(other)}; llmconv makes up images only for "
                         "models that take nothing else", hint=_NPZ_HINT)
    rng = np.random.default_rng(seed)
    rows = [batch] * samples + ([1] if edge_shapes and batch > 1 else [])
    return [{"pixel_values": synthetic_pixels(image, n, rng)} for n in rows]


def empty_past(past: PastSpec | None, batch: int) -> dict[str, Any]:
    """Zero-length past key/values (``past_sequence_length`` = 0) for a graph that takes them."""
    if past is None:
        return {}
    out = {}
    for k, v in past.names:
        out[k] = np.zeros((batch, past.num_heads, 0, past.head_dim), dtype=past.dtype)
        out[v] = np.zeros((batch, past.num_heads, 0, past.head_dim), dtype=past.dtype)
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:
        raise UsageError("not an .npz file of plain arrays (numpy reads it as pickled data, which is refused)",
                         path=path, hint="save the arrays with numpy.savez(FILE, input_ids=ids, ...)") from None
    except (OSError, EOFError) as e:
        raise CorruptInput(f"not a readable .npz file ({e})", path=path,
                           hint="save the arrays with numpy.savez") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError("this is a single .npy array; --inputs takes an .npz of named arrays", path=path,
                         hint="numpy.savez(FILE, input_ids=ids, attention_mask=mask)")
    try:
        with loaded as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:
        raise UsageError(f"cannot read the inputs file: {e}", path=path,
                         hint="save arrays with numpy.savez (object arrays and pickles are refused)") from None


def load_inputs(path: Path, plan: InputPlan) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The user's inputs from an ``.npz`` file (name -> array), completed with what the models also need.

    For language models ``input_ids`` is required; a missing ``attention_mask`` is all ones,
    ``position_ids`` counts from 0, ``token_type_ids`` is zeros and past key/values are empty.
    Token ids must lie inside the vocabulary. Image models take ``pixel_values``: a finite float array
    [batch, channels, height, width] of the model's channel count, normalised as its image processor
    does. A graph that takes neither gets the arrays as they are. Pickled arrays are refused.

    Args:
        path: the ``.npz`` file.
        plan: what the models take.
    Returns:
        One feed, and the ``inputs`` block of the report (``shapes``: the main input's shape).
    Example:
        >>> feeds, meta = load_inputs(Path("inputs.npz"), plan)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such inputs file", path=path, hint="--inputs takes an .npz of name -> array")
    arrays = _read_npz(path)
    if "pixel_values" in plan.wants and "input_ids" not in plan.wants:
        return _load_images(path, arrays, plan)
    if "input_ids" not in plan.wants:
        # A graph that takes no token ids: the arrays are its inputs as they are.
        first = next(iter(arrays.values()), None)
        if first is None:
            raise UsageError("the inputs file holds no arrays", path=path)
        batch = int(first.shape[0]) if first.ndim else 1
        length = int(first.shape[1]) if first.ndim > 1 else 1
        meta = {"batch": batch, "seq_len": length, "samples": 1, "seed": None, "file": str(path),
                "shapes": feed_shapes([arrays])}
        return [dict(arrays)], meta
    if "input_ids" not in arrays:
        raise UsageError("the inputs file has no 'input_ids' array", path=path,
                         hint="numpy.savez(FILE, input_ids=ids, attention_mask=mask)")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"input_ids must be a 2-D integer array (batch, sequence), not {ids.dtype}{list(ids.shape)}",
                         path=path)
    if plan.vocab_size and (ids.min() < 0 or ids.max() >= plan.vocab_size):
        raise UsageError(f"input_ids holds ids outside the vocabulary [0, {plan.vocab_size})", path=path)
    batch, length = ids.shape
    if plan.max_positions is not None and length > plan.max_positions:
        raise UsageError(f"input_ids has {length} positions but the model has {plan.max_positions}", path=path)
    known = set(_TOKEN_INPUTS) | set(plan.wants)
    unknown = sorted(k for k in arrays if k not in known)
    if unknown:
        raise UsageError(f"the inputs file has arrays the models do not take: {', '.join(unknown)}", path=path,
                         hint="the models take " + ", ".join(sorted(k for k in plan.wants
                                                                    if not k.startswith("past_key_values"))))
    feed: dict[str, Any] = dict(arrays)
    feed["input_ids"] = ids.astype(np.int64)
    for k in ("attention_mask", "position_ids", "token_type_ids"):
        if k not in feed:
            continue
        v = feed[k]
        if tuple(v.shape) != (batch, length):
            raise UsageError(f"{k} has shape {list(v.shape)}, input_ids {[batch, length]}", path=path)
        if not (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
            raise UsageError(f"{k} must be an integer array, not {v.dtype}", path=path,
                             hint="a float mask would be cut to whole numbers; save it as int64")
    mask = feed.get("attention_mask")
    if mask is None:
        mask = np.ones_like(feed["input_ids"])
    elif not np.isin(mask, (0, 1)).all():
        raise UsageError("attention_mask holds values other than 0 and 1", path=path)
    elif not mask.any(axis=1).all():
        raise UsageError("attention_mask has a row with no token to attend to", path=path)
    feed["attention_mask"] = np.asarray(mask).astype(np.int64)
    if "position_ids" in feed:
        pos = feed["position_ids"]
        top = plan.max_positions
        if pos.min() < 0 or (top is not None and pos.max() >= top):
            raise UsageError(f"position_ids holds positions outside [0, {top if top is not None else 'inf'})",
                             path=path)
    if "position_ids" in plan.wants and "position_ids" not in feed:
        feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    if "token_type_ids" in plan.wants and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros((batch, length), dtype=np.int64)
    for k in ("position_ids", "token_type_ids"):
        if k in feed:
            feed[k] = np.asarray(feed[k]).astype(np.int64)
    for k, v in empty_past(plan.past, batch).items():
        feed.setdefault(k, v)
    feeds = [feed, *_edge_of(feed)]
    meta = {"batch": int(batch), "seq_len": int(length), "samples": len(feeds), "seed": None, "file": str(path),
            "shapes": feed_shapes(feeds)}
    return feeds, meta


def _edge_of(feed: dict[str, Any]) -> list[dict[str, Any]]:
    """The one-row feed (of one token, for token models) cut from the user's own ``feed``, as every verification
    tries it (what a decode step is); none when the feed is that shape already. A token row keeps its first real
    token, with its position id."""
    if "pixel_values" in feed:
        px = feed["pixel_values"]
        return [{**feed, "pixel_values": px[:1]}] if px.shape[0] > 1 else []
    ids = feed["input_ids"]
    if ids.shape == (1, 1):
        return []
    mask = feed.get("attention_mask")
    first = int(np.argmax(mask[0] == 1)) if mask is not None else 0
    edge: dict[str, Any] = {}
    for k, v in feed.items():
        a = np.asarray(v)
        if k.startswith("past_key_values."):
            edge[k] = a[:1]
        elif a.ndim == 2 and a.shape == ids.shape:
            edge[k] = a[:1, first:first + 1].copy()
        else:
            edge[k] = a
    return [edge]


def _load_images(path: Path, arrays: dict[str, np.ndarray], plan: InputPlan) -> tuple[list[dict[str, Any]],
                                                                                      dict[str, Any]]:
    """The user's ``pixel_values`` for an image model: float, [batch, channels, height, width], finite, of the
    model's channel count (and of its size, when it takes only one)."""
    unknown = sorted(k for k in arrays if k not in plan.wants)
    if unknown:
        raise UsageError(f"the inputs file has arrays the models do not take: {', '.join(unknown)}", path=path,
                         hint="the models take " + ", ".join(sorted(plan.wants)))
    if "pixel_values" not in arrays:
        raise UsageError("the inputs file has no 'pixel_values' array", path=path,
                         hint="numpy.savez(FILE, pixel_values=images) with images of shape "
                              "[batch, channels, height, width], normalised as the model's image processor does")
    px = arrays["pixel_values"]
    if not np.issubdtype(px.dtype, np.floating):
        raise UsageError(f"pixel_values must be a float array (the image processor's output, rescaled and "
                         f"normalised), not {px.dtype}", path=path)
    if px.ndim != 4 or 0 in px.shape:
        raise UsageError(f"pixel_values must have shape [batch, channels, height, width], not {list(px.shape)}",
                         path=path)
    image = plan.image
    if image is not None and px.shape[1] != image.num_channels:
        raise UsageError(f"pixel_values has {px.shape[1]} channels but the model takes {image.num_channels}",
                         path=path, hint="images are laid out [batch, channels, height, width]")
    if image is not None and image.fixed_size and tuple(px.shape[2:]) != (image.height, image.width):
        raise UsageError(f"pixel_values holds {px.shape[2]}x{px.shape[3]} images but the model takes "
                         f"{image.height}x{image.width} ({image.size_from})", path=path)
    if not np.isfinite(px).all():
        raise UsageError(f"pixel_values holds {int((~np.isfinite(px)).sum())} NaN or Inf values", path=path)
    feed: dict[str, Any] = {"pixel_values": px.astype(np.float32)}
    feeds = [feed, *_edge_of(feed)]
    meta = {"batch": int(px.shape[0]), "seq_len": None, "samples": len(feeds), "seed": None, "file": str(path),
            "shapes": feed_shapes(feeds)}
    return feeds, meta
