"""Hugging Face folders: detection, carried files, and outputs that from_pretrained loads with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmconv.conversion import convert
from llmconv.errors import CorruptInput, InputError
from llmconv.formats import registry, sharding

IDS = torch.tensor([[5, 17, 300, 2, 999, 64, 1, 0], [42, 43, 44, 45, 46, 47, 48, 49]])


def logits(folder: Path) -> tuple[torch.Tensor, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(IDS).logits, model


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(
        ".index.json"))


def test_detect_and_open_hf_folder(fx):
    folder = fx("gpt2-hf-bin")
    fmt = registry.detect(folder)
    assert fmt.name == "hf"
    with fmt.open(folder) as src:
        assert src.format == "hf" and src.weights_format == "pytorch"
        assert src.config["model_type"] == "gpt2"
        assert src.aliases == {"lm_head.weight": "transformer.wte.weight"}
        assert sorted(p.name for p in src.extra_files) == [
            "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer_config.json"]


def test_hf_wins_over_a_plain_safetensors_folder(fx):
    assert registry.detect(fx("gpt2-hf")).name == "hf"
    assert registry.detect(fx("llama-hf-sharded")).name == "hf"
    assert registry.detect(fx("llama-hf-bin-sharded")).name == "hf"


@pytest.mark.parametrize(("source", "to", "shard", "expected_files"), [
    ("gpt2-hf-bin", "safetensors", None, ["model.safetensors"]),
    ("gpt2-hf", "pytorch", None, ["pytorch_model.bin"]),
    ("gpt2-hf-bin", "safetensors", "100KB", [sharding.SAFETENSORS_INDEX]),
    ("gpt2-hf", "pytorch", "100KB", [sharding.PYTORCH_INDEX]),
])
def test_gpt2_outputs_load_with_from_pretrained_and_give_the_same_logits(fx, tmp_path, source, to, shard,
                                                                          expected_files):
    src = fx(source)
    dst = tmp_path / "out"
    report = convert(src, dst, to=to, shard_size=shard)
    assert report.destination_format == "hf" and report.weights_format == to
    files = weight_files(dst)
    for f in expected_files:
        assert f in files
    if shard:
        assert len(files) > 2  # index + several shards
    ref, _ = logits(src)
    out, model = logits(dst)
    assert torch.equal(out, ref)
    # The head is tied again, not left random or on the meta device.
    assert model.lm_head.weight.device.type == "cpu"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_shared_storage_in_an_untied_model_is_kept_as_a_copy(fx, tmp_path):
    """A state dict may share a head's storage with the embedding while the config does not tie them:
    leaving the head out would load a random one. It is written as a copy, and the logits match."""
    src = tmp_path / "shared"
    shutil.copytree(fx("llama-hf"), src, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(fx("llama-hf") / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, two names
    torch.save(state, src / "pytorch_model.bin")
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is False
    dst = tmp_path / "out"
    report = convert(src, dst, to="safetensors")
    assert report.dropped_aliases == {}
    assert any("lm_head.weight shares storage with model.embed_tokens.weight" in n and "written as a copy" in n
               and "the config does not tie them" in n for n in report.notes)
    assert "lm_head.weight" in load_file(dst / "model.safetensors")
    ref, _ = logits(src)
    out, _ = logits(dst)
    assert torch.equal(out, ref)


def test_llama_sharded_both_ways_gives_the_same_logits(fx, tmp_path):
    src = fx("llama-hf-sharded")
    as_bin = tmp_path / "bin"
    back = tmp_path / "st"
    convert(src, as_bin, to="pytorch", shard_size="300KB")
    convert(as_bin, back, to="safetensors")
    assert sharding.PYTORCH_INDEX in weight_files(as_bin)
    assert weight_files(back) == ["model.safetensors"]
    ref, _ = logits(src)
    for folder in (as_bin, back):
        out, _ = logits(folder)
        assert torch.equal(out, ref)


def test_carried_files_travel_unchanged(fx_copy, tmp_path):
    src = fx_copy("gpt2-hf")
    (src / "README.md").write_text("# tiny gpt2\nmodel card\n")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_bytes(b"\x00\x01binary-ish\n")
    dst = tmp_path / "out"
    convert(src, dst, to="pytorch")
    carried = ["README.md", "config.json", "extra/notes.txt", "generation_config.json", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json"]
    for rel in carried:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(
        [*carried, "pytorch_model.bin"])


def test_tokenizer_of_the_output_still_works(fx, tmp_path):
    from transformers import AutoTokenizer

    dst = tmp_path / "out"
    convert(fx("gpt2-hf-bin"), dst, to="safetensors")
    a = AutoTokenizer.from_pretrained(fx("gpt2-hf-bin"))("w1 w2 w3")["input_ids"]
    b = AutoTokenizer.from_pretrained(dst)("w1 w2 w3")["input_ids"]
    assert a == b == [4, 5, 6]


def test_config_that_is_not_json(fx_copy):
    src = fx_copy("gpt2-hf")
    (src / "config.json").write_text("{broken")
    with pytest.raises(CorruptInput, match=r"config\.json: config\.json is not valid JSON"):
        registry.open_checkpoint(src)
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptInput, match="config.json is not a JSON object"):
        registry.open_checkpoint(src)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match="folder holds no model llmconv recognises"):
        registry.detect(tmp_path)


def test_hf_folder_through_a_relative_path(fx, tmp_path, monkeypatch):
    shutil.copytree(fx("llama-hf-sharded"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    with registry.open_checkpoint(Path("model")) as src:
        assert src.details["shards"] == 6 and len(src.infos) == 21
    report = convert("model", "out", to="pytorch", shard_size="300KB")
    assert all(f.startswith("out/") for f in report.files)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "model" / "tokenizer.json").read_bytes()


def _hf_cache_snapshot(src: Path, cache: Path) -> Path:
    """Lay ``src`` out as the Hugging Face hub cache does: snapshot files are links to ../../blobs/HASH."""
    import hashlib

    blobs = cache / "models--org--tiny" / "blobs"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


def test_sharded_model_in_the_hub_cache_layout(fx, tmp_path):
    snapshot = _hf_cache_snapshot(fx("llama-hf-sharded"), tmp_path / "hub")
    with registry.open_checkpoint(snapshot) as src:
        assert src.details["shards"] == 6
        assert all(f.parent == snapshot for f in src.files)
    dst = tmp_path / "out"
    convert(snapshot, dst, to="pytorch")
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert (dst / "config.json").read_bytes() == (fx("llama-hf-sharded") / "config.json").read_bytes()
    ref, _ = logits(fx("llama-hf-sharded"))
    out, _ = logits(dst)
    assert torch.equal(out, ref)


def test_hub_cache_layout_does_not_open_other_links(fx, tmp_path):
    from llmconv.errors import UnsafeInput

    snapshot = _hf_cache_snapshot(fx("llama-hf-sharded"), tmp_path / "hub")
    elsewhere = tmp_path / "elsewhere.safetensors"
    shard = snapshot / "model-00001-of-00006.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(elsewhere)
    with pytest.raises(UnsafeInput, match="resolves outside the model's folder"):
        registry.open_checkpoint(snapshot)


def test_hidden_folders_are_not_carried(fx_copy, tmp_path):
    src = fx_copy("gpt2-hf")
    (src / ".git" / "lfs").mkdir(parents=True)
    (src / ".git" / "lfs" / "model.safetensors").write_bytes(b"all the weights again")
    (src / ".cache" / "huggingface").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "download.metadata").write_text("x")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    dst = tmp_path / "out"
    convert(src, dst)
    assert not (dst / ".git").exists() and not (dst / ".cache").exists()
    assert (dst / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"


def test_an_hf_folder_cannot_be_made_without_a_config(fx, tmp_path):
    from llmconv.errors import UsageError

    dst = tmp_path / "out"
    with pytest.raises(UsageError) as info:
        convert(fx("llama.safetensors"), dst, to="hf")
    assert str(info.value).startswith(f"{dst}: an hf folder needs a config.json")
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_a_cast_folder_says_its_new_dtype_in_config_json(fx, tmp_path):
    src = fx("llama-hf")
    before = json.loads((src / "config.json").read_text())
    assert before["dtype"] == "float32"
    convert(src, tmp_path / "bf", to="pytorch", dtype="bf16")
    after = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert after == {**before, "dtype": "bfloat16"}  # nothing else changes
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf", dtype="auto").dtype == torch.bfloat16
    convert(src, tmp_path / "same", to="pytorch")  # no cast: config.json is carried byte for byte
    assert (tmp_path / "same" / "config.json").read_bytes() == (src / "config.json").read_bytes()
