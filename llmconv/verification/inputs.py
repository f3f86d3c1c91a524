"""Inputs for outputs mode: seeded synthetic batches, or the user's own arrays from an ``.npz`` file.

Synthetic inputs are deterministic for a seed: token ids drawn inside the vocabulary, an attention
mask with the last row of each batch right-padded (so a padded sample is always exercised), position
ids, token type ids and empty past key/values for graphs that take them. Samples alternate between
two sequence lengths, so dynamic axes are exercised at two sizes.

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

# Inputs the verifier knows how to make; anything else a graph requires must come from --inputs.
KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


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


@dataclass
class InputPlan:
    """What the inputs need to hold: the union of what both models take."""

    wants: set[str] = field(default_factory=set)
    vocab_size: int = 0
    max_positions: int | None = None
    past: PastSpec | None = None
    pad_token_id: int | None = None


def plan_for(*sigs: Any) -> InputPlan:
    """The inputs that run every model given (``runners.Signature``): the union of what they take, the
    smallest vocabulary and position count, the first past layout and pad id any of them names."""
    vocabs = [s.vocab_size for s in sigs if s.vocab_size]
    positions = [s.max_positions for s in sigs if s.max_positions]
    pads = [s.pad_token_id for s in sigs if s.pad_token_id is not None]
    return InputPlan(wants=set().union(*(s.inputs for s in sigs)), vocab_size=min(vocabs) if vocabs else 0,
                     max_positions=min(positions) if positions else None,
                     past=next((s.past for s in sigs if s.past), None), pad_token_id=pads[0] if pads else None)


def second_length(seq_len: int) -> int:
    """The other length dynamic axes are tried at: about half of ``seq_len`` (2 when it is 1)."""
    return max(1, (seq_len + 1) // 2) if seq_len > 2 else seq_len + 1


def synthetic_inputs(plan: InputPlan, *, batch: int, seq_len: int, samples: int, seed: int) -> list[dict[str, Any]]:
    """Seeded synthetic feeds, one dict of numpy arrays per sample.

    Args:
        plan: what the models take (names, vocabulary, past layout).
        batch: rows per sample.
        seq_len: the first length; odd samples use ``second_length(seq_len)``.
        samples: how many feeds.
        seed: the random seed; the same seed gives the same arrays.
    Returns:
        A list of feeds (name -> array).
    Example:
        >>> feeds = synthetic_inputs(InputPlan({"input_ids"}, vocab_size=100), batch=2, seq_len=8, samples=2, seed=0)
        >>> [f["input_ids"].shape for f in feeds]
        [(2, 8), (2, 4)]
    """
    if batch < 1 or seq_len < 1 or samples < 1:
        raise UsageError("--batch, --seq-len and --samples must be at least 1")
    unknown = sorted(plan.wants - set(KNOWN_INPUTS))
    if unknown:
        raise UsageError(f"the model takes inputs llmconv cannot make up: {', '.join(unknown)}",
                         hint="give them with --inputs FILE.npz (numpy.savez(FILE, name=array, ...))")
    if plan.vocab_size < 1:
        raise UsageError("cannot tell the model's vocabulary size to draw token ids",
                         hint="give config.json beside the model, or your own inputs with --inputs FILE.npz")
    lengths = [seq_len, second_length(seq_len)]
    if plan.max_positions is not None and max(lengths) > plan.max_positions:
        raise UsageError(f"--seq-len {seq_len} needs {max(lengths)} positions but the model has "
                         f"{plan.max_positions}", hint=f"use --seq-len {plan.max_positions} or less")
    pad = plan.pad_token_id
    if pad is not None and not (0 <= pad < plan.vocab_size and plan.vocab_size >= 2):
        pad = None  # a pad id outside the vocabulary (or the only id there is) is never drawn anyway
    rng = np.random.default_rng(seed)
    feeds = []
    for s in range(samples):
        length = lengths[s % 2]
        if pad is None:
            ids = rng.integers(0, plan.vocab_size, size=(batch, length), dtype=np.int64)
        else:  # uniform over the vocabulary without the pad id
            ids = rng.integers(0, plan.vocab_size - 1, size=(batch, length), dtype=np.int64)
            ids += ids >= pad
        mask = np.ones((batch, length), dtype=np.int64)
        pad_row = batch - 1 if batch >= 2 else (0 if s % 2 else None)
        if pad_row is not None and length >= 2:
            valid = max(1, length - max(1, length // 4))
            mask[pad_row, valid:] = 0  # right padding: every position still sees at least one token
            if pad is not None:
                ids[pad_row, valid:] = pad
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in plan.wants:
            feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        if "token_type_ids" in plan.wants:
            feed["token_type_ids"] = np.zeros((batch, length), dtype=np.int64)
        feed.update(empty_past(plan.past, batch))
        feeds.append(feed)
    return feeds


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
    Token ids must lie inside the vocabulary. A graph that takes no token ids gets the arrays as
    they are. Pickled arrays are refused.

    Args:
        path: the ``.npz`` file.
        plan: what the models take.
    Returns:
        One feed, and the ``inputs`` block of the report.
    Example:
        >>> feeds, meta = load_inputs(Path("inputs.npz"), plan)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such inputs file", path=path, hint="--inputs takes an .npz of name -> array")
    arrays = _read_npz(path)
    if "input_ids" not in plan.wants:
        # A graph that takes no token ids: the arrays are its inputs as they are.
        first = next(iter(arrays.values()), None)
        if first is None:
            raise UsageError("the inputs file holds no arrays", path=path)
        batch = int(first.shape[0]) if first.ndim else 1
        length = int(first.shape[1]) if first.ndim > 1 else 1
        meta = {"batch": batch, "seq_len": length, "samples": 1, "seed": None, "file": str(path)}
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
    known = {"input_ids", "attention_mask", "position_ids", "token_type_ids"} | set(plan.wants)
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
    meta = {"batch": int(batch), "seq_len": int(length), "samples": 1, "seed": None, "file": str(path)}
    return [feed], meta
