"""Issue 7, destinations: llmconv never touches a file that is not its own.

--force removes only what llmconv wrote for that destination (items 2), no output or report path may be a
file an input reads (items 4, 5), an interrupt during the swap of a folder says what is true (item 6), and
leftovers of killed runs are found and removed by a later run (item 11). Real files, the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.hostile_destinations import host_tag

ROOT = Path(__file__).resolve().parents[2]


def digest(path: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def llmconv_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".llmconv-" in p.name)


def data_record(model: Path) -> list[str] | None:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return json.loads(props["llmconv.data_files"]) if "llmconv.data_files" in props else None


def recorded_site(cli, fx, tmp_path: Path) -> tuple[Path, Path]:
    """An inline one-MatMul model, and a folder where llmconv wrote q.onnx with its data file q.onnx.data."""
    from fixtures import make_fixtures

    inline = tmp_path / "inline"
    make_fixtures._onnx_matmul(inline, location=None)
    site = tmp_path / "site"
    r = cli("quantize", fx("onnx-wide-external-data") / "model.onnx", site / "q.onnx", "--target", "gpu",
            "--method", "fp16", "--no-verify")
    assert r.exit_code == 0, r.stderr
    return inline, site


def x_inputs(folder: Path) -> Path:
    """Inputs for the one-MatMul fixtures (input X, float32[batch, 4])."""
    import numpy as np

    path = folder / "x.npz"
    np.savez(path, X=np.arange(8, dtype=np.float32).reshape(2, 4))
    return path


# ---- item 2: --force deletes only what llmconv wrote -------------------------------------------------------


def test_force_keeps_the_source_data_file_an_old_destination_named(cli, fx_copy, tmp_path):
    """The old q.onnx reads the source's weights.bin (and even claims, in a forged record, that llmconv
    wrote it): replacing q.onnx must not delete it."""
    folder = fx_copy("dst-old-onnx-names-source-data")
    before = digest(folder / "weights.bin") | digest(folder / "model.onnx")
    r = cli("quantize", folder / "model.onnx", folder / "q.onnx", "--target", "gpu", "--method", "fp16",
            "--force", "--no-verify", "--json")
    assert r.exit_code == 0, r.stderr
    assert digest(folder / "weights.bin") | digest(folder / "model.onnx") == before
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "q.onnx", "weights.bin"]
    notes = json.loads(r.stdout)["notes"]
    assert any("did not record writing for it (weights.bin); they were left in place" in n for n in notes), notes
    # The new output runs: the source's data is intact and the output reads its own.
    r = cli("verify", folder / "model.onnx", folder / "q.onnx", "--profile", "fp16", "--inputs", x_inputs(tmp_path))
    assert r.exit_code == 0, r.stderr


def test_force_keeps_shared_and_unrelated_files_the_old_destination_named(cli, fx, fx_copy):
    """b.onnx names shared.bin (another model's data) and notes.txt: --force replaces b.onnx only."""
    site = fx_copy("dst-old-onnx-names-shared-files")
    keep = digest(site / "shared.bin") | digest(site / "notes.txt") | digest(site / "other.onnx")
    r = cli("quantize", fx("onnx-external-data") / "model.onnx", site / "b.onnx", "--target", "gpu",
            "--method", "fp16", "--force", "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert digest(site / "shared.bin") | digest(site / "notes.txt") | digest(site / "other.onnx") == keep
    assert "shared.bin, notes.txt" in r.stdout and "left in place" in r.stdout
    assert sorted(p.name for p in site.iterdir()) == ["b.onnx", "notes.txt", "other.onnx", "shared.bin"]


def test_export_with_force_keeps_what_the_old_destination_named(cli, fx, fx_copy):
    """The export path (hf folder -> b.onnx) honours the same rule."""
    site = fx_copy("dst-old-onnx-names-shared-files")
    keep = digest(site / "shared.bin") | digest(site / "notes.txt")
    r = cli("convert", fx("gpt2-hf"), site / "b.onnx", "--external-data", "--force", "--json")
    assert r.exit_code == 0, r.stderr
    assert digest(site / "shared.bin") | digest(site / "notes.txt") == keep
    assert data_record(site / "b.onnx") == ["b.onnx_data"]
    assert any("(shared.bin, notes.txt); they were left in place" in n for n in json.loads(r.stdout)["notes"])
    assert llmconv_names(site) == []


def test_force_removes_the_data_file_llmconv_recorded_writing(cli, fx, tmp_path):
    """What llmconv wrote and recorded is its own: replaced by an inline model, the old data file goes."""
    inline, site = recorded_site(cli, fx, tmp_path)
    assert sorted(p.name for p in site.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert data_record(site / "q.onnx") == ["q.onnx.data"]
    r = cli("quantize", inline / "model.onnx", site / "q.onnx", "--target", "gpu", "--method", "fp16", "--force",
            "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in site.iterdir()) == ["q.onnx"]
    assert data_record(site / "q.onnx") is None


# ---- items 4 and 5: no output is a file an input reads ------------------------------------------------------


def test_destination_that_is_the_sources_external_data_is_refused(cli, fx_copy):
    folder = fx_copy("onnx-external-data")
    before = digest(folder)
    r = cli("convert", folder / "model.onnx", folder / "weights.bin", "--force")
    assert r.exit_code == 2
    assert one_line(r.stderr) == (f"error: {folder / 'weights.bin'}: destination is {folder / 'weights.bin'}, which "
                                  "the source reads; writing there would destroy it (choose another path)")
    assert digest(folder) == before


def test_destination_hard_linked_to_a_source_file_is_refused(cli, fx_copy, tmp_path):
    folder = fx_copy("onnx-external-data")
    link = tmp_path / "elsewhere.bin"
    os.link(folder / "weights.bin", link)
    before = digest(folder)
    r = cli("convert", folder / "model.onnx", link, "--force")
    assert r.exit_code == 2
    assert f"destination is a hard link to {folder / 'weights.bin'}, which the source reads" in r.stderr
    assert digest(folder) == before and link.read_bytes() == (folder / "weights.bin").read_bytes()


def test_output_data_file_that_is_the_sources_data_is_refused(cli, fx_copy):
    """x.onnx would write x.onnx.data beside it, and that is the source's external data."""
    folder = fx_copy("onnx-data-named-like-dst-sidecar")
    before = digest(folder)
    r = cli("quantize", folder / "model.onnx", folder / "x.onnx", "--target", "cpu", "--force")
    assert r.exit_code == 2
    assert (f"{folder / 'x.onnx.data'}: the output's external data file x.onnx.data is {folder / 'x.onnx.data'}, "
            "which the source reads") in r.stderr
    assert digest(folder) == before and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "x.onnx.data"]


def test_folder_destination_holding_a_source_file_is_refused(cli, fx_copy):
    folder = fx_copy("onnx-data-in-subfolder")
    before = digest(folder)
    r = cli("convert", folder / "model.onnx", folder / "sub", "--to", "safetensors", "--force")
    assert r.exit_code == 2
    assert f"destination is a folder that holds {folder / 'sub' / 'weights.bin'}, which the source reads" in r.stderr
    assert digest(folder) == before


def test_junit_that_is_a_shard_of_a_compared_model_is_refused(cli, fx_copy, tmp_path):
    pair = fx_copy("sharded-safetensors-pair")
    before = digest(pair)
    shard = pair / "b" / "model-00001-of-00002.safetensors"
    r = cli("verify", pair / "a", pair / "b", "--junit", shard)
    assert r.exit_code == 2
    assert one_line(r.stderr) == (f"error: {shard}: --junit names one of the models being compared: it is {shard}; "
                                  "the report would replace it (give the report a path of its own)")
    link = tmp_path / "report.xml"
    os.link(pair / "a" / "model.safetensors.index.json", link)
    r = cli("verify", pair / "a", pair / "b", "--junit", link)
    assert r.exit_code == 2 and "it is a hard link to" in r.stderr
    assert digest(pair) == before
    r = cli("verify", pair / "a", pair / "b", "--junit", tmp_path / "ok.xml")  # a path of its own is fine
    assert r.exit_code == 0 and (tmp_path / "ok.xml").read_text().startswith("<?xml")


def test_junit_that_is_an_onnx_models_external_data_is_refused(cli, fx_copy):
    folder = fx_copy("onnx-external-data")
    before = digest(folder)
    r = cli("verify", folder / "model.onnx", folder / "model.onnx", "--junit", folder / "weights.bin")
    assert r.exit_code == 2 and "--junit names one of the models being compared" in r.stderr
    assert digest(folder) == before



def test_quantize_and_prune_never_write_over_a_file_they_read_for_quality(cli, fx_copy, tmp_path):
    """--inputs (and --text, --calibration) files are inputs too: DST may not be one of them."""
    folder = fx_copy("onnx-external-data")
    inputs = x_inputs(tmp_path)
    before = inputs.read_bytes()
    for args in (("quantize", folder / "model.onnx", inputs, "--target", "cpu", "--inputs", inputs, "--force"),
                 ("prune", folder / "model.onnx", inputs, "--sparsity", "0.5", "--inputs", inputs, "--force")):
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert f"destination is {inputs}, which the source reads" in r.stderr
        assert inputs.read_bytes() == before

# ---- item 11: leftovers of killed runs ---------------------------------------------------------------------


def test_a_later_run_removes_leftovers_of_dead_runs_and_nothing_else(cli, fx, fx_copy):
    out = fx_copy("dst-stale-leftovers")
    host, dead = host_tag(), (out / "dead.pid").read_text()
    stale = {f".model.bin.llmconv-tmp-{dead}-{host}-k3j9x2ab", f".model.bin.llmconv-scratch-{dead}-{host}-q1w2e3r4",
             f"..model.bin.llmconv-tmp-{dead}-{host}-a1b2c3d4.llmconv-scratch-{dead}-{host}-z9y8x7w6",
             f".model.bin.llmconv-old-{dead}-{host}-m4n5b6v7"}
    assert stale <= {p.name for p in out.iterdir()}
    (out / f".model.bin.llmconv-tmp-{os.getpid()}-{host}-live0001").write_bytes(b"in progress")  # alive: ours
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in stale | {"model.bin"}}
    r = cli("convert", fx("llama.safetensors"), out / "model.bin", "--force")
    assert r.exit_code == 0, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "model.bin"} == kept
    assert (out / "model.bin").read_bytes() != b"the previous model"


def _wait_for(proc: subprocess.Popen, folder: Path, prefix: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name.startswith(prefix) for name in os.listdir(folder)):
            return
        time.sleep(0.001)
    out, err = proc.communicate()
    pytest.fail(f"{prefix}* never appeared (exit {proc.returncode}): {err}")


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"w.{i}": torch.randn(1024, 1024, generator=gen) for i in range(32)}, str(src))  # 128 MB
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "llmconv", "convert", str(src), str(out / "model.bin"), "--no-verify"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, out, ".model.bin.llmconv-tmp-")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    left = llmconv_names(out)
    assert left and all(n.startswith(f".model.bin.llmconv-tmp-{proc.pid}-{host_tag()}-") for n in left)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.bin"]


