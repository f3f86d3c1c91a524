"""Issue 7: corrupt inputs are refused (exit 2, one line naming the file and the tensor), never read
as weights, never blamed on the disk, never an internal error; and the .bin writer reports a full
disk, a file-size limit and Ctrl-C as such. Fixtures: fixtures/hostile_corrupt.py."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def refused(cli, path: Path, *texts: str, command: str = "inspect") -> str:
    """Run inspect (or convert into an empty folder): exit 2, one line naming ``path`` and each text."""
    if command == "convert":
        out = path.parent.parent / f"out-{path.name}"
        r = cli("convert", path, out / "model.safetensors")
        assert not out.exists()
    else:
        r = cli(command, path)
    assert r.exit_code == 2, r.stderr
    line = one_error_line(r.stderr)
    assert str(path) in line, line
    for text in texts:
        assert text in line, line
    assert "internal error" not in line and "Traceback" not in r.stderr
    return line


# ---- torch zip checkpoints: storages, records and views ---------------------------------------

def test_short_storage_record_is_refused_not_read_past(cli, fx, fx_copy, tmp_path):
    bad = fx("short-record.bin")
    line = refused(cli, bad, "tensor 'w' needs 256 bytes of storage but its record 'data/0' holds 32")
    refused(cli, fx_copy("short-record.bin"), "tensor 'w'", command="convert")
    # Compared with the healthy original: a corrupt file, exit 2, not "not equivalent" (exit 1).
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(4)}, good)
    r = cli("verify", good, bad)
    assert r.exit_code == 2 and one_error_line(r.stderr) == line


def test_stride0_view_is_refused_before_it_expands(cli, fx, fx_copy):
    refused(cli, fx("stride0.bin"), "tensor 'w' maps 1000 elements onto 1 stored ones", "strides [0]")
    refused(cli, fx_copy("stride0.bin"), "tensor 'w' maps 1000 elements", command="convert")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_and_shared_storage_of_real_state_dicts_still_load(cli, tmp_path, legacy):
    """What a real state dict shares: one view under two names (a tie), disjoint row and column slices of
    a fused weight saved without a copy; and a transpose, alone on its storage. They stay readable."""
    fused = torch.arange(24, dtype=torch.float32).view(6, 4)
    cols = torch.arange(24, dtype=torch.float32).view(4, 6) + 100
    emb = torch.arange(12, dtype=torch.float32).view(3, 4) - 50
    sd = {"q": fused[0:2], "k": fused[2:4], "v": fused[4:6], "cq": cols[:, :2], "ck": cols[:, 2:],
          "t": (torch.arange(24, dtype=torch.float32) + 200).view(4, 6).t(), "emb": emb, "head": emb,
          "empty": torch.zeros(0, 3)}
    src = tmp_path / "views.bin"
    torch.save(sd, src, _use_new_zipfile_serialization=not legacy)
    dst = tmp_path / "views.safetensors"
    r = cli("convert", src, dst, "--no-verify")
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    out = load_file(dst)
    for name in ("q", "k", "v", "cq", "ck", "t", "emb"):
        assert torch.equal(out[name], sd[name]), name
    assert dst.stat().st_size < 2 * sum(t.nbytes for n, t in sd.items() if n != "head") + 4096


def test_views_that_overlap_one_another_are_refused(cli, tmp_path):
    """A slice of another tensor, or its transpose, shares elements without being a tie: converting
    writes them twice (a few bytes turn into gigabytes with enough views)."""
    base = torch.arange(24, dtype=torch.float32)
    for name, other in (("slice", base[4:10]), ("t", base.view(4, 6).t())):
        src = tmp_path / f"{name}.bin"
        torch.save({"a": base, name: other}, src)
        refused(cli, src, f"tensors 'a' and '{name}' overlap in the storage they share")


@pytest.mark.parametrize("name, reason", [
    ("listing-crash.bin", "(Can only append to lists, but got <class 'dict'>)"),
    ("bad-opcode.bin", "(Unsupported operand 254)"),
    ("legacy-huge-length.pt", "(Unsupported operand 142)"),
])
def test_corrupt_pickle_is_corrupt_not_unsafe(cli, fx, name, reason):
    line = refused(cli, fx(name), "not a valid pickle of tensors " + reason, "the file is truncated")
    assert "needs more than plain tensors" not in line and "nothing in it was run" not in line


def test_unsafe_pickle_is_still_called_unsafe(cli, fx):
    refused(cli, fx("unsafe.bin"), "pickle needs more than plain tensors to load (", "nothing in it was run")


# ---- legacy (non-zip) pickles -------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    # The key replaced is the storage's address, so its length varies from run to run.
    ("legacy-bad-key.pt", "torch.load cannot read it: AssertionError: storage key '9999999"),
    ("legacy-truncated.pt", "torch.load cannot read it: struct.error: unpack requires a buffer of 4 bytes"),
])
def test_broken_legacy_pickle_is_exit_2(cli, fx, name, text):
    refused(cli, fx(name), text)


def test_small_legacy_pickle_still_converts(cli, fx, tmp_path):
    dst = tmp_path / "legacy.safetensors"
    r = cli("convert", fx("legacy.pt"), dst)
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    out = load_file(dst)
    assert torch.equal(out["w"], torch.arange(8, dtype=torch.float32)) and torch.equal(out["b"], torch.ones(2))


def test_large_legacy_pickle_is_refused_before_reading(cli, fx):
    from llmconv.formats.pytorch import LEGACY_MAX_BYTES

    path = fx("legacy-large.pt")
    assert path.stat().st_size == LEGACY_MAX_BYTES + 1
    refused(cli, path, "legacy (non-zip) PyTorch pickle of 256.00 MB, over the 256.00 MB llmconv reads",
            "re-save it with torch.save(state_dict, path) from torch >= 1.6 (zip format) or as safetensors")


# ---- ONNX ---------------------------------------------------------------------------------------

def test_onnx_duplicate_initializer_is_refused(cli, fx):
    mfile = fx("onnx-duplicate-initializer") / "model.onnx"
    refused(cli, mfile, "initializer 'W' is defined twice in the graph")
    r = cli("verify", mfile, mfile, "--mode", "weights")
    assert r.exit_code == 2 and "initializer 'W' is defined twice" in one_error_line(r.stderr)


def test_onnx_sparse_initializer_is_refused_not_skipped(cli, fx, tmp_path):
    mfile = fx("onnx-sparse-initializer") / "model.onnx"
    refused(cli, mfile, "initializer 'B' is a sparse_initializer", "--mode outputs")
    r = cli("convert", mfile, tmp_path / "w.safetensors")
    assert r.exit_code == 2 and "'B' is a sparse_initializer" in one_error_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_onnx_absurd_dims_are_corrupt_not_a_full_disk(cli, fx, tmp_path):
    mfile = fx("onnx-absurd-dims") / "model.onnx"
    refused(cli, mfile, "initializer 'B' holds 0 bytes but shape [4096, 4096, 4096, 288] of float32 needs ")
    r = cli("convert", mfile, tmp_path / "w.safetensors")
    line = one_error_line(r.stderr)
    assert r.exit_code == 2 and "initializer 'B'" in line and "free" not in line


def test_onnx_external_ranges_that_overlap_are_refused(cli, fx, fx_copy):
    """Two initializers on one range of a data file: no writer does it; 100 of them on 1 MB converted to
    100 MB."""
    text = ("initializers 'W' and 'B' both read bytes 36..48 of 'weights.bin'; each initializer's external data "
            "has its own range (the model is damaged; export it again)")
    mfile = fx("onnx-external-overlap") / "model.onnx"
    assert refused(cli, mfile, text).endswith(text)
    refused(cli, fx_copy("onnx-external-overlap") / "model.onnx", text, command="convert")
    r = cli("verify", mfile, mfile, "--mode", "weights")
    assert r.exit_code == 2 and text in one_error_line(r.stderr)


def test_onnx_external_ranges_side_by_side_still_convert(cli, fx_copy, tmp_path):
    """The usual layout: ranges one after another in one file (here with a gap), read as they are."""
    import onnx
    from safetensors.numpy import load_file

    folder = fx_copy("onnx-external-overlap")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    b = next(t for t in model.graph.initializer if t.name == "B")
    next(e for e in b.external_data if e.key == "offset").value = "52"
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    data = (folder / "weights.bin").read_bytes() + b"\0" * 4 + bytes(range(12))
    (folder / "weights.bin").write_bytes(data)
    r = cli("convert", folder / "model.onnx", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.stderr
    out = load_file(str(tmp_path / "w.safetensors"))
    assert out["W"].tobytes() == data[:48] and out["B"].tobytes() == bytes(range(12))


def test_onnx_initializer_that_a_node_also_produces_is_refused(cli, fx, fx_copy):
    """onnxruntime refuses the graph; convert used to write the initializer as if it were the weight."""
    import onnxruntime as ort

    mfile = fx("onnx-initializer-also-node-output") / "model.onnx"
    with pytest.raises(Exception, match="Shape of initializer B does not match"):
        ort.InferenceSession(str(mfile), providers=["CPUExecutionProvider"])
    text = ("initializer 'B' is also the output of a Constant node in the graph; onnxruntime refuses such a "
            "model (the model is damaged; export it again)")
    assert refused(cli, mfile, text).endswith(text)
    refused(cli, fx_copy("onnx-initializer-also-node-output") / "model.onnx", text, command="convert")


# ---- safetensors headers ------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("st-dtype-object.safetensors", "tensor 'w' has unknown dtype {}"),
    ("st-dtype-list.safetensors", "tensor 'w' has unknown dtype []"),
    ("st-long-int.safetensors", "header holds a number too long to read (Exceeds the limit (4300 digits)"),
    ("st-deep-json.safetensors", "header nests JSON too deeply to read"),
    ("st-absurd-dims.safetensors", "tensor 'w' has shape [4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096]: "
                                   "more elements than the "),
])
def test_corrupt_safetensors_header_is_exit_2_naming_it(cli, fx, fx_copy, name, text):
    refused(cli, fx(name), text)
    line = refused(cli, fx_copy(name), text, command="convert")
    assert "needs" not in line.split(text)[0]  # not "the output needs 73.8 TB"


# ---- shards -------------------------------------------------------------------------------------

def test_tensor_missing_from_the_index_is_refused_not_dropped(cli, fx, tmp_path):
    folder = fx("shard-unlisted-tensor")
    r = cli("inspect", folder)
    assert r.exit_code == 2
    line = one_error_line(r.stderr)
    assert line == (f"error: {folder / 'model.safetensors.index.json'}: shard 'model-00002-of-00002.safetensors' "
                    "holds tensor 'extra', which the index does not map to it (regenerate the index, or remove "
                    "the tensor from the shard)")
    r = cli("convert", folder, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and not (tmp_path / "out.safetensors").exists()


# ---- the .bin writer ------------------------------------------------------------------------------

def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("ext", [".bin", ".safetensors"])
def test_file_size_limit_is_exit_2_naming_dst(tmp_path, ext):
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.zeros(200_000)}, str(src))  # 800 KB
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"model{ext}"
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(src), str(dst)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(300_000))
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr) == (f"error: {dst}: cannot write the output: File too large: it is over this "
                                        "process's file-size limit of 300.00 KB (ulimit -f) (raise the limit, or "
                                        "write a smaller model)")
    assert list(out.iterdir()) == []


def test_full_disk_while_writing_bin_is_exit_2(fx, tmp_path, tmpfs):
    """On a real tmpfs (needs the right to mount one, else skipped): room for the tensor's bytes, not
    for the zip headers around them; torch's zip writer fails in the middle of the file."""
    import os

    from safetensors.torch import save_file

    small = tmpfs("2m")
    page = os.statvfs(small).f_frsize
    src = tmp_path / "exact.safetensors"
    save_file({"w": torch.zeros(100 * page // 4)}, str(src))
    (small / "filler").write_bytes(b"\0" * ((os.statvfs(small).f_bavail - 100) * page))
    assert os.statvfs(small).f_bavail == 100
    dst = small / "model.bin"
    r = subprocess.run([sys.executable, "-m", "llmconv", "convert", str(src), str(dst)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr).startswith(f"error: {dst}: cannot write the output: No space left on device")
    assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_ctrl_c_inside_torch_save_is_a_keyboard_interrupt(tmp_path):
    """A SIGINT that lands in one of torch.save's write() calls is re-raised as KeyboardInterrupt (exit
    130 in the CLI), not torch's "RuntimeError: unexpected pos" (exit 3)."""
    from safetensors.torch import save_file

    from llmconv.formats import pytorch as pt_format
    from llmconv.formats import registry

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.zeros(4_000_000)}, str(src))  # 16 MB: 32 write() calls of 512 KiB
    inside = 0
    previous = signal.getsignal(signal.SIGALRM)
    signal.signal(signal.SIGALRM, signal.default_int_handler)  # raises KeyboardInterrupt, as SIGINT does
    try:
        with registry.open_checkpoint(src) as s:
            for attempt in range(20):
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0.001 + attempt * 0.002)
                    pt_format.write_file(s, s.names(), tmp_path / f"out{attempt}.bin")
                    signal.setitimer(signal.ITIMER_REAL, 0)  # finished before the alarm
                except KeyboardInterrupt as e:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    inside += "write" in [code.co_name for code in _frames(e.__traceback__)]
                if inside >= 2:
                    break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert inside, "no alarm landed inside torch.save's writes"


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


# ---- ONNX, from the fuzz campaign ---------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("onnx-op-type-not-utf8", "model.graph.node[0].op_type holds b'\\xffatMul', which is not valid UTF-8"),
    ("onnx-initializer-name-not-utf8", "initializer name b'B\\x80' is not valid UTF-8"),
    ("onnx-external-nul-location", "initializer 'W': external data file path 'a\\x00b' holds a NUL byte"),
    ("onnx-external-no-length-short", "initializer 'W' reads bytes 0..48 of 'weights.bin', which holds 40"),
])
def test_onnx_broken_text_and_short_data_are_corrupt(cli, fx, name, text):
    """Strings that are not UTF-8 (upb hands them out as bytes), a NUL byte in an external path and data
    too short for the shape: exit 2 for inspect, convert and verify, never an internal error."""
    mfile = fx(name) / "model.onnx"
    refused(cli, mfile, text)
    refused(cli, mfile, text, command="convert")
    r = cli("verify", mfile, mfile, "--mode", "weights")
    assert r.exit_code == 2 and text in one_error_line(r.stderr), r.stderr


