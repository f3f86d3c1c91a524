"""The in-between model: named tensors, loaded lazily, with metadata, tied aliases and a config.

Every format module opens its files as a :class:`TensorSource` and every writer consumes one, so a
conversion is ``write(open(src), dst)`` and never holds more than one tensor it made itself.
Tensors read from safetensors and zip-pickle files are views of memory-mapped files: they cost
page cache, not anonymous memory.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmconv.errors import ConversionError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
    torch.uint16: "uint16", torch.uint32: "uint32", torch.uint64: "uint64",
    torch.complex64: "complex64", torch.complex128: "complex128",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
# What `--dtype` accepts.
CAST_TARGETS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Names that hold a model's output projection. Only the fallback where the model's class cannot be read (a
# bare weights file, no transformers, an unknown model_type): a tied head is then stored as the embedding, as
# save_pretrained stores GPT-2's and Llama's. With a config, llmconv.architecture says what is tied.
_OUTPUT_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight", "cls.predictions.decoder.weight",
                         "lm_head.decoder.weight", "output_embeddings.weight")


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


_PACKED_VALUES = {dt: 2 for dt in (getattr(torch, "float4_e2m1fn_x2", None),) if dt is not None}


def packed_values(dtype: torch.dtype) -> int:
    """Values per element of ``dtype``: 2 for a packed dtype (``float4_e2m1fn_x2``), else 1."""
    return _PACKED_VALUES.get(dtype, 1)


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def values(self) -> int:
        """How many numbers the tensor holds: its elements, times two for a packed dtype (torch's
        ``float4_e2m1fn_x2`` holds two 4-bit values per element)."""
        return self.numel * packed_values(self.dtype)


@dataclass
class TensorSource:
    """Named tensors with lazy loaders, plus what travels with them.

    Attributes:
        format: the format name ("safetensors", "pytorch", "hf", "onnx").
        path: the file or folder it was read from.
        infos: name -> TensorInfo, in the order the source lists them.
        aliases: name -> canonical name, for names that share the canonical tensor's storage.
        metadata: string metadata (safetensors ``__metadata__``).
        config: the parsed config.json of an hf folder, else None.
        weights_format: the format of the weight files ("safetensors"/"pytorch"/"onnx").
        files: the weight files read (one, or the shards).
        extra_files: files of an hf folder carried over unchanged (config, tokenizer, ...).
        zero_copy: tensors are views of mapped files (a writer may keep them all alive at once).

    Setting ``config`` (the hf reader does, after reading the weights) re-chooses the canonical name of
    each group of aliases as the model's class does (:func:`retie`): the name ``save_pretrained`` keeps.
    """

    format: str
    path: Path
    infos: dict[str, TensorInfo]
    loader: Callable[[str], torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    weights_format: str = ""
    files: list[Path] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)
    zero_copy: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # The readers find aliases from shared storage before they know the config; the stored name of a
        # group must be the one transformers keeps, or from_pretrained would not find it.
        if name == "config" and value is not None and self.__dict__.get("aliases"):
            super().__setattr__("aliases", retie(self.aliases, value))

    def names(self) -> list[str]:
        return list(self.infos)

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (a view of a mapped file where the format allows)."""
        return self.loader(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.loader(name)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for n, i in self.infos.items() if n not in self.aliases)

    @property
    def num_parameters(self) -> int:
        return sum(i.values for n, i in self.infos.items() if n not in self.aliases)

    def canonical_names(self) -> list[str]:
        """Names to store when a format cannot hold aliases (safetensors).

        An alias the model ties again on load is left out, as ``save_pretrained`` leaves it out
        (:func:`left_out_when_tied`); any other alias is kept, and written as a tensor of its own, so
        that no name is lost.
        """
        dropped = self.left_out()
        return [n for n in self.infos if n not in dropped]

    def left_out(self) -> dict[str, str]:
        """The aliases a format without shared storage leaves out: alias -> the tensor stored."""
        return {a: c for a, c in self.aliases.items() if left_out_when_tied(a, c, self.config)}

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):  # closing mmaps still referenced by views can fail
                self._closers.pop()()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_output_head(name: str) -> bool:
    """Whether ``name`` is a model's output projection (lm_head.weight and its other spellings)."""
    return name.endswith(_OUTPUT_HEAD_SUFFIXES)


def ties_on_load(config: dict[str, Any] | None) -> bool:
    """Whether transformers ties the output head to the input embedding when it loads ``config``.

    ``save_pretrained`` writes ``tie_word_embeddings`` only when it differs from PretrainedConfig's
    default (true), so a config without it ties (GPT-2), and Llama's says false.
    """
    if config is None:
        return False
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    return True if value is None else bool(value)


