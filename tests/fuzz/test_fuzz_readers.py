"""Property tests over every reader: mutated inputs through the real CLI (in-process), judged by
tests/fuzz/fuzz_oracle.py against safetensors, torch.load(weights_only=True) and onnx.

A short, seeded, deterministic budget runs in the default suite; ``make fuzz`` runs the long campaign
(scripts/fuzz_campaign.py) with the same seeds, mutators and oracle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fuzz_corpus import KINDS, OUTSIDE_SHARD
from fuzz_mutators import HypothesisChooser, apply_case, describe, draw_case, seed_files
from fuzz_oracle import Refuse, judge_case, read_index, read_torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("LLMCONV_FUZZ_EXAMPLES", "30"))


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", KINDS)
def test_seed_round_trips(kind, fuzz_env):
    """The oracle's baseline: every unmutated seed converts, inspects (and verifies) cleanly."""
    root, cache = fuzz_env
    case = Path(tempfile.mkdtemp(dir=root)) / "case"
    cache.copy(kind, case)
    for dest in ("safetensors", "pytorch"):
        shutil.rmtree(case / "out", ignore_errors=True)
        outcome = judge_case(case, {"kind": kind, "dest": dest, "ops": []}, seed_case=cache.path(kind))
        if outcome.cls != "ok0":
            pytest.fail(outcome.report(), pytrace=False)


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_reader_survives_mutations(kind, data, fuzz_env):
    """exit 0 with the reference's tensors, or exit 2 with one line; nothing else (see fuzz_oracle)."""
    root, cache = fuzz_env
    spec = draw_case(HypothesisChooser(data), kind, seed_files(cache.path(kind)))
    what = f"case: {kind}, convert to {spec['dest']}: {describe(spec)}"
    note(what)
    case = Path(tempfile.mkdtemp(dir=root)) / "case"
    try:
        cache.copy(kind, case)
        apply_case(case, spec)
        outcome = judge_case(case, spec, seed_case=cache.path(kind))
        if outcome.failed:
            pytest.fail(f"{what}\n{outcome.report()}", pytrace=False)
    finally:
        shutil.rmtree(case.parent, ignore_errors=True)


# ---- the oracle's own checks: it must call these inputs unsound even when a library reads them ----------

def test_reference_refuses_a_short_storage_record(tmp_path):
    """torch.load (mmap) reads a record shorter than its storage; the reference must call it corrupt."""
    import zipfile

    import torch

    path = tmp_path / "short.bin"
    torch.save({"w": torch.arange(8, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members:
            z.writestr(name, content[:-4] if name.endswith("/data/0") else content)
    with pytest.raises(Refuse, match="holds 28 bytes, its storage needs 32"):
        read_torch(path)


def test_reference_refuses_a_stride_0_view(tmp_path):
    import torch

    path = tmp_path / "expand.bin"
    torch.save({"w": torch.ones(1).expand(1000)}, path)
    with pytest.raises(Refuse, match="re-uses its own elements"):
        read_torch(path)


def test_reference_refuses_a_shard_outside_the_folder(tmp_path, fuzz_env):
    _, cache = fuzz_env
    case = tmp_path / "case"
    cache.copy("st_sharded", case)
    index = case / "model" / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-00001-of-00002.safetensors", f"../{OUTSIDE_SHARD}"))
    with pytest.raises(Refuse, match="leaves the folder") as e:
        read_index(index, pytorch=False)
    assert e.value.why == "unsafe"


@pytest.mark.slow
def test_campaign_runs_and_reports(tmp_path):
    """`make fuzz`'s script, on a few cases: a table, a JSON summary, and findings saved with their command."""
    out = tmp_path / "fuzz"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_campaign.py"), "--cases", "16", "--seed", "3",
                           "--timeout", "60", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 16
    assert sum(sum(row.values()) for row in summary["outcomes"].values()) == 16
    assert "cases" in proc.stdout and "per case" in proc.stdout
    assert (proc.returncode == 1) == bool(summary["findings"])
    for finding in summary["findings"]:
        saved = out / finding["folder"]
        assert (saved / "spec.json").is_file() and (saved / "report.txt").is_file()
