"""GGUF: llama.cpp's one-file format (Ollama, LM Studio), read and written through the gguf package (gguf-py).

Reading maps the file (``GGUFReader``) and hands out one tensor at a time: F32/F16 as views of the file, BF16
reinterpreted, Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 dequantized to float32 by ``gguf.quants``. For the architectures of
:mod:`llmconv.formats.gguf_arch` the tensors come back under the checkpoint's names, in its layout (Llama's Q/K
permutation undone, GPT-2's Conv1D transposed back), with a config.json and tokenizer files that transformers
builds from the file's metadata, so an hf folder written from it loads with ``from_pretrained``.

Writing streams: the tensor table is written first (every shape and type is known beforehand), then each tensor
is read, laid out, converted or quantized, and written before the next is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmconv import progress as status
from llmconv.checkpoint import TensorInfo, TensorSource, dtype_name
from llmconv.errors import CorruptInput, MissingDependency, Unsupported, UsageError
from llmconv.formats import gguf_arch
from llmconv.formats.registry import Format, WriteOptions, register

MAGIC = b"GGUF"
# What ``quantize --method`` accepts for a .gguf destination.
QUANT_METHODS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Tensors llama.cpp's converter always stores in float32 (besides 1-D ones).
_F32_NAMES = ("_norm.weight", "position_embd.weight")
# Buffers a model makes itself, which some checkpoints store and llama.cpp does not read.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise MissingDependency("GGUF needs the gguf package (llama.cpp's gguf-py)",
                                hint="pip install 'llmconv[gguf]'") from e
    # The writer logs each step at INFO; llmconv reports progress itself.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    return gguf


def readable_types() -> dict[str, Any]:
    """GGML type name -> type, for the types llmconv reads (dequantizes)."""
    t = _gguf().GGMLQuantizationType
    return {x.name: x for x in (t.F32, t.F16, t.BF16, t.Q8_0, t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1)}


def quant_type(method: str):
    """The GGML type of a ``--method`` name (q8_0, ...)."""
    return getattr(_gguf().GGMLQuantizationType, method.upper())


# --------------------------------------------------------------------------------------------------- reading


def _checked_reader_class():
    """``GGUFReader`` that checks each tensor's data lies inside the file before it maps it, so a truncated file or
    a lying offset is reported with the tensor's name (the reader itself fails on a reshape)."""
    gguf = _gguf()

    class Checked(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    kind = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise _UnknownType(name, int(raw_dtype[0])) from None
                block, type_size = gguf.GGML_QUANT_SIZES[kind]
                numel = int(np.prod(dims.astype(object))) if len(dims) else 1
                end = int(start_offs) + int(offset[0]) + numel * type_size // block
                if end > size:
                    raise _PastEnd(name, end, size)
            super()._build_tensors(start_offs, fields)

    return Checked


class _UnknownType(Exception):
    def __init__(self, name: str, type_id: int) -> None:
        super().__init__(name)
        self.name, self.type_id = name, type_id


class _PastEnd(Exception):
    def __init__(self, name: str, end: int, size: int) -> None:
        super().__init__(name)
        self.name, self.end, self.size = name, end, size


def _gguf_version() -> str:
    from importlib import metadata as md

    try:
        return f"gguf {md.version('gguf')}"
    except md.PackageNotFoundError:
        return "gguf"


def _reader(path: Path):
    _gguf()  # the package imported (and its loggers quieted), or MissingDependency
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = _checked_reader_class()(path, "r")
    except _UnknownType as e:
        raise CorruptInput(f"tensor {e.name} has the unknown GGML type id {e.type_id}: the file is damaged, or newer "
                           f"than the installed gguf package ({_gguf_version()})", path=path,
                           hint="update the gguf package, or re-create the file") from None
    except _PastEnd as e:
        raise CorruptInput(f"tensor {e.name} runs to byte {e.end}, past the end of the {e.size}-byte file (truncated, "
                           "or its offset is wrong)", path=path, hint="the file is incomplete or damaged") from None
    except ValueError as e:
        raise CorruptInput(f"not a readable GGUF file: {e}", path=path) from None
    except (IndexError, OverflowError, TypeError, UnicodeDecodeError, KeyError, MemoryError) as e:
        raise CorruptInput(f"GGUF header is truncated or damaged ({type(e).__name__}: {e})", path=path,
                           hint="the file is incomplete; download or convert it again") from None
    _check_tensor_spans(path, reader)
    return reader


def _check_tensor_spans(path: Path, reader) -> None:
    """Every tensor's data after the header, aligned, without overlapping another (the reader class checked that
    each ends inside the file)."""
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    end_prev, name_prev = reader.data_offset, None
    for start, end, name in spans:
        if start < end_prev:
            what = f"overlaps {name_prev}" if name_prev else "starts inside the header"
            raise CorruptInput(f"tensor {name} {what} (offset {start - reader.data_offset})", path=path,
                               hint="the file's tensor table is damaged")
        end_prev, name_prev = end, name
        if start % reader.alignment:
            raise CorruptInput(f"tensor {name} is not aligned to {reader.alignment} bytes", path=path)


def metadata(reader, path: Path | None = None) -> dict[str, Any]:
    """Every metadata key and value, the header fields (``GGUF.*``) left out.

    Raises:
        CorruptInput: a string value is not UTF-8.
    """
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except UnicodeDecodeError:
            raise CorruptInput(f"metadata {k!r} holds a string that is not UTF-8", path=path,
                               hint="the file is damaged") from None
    return out


@contextlib.contextmanager
def reading(path: Path):
    """The ``GGUFReader`` of ``path`` (checked: tensors inside the file, not overlapping), closed on the way out."""
    reader = _reader(path)
    try:
        yield reader
    finally:
        _close_reader(reader)


def metadata_of(path: Path) -> dict[str, Any]:
    """The metadata of the GGUF file at ``path``."""
    with reading(path) as reader:
        return metadata(reader, path)


def _logical_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _load(reader_tensor, path: Path) -> torch.Tensor:
    """One tensor as torch: F32/F16 a view of the mapped file, BF16 reinterpreted, quantized types dequantized."""
    gguf = _gguf()
    t = reader_tensor
    kind = t.tensor_type
    shape = _logical_shape(t)
    T = gguf.GGMLQuantizationType
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.from_numpy of a read-only map warns
        if kind in (T.F32, T.F16):
            return torch.from_numpy(np.asarray(t.data)).reshape(shape)
        if kind == T.BF16:
            raw = np.asarray(t.data).reshape(-1)
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
        if kind.name in readable_types():
            try:
                return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), kind)).reshape(shape)
            except (ValueError, gguf.quants.QuantError) as e:
                raise CorruptInput(f"tensor {t.name} ({kind.name}) cannot be dequantized: {e}", path=path) from None
    raise Unsupported(f"tensor {t.name} is {kind.name}, which llmconv does not dequantize", path=path,
                      hint="llmconv reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; re-quantize the model "
                           "from its original weights, or convert it with llama.cpp's tools")