def test_onnx_external_data_without_length_reads_the_shapes_bytes(cli, fx, tmp_path):
    """No 'length' entry and bytes after the tensor: read numel * itemsize bytes from the offset, as
    onnxruntime does (not to the end of the file, as onnx.numpy_helper does)."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    folder = fx("onnx-external-no-length")
    data = (folder / "weights.bin").read_bytes()
    assert len(data) == 64
    w = np.frombuffer(data[:48], dtype="<f4").reshape(4, 3)
    r = cli("convert", folder / "model.onnx", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.stderr
    assert load_file(str(tmp_path / "w.safetensors"))["W"].tobytes() == w.tobytes()
    x = np.eye(4, dtype=np.float32)
    y = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_array_equal(y, w + np.arange(3, dtype=np.float32))


# ---- PyTorch readers: cases the fuzz campaign found (tests/fuzz) ---------------------------------

@pytest.mark.parametrize("name, text", [
    ("zip-eocd-shifted.bin", "not a readable zip archive (BadZipFile: Bad magic number for central directory)"),
    ("zip-multi-disk.bin", "not a readable zip archive (BadZipFile: zipfiles that span multiple disks are not "
                           "supported)"),
])
def test_zip_that_torch_reads_but_zipfile_refuses_is_exit_2(cli, fx, fx_copy, name, text):
    torch.load(fx(name), weights_only=True)  # miniz reads past the damage; its records cannot be checked
    refused(cli, fx(name), text)
    refused(cli, fx_copy(name), text, command="convert")


@pytest.mark.parametrize("name, text", [
    ("long-record.bin", "tensor 'w' needs 256 bytes of storage but its record 'data/0' holds 300 (torch.load "
                        "refuses it too unless it maps the file"),
    ("empty-record-1-byte.bin", "tensor 'empty' needs 0 bytes of storage but its record 'data/1' holds 1"),
])
def test_zip_record_must_hold_exactly_its_storage(cli, fx, fx_copy, name, text):
    """The rule of torch.load without mmap: a record holds numel * itemsize bytes, no more and no fewer."""
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(fx(name), weights_only=True)
    refused(cli, fx(name), text)
    refused(cli, fx_copy(name), text, command="convert")


def test_zip_record_twice_is_refused(cli, fx, fx_copy):
    refused(cli, fx("duplicate-record.bin"), "tensor 'b': its record 'data/1' is in the archive twice; which "
                                             "copy a reader takes is not defined")
    refused(cli, fx_copy("duplicate-record.bin"), "tensor 'b': its record 'data/1'", command="convert")


@pytest.mark.parametrize("name", ["negative-stride-empty.bin", "legacy-negative-stride-empty.pt"])
def test_negative_stride_of_an_empty_tensor_is_refused(cli, fx, fx_copy, name):
    """torch re-strides an empty tensor quietly; the pickle's own (0, 2) with strides (-1, 1) is corrupt."""
    assert torch.load(fx(name), weights_only=True)["empty"].stride() == (2, 1)
    text = "tensor 'empty' has a negative size, stride or offset (size [0, 2], stride [-1, 1], offset 0)"
    refused(cli, fx(name), text)
    refused(cli, fx_copy(name), text, command="convert")


