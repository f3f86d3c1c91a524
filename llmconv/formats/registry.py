"""The one place that knows which formats exist and how a path is recognised.

A format is one module that defines a :class:`Format` and registers it here. Commands never look at
extensions themselves: they call :func:`detect` or :func:`get`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmconv.errors import InputError, Unsupported, UsageError
from llmconv.io import check_usable_path

if TYPE_CHECKING:
    from llmconv.checkpoint import TensorSource

ProgressFn = Callable[[int], None]


@dataclass
class WriteOptions:
    """What a writer needs besides the tensors."""

    shard_size: int | None = None
    progress: ProgressFn | None = None
    weights_format: str | None = None  # hf folders: "safetensors" or "pytorch"
    quantize: str | None = None  # GGUF: q8_0, q4_0, q4_1, q5_0, q5_1 (None keeps float dtypes)
    notes: list[str] | None = None  # receives what the writer decided, for the report


class Format:
    """A checkpoint format: how to recognise, open and write it."""

    name: str = ""
    description: str = ""
    extensions: tuple[str, ...] = ()
    # Whether write() can produce it from named tensors (ONNX graphs come from an exporter instead).
    writable: bool = True
    folder_only: bool = False
    # Lower is tried first by detect(): an hf folder is also a folder of safetensors shards.
    priority: int = 10

    def sniff(self, path: Path, head: bytes) -> bool:
        """Recognise ``path`` (a file or a folder) from content; ``head`` is a file's first bytes."""
        raise NotImplementedError

    def open(self, path: Path) -> TensorSource:
        raise NotImplementedError

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        """Write ``src`` to ``dst`` (a file, or an existing empty folder). Returns the files written."""
        raise Unsupported(f"llmconv cannot write {self.name} from named tensors")

    def describe(self, path: Path) -> dict[str, Any]:
        """What ``inspect`` adds for this format beyond the tensors (a GGUF's metadata and type counts)."""
        return {}


_FORMATS: dict[str, Format] = {}
_SNIFF_BYTES = 16


def register(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def _load_builtin() -> None:
    # Importing a format module registers it; the ONNX module imports onnx lazily itself.
    from llmconv.formats import gguf, hf, onnx, peft, pytorch, safetensors  # noqa: F401


def all_formats() -> list[Format]:
    _load_builtin()
    return list(_FORMATS.values())


def get(name: str) -> Format:
    """The format called ``name``."""
    _load_builtin()
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise Unsupported(f"unknown format {name!r}", hint=f"known formats: {known}") from None


def by_extension(path: Path) -> Format | None:
    """The format that a destination's extension asks for, if any."""
    _load_builtin()
    suffix = path.suffix.lower()
    for fmt in _FORMATS.values():
        if suffix and suffix in fmt.extensions:
            return fmt
    return None


# Extensions of model formats llmconv does not write (yet), with what each holds: a destination ending in one
# is refused rather than turned into a folder of that name.
_FOREIGN = {
    ".ggml": "GGML (llama.cpp's old format)",
    ".ckpt": "a training checkpoint (PyTorch Lightning, TensorFlow)", ".h5": "Keras/TensorFlow HDF5",
    ".hdf5": "Keras/TensorFlow HDF5", ".keras": "Keras", ".pb": "TensorFlow SavedModel/GraphDef",
    ".tflite": "TensorFlow Lite", ".msgpack": "Flax (msgpack)", ".mlmodel": "Core ML", ".mlpackage": "Core ML",
    ".engine": "a TensorRT engine", ".plan": "a TensorRT engine", ".pt2": "a torch.export program",
    ".pkl": "a pickle", ".pickle": "a pickle", ".npz": "NumPy arrays", ".npy": "a NumPy array",
    ".tar": "an archive", ".zip": "an archive", ".gz": "an archive", ".json": "JSON",
}
# A suffix read as a file extension: a letter, then letters, digits or "_" ("Qwen2.5-0.5B" and
# "llama-3.1-8b" are folder names).
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9_]{0,15}")


def check_extension(dst: Path, *, folder_hint: str) -> None:
    """Refuse a destination whose extension names no format llmconv writes, instead of writing a folder of
    that name (``out.gguf``, ``w.ckpt``, the typo ``w.safetensor``).

    An existing folder, and a name whose suffix is no file extension, pass.

    Args:
        dst: the destination given without ``--to``.
        folder_hint: how this command writes a folder whose name has a dot (for the hint).
    Raises:
        UsageError: the extension is unknown, or belongs to a format llmconv does not write.
    """
    _load_builtin()
    dst = Path(dst)
    suffix = dst.suffix
    if not suffix or dst.is_dir() or by_extension(dst) is not None or not _EXTENSION.fullmatch(suffix):
        return
    known = sorted({e for f in _FORMATS.values() for e in f.extensions})
    writes = ", ".join(known) + ", or a folder"
    foreign = _FOREIGN.get(suffix.lower())
    if foreign is not None:
        raise UsageError(f"{suffix} is {foreign}, which llmconv does not write", path=dst,
                         hint=f"llmconv writes {writes}; run `llmconv formats` for the conversions")
    close = difflib.get_close_matches(suffix.lower(), known, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]}? " if close else ""
    raise UsageError(f"unknown destination extension {suffix}", path=dst,
                     hint=f"{guess}llmconv writes {writes}; {folder_hint}")


def detect(path: Path) -> Format:
    """Which format ``path`` holds: by content first (magic bytes, headers, index files), extension second.

    Raises:
        InputError: the path does not exist, or holds nothing llmconv recognises.
    """
    _load_builtin()
    path = Path(path)
    check_usable_path(path, must_exist=True)
    head = b""
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror or e}", path=path) from e
    for fmt in sorted(_FORMATS.values(), key=lambda f: f.priority):
        if fmt.sniff(path, head):
            return fmt
    if path.is_file():
        ext = by_extension(path)
        if ext is not None and not ext.folder_only:
            return ext
        raise InputError("not a checkpoint llmconv recognises (safetensors, PyTorch zip or pickle, ONNX)",
                         path=path, hint="run `llmconv formats` for what is supported")
    if not path.is_dir():
        raise InputError("not a regular file or folder", path=path, hint="give the checkpoint's file or folder")
    raise InputError("folder holds no model llmconv recognises: expected config.json with weights, "
                     "a *.index.json with shards, or one .safetensors/.bin/.onnx file", path=path)


def open_checkpoint(path: Path) -> TensorSource:
    """Detect and open ``path``."""
    return detect(Path(path)).open(Path(path))