# ---- item 6: an interrupt during the swap of a folder -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_interrupt_while_the_old_folder_goes_says_the_new_output_is_in_place(fx, fx_copy, sig, code, word):
    """The old folder (4k files) is moved aside and removed with the signal held: the message says the new
    output is in place, and no old copy is left behind."""
    site = fx_copy("dst-old-folder-4k")
    dst = site / "out"
    src = fx("llama-hf")
    before = digest(src)
    proc = subprocess.Popen([sys.executable, "-m", "llmconv", "convert", str(src), str(dst), "--force"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, site, ".out.llmconv-old-")
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert one_line(stderr) == f"error: {word}; the new output was already in place at {dst}"
    assert (dst / "config.json").is_file() and not (dst / "d000").exists()
    assert sorted(p.name for p in site.iterdir()) == ["out"]
    assert digest(src) == before


# ---- a full disk or a file-size limit while an ONNX output is built ------------------------------------------

_LIMIT = 60_000  # under every method's output of onnx-matmul-512kb (the smallest, int4, is 64 KB)
_BUILDS = {
    # onnxruntime's int8-dynamic writes a shape-inferred copy of the model and reads it back: its C++ writer
    # stops at the limit without a word, and the copy comes back cut short.
    "int8-dynamic": ("quantize", "--target", "cpu", "--method", "int8-dynamic"),
    "int8-static": ("quantize", "--target", "cpu", "--method", "int8-static", "--calibration", "{fx}/x.npz"),
    "int4": ("quantize", "--target", "cpu", "--method", "int4"),
    "fp16": ("quantize", "--target", "cpu", "--method", "fp16"),
    "prune": ("prune", "--sparsity", "0.5"),
}
_CUT_SHORT = {"int8-dynamic": f"a file written for it was cut short at the file-size limit of "
                              f"{_LIMIT / 1000:.2f} KB (ulimit -f) (raise the limit, or write a smaller model)"}


def _build_cmd(kind: str, src: Path, dst: Path) -> list[str]:
    command, *flags = _BUILDS[kind]
    return [sys.executable, "-m", "llmconv", command, str(src / "model.onnx"), str(dst),
            *(f.format(fx=src) for f in flags), "--no-verify"]


@pytest.mark.parametrize("kind", list(_BUILDS))
def test_file_size_limit_while_an_onnx_output_is_built_is_exit_2_naming_dst(fx, tmp_path, kind):
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (_LIMIT, _LIMIT))

    out = tmp_path / "f"
    out.mkdir()
    dst = out / "q.onnx"
    r = subprocess.run(_build_cmd(kind, fx("onnx-matmul-512kb"), dst), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    why = _CUT_SHORT.get(kind, f"File too large: it is over this process's file-size limit of {_LIMIT / 1000:.2f} KB "
                               "(ulimit -f) (raise the limit, or write a smaller model)")
    assert one_line(r.stderr) == f"error: {dst}: cannot write the output: {why}"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["int8-dynamic", "int8-static", "fp16", "prune"])