def refuse_unreadable(src: TensorSource) -> None:
    """Refuse, before any work, a GGUF source holding a tensor type llmconv does not dequantize.

    Raises:
        Unsupported: naming the types and the first tensor of one.
    """
    info = src.details.get("gguf") or {}
    unreadable = info.get("unreadable") or []
    if unreadable:
        first = next(n for n, k in info["types"].items() if k in unreadable)
        raise Unsupported(f"the file holds {', '.join(unreadable)} tensors (first: {first}), which llmconv does not "
                          "dequantize", path=src.path,
                          hint="llmconv reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1; convert the original "
                               "weights instead")


def refuse_unmapped(src: TensorSource, *, what: str) -> None:
    """Refuse a GGUF source holding tensors its checkpoint architecture has no place for, where that would drop
    them silently (an hf folder, transformers' loader).

    Raises:
        Unsupported: naming the tensors.
    """
    unmapped = (src.details.get("gguf") or {}).get("unmapped") or []
    if unmapped:
        shown = ", ".join(unmapped[:4]) + (" ..." if len(unmapped) > 4 else "")
        arch = (src.config or {}).get("architectures", ["?"])[0]
        them = "tensor" if len(unmapped) == 1 else "tensors"
        raise Unsupported(f"the file holds {len(unmapped)} {them} {arch} has no place for ({shown}): llama.cpp uses "
                          f"{'it' if len(unmapped) == 1 else 'them'}, so {what} would not be the same model",
                          path=src.path,
                          hint="convert it to a weights file (.safetensors keeps every tensor under its GGUF name)")


