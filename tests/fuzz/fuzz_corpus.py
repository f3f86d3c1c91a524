"""The seed corpus of the fuzzing suite: one small valid input per reader, built in code.

Every seed is a folder ``model/`` (what the mutators edit) inside a case folder that also holds
bait outside the model: ``secret.txt`` (a fake secret that must never reach an output), and
valid copies of a shard and of an external data file that a reference escaping the folder would
read happily (so that accepting ``../outside.safetensors`` shows up as a wrong answer, not as a
missing file).

Tensors are tiny (a few bytes each) so that one case costs milliseconds; they still cover several
dtypes, a scalar, an empty tensor, a view into a larger storage and a tied alias.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

FAKE_SECRET = "FAKE-SECRET-123"
SECRET_FILE = "secret.txt"
OUTSIDE_SHARD = "outside.safetensors"
OUTSIDE_BIN = "outside.bin"
OUTSIDE_DATA = "outside.data"
MODEL_DIR = "model"
# What a model folder's code would leave behind if llmconv ran it (it never may).
CODE_RAN_MARKER = "CODE-RAN"


@dataclass(frozen=True)
class Seed:
    """One reader's seed.

    Attributes:
        kind: the reader it feeds (``st_single``, ``onnx_external``, ...).
        arg: the CLI argument, relative to the case folder (``model/model.safetensors`` or ``model``).
        folder: whether the argument is a folder.
        onnx: whether it is an ONNX model (inspected, converted and verified in weights mode).
    """

    kind: str
    arg: str
    folder: bool
    onnx: bool = False


SEEDS: dict[str, Seed] = {s.kind: s for s in (
    Seed("st_single", f"{MODEL_DIR}/model.safetensors", False),
    Seed("st_sharded", MODEL_DIR, True),
    Seed("pt_zip", f"{MODEL_DIR}/pytorch_model.bin", False),
    Seed("pt_legacy", f"{MODEL_DIR}/pytorch_model.bin", False),
    Seed("pt_sharded", MODEL_DIR, True),
    Seed("hf", MODEL_DIR, True),
    Seed("onnx_inline", f"{MODEL_DIR}/model.onnx", False, onnx=True),
    Seed("onnx_external", f"{MODEL_DIR}/model.onnx", False, onnx=True),
)}
KINDS = tuple(SEEDS)


def _tensors() -> dict:
    """The tiny state dict every weights seed holds (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 3, generator=g)
    return {
        "embed.weight": torch.randn(4, 3, generator=g),
        "layer.0.bias": torch.randn(3, generator=g).to(torch.float16),
        "layer.0.scale": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "layer.0.window": base[2:5],  # a view into a larger storage (torch seeds keep the storage)
        "step": torch.tensor(12345, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }


def _save_st(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _split(tensors: dict) -> list[dict]:
    names = sorted(tensors)
    half = len(names) // 2
    return [{n: tensors[n] for n in names[:half]}, {n: tensors[n] for n in names[half:]}]


def _write_index(folder: Path, name: str, shards: list[dict], stem: str, ext: str) -> list[str]:
    files = [f"{stem}-{i:05d}-of-{len(shards):05d}{ext}" for i in range(1, len(shards) + 1)]
    weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def _build_weights(kind: str, model: Path, case: Path) -> None:
    import torch

    tensors = _tensors()
    if kind == "st_single":
        _save_st(tensors, model / "model.safetensors", {"format": "pt", "note": "seed"})
    elif kind == "st_sharded":
        shards = _split(tensors)
        files = _write_index(model, "model.safetensors.index.json", shards, "model", ".safetensors")
        for f, shard in zip(files, shards, strict=True):
            _save_st(shard, model / f, {"format": "pt"})
        shutil.copyfile(model / files[0], case / OUTSIDE_SHARD)
    elif kind in ("pt_zip", "pt_legacy"):
        tensors["lm_head.weight"] = tensors["embed.weight"]  # a tied alias, as GPT-2 state dicts hold
        torch.save(tensors, model / "pytorch_model.bin", _use_new_zipfile_serialization=kind == "pt_zip")
    elif kind == "pt_sharded":
        shards = _split(tensors)
        files = _write_index(model, "pytorch_model.bin.index.json", shards, "pytorch_model", ".bin")
        for f, shard in zip(files, shards, strict=True):
            torch.save(shard, model / f)
        shutil.copyfile(model / files[0], case / OUTSIDE_BIN)
    else:
        raise KeyError(kind)


def _build_hf(model: Path, case: Path) -> None:
    """A GPT-2 config (through transformers' config class) with matching tiny weights; no model is built."""
    import torch
    import transformers as tf

    config = tf.GPT2Config(n_layer=1, n_head=1, n_embd=4, vocab_size=8, n_positions=16, n_inner=8)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(model)
    g = torch.Generator().manual_seed(11)
    tensors = {
        "transformer.wte.weight": torch.randn(8, 4, generator=g),
        "transformer.wpe.weight": torch.randn(16, 4, generator=g),
        "transformer.ln_f.weight": torch.ones(4),
        "transformer.ln_f.bias": torch.zeros(4),
        "transformer.h.0.attn.c_attn.bias": torch.randn(12, generator=g).to(torch.float16),
    }
    _save_st(tensors, model / "model.safetensors", {"format": "pt"})
    (model / "tokenizer_config.json").write_text('{"model_max_length": 16}\n', encoding="utf-8")
    (model / "README.md").write_text("# tiny seed\n", encoding="utf-8")


def _onnx_model(model: Path, case: Path, *, external: bool) -> None:
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    h = rng.standard_normal(2).astype(np.float16)
    shape = np.array([-1, 3], dtype=np.int64)
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [4, 3], w.tobytes(), raw=True),
        helper.make_tensor("B", TensorProto.FLOAT, [3], b.tolist()),  # typed float_data, not raw_data
        helper.make_tensor("H", TensorProto.FLOAT16, [2], h.tobytes(), raw=True),
        helper.make_tensor("shape", TensorProto.INT64, [2], shape.tobytes(), raw=True),
    ]
    if external:
        blob = bytearray()
        for t in (inits[0], inits[2]):
            raw = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", "weights.bin"), ("offset", str(len(blob))), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            blob += raw + b"\0" * (-len(raw) % 16)
        (model / "weights.bin").write_bytes(bytes(blob))
        (case / OUTSIDE_DATA).write_bytes(bytes(blob))
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y0"]),
        helper.make_node("Reshape", ["Y0", "shape"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10,
                              producer_name="llmconv-fuzz-seed")
    (model / "model.onnx").write_bytes(proto.SerializeToString())


def build_seed(kind: str, case: Path) -> Path:
    """Build ``kind``'s seed in the (new) case folder ``case``; returns the CLI argument's path."""
    model = case / MODEL_DIR
    model.mkdir(parents=True)
    (case / SECRET_FILE).write_text(FAKE_SECRET + "\n", encoding="utf-8")
    if kind == "hf":
        _build_hf(model, case)
    elif kind == "onnx_inline":
        _onnx_model(model, case, external=False)
    elif kind == "onnx_external":
        _onnx_model(model, case, external=True)
    else:
        _build_weights(kind, model, case)
    return case / SEEDS[kind].arg


class SeedCache:
    """Seeds built once under ``root`` and copied into each case folder (links kept as links)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str) -> Path:
        case = self.root / kind
        if not case.exists():
            tmp = self.root / f".{kind}.building"
            shutil.rmtree(tmp, ignore_errors=True)
            build_seed(kind, tmp)
            tmp.rename(case)
        return case

    def copy(self, kind: str, case: Path) -> Path:
        shutil.copytree(self.path(kind), case, symlinks=True)
        return case / SEEDS[kind].arg
