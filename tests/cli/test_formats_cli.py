"""`llmconv formats`: the conversion matrix, from the registry."""

from __future__ import annotations

import json


def test_formats_json(cli):
    r = cli("formats", "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["schema"] == "llmconv.formats/1" and out["ok"] is True
    assert {"safetensors", "pytorch", "hf", "onnx"} <= set(out["formats"])
    for src in ("safetensors", "pytorch", "hf"):
        assert {"safetensors", "pytorch", "hf"} <= set(out["conversions"][src])
    details = {d["name"]: d for d in out["format_details"]}
    assert details["safetensors"]["extensions"] == [".safetensors"]
    assert details["pytorch"]["extensions"] == [".bin", ".pt", ".pth"]


def test_formats_table(cli):
    r = cli("formats", env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "conversions" in r.stdout and "safetensors" in r.stdout
