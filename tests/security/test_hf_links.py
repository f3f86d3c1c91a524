"""Issue 7, items 3 and 13: links in hf folders never bring outside files into an output; empty models are
refused (exit 2) by convert and verify instead of being called converted or equivalent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.hostile_hf import FAKE_SECRET

SKIPPED = ["README.md links to ../", "notes.txt links to /proc/self/environ", "loop.txt is a link that loops",
           "tokenizer.fifo is not a regular file"]


def _assert_clean(out: Path) -> None:
    """No file of ``out`` holds the outside secret or the environment; the inside link's content came along."""
    env_marker = f"PATH={os.environ['PATH']}".encode()
    for p in out.rglob("*"):
        assert not p.is_symlink(), p
        if p.is_file():
            data = p.read_bytes()
            assert FAKE_SECRET.encode() not in data, p
            assert env_marker not in data, p
    names = {p.name for p in out.iterdir()}
    assert not names & {"README.md", "notes.txt", "vocab.txt", "loop.txt", "tokenizer.fifo"}


def test_convert_hf_folder_skips_links_that_leave_it_with_a_note(cli, fx, tmp_path):
    src = fx("hf-links-outside")
    r = cli("convert", src, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    for text in SKIPPED:
        assert text in r.output
    _assert_clean(tmp_path / "out")
    assert (tmp_path / "out" / "LICENSE").read_text() == "FAKE-LICENSE-TEXT\n"  # a link inside: its content
    assert (tmp_path / "out" / "docs" / "LICENSE.txt").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    r = cli("convert", src, tmp_path / "out-json", "--to", "pytorch", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    skipped = [n for n in report["notes"] if n.startswith("not copied into the output: ")]
    assert report["ok"] and len(skipped) == 1
    for text in SKIPPED:
        assert text in skipped[0]
    _assert_clean(tmp_path / "out-json")


def test_inspect_lists_only_the_files_that_travel(cli, fx):
    r = cli("inspect", fx("hf-links-outside"), "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert "LICENSE" in report["extra_files"] and "README.md" not in report["extra_files"]
    assert "notes.txt links to /proc/self/environ" in report["notes"][0]


def test_fp16_and_prune_folder_outputs_skip_them_too(cli, fx, tmp_path):
    src = fx("hf-links-outside")
    r = cli("quantize", src, tmp_path / "fp16", "--target", "gpu", "--method", "fp16", "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert "README.md links to ../" in r.output
    _assert_clean(tmp_path / "fp16")
    r = cli("prune", src, tmp_path / "pruned", "--sparsity", "0.5", "--no-verify", "--json")
    assert r.exit_code == 0, r.stderr
    assert any("notes.txt links to /proc/self/environ" in n for n in json.loads(r.stdout)["notes"])
    _assert_clean(tmp_path / "pruned")


@pytest.mark.slow
def test_onnx_export_reads_and_carries_none_of_them(cli, fx, tmp_path):
    r = cli("convert", fx("hf-links-outside"), tmp_path / "onnx", "--to", "onnx", "--json")
    assert r.exit_code == 0, r.stderr
    notes = json.loads(r.stdout)["notes"]
    assert any("chat_template.jinja links to ../" in n for n in notes)
    _assert_clean(tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "chat_template.jinja").exists()
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()


def test_weights_linked_from_outside_the_folder_are_refused(cli, fx, tmp_path):
    src = fx("hf-weights-outside")
    for args in (("convert", src, tmp_path / "out"), ("verify", src, src), ("inspect", src)):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.stderr)
        assert "the weights: model.safetensors links to ../hf-weights-outside.weights.safetensors, outside the " \
               "model's folder" in r.stderr
    assert not (tmp_path / "out").exists()


def test_hf_cache_snapshot_links_into_blobs_still_convert(cli, fx, tmp_path):
    snap = fx("hf-cache-snapshot") / "models--fake--tiny" / "snapshots" / "0123abc"
    r = cli("convert", snap, tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["notes"] == []
    assert (tmp_path / "out" / "config.json").read_bytes() == (snap / "config.json").read_bytes()
    assert not (tmp_path / "out" / "config.json").is_symlink()


@pytest.mark.parametrize("name", ["empty-header.safetensors", "empty-metadata.safetensors", "empty-state-dict.bin"])
def test_an_empty_model_is_refused_by_convert_and_verify(cli, fx, tmp_path, name):
    src = fx(name)
    r = cli("convert", src, tmp_path / "out.safetensors")
    assert r.exit_code == 2
    assert f"{src}: holds no tensors; nothing to convert" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
    r = cli("verify", src, src, "--json")
    assert r.exit_code == 2
    report = json.loads(r.stdout)
    assert not report["ok"] and "holds no tensors; nothing to compare" in report["error"]["message"]
    r = cli("verify", fx("gpt2-state-dict.bin"), src)
    assert r.exit_code == 2 and f"{src}: holds no tensors" in r.stderr


def test_tokenizer_files_linked_outside_are_refused_when_text_is_tokenized(cli, fx, tmp_path):
    """Left out of what transformers reads, they made it fall back to another tokenizer class (exit 3)."""
    src = fx("hf-tokenizer-linked-outside")
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4 w5 w6 w7 w8 " * 20)
    for args in (("verify", src, src, "--text", text),
                 ("prune", src, tmp_path / "p", "--sparsity", "0.5", "--text", text)):
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert "the tokenizer cannot be read: " in r.stderr and "outside the model's folder" in r.stderr
        assert "(copy the file into the folder)" in r.stderr
    assert not (tmp_path / "p").exists()
    r = cli("convert", src, tmp_path / "out")  # no tokenizing: converts, and leaves the links out with a note
    assert r.exit_code == 0, r.stderr
    assert "tokenizer.json links to ../" in r.output


def test_a_folder_without_tokenizer_data_is_exit_2_for_text(cli, fx, tmp_path):
    src = fx("hf-tokenizer-config-only")
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4 " * 20)
    r = cli("verify", src, src, "--text", text)
    assert r.exit_code == 2, r.stderr
    assert "the folder has no tokenizer data (tokenizer.json, vocab.json/merges.txt" in r.stderr