def _hf_config(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """config.json for the GGUF file, as transformers builds it from the metadata (None: transformers cannot)."""
    from transformers import AutoConfig

    from llmconv.export._quiet import quiet

    try:
        with quiet():
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except (ValueError, KeyError, OSError, NotImplementedError):
        return None
    # What differs from the class's defaults (as save_pretrained writes it), with the values the loader reads under
    # names the class ignores given under its own.
    out = config.to_diff_dict()
    out.update(gguf_arch.loader_overrides(meta))
    for key in ("n_ctx", "feed_forward_length", "transformers_version", "_model_name_or_path", "attn_implementation"):
        out.pop(key, None)
    for key, value in list(out.items()):
        if isinstance(value, float):  # float32 in the file: its shortest repr (1e-06, not 9.999999974752427e-07)
            out[key] = float(str(np.float32(value)))
    cls = gguf_arch.READ_BACK.get(out.get("model_type", ""))
    if cls is None:  # "mistral" (a file named so): transformers builds the config, and its loader then fails
        return None
    out["architectures"] = [cls]
    return out


def _hf_names(config: dict[str, Any]) -> list[str]:
    """The state dict names of ``config``'s model (built on the meta device)."""
    import transformers

    cfg = transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(cfg)
    return list(model.state_dict())


def name_map(arch: gguf_arch.Arch, config: dict[str, Any], hf_names: list[str]) -> dict[str, str | None]:
    """Checkpoint name -> GGUF name (None: a buffer llama.cpp does not read).

    Raises:
        Unsupported: a tensor the gguf package's map for the architecture does not know.
    """
    gguf = _gguf()
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf)
    blocks = int(config.get("num_hidden_layers") or config.get("n_layer"))
    tmap = gguf.get_tensor_name_map(arch_enum, blocks)
    out: dict[str, str | None] = {}
    for n in hf_names:
        g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None and n.endswith(BUFFER_SUFFIXES):
            out[n] = None
            continue
        if g is None:
            raise Unsupported(f"tensor {n} has no GGUF name for {arch.gguf} in the gguf package's map",
                              hint="the checkpoint holds a tensor llama.cpp's architecture does not have")
        out[n] = g
    return out


class GgufFormat(Format):
    name = "gguf"
    description = "GGUF (llama.cpp, Ollama, LM Studio): one file, float or Q8_0/Q4_x/Q5_x blocks"
    extensions = (".gguf",)
    priority = 5

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_file() and head[:4] == MAGIC

    def open(self, path: Path) -> TensorSource:
        return open_gguf(Path(path))

    def describe(self, path: Path) -> dict[str, Any]:
        return describe(path)

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        if folder:
            raise UsageError("a GGUF model is one file", path=dst, hint="give DST a .gguf name")
        write_gguf(src, dst, method=options.quantize, progress=options.progress, notes=options.notes)
        return [dst]


def open_gguf(path: Path, *, folder_files: bool = True) -> TensorSource:
    """The GGUF file at ``path`` as a checkpoint (the format's ``open``).

    Args:
        path: the file.
        folder_files: build config.json and the tokenizer transformers makes from the metadata, for an hf folder
            or a GGUF written from this one (``extra_files``); a check that only reads tensors does without.
    """
    reader = _reader(path)
    try:
        return _open(path, reader, folder_files=folder_files)
    except BaseException:  # the map is closed, and the error goes on as it was
        _close_reader(reader)
        raise


