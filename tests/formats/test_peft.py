"""PEFT LoRA adapter folders (issue 14): detected as the "peft" format, described by `inspect` from their
adapter_config.json and weights, and converted between safetensors and PyTorch weights into a folder that PEFT
still loads to the same model, config carried byte for byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.make_fixtures import tiny_model
from llmconv.formats import registry

WEIGHTS = {"safetensors": "adapter_model.safetensors", "pytorch": "adapter_model.bin"}


def inspect_json(cli, path: Path) -> dict:
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read with the file's own library (not llmconv's readers)."""
    if (folder / WEIGHTS["safetensors"]).is_file():
        with safe_open(folder / WEIGHTS["safetensors"], "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    return torch.load(folder / WEIGHTS["pytorch"], map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        u = b[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(t.view(torch.uint8) if t.numel() else t, u.view(torch.uint8) if u.numel() else u), name


def peft_logits(kind: str, adapter: Path | None) -> torch.Tensor:
    """Logits of the seeded ``kind`` base with ``adapter`` loaded by PEFT (None: the base alone), on a fixed input."""
    import peft

    model = tiny_model(kind)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama-lora", "llama-lora-bin"])
def test_detected_as_peft(fx, name):
    assert registry.detect(fx(name)).name == "peft"


def test_inspect_json(cli, fx):
    path = fx("llama-lora")
    info = inspect_json(cli, path)
    assert info["format"] == "peft" and info["weights_format"] == "safetensors"
    ad = info["adapter"]
    assert ad["peft_type"] == "LORA" and ad["task_type"] == "CAUSAL_LM"
    assert ad["r"] == 4 and ad["lora_alpha"] == 8 and ad["scale"] == 2.0
    assert set(ad["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert ad["lora_dropout"] == 0.05 and ad["modules_to_save"] is None
    assert ad["use_rslora"] is False and ad["use_dora"] is False
    assert ad["lora_modules"] == 2 * 7
    with safe_open(path / WEIGHTS["safetensors"], "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert ad["parameters"] == numel == info["parameters"] and ad["lora_parameters"] == numel
    assert ad["saved_in_full"] == [] and ad["bytes"] == 4 * numel


def test_inspect_json_bin(cli, fx):
    info = inspect_json(cli, fx("llama-lora-bin"))
    assert info["format"] == "peft" and info["weights_format"] == "pytorch"
    ad = info["adapter"]
    assert ad["r"] == 4 and ad["lora_alpha"] == 8 and ad["lora_modules"] == 14
    numel = sum(t.numel() for t in read_tensors(fx("llama-lora-bin")).values())
    assert ad["parameters"] == numel == info["parameters"]


def test_inspect_json_rslora_and_modules_to_save(cli, fx):
    rs = inspect_json(cli, fx("llama-lora-rs"))["adapter"]
    assert rs["use_rslora"] is True and rs["r"] == 8 and rs["lora_alpha"] == 16
    assert rs["rank_pattern"] == {"down_proj": 2} and rs["alpha_pattern"] == {"o_proj": 3}
    assert rs["scale"] == pytest.approx(16 / math.sqrt(8))

    path = fx("llama-lora-embed")
    embed = inspect_json(cli, path)["adapter"]
    assert embed["modules_to_save"] == ["lm_head"] and set(embed["target_modules"]) == {"embed_tokens", "q_proj"}
    assert embed["lora_modules"] == 1 + 2  # embed_tokens, and q_proj in both layers
    assert "base_model.model.lm_head.weight" in embed["saved_in_full"]
    with safe_open(path / WEIGHTS["safetensors"], "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert embed["parameters"] == numel


def test_inspect_human(cli, fx):
    r = cli("inspect", fx("llama-lora"), env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    lines = {line.split("  ")[0]: line for line in (x.rstrip() for x in r.stdout.splitlines())}
    assert lines["format"].split() == ["format", "peft"]
    assert lines["rank"].split() == ["rank", "r=4"]
    assert lines["alpha"].split()[:2] == ["alpha", "8"]
    targets = lines["target modules"].split(None, 2)[2]
    assert set(targets.split(", ")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(("name", "kind"), [("llama-lora", "llama"), ("gpt2-lora", "gpt2")])
def test_round_trip_pytorch_and_back(cli, fx, tmp_path, name, kind):
    src = fx(name)
    pt, st = tmp_path / "pt", tmp_path / "st"
    r = cli("convert", src, pt, "--to", "pytorch")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = cli("convert", pt, st, "--to", "safetensors")
    assert r.exit_code == 0, r.stdout + r.stderr

    original = read_tensors(src)
    for folder, weights in ((pt, "pytorch"), (st, "safetensors")):
        assert registry.detect(folder).name == "peft"
        assert (folder / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
        assert (folder / WEIGHTS[weights]).is_file()
        assert not (folder / WEIGHTS["pytorch" if weights == "safetensors" else "safetensors"]).exists()
        assert_same_tensors(read_tensors(folder), original)
    with safe_open(st / WEIGHTS["safetensors"], "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what PEFT writes, and what transformers' loaders look for

    expected = peft_logits(kind, src)
    assert (expected - peft_logits(kind, None)).abs().max() > 1e-2  # the adapter moves the logits
    for folder in (pt, st):
        assert torch.equal(peft_logits(kind, folder), expected)


def test_single_file_destination_notes_the_config(cli, fx, tmp_path):
    src = fx("llama-lora")
    dst = tmp_path / "x.safetensors"
    r = cli("convert", src, dst, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert any("adapter_config.json" in n and "not carried" in n for n in report["notes"]), report["notes"]
    assert dst.is_file()
    with safe_open(dst, "pt") as f:
        assert sorted(f.keys()) == sorted(read_tensors(src))