def left_out_when_tied(alias: str, canonical: str, config: dict[str, Any] | None) -> bool:
    """Whether ``alias`` (sharing ``canonical``'s storage) may be left out of a file, as transformers does.

    With a config, the model's class decides (:mod:`llmconv.architecture`): ``alias`` is left out when
    ``tie_weights()`` makes it the same Parameter as ``canonical``, so ``from_pretrained`` ties it again
    (BART's ``model.encoder.embed_tokens.weight`` to ``model.shared.weight``; GPT-2's ``lm_head.weight``
    unless the config says ``tie_word_embeddings: false``).

    Fallback, where the class cannot be read (no transformers, a model_type it does not know, model
    code) or knows neither name: only an output head (by name, :func:`is_output_head`) tied to a
    tensor that is not a head qualifies, when the config ties them (:func:`ties_on_load`). A bare
    weights file (no config) keeps that rule too: it is written the way ``save_pretrained`` would
    write a GPT-2 or Llama file, which is what ``from_pretrained`` reads.
    """
    if config is not None:
        from llmconv.architecture import describe

        arch = describe(config)
        if arch is not None and (arch.own_name(alias) or arch.own_name(canonical)):
            return arch.ties(alias, canonical)
    if not is_output_head(alias) or is_output_head(canonical):
        return False
    return config is None or ties_on_load(config)


def retie(aliases: dict[str, str], config: dict[str, Any] | None) -> dict[str, str]:
    """``aliases`` (alias -> canonical) with each group's canonical name the one ``save_pretrained`` keeps.

    The readers group names by shared storage and pick a canonical name by :func:`choose_canonical`
    without a config; BART's four names would keep ``model.decoder.embed_tokens.weight`` where
    transformers keeps ``model.shared.weight``. With a config whose class can be read
    (:func:`llmconv.architecture.describe`), its choice is used; otherwise ``aliases`` is returned as is.
    """
    from llmconv.architecture import describe

    arch = describe(config) if aliases and config is not None else None
    if arch is None:
        return aliases
    groups: dict[str, list[str]] = {}
    for alias, canon in aliases.items():
        groups.setdefault(canon, [canon]).append(alias)
    out: dict[str, str] = {}
    for names in groups.values():
        known = [n for n in names if arch.own_name(n)]
        keep = arch.kept(known) if known else choose_canonical(names)
        out.update({n: keep for n in names if n != keep})
    return out