@pytest.mark.parametrize("name, text", [
    # The storage key is the fixture's fixed digits (see fixtures/hostile_corrupt.py::_legacy), as many as the
    # id torch wrote had: 14 natively here, 12 under qemu-user. {key} stands for any count of 0 then 1.
    ("legacy-count-mismatch.pt", "tensor 'w': storage '{key}' counts 7 elements, the pickle says 8"),
    ("legacy-storage-grown.pt", "tensor 'w' reaches element 7 of a storage that holds 7"),
])
def test_legacy_storage_that_disagrees_with_its_pickle_is_refused(cli, fx, fx_copy, name, text):
    pattern = re.escape(text).replace(re.escape("{key}"), "0+1")
    for line in (refused(cli, fx(name)), refused(cli, fx_copy(name), command="convert")):
        assert re.search(pattern, line), line


@pytest.mark.parametrize("name, text", [
    ("overlapping-views.bin", "tensors 'a' and 'b' overlap in the storage they share"),
    ("legacy-overlapping-views.pt", "tensors 'a' and 'b' overlap in the storage they share"),
    # views with gaps: checked element by element, 'v' beside them is disjoint
    ("overlapping-columns.bin", "tensors 'q' and 'k' overlap in the storage they share"),
])
def test_views_overlapping_in_one_storage_are_refused(cli, fx, fx_copy, name, text):
    """Partial overlap of two tensors of one storage: a 4 MB file of 100 such views converted to 400 MB."""
    hint = "(save copies: torch.save({k: v.clone() for k, v in state_dict.items()}, path))"
    assert refused(cli, fx(name), text).endswith(hint)
    refused(cli, fx_copy(name), text, command="convert")


