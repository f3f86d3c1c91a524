"""PEFT LoRA adapter folders: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``.bin``).

The folder's weights are plain named tensors (``base_model.model.<module>.lora_A.weight``, ...); what makes it an
adapter is its config, which this format carries with the weights so that PEFT still loads a converted folder.
What the adapter means for a base model (ranks, scaling, which modules it changes) is :mod:`llmconv.adapters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmconv.checkpoint import TensorSource, read_json
from llmconv.errors import CorruptInput, InputError
from llmconv.formats import pytorch, safetensors
from llmconv.formats.hf import carried_files, check_inside, copy_carried, skipped_note
from llmconv.formats.registry import Format, WriteOptions, register

ADAPTER_CONFIG = "adapter_config.json"
# The weight files PEFT's save_pretrained writes, in the order its loader looks for them.
WEIGHT_FILES = {"safetensors": "adapter_model.safetensors", "pytorch": "adapter_model.bin"}


def weight_file(folder: Path) -> tuple[Path, str] | None:
    """The adapter's weights file in ``folder`` and its format, if any."""
    for fmt, name in WEIGHT_FILES.items():
        if (folder / name).is_file():
            return folder / name, fmt
    return None


def load_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder``, parsed (a JSON object, or CorruptInput)."""
    path = folder / ADAPTER_CONFIG
    check_inside(folder, path, what="the adapter config")
    config = read_json(path, what=ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise CorruptInput(f"{ADAPTER_CONFIG} is not a JSON object", path=path)
    return config


class PeftFormat(Format):
    name = "peft"
    description = "PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors or adapter_model.bin"
    extensions = ()
    folder_only = True
    priority = 0

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and weight_file(path) is not None

    def open(self, path: Path) -> TensorSource:
        path = Path(path)
        config = load_adapter_config(path)
        found = weight_file(path)
        if found is None:
            raise InputError(f"{ADAPTER_CONFIG} but no adapter weights ({' or '.join(WEIGHT_FILES.values())})",
                             path=path)
        weights, fmt = found
        check_inside(path, weights, what="the adapter weights")
        src = safetensors.open_file(weights) if fmt == "safetensors" else pytorch.open_file(weights)
        src.format = "peft"
        src.path = path
        src.weights_format = fmt
        skipped: list[str] = []
        src.extra_files = carried_files(path, skipped=skipped)
        src.details["adapter_config"] = config
        if skipped:
            src.details["notes"] = [skipped_note(skipped)]
        return src

    def write(self, src: TensorSource, dst: Path, *, folder: bool, options: WriteOptions) -> list[Path]:
        """A folder PEFT loads: the source's folder files (``adapter_config.json``, README, tokenizer) as they
        were, and the weights under the name PEFT looks for in the chosen format, names unchanged."""
        weights_format = options.weights_format or src.weights_format or "safetensors"
        written = copy_carried(src, dst)
        target = dst / WEIGHT_FILES[weights_format]
        if weights_format == "safetensors":
            safetensors.write_file(src, src.canonical_names(), target, metadata=safetensors.default_metadata(src))
        else:
            pytorch.write_file(src, src.names(), target)
        written.append(target)
        return written

    def describe(self, path: Path) -> dict[str, Any]:
        from llmconv.adapters import summary

        return {"adapter": summary(Path(path))}


FORMAT = register(PeftFormat())
