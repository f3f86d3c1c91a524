"""`llmconv inspect`: the figures, in JSON and for people."""

from __future__ import annotations

import json
import shutil


def inspect_json(cli, path) -> dict:
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_hf_folder_with_tied_weights(cli, fx):
    info = inspect_json(cli, fx("gpt2-hf-bin"))
    assert info["schema"] == "llmconv.inspect/1" and info["ok"] is True
    assert info["format"] == "hf" and info["weights_format"] == "pytorch"
    assert info["architecture"] == "GPT2LMHeadModel" and info["model_type"] == "gpt2"
    assert info["tensors"] == 28 and info["parameters"] == 173_824
    assert info["bytes"] == 695_296 and info["dtypes"] == {"float32": 28}
    assert info["bytes_by_dtype"] == {"float32": 695_296}
    assert info["shards"] == 1 and info["files"] == ["pytorch_model.bin"]
    assert info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "tokenizer.json" in info["extra_files"] and "config.json" in info["extra_files"]
    assert info["largest"][0] == {"name": "transformer.wte.weight", "dtype": "float32", "shape": [1024, 64],
                                  "bytes": 262_144}


def test_sharded_hf_folder(cli, fx):
    info = inspect_json(cli, fx("llama-hf-sharded"))
    assert info["format"] == "hf" and info["weights_format"] == "safetensors"
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["shards"] == 6 and info["tensors"] == 21 and info["parameters"] == 205_120
    assert len([f for f in info["files"] if f.endswith(".safetensors")]) == 6
    assert "model.safetensors.index.json" in info["files"]
    assert info["metadata"] == {"format": "pt"} and info["tied"] == {}
    assert info["tie_word_embeddings"] is False  # written in config.json: not the default
    assert info["tied_by_config"] == []


def test_tie_that_only_the_config_shows(cli, fx):
    # transformers stores GPT-2's head once, as the embedding: the files hold no lm_head.weight, and
    # its config.json leaves tie_word_embeddings at the class default (true).
    info = inspect_json(cli, fx("gpt2-hf"))
    assert "lm_head.weight" not in [t["name"] for t in info["largest"]] and info["tied"] == {}
    assert info["tie_word_embeddings"] is None and info["tied_by_config"] == ["lm_head.weight"]
    r = cli("inspect", fx("gpt2-hf"), env={"COLUMNS": "200"})
    assert "tied          lm_head.weight = input embedding (by config: stored once, tied on load)" in r.stdout


def test_sharded_folder_given_as_a_relative_path(cli, fx, tmp_path, monkeypatch):
    shutil.copytree(fx("llama-hf-bin-sharded"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    info = inspect_json(cli, "model")
    assert info["path"] == "model" and info["shards"] == 6
    assert all(not f.startswith("/") for f in info["files"])
    r = cli("inspect", "model")
    assert r.exit_code == 0 and "llama" in r.stdout


def test_mixed_dtypes_histogram_and_metadata(cli, fx):
    info = inspect_json(cli, fx("mixed-dtypes.safetensors"))
    assert info["format"] == "safetensors" and info["tensors"] == 12 and info["parameters"] == 115
    assert info["dtypes"] == {"bfloat16": 1, "bool": 1, "float16": 1, "float32": 4, "float64": 1, "int32": 1,
                              "int64": 1, "int8": 1, "uint8": 1}
    assert info["bytes_by_dtype"]["float32"] == (32 + 0 + 1 + 5) * 4
    assert info["bytes"] == sum(info["bytes_by_dtype"].values()) == 406
    assert info["files"] == ["mixed-dtypes.safetensors"] and info["shards"] == 1
    assert info["architecture"] is None and info["tied_by_config"] is None
    info = inspect_json(cli, fx("llama.safetensors"))
    assert info["metadata"] == {"format": "pt", "source": "llmconv-fixture"}


def test_pytorch_file_with_ties(cli, fx):
    info = inspect_json(cli, fx("gpt2-state-dict.bin"))
    assert info["format"] == "pytorch" and info["tensors"] == 28 and info["parameters"] == 173_824
    assert info["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_human_output(cli, fx):
    r = cli("inspect", fx("gpt2-hf-bin"))
    assert r.exit_code == 0 and r.stderr == ""
    text = r.stdout
    for expected in ("hf", "GPT2LMHeadModel (gpt2)", "173,824", "695.30 KB (695,296)", "float32 x28",
                     "lm_head.weight -> transformer.wte.weight", "largest tensors"):
        assert expected in text, expected


def test_sparsity(cli, fx):
    info = json.loads(cli("inspect", fx("noncontiguous.pt"), "--json", "--sparsity").stdout)
    assert info["sparsity"]["overall"] == 0.0 and set(info["sparsity"]["per_tensor"]) == {"transposed", "q", "k", "v"}


def test_sparsity_per_tensor_for_people(cli, fx, tmp_path):
    import llmconv

    llmconv.prune(fx("llama.safetensors"), tmp_path / "p.safetensors", sparsity=0.5, pattern="2:4")
    r = cli("inspect", tmp_path / "p.safetensors", "--sparsity", env={"COLUMNS": "200"})
    assert r.exit_code == 0
    import re

    assert "sparsest weight matrices" in r.stdout
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\.weight +50\.00%", r.stdout)
    assert "... 6 more (see --json)" in r.stdout  # 14 pruned, lm_head and the embedding: 16 matrices


def test_inspect_errors(cli, fx, tmp_path):
    r = cli("inspect", tmp_path / "missing.safetensors", "--json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.inspect/1" and out["ok"] is False and out["path"] is None
    assert out["error"] == {"code": 2, "message": f"{tmp_path / 'missing.safetensors'}: no such file or folder",
                            "kept": None}
    r = cli("inspect", fx("not-a-model.txt"))
    assert r.exit_code == 2 and "not a checkpoint llmconv recognises" in r.stderr and r.stdout == ""