def test_full_disk_while_an_onnx_output_is_built_is_exit_2_naming_dst(fx, tmp_path, tmpfs, kind):
    """On a real 1 MB tmpfs with 25 pages free (needs the right to mount one, else skipped)."""
    small = tmpfs("1m")
    st = os.statvfs(small)
    (small / "filler").write_bytes(b"\0" * ((st.f_bavail - 25) * st.f_frsize))
    dst = small / "q.onnx"
    r = subprocess.run(_build_cmd(kind, fx("onnx-matmul-512kb"), dst), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) == (f"error: {dst}: cannot write the output: No space left on device (free some "
                                  "space or choose another destination)")
    assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_a_short_read_back_with_room_and_no_limit_stays_a_bug(tmp_path, monkeypatch):
    """Without a file at the limit, a limit below the model's size or a (nearly) full disk, nothing shows that
    the destination cut the file short: the error stays what it was (an internal error, exit 3)."""
    import resource

    from google.protobuf.message import DecodeError

    from llmconv.io import build_failure

    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (tmp_path / "out.onnx").write_bytes(b"\0" * 1000)
    e = DecodeError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")
    assert build_failure(tmp_path / "q.onnx", e, scratch=tmp_path, needed=10**6) is None
    assert build_failure(tmp_path / "q.onnx", PermissionError(13, "Permission denied"), scratch=tmp_path,
                         needed=0) is None
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1000, 1000))  # out.onnx stopped at the limit
    found = build_failure(tmp_path / "q.onnx", e, scratch=tmp_path, needed=0)
    assert found is not None and found.path == tmp_path / "q.onnx"


