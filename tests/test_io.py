"""llmconv.io: sizes, safe paths, destination rules and atomic outputs, on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmconv.errors import DestinationError, UnsafeInput, UsageError
from llmconv.io import atomic_output, check_destination, human_size, parse_size, safe_child


@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2_000_000_000), ("500MB", 500_000_000), ("100KB", 100_000), ("100kb", 100_000),
    ("1GiB", 2**30), ("1.5GB", 1_500_000_000), ("10M", 10_000_000), ("64", 64), (" 3 MiB ", 3 * 2**20),
    ("1TB", 10**12), ("7b", 7), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "GB", "-1MB", "1XB", "0.1"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_human_size():
    assert human_size(999) == "999 B"
    assert human_size(1500) == "1.50 KB"
    assert human_size(2_000_000_000) == "2.00 GB"
    assert human_size(5 * 10**15) == "5000.00 TB"


def test_safe_child_accepts_plain_and_nested_names(tmp_path):
    (tmp_path / "sub").mkdir()
    assert safe_child(tmp_path, "a.safetensors", what="shard", source=tmp_path / "i.json") == \
        (tmp_path / "a.safetensors").resolve()
    assert safe_child(tmp_path, "sub/b.bin", what="shard", source=tmp_path / "i.json") == \
        (tmp_path / "sub" / "b.bin").resolve()


@pytest.mark.parametrize(("rel", "words"), [
    ("../outside.safetensors", "leaves the model's folder"),
    ("sub/../../x", "leaves the model's folder"),
    ("/etc/passwd", "is absolute"),
    ("C:\\weights.bin", "is absolute"),
    ("", "is absolute"),
])
def test_safe_child_refuses_escapes(tmp_path, rel, words):
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(UnsafeInput) as info:
        safe_child(tmp_path, rel, what="shard", source=index)
    assert words in str(info.value)
    assert str(index) in str(info.value)


def test_safe_child_refuses_a_link_out_of_the_folder(tmp_path):
    model, outside = tmp_path / "model", tmp_path / "outside"
    model.mkdir()
    outside.mkdir()
    (outside / "w.safetensors").write_bytes(b"x")
    (model / "link.safetensors").symlink_to(outside / "w.safetensors")
    with pytest.raises(UnsafeInput, match="resolves outside"):
        safe_child(model, "link.safetensors", what="shard", source=model / "i.json")


def test_safe_child_follows_hub_cache_links_into_blobs_only(tmp_path):
    blobs = tmp_path / "models--org--m" / "blobs"
    snapshot = tmp_path / "models--org--m" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"x")
    (snapshot / "shard.safetensors").symlink_to(Path("..", "..", "blobs", "abc"))
    assert safe_child(snapshot, "shard.safetensors", what="shard", source=snapshot / "i.json") == blobs / "abc"
    (tmp_path / "other").write_bytes(b"y")
    (snapshot / "evil.safetensors").symlink_to(tmp_path / "other")
    with pytest.raises(UnsafeInput, match="resolves outside"):
        safe_child(snapshot, "evil.safetensors", what="shard", source=snapshot / "i.json")
    with pytest.raises(UnsafeInput, match="leaves the model's folder"):
        safe_child(snapshot, "../../blobs/abc", what="shard", source=snapshot / "i.json")


def test_check_destination_rules(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.safetensors").write_bytes(b"x")
    with pytest.raises(DestinationError, match="is the source itself"):
        check_destination(src, src, force=True)
    with pytest.raises(DestinationError, match="inside the source folder"):
        check_destination(src, src / "out.safetensors", force=True)
    with pytest.raises(DestinationError, match="contains the source"):
        check_destination(src / "w.safetensors", src, force=True)
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"old")
    with pytest.raises(DestinationError, match="pass --force"):
        check_destination(src, existing, force=False)
    check_destination(src, existing, force=True)
    check_destination(src, tmp_path / "new.bin", force=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".llmconv-" in p.name)


def test_atomic_output_file_renamed_into_place_with_shared_modes(tmp_path):
    dst = tmp_path / "out.bin"
    with atomic_output(dst, folder=False) as tmp:
        assert tmp.parent == tmp_path and tmp != dst
        assert not dst.exists()
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_atomic_output_failure_leaves_the_old_destination(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_output(dst, folder=False, force=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert dst.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_output_refuses_existing_without_force(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(DestinationError, match="destination exists"), atomic_output(dst, folder=False):
        pass
    assert dst.read_bytes() == b"old"


def test_atomic_output_folder_replaces_folder(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("stale")
    with atomic_output(dst, folder=True, force=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["sub", "sub/a.txt"]
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dst / "sub" / "a.txt").st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_atomic_output_failed_folder_keeps_old_folder(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("keep")
    with pytest.raises(KeyboardInterrupt), atomic_output(dst, folder=True, force=True) as tmp:
        (tmp / "partial.txt").write_text("partial")
        raise KeyboardInterrupt
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_output_removes_the_folders_it_made_when_it_fails(tmp_path):
    dst = tmp_path / "a" / "b" / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(dst, folder=False) as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("fail")
    assert not (tmp_path / "a").exists()
    with atomic_output(dst, folder=False) as tmp:
        tmp.write_bytes(b"x")
    assert dst.read_bytes() == b"x"


def test_atomic_output_file_never_replaces_a_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"keep")
    with pytest.raises(DestinationError, match="destination is a folder, and the output is a file"), \
            atomic_output(folder, folder=False, force=True):
        pass
    assert (folder / "weights.bin").read_bytes() == b"keep"


def test_a_destination_under_a_file_is_a_destination_error(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    dst = tmp_path / "f.bin" / "sub" / "o.safetensors"
    with pytest.raises(DestinationError, match=r"cannot create the output here: .*f\.bin is a file, not a folder"), \
            atomic_output(dst, folder=False):
        pass


def test_a_full_disk_is_a_destination_error_naming_dst(tmp_path):
    import errno

    from llmconv.io import check_free_space

    dst = tmp_path / "o.safetensors"
    with pytest.raises(DestinationError, match=r"o\.safetensors: the output needs 1000000.00 TB, and .* free"):
        check_free_space(dst, 10**18)
    check_free_space(tmp_path / "new" / "deeper" / "o.bin", 1)  # folders not made yet: their parent is checked
    with pytest.raises(DestinationError, match=r"o\.safetensors: cannot write the output: No space left on device"), \
            atomic_output(dst, folder=False):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_held_signals_delivers_an_interrupt_after_the_block(tmp_path):
    """SIGINT inside the block waits until it ends: the renames it guards are never cut in half."""
    import signal

    from llmconv.io import held_signals

    done = []
    with pytest.raises(KeyboardInterrupt), held_signals():
        os.kill(os.getpid(), signal.SIGINT)
        (tmp_path / "a").write_text("a")
        done.append("after the signal")
    assert done == ["after the signal"] and (tmp_path / "a").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_leftovers_of_dead_processes_only_are_removed(tmp_path):
    import subprocess
    import sys

    from llmconv.io import atomic_output

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    dst = tmp_path / "out.bin"
    with atomic_output(dst, folder=False) as tmp:
        prefix = tmp.name.rsplit("-", 1)[0]  # .out.bin.llmconv-tmp-PID-HOST
        assert prefix.startswith(f".out.bin.llmconv-tmp-{os.getpid()}-")
        tmp.write_bytes(b"x")
    stale = tmp_path / prefix.replace(f"-{os.getpid()}-", f"-{dead}-")
    live = tmp_path / f"{prefix}-live"
    for p in (stale.with_name(stale.name + "-abc"), live):
        p.write_bytes(b"left")
    with atomic_output(dst, folder=False, force=True) as tmp:
        tmp.write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.bin", live.name])