def _open(path: Path, reader, *, folder_files: bool) -> TensorSource:
    meta = metadata(reader, path)
    arch_name = str(meta.get("general.architecture", ""))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    unreadable = sorted({k for k in types.values() if k not in readable_types()})
    by_gguf = {t.name: t for t in reader.tensors}
    config = None
    gguf_to_hf: dict[str, str] = {}
    unmapped: list[str] = []
    notes: list[str] = []
    cls = gguf_arch.READ_BACK.get(arch_name)
    if cls is not None:
        config = _hf_config(path, meta)
        if config is None:
            notes.append(f"transformers cannot build a config from this {arch_name} file's metadata: tensors "
                         "keep their GGUF names")
    else:
        notes.append(f"architecture {arch_name or '(none)'} is not one llmconv maps back to a checkpoint "
                     f"({', '.join(sorted(gguf_arch.READ_BACK))}): tensors keep their GGUF names")
    arch = None
    hf_names: list[str] = []
    if config is not None:
        arch = gguf_arch.ARCHS[config["architectures"][0]]
        hf_names = _hf_names(config)
        forward = name_map(arch, config, hf_names)
        gguf_to_hf = {g: n for n, g in forward.items() if g is not None and g in by_gguf}
        unmapped = [g for g in by_gguf if g not in gguf_to_hf]
        if unmapped:
            notes.append(f"tensors with no checkpoint name keep their GGUF names: {', '.join(unmapped[:5])}"
                         + (" ..." if len(unmapped) > 5 else ""))
    hf_of = {g: gguf_to_hf.get(g, g) for g in by_gguf}
    gguf_of = {h: g for g, h in hf_of.items()}
    infos: dict[str, TensorInfo] = {}
    for g, t in by_gguf.items():
        kind = t.tensor_type.name
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)
        shape = _logical_shape(t)
        if arch is not None and arch.transposes(g, len(shape)):
            shape = (shape[1], shape[0])  # GPT-2's Conv1D: stored as rows of outputs, read back as (in, out)
        infos[hf_of[g]] = TensorInfo(hf_of[g], dtype, shape)
    # llama.cpp stores 1-D tensors (norms, biases) in F32 whatever the model's dtype: in a file whose weights
    # are F16/BF16, those that dtype holds exactly come back in it, as the checkpoint had them.
    narrowed: dict[str, torch.dtype] = {}
    sizes: Counter[str] = Counter()
    for t in reader.tensors:
        if len(t.shape) > 1:
            sizes[t.tensor_type.name] += int(t.n_bytes)
    main_type = sizes.most_common(1)[0][0] if sizes else "F32"  # the type of most of the matrices' bytes
    if config is not None:
        model_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(main_type)
        if model_dtype is not None:
            for g, t in by_gguf.items():
                if t.tensor_type.name == "F32" and len(t.shape) == 1:
                    values = _load(t, path)
                    if torch.equal(values.to(model_dtype).to(torch.float32), values):
                        narrowed[hf_of[g]] = model_dtype
                        infos[hf_of[g]] = TensorInfo(hf_of[g], model_dtype, infos[hf_of[g]].shape)
            config["dtype"] = dtype_name(model_dtype)  # from_pretrained(dtype="auto") loads it so
            if narrowed:
                notes.append(f"{len(narrowed)} 1-D tensors stored in F32 (as llama.cpp stores norms and biases) "
                             f"read back as {dtype_name(model_dtype)}, the file's weights dtype, which holds them "
                             "exactly")
    aliases: dict[str, str] = {}
    if config is not None and arch is not None:
        from llmconv.checkpoint import ties_on_load

        if "output.weight" not in gguf_to_hf and ties_on_load(config):
            # No output.weight: llama.cpp and transformers use the embedding as the output head.
            embed = gguf_to_hf.get("token_embd.weight")
            out_name = next((n for n in hf_names if n.endswith("lm_head.weight")), None)
            if embed and out_name:
                infos[out_name] = TensorInfo(out_name, infos[embed].dtype, infos[embed].shape)
                aliases[out_name] = embed

    def loader(name: str) -> torch.Tensor:
        name = aliases.get(name, name)
        g = gguf_of[name]
        t = _load(by_gguf[g], path)
        if name in narrowed:
            t = t.to(narrowed[name])
        if arch is not None and arch.changes_layout(g):
            t = arch.gguf_to_hf(g, t, config)
        return t

    src = TensorSource(format="gguf", path=path, infos=infos, loader=loader, aliases=aliases,
                       metadata={}, weights_format="gguf", files=[path])
    src.details["gguf"] = {
        "architecture": arch_name, "version": int(reader.fields["GGUF.version"].contents()),
        "types": {hf_of[g]: k for g, k in types.items()}, "names": {hf_of[g]: g for g in by_gguf},
        "unreadable": unreadable, "main_type": main_type,
        # Tensors the checkpoint's architecture has no place for (attention biases of a Llama, Llama 3.1's
        # rope_freqs): llama.cpp uses them, transformers and an hf folder cannot.
        "unmapped": unmapped,
        # Tensors whose GGUF rows are the checkpoint's columns (GPT-2's Conv1D): quantization blocks run along
        # the checkpoint's first dimension.
        "transposed": sorted(hf_of[g] for g, t in by_gguf.items()
                             if arch is not None and arch.transposes(g, len(t.shape))),
    }
    src.details["notes"] = notes
    src._closers.append(lambda: _close_reader(reader))
    if config is not None:
        src.config = config
    if config is not None and folder_files:
        scratch = Path(tempfile.mkdtemp(prefix="llmconv-gguf-"))
        src._closers.append(lambda: _remove_tree(scratch))
        try:
            src.extra_files = _folder_files(path, meta, config, scratch)
        except BaseException:  # the scratch folder and the map are released, and the error goes on
            src.close()
            raise
    return src

