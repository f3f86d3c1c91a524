"""Hugging Face model folders: ``config.json`` plus weights in safetensors or PyTorch form.

Other files (tokenizer, generation config, README, ...) are carried over unchanged. Weights are
written the way ``save_pretrained`` writes them, so ``from_pretrained`` loads our output folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llmconv.checkpoint import TensorSource, read_json
from llmconv.errors import CorruptInput, InputError
from llmconv.formats import pytorch, safetensors, sharding
from llmconv.formats.registry import Format, WriteOptions, register

# Weight files in the order transformers looks for them.
_WEIGHT_CANDIDATES = (
    (sharding.SAFETENSORS_INDEX, "safetensors"),
    ("model.safetensors", "safetensors"),
    (sharding.PYTORCH_INDEX, "pytorch"),
    ("pytorch_model.bin", "pytorch"),
)


def weight_files(folder: Path) -> tuple[Path, str] | None:
    """The weights transformers would load from ``folder`` and their format, if any."""
    for name, fmt in _WEIGHT_CANDIDATES:
        if (folder / name).is_file():
            return folder / name, fmt
    return None


def _is_weight_file(p: Path) -> bool:
    n = p.name
    return (n.endswith((".safetensors", ".bin", ".pt", ".pth")) or n in (sharding.SAFETENSORS_INDEX,
                                                                        sharding.PYTORCH_INDEX))


def carried_files(folder: Path) -> list[Path]:
    """Files of an hf folder that are not weights: they travel unchanged with a conversion."""
    out = []
    for p in sorted(folder.rglob("*")):
        # Hidden folders (.git of a cloned repo holds every weight again, .cache holds download state) stay.
        if any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]):
            continue
        if p.is_file() and not (p.parent == folder and _is_weight_file(p)) and not p.name.startswith(".llmconv"):
            out.append(p)
    return out


def load_config(folder: Path) -> dict:
    config = read_json(folder / "config.json", what="config.json")
    if not isinstance(config, dict):
        raise CorruptInput("config.json is not a JSON object", path=folder / "config.json")
    return config


_FLOAT_NAMES = {"float32", "float16", "bfloat16", "float64"}


def _record_dtype(config_path: Path, src: TensorSource) -> None:
    """Say in config.json the dtype the weights are now stored in, after a cast (--dtype).

    ``from_pretrained(dtype="auto")`` loads the dtype config.json names: left at float32, a bf16
    folder would load upcast, at twice the memory. The rest of the file is kept as it was.
    """
    import json

    from llmconv.checkpoint import dtype_name

    floats = {dtype_name(i.dtype) for n, i in src.infos.items() if i.dtype.is_floating_point}
    if len(floats) != 1:
        return
    stored = floats.pop()
    config = read_json(config_path, what="config.json")
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == stored for k in keys) or any(config.get(k) not in (None, *_FLOAT_NAMES) for k in keys):
        return
    for k in keys:
        config[k] = stored
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


class HfFormat(Format):
    name = "hf"
    description = "Hugging Face model folder: config.json + safetensors or PyTorch weights (+ tokenizer files)"
    extensions = ()
    folder_only = True
    priority = 0

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and weight_files(path) is not None

    def open(self, path: Path) -> TensorSource:
        path = Path(path)
        config = load_config(path)
        found = weight_files(path)
        if found is None:
            raise InputError("config.json but no weights (model.safetensors, pytorch_model.bin or an index)",
                             path=path)
        weights, fmt = found
        reader = safetensors.FORMAT if fmt == "safetensors" else pytorch.FORMAT
        src = reader.open(path if weights.name.endswith(".index.json") else weights)
        src.format = "hf"
        src.path = path
        src.config = config
        src.weights_format = fmt
        src.extra_files = carried_files(path)
        src.details.setdefault("shards", len([f for f in src.files if not f.name.endswith(".json")]))
        return src

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        weights_format = options.weights_format or "safetensors"
        writer = safetensors.FORMAT if weights_format == "safetensors" else pytorch.FORMAT
        written = []
        root = src.path if src.path.is_dir() else None
        for extra in src.extra_files:
            rel = extra.relative_to(root) if root else Path(extra.name)
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extra, target)
            written.append(target)
            if rel == Path("config.json") and src.details.get("cast_to"):
                _record_dtype(target, src)
        written += writer.write(src, dst, folder=True, options=options)
        return written


FORMAT = register(HfFormat())