# ---- data files that another model in the folder reads ------------------------------------------------------


def test_force_keeps_the_old_data_file_that_a_copy_of_the_old_graph_reads(cli, fx, tmp_path):
    """c.onnx is the user's copy of q.onnx's graph: it reads q.onnx.data, which llmconv recorded writing for
    q.onnx. Replacing q.onnx keeps the file, and says why."""
    inline, site = recorded_site(cli, fx, tmp_path)
    (site / "c.onnx").write_bytes((site / "q.onnx").read_bytes())
    data = digest(site / "q.onnx.data")
    r = cli("quantize", inline / "model.onnx", site / "q.onnx", "--target", "gpu", "--method", "fp16", "--force",
            "--no-verify", "--json")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in site.iterdir()) == ["c.onnx", "q.onnx", "q.onnx.data"]
    assert digest(site / "q.onnx.data") == data and data_record(site / "q.onnx") is None
    assert "kept q.onnx.data, the replaced q.onnx's data file: c.onnx beside it reads it too" in json.loads(
        r.stdout)["notes"]
    r = cli("inspect", site / "c.onnx")  # the copy still has its weights
    assert r.exit_code == 0, r.stderr


# ---- --junit that names a file the command reads ------------------------------------------------------------


def test_junit_that_is_the_text_file_is_refused_naming_it(cli, fx, tmp_path):
    text = tmp_path / "h.txt"
    text.write_text("Hello world.\n")
    pair = fx("sharded-safetensors-pair")
    r = cli("verify", pair / "a", pair / "b", "--junit", text, "--text", text)
    assert r.exit_code == 2
    assert one_line(r.stderr) == (f"error: {text}: --junit names the file that --text reads: it is {text}; the "
                                  "report would replace it (give the report a path of its own)")
    assert text.read_text() == "Hello world.\n"