def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _close_reader(reader) -> None:
    mm = getattr(reader, "data", None)
    mmap_obj = getattr(mm, "_mmap", None)
    if mmap_obj is not None:
        with contextlib.suppress(Exception):
            mmap_obj.close()


def _folder_files(path: Path, meta: dict[str, Any], config: dict[str, Any], scratch: Path) -> list[Path]:
    """config.json, and the tokenizer transformers builds from the GGUF's vocabulary, for an hf folder."""
    from llmconv.export._quiet import quiet

    (scratch / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = [scratch / "config.json"]
    try:
        from transformers import AutoTokenizer

        with quiet():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
            # transformers' GGUF tokenizer does not read these (a Llama's always adds its bos): the file decides.
            for typ in ("bos", "eos"):
                flag = meta.get(f"tokenizer.ggml.add_{typ}_token")
                if isinstance(flag, bool) and hasattr(tok, f"add_{typ}_token"):
                    with contextlib.suppress(AttributeError, ValueError):
                        setattr(tok, f"add_{typ}_token", flag)
            written = tok.save_pretrained(scratch)
        files += sorted({Path(f) for f in written if Path(f).is_file()})
    except (ValueError, KeyError, OSError, TypeError, NotImplementedError, IndexError):
        pass  # a file without tokenizer metadata: the folder carries the config only
    return files


# --------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Plan:
    """One tensor as ``write_gguf`` writes it."""

    src_name: str  # the checkpoint's name
    name: str  # the GGUF name
    gtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # in GGUF's layout (GPT-2's Conv1D transposed)
    nbytes: int


@contextlib.contextmanager
def _gguf_warnings():
    """The gguf package's warnings (special token ids out of range, merges missing) as a list, not on stderr."""
    caught: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    lg = logging.getLogger("gguf")
    handler, propagate = Keep(logging.WARNING), lg.propagate
    lg.addHandler(handler)
    lg.propagate = False
    try:
        yield caught
    finally:
        lg.removeHandler(handler)
        lg.propagate = propagate


def _float_type(dtype: torch.dtype):
    T = _gguf().GGMLQuantizationType
    return {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}.get(dtype)


def plan(src: TensorSource, method: str | None) -> tuple[str, gguf_arch.Arch, list[_Plan], list[str]]:
    """What ``write_gguf`` writes: each tensor's GGUF name, type and size (no tensor is read).

    Returns:
        (the checkpoint class, its GGUF layout, one entry per tensor in writing order, notes).
    """
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    cls, arch = gguf_arch.arch_for(src.config, path=src.path)
    names = src.canonical_names()
    mapping = name_map(arch, src.config, names)
    qtype = quant_type(method) if method else None
    head = "output.weight" if "output.weight" in mapping.values() else "token_embd.weight"
    entries, notes, fallbacks = [], [], []
    for n in names:
        g = mapping[n]
        if g is None:
            notes.append(f"{n} is a buffer llama.cpp does not read: not written")
            continue
        info = src.infos[n]
        shape = tuple(info.shape)
        if arch.transposes(g, len(shape)):
            shape = (shape[1], shape[0])
        if len(shape) <= 1 or g.endswith(_F32_NAMES):
            gtype = T.F32  # as llama.cpp keeps 1-D tensors (norms, biases) and position embeddings
        elif qtype is not None:
            gtype = qtype
            if qtype != T.Q8_0 and g == head:
                gtype = T.Q8_0  # llama-quantize keeps the output head at a higher precision than 4/5 bits
            block = gguf.GGML_QUANT_SIZES[gtype][0]
            if shape[-1] % block:
                gtype = T.F16
                fallbacks.append(f"{g} (rows of {shape[-1]} are not a multiple of {block})")
        else:
            gtype = _float_type(info.dtype)
            if gtype is None:
                raise Unsupported(f"tensor {n} is {dtype_name(info.dtype)}, which GGUF does not hold as a float",
                                  path=src.path, hint="cast it first (--dtype fp16 or fp32)")
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        numel = int(np.prod(shape)) if shape else 1
        entries.append(_Plan(n, g, gtype, shape, numel * size // block))
    if fallbacks:
        notes.append(f"kept in F16, as llama.cpp does when a tensor cannot be quantized: {', '.join(fallbacks)}")
    if qtype is not None and qtype != T.Q8_0 and any(e.name == head and e.gtype == T.Q8_0 for e in entries):
        notes.append(f"{head} (the output head) is Q8_0: llama-quantize keeps the head above 4/5 bits (its Q6_K is "
                     "not available in the gguf package)")
    return cls, arch, entries, notes


def _file_type(entries: list[_Plan], method: str | None):
    gguf = _gguf()
    F = gguf.LlamaFileType
    if method:
        return getattr(F, f"MOSTLY_{method.upper()}")
    kinds = Counter(e.gtype.name for e in entries if len(e.shape) > 1)
    main = kinds.most_common(1)[0][0] if kinds else "F32"
    return {"F32": F.ALL_F32, "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16}[main]


def _convert(t: torch.Tensor, e: _Plan) -> np.ndarray:
    """The bytes of one tensor in its GGUF type."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if e.gtype == T.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if e.gtype in (T.F32, T.F16):
        target = torch.float32 if e.gtype == T.F32 else torch.float16
        return t.to(target).contiguous().numpy()
    data = t.to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, e.gtype)


def write_gguf(src: TensorSource, dst: Path, *, method: str | None = None, progress=None,
               notes: list[str] | None = None) -> None:
    """Write ``src`` (an hf checkpoint with its config) as a GGUF file at ``dst``, one tensor at a time.

    Args:
        src: the checkpoint; its config says the architecture, its folder's tokenizer files the vocabulary.
        dst: the file to write (atomic_output's temporary name).
        method: None keeps each tensor's float dtype (1-D tensors in float32); q8_0/q4_0/q4_1/q5_0/q5_1 quantize.
        progress: called with the bytes written of each tensor.
        notes: receives what the writer decided (fallbacks, tokenizer).
    """
    gguf = _gguf()
    cls, arch, entries, plan_notes = plan(src, method)
    config = src.config or {}
    writer = gguf.GGUFWriter(None, arch.gguf)
    name = config.get("_name_or_path") or src.path.name
    if cls == "MistralForCausalLM":
        # Written as llama, as llama.cpp does. transformers' loader would read general.name "mistral" as a Mistral,
        # and then fails (the gguf package has no "mistral" architecture): the file reads back as a Llama.
        plan_notes.append("MistralForCausalLM is written as general.architecture llama, as llama.cpp writes it; it "
                          "reads back as LlamaForCausalLM (the same computation without a sliding window)")
        if config.get("sliding_window"):
            plan_notes.append(f"sliding_window {config['sliding_window']} is not represented in the GGUF (llama.cpp "
                              "attends to the whole context): outputs differ on sequences longer than the window")
    writer.add_type("model")
    writer.add_name(str(name))
    for _key, method_name, value in gguf_arch.hyper_parameters(arch, config):
        getattr(writer, method_name)(value)
    vocab = int(config.get("vocab_size") or 0)
    if vocab:
        writer.add_vocab_size(vocab)
    writer.add_file_type(_file_type(entries, method))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter, for every file
    with _gguf_warnings() as warned:
        plan_notes += _add_vocab(writer, src, vocab)
    plan_notes += [f"tokenizer: {w}" for w in warned]
    for e in entries:
        if e.gtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if e.gtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(e.name, e.shape, np.dtype(dtype), e.nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(e.shape, e.gtype)
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), e.nbytes, raw_dtype=e.gtype)
    writer.write_header_to_file(path=Path(dst))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        with status.bytes(sum(e.nbytes for e in entries), "bytes written", also=progress) as advance:
            for e in entries:
                t = src.tensor(e.src_name)
                t = arch.hf_to_gguf(e.name, t, config)
                data = _convert(t, e)
                del t
                if data.nbytes != e.nbytes:
                    raise RuntimeError(f"{e.name}: {data.nbytes} bytes made, {e.nbytes} planned")
                writer.write_tensor_data(data)
                del data
                advance(e.nbytes)
    finally:
        writer.close()
    if notes is not None:
        notes += plan_notes


# ------------------------------------------------------------------------------------------------ vocabulary

# The pre-tokenizer regexes llama.cpp names (tokenizer.ggml.pre), as tokenizer.json writes them in a Split.
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _SPLIT_TAIL: "qwen2",
}


def _pre_tokenizer(tok: dict[str, Any]) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization (None: not one it knows)."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        # llama.cpp's gpt-2 pre-tokenizer adds no space before the text
        return None if pre.get("add_prefix_space") else "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        splits = [p for p in parts if p.get("type") == "Split"]
        if len(splits) == 1 and any(p.get("type") == "ByteLevel" and not p.get("use_regex", True) for p in parts):
            regex = (splits[0].get("pattern") or {}).get("Regex")
            return _PRE_REGEXES.get(regex)
    return None


def _add_vocab(writer, src: TensorSource, vocab_size: int) -> list[str]:
    """tokenizer.ggml.* from the folder's tokenizer.json (a byte-level BPE, as llama.cpp's get_vocab_base reads it):
    tokens in id order, their types, the merges, special token ids and the chat template (gguf.SpecialVocab)."""
    gguf = _gguf()
    files = {f.name: f for f in src.extra_files}
    if "tokenizer.json" not in files:
        raise Unsupported("the folder has no tokenizer.json: a GGUF without a vocabulary does not load in llama.cpp",
                          path=src.path, hint="add the model's tokenizer files to the folder")
    try:
        tok = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptInput(f"tokenizer.json cannot be read: {e}", path=files["tokenizer.json"]) from None
    model = tok.get("model") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        spm = model.get("byte_fallback")
        raise Unsupported(f"tokenizer.json holds a {model.get('type')} tokenizer"
                          f"{' with byte fallback (SentencePiece-style)' if spm else ''}; llmconv writes byte-level "
                          "BPE vocabularies (GPT-2, Llama 3, Qwen2) to GGUF", path=files["tokenizer.json"],
                          hint="convert with llama.cpp's convert_hf_to_gguf.py" + (
                              ", which reads SentencePiece tokenizers" if spm else ""))
    if tok.get("normalizer"):
        kind = (tok["normalizer"] or {}).get("type")
        raise Unsupported(f"tokenizer.json normalizes text ({kind}) before it splits it, which a GGUF vocabulary "
                          "does not record: llama.cpp would tokenize differently", path=files["tokenizer.json"],
                          hint="convert with llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer(tok)
    if pre is None:
        raise Unsupported("tokenizer.json's pre-tokenizer is not one llama.cpp names (gpt-2, llama-bpe, qwen2): "
                          "llama.cpp would split text differently from the model's tokenizer",
                          path=files["tokenizer.json"], hint="convert with llama.cpp's convert_hf_to_gguf.py")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tok.get("added_tokens") or []}
    for a in added.values():
        vocab.setdefault(a["content"], int(a["id"]))
    reverse = {i: t for t, i in vocab.items()}
    top = max(reverse) + 1 if reverse else 0
    if vocab_size and top > vocab_size:
        raise Unsupported(f"the tokenizer has token ids up to {top - 1}, and the model's embedding {vocab_size} rows: "
                          "llama.cpp sizes the embedding from the token list and would refuse the file",
                          path=files["tokenizer.json"], hint="resize the model's embeddings to the tokenizer first")
    size = max(vocab_size, top)
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(T.CONTROL if added[token].get("special") else T.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    from llmconv.formats.hf import linked_view

    wanted = {n: f for n, f in files.items() if n in ("tokenizer.json", "tokenizer_config.json", "config.json",
                                                      "special_tokens_map.json")}
    with linked_view(wanted) as view:
        special = gguf.SpecialVocab(view, load_merges=True, n_vocab=len(tokens))
        adds = _adds_specials(view / "tokenizer.json")
    for typ, added in adds.items():  # what the tokenizer does, where its config does not say it
        special.add_special_token.setdefault(typ, added)
    special.add_to_gguf(writer, quiet=True)
    return []


def _adds_specials(tokenizer_json: Path) -> dict[str, bool]:
    """Whether the tokenizer puts a special token before (bos) or after (eos) the text, as its post-processor does."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
        plain = tok.encode("a b", add_special_tokens=False).ids
        full = tok.encode("a b").ids
    except Exception:  # noqa: BLE001 - a tokenizer the library cannot run: say nothing of it
        return {}
    if not plain or plain not in [full[i:i + len(plain)] for i in range(len(full) - len(plain) + 1)]:
        return {}
    start = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
    return {"bos": start > 0, "eos": start + len(plain) < len(full)}


FORMAT = register(GgufFormat())


def describe(path: Path) -> dict[str, Any]:
    """For ``inspect``: architecture, metadata (long arrays summarised), tensor types, sizes."""
    reader = _reader(path)
    try:
        meta = metadata(reader, path)
        shown: dict[str, Any] = {}
        for k, v in meta.items():
            if isinstance(v, list) and len(v) > 8:
                shown[k] = f"[{len(v)} items: {', '.join(repr(x) for x in v[:3])}, ...]"
            else:
                shown[k] = v
        types = Counter(t.tensor_type.name for t in reader.tensors)
        type_bytes = Counter()
        for t in reader.tensors:
            type_bytes[t.tensor_type.name] += int(t.n_bytes)
        return {"gguf_architecture": meta.get("general.architecture"),
                "gguf_version": int(reader.fields["GGUF.version"].contents()), "gguf_metadata": shown,
                "gguf_types": dict(sorted(types.items())), "gguf_type_bytes": dict(sorted(type_bytes.items())),
                "unreadable_types": sorted(k for k in types if k not in readable_types())}
    finally:
        _close_reader(reader)