def find_aliases(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Group names whose tensors are the same view of the same storage.

    Returns:
        alias -> canonical name, by :func:`choose_canonical` (the readers know no config yet); setting
        a source's config re-chooses it as the model's class does (:func:`retie`).
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in named:
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = choose_canonical(names)
        for n in names:
            if n != keep:
                aliases[n] = keep
    return aliases


def choose_canonical(names: list[str]) -> str:
    """Of tied names, keep one that is not an output head; then the first in sorted order.

    The rule without a config (or a class to read, :func:`retie`): right for GPT-2 and Llama.
    """
    heads = [n for n in names if n.endswith(_OUTPUT_HEAD_SUFFIXES)]
    rest = sorted(n for n in names if n not in heads)
    return rest[0] if rest else sorted(names)[0]


def cast_source(src: TensorSource, target: torch.dtype) -> tuple[TensorSource, list[str]]:
    """A view of ``src`` whose floating-point tensors are cast to ``target`` when read.

    Args:
        src: the source.
        target: float32, float16 or bfloat16.
    Returns:
        The cast view and the names of the tensors it casts. Reading a tensor whose finite
        values overflow float16 raises ConversionError naming it and its largest magnitude.
    """
    cast_names = [n for n, i in src.infos.items() if i.dtype.is_floating_point and i.dtype != target]
    if not cast_names:
        return src, []
    to_cast = set(cast_names)
    infos = {n: (TensorInfo(n, target, i.shape) if n in to_cast else i) for n, i in src.infos.items()}

    def load(name: str) -> torch.Tensor:
        t = src.tensor(name)
        if name not in to_cast:
            return t
        return cast_tensor(name, t, target, path=src.path)

    return TensorSource(format=src.format, path=src.path, infos=infos, loader=load, aliases=dict(src.aliases),
                        metadata=dict(src.metadata), config=src.config, weights_format=src.weights_format,
                        files=list(src.files), extra_files=list(src.extra_files), zero_copy=False,
                        details={**src.details, "cast_to": dtype_name(target)}), cast_names


def cast_tensor(name: str, t: torch.Tensor, target: torch.dtype, *, path: Path | None = None) -> torch.Tensor:
    """Cast one tensor, refusing finite values that would become inf."""
    out = t.to(target)
    # Any narrowing cast can overflow: fp32/bf16 -> fp16, and fp64 -> fp32 too. An overflow shows as
    # an inf in the result, so the cheap test is the result's range (one pass, no temporary); the
    # source is searched only when the result holds an inf or NaN.
    if not (out.numel() and t.dtype.is_floating_point and torch.finfo(target).max < torch.finfo(t.dtype).max):
        return out
    low, high = torch.aminmax(out)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return out
    overflow = torch.isinf(out) & torch.isfinite(t)
    if bool(overflow.any()):
        biggest = float(t[overflow].abs().max())
        limit = torch.finfo(target).max
        raise ConversionError(
            f"tensor {name!r} has a value of magnitude {biggest:.6g}, past the {dtype_name(target)} "
            f"maximum {limit:.6g}; casting would turn it into inf", path=path,
            hint="keep this model in fp32 or bf16 (--dtype bf16)" if target == torch.float16
            else f"keep it in {dtype_name(t.dtype)} (--dtype keep)")
    return out


# Deeper than any real config or index (they nest 2-4 levels); deeper values crash the recursive code
# that reads them later (transformers' config classes, json.dumps) with RecursionError.
MAX_JSON_DEPTH = 100
MAX_CONFIG_INT = 2**31

# The config.json values llmconv reads itself, with the JSON types they must have; null stands for "not
# set". Integers are sizes and counts, never negative, and below 2**31 (torch takes sizes as 64-bit
# integers, and no model has two billion of anything per layer). (Other keys are transformers' business.)
_CONFIG_STR = ("model_type", "torch_dtype", "dtype", "tokenizer_class")
_CONFIG_BOOL = ("tie_word_embeddings", "is_decoder", "use_sliding_window")
_CONFIG_INT = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_layers",
               "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "type_vocab_size")
_CONFIG_DICT = ("text_config",)


def read_json(path: Path, *, what: str) -> Any:
    """Read a JSON file, raising InputError/CorruptInput that names it.

    Args:
        path: the file.
        what: what it is, for messages ("index file", "config.json"). For ``"config.json"`` the values
            llmconv reads are type-checked too (:func:`check_config`), so every reader of a config gets them.
    Returns:
        The parsed value.
    Raises:
        InputError: the file cannot be read.
        CorruptInput: not JSON, nested deeper than ``MAX_JSON_DEPTH``, an integer of more digits than Python
            converts (4300 by default), or a config value of the wrong type.
    """
    from llmconv.errors import CorruptInput, InputError

    try:
        text = path.read_bytes()  # decoded by json.loads, so bad UTF-8 is reported as corrupt JSON below
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}", path=path) from e
    except ValueError as e:  # a NUL byte in a path taken from another file
        raise InputError(f"cannot read {what}: the path holds a NUL byte", path=path) from e
    if text.startswith(b"\xef\xbb\xbf"):
        # json.loads(bytes) skips a BOM, transformers' json.load of the opened file does not: one rule for both.
        raise CorruptInput(f"{what} starts with a UTF-8 byte-order mark, which transformers cannot read", path=path,
                           hint="save the file as UTF-8 without the BOM")
    try:
        value = json.loads(text.decode("utf-8"))  # UTF-8 only, as transformers reads it (not UTF-16/32)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptInput(f"{what} is not valid JSON ({e})", path=path) from e
    except ValueError as e:  # int("9" * 5000): Python's guard against quadratic-time conversion
        raise CorruptInput(f"{what} holds an integer of more than {sys.get_int_max_str_digits()} digits, "
                           "too long to read", path=path, hint="no model needs such a number") from e
    except RecursionError as e:
        raise CorruptInput(f"{what} is nested too deeply to read (more than {MAX_JSON_DEPTH} levels)",
                           path=path) from e
    if _depth(value) > MAX_JSON_DEPTH:
        raise CorruptInput(f"{what} is nested too deeply to read (more than {MAX_JSON_DEPTH} levels)", path=path)
    if what == "config.json" and isinstance(value, dict):
        check_config(value, path=path)
    return value


def _depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar is 1), counted level by level without recursion."""
    depth, level = 0, [value]
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def check_config(config: dict[str, Any], *, path: Path, _prefix: str = "") -> None:
    """Check the types of the config.json values llmconv reads (``"torch_dtype": {}`` and the like).

    Args:
        config: the parsed config.json.
        path: the file, for the message.
    Raises:
        CorruptInput: naming the key, the type it has and the type it must have.
    Example:
        >>> check_config({"model_type": "gpt2", "vocab_size": 50257}, path=Path("config.json"))
    """
    from llmconv.errors import CorruptInput

    def bad(key: str, want: str) -> CorruptInput:
        shown = json.dumps(config[key], ensure_ascii=True)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return CorruptInput(f"{_prefix + key!r} must be {want}, not {shown}", path=path,
                            hint="fix the value or remove the key")

    for key in _CONFIG_STR:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise bad(key, "a string")
    if "model_type" in config and config["model_type"] is None:
        raise bad("model_type", "a string")  # transformers takes an explicit null for a model type named None
    for key in _CONFIG_BOOL:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    for key in _CONFIG_INT:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_CONFIG_INT):
            raise bad(key, f"a non-negative integer below 2**{MAX_CONFIG_INT.bit_length() - 1}")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise bad("architectures", "a list of class names")
    for key in _CONFIG_DICT:
        sub = config.get(key)
        if sub is not None and not isinstance(sub, dict):
            raise bad(key, "an object")
        if isinstance(sub, dict):
            check_config(sub, path=path, _prefix=f"{_prefix}{key}.")