def _address_space_cap(extra: int):
    """Limit this process's address space to what it maps now plus ``extra`` bytes (as the fuzz oracle
    does), so an allocation of gigabytes fails at once instead of succeeding lazily."""
    import contextlib

    @contextlib.contextmanager
    def cap():
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        if hard != resource.RLIM_INFINITY and vm + extra > hard:
            pytest.skip("the address-space limit is already lower")
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    return cap()


@pytest.mark.parametrize("name, text", [
    # declared 4 GiB: refused from the pickle, before torch allocates the storage ({size}: the fixture's bytes,
    # which vary with the length of the storage ids torch wrote)
    ("legacy-huge-storage.pt", "tensor 'w': its storage declares 4294967296 bytes, more than the whole file "
                               "holds ({size})"),
    # a 3 GiB string length: the reads stop at the end of the file (MemoryError, exit 3, before)
    ("legacy-long-string.pt", "torch.load cannot read it: UnicodeDecodeError: 'utf-8' codec can't decode"),
])
def test_legacy_sizes_larger_than_the_file_are_exit_2_under_a_memory_limit(cli, fx, name, text):
    path = fx(name)
    text = text.replace("{size}", str(path.stat().st_size))
    with _address_space_cap(1 << 30):
        r = cli("inspect", path)
    assert r.exit_code == 2, r.stderr
    line = one_error_line(r.stderr)
    assert str(path) in line and text in line, line


@pytest.mark.parametrize("name", ["self-overlapping-view.bin", "legacy-self-overlapping-view.pt"])
def test_a_view_that_maps_an_element_twice_is_refused(cli, fx, name):
    refused(cli, fx(name), "tensor 'w' maps some of its elements onto the same stored element",
            "strides [3, 3]")
