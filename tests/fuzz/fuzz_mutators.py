"""Mutations of the seed corpus, shared by the default suite (hypothesis) and ``make fuzz``.

A case is plain data: ``{"kind": ..., "dest": ..., "ops": [op, ...]}``, each op a JSON-ready dict
(``{"op": "st_field", "file": "model.safetensors", ...}``). Drawing a case asks a :class:`Chooser`
for every decision, so the same drawers serve hypothesis (``HypothesisChooser``: shrinkable) and the
long campaign (``RandomChooser``: seeded, fast); applying a case to a copy of its seed is
deterministic, so a finding is replayed, minimised (ops dropped one at a time) and saved as JSON.

Structured ops come first (they parse what they edit; an op whose target no longer parses does
nothing), byte-level ops last.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickletools
import random
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fuzz_corpus import CODE_RAN_MARKER, MODEL_DIR, OUTSIDE_BIN, OUTSIDE_DATA, OUTSIDE_SHARD, SECRET_FILE, SEEDS

T = TypeVar("T")


# ---- choosers ------------------------------------------------------------------------------------

class Chooser:
    """Where every random decision of a draw comes from."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]

    def binary(self, lo: int, hi: int) -> bytes:
        return bytes(self.integer(0, 255) for _ in range(self.integer(lo, hi)))

    def chance(self, percent: int) -> bool:
        return self.integer(0, 99) < percent


class RandomChooser(Chooser):
    """Decisions from a seeded ``random.Random`` (the campaign)."""

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def binary(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))


class HypothesisChooser(Chooser):
    """Decisions drawn from hypothesis (``st.data()``), so failures shrink to small cases."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(self.st.sampled_from(list(options)))

    def binary(self, lo: int, hi: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=lo, max_size=hi))


# ---- interesting values --------------------------------------------------------------------------

BIG_INTS = (0, 1, -1, 2, 7, 8, 255, 65536, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64,
            -(2**63), 10**30)
# Raw JSON texts (kept as text: a 5000-digit int cannot go through Python's int -> str limit).
RAW_JSON = ("0", "-1", "1.5", "-0.0", "1e308", "2e400", "null", "true", "false", '""', '"10"', "{}", "[]", "[[]]",
            '{"a": 1}', "1" * 5000, "-" + "9" * 4400, "[" * 50 + "]" * 50, "[" * 5000 + "]" * 5000,
            '{"a":' * 3000 + "1" + "}" * 3000, '"' + "x" * 70000 + '"', '"\\u0000"', '"\\ud800"')
NAMES = ("", "\x00", "a\x00b", "\x1b[31mred\x1b[0m", "new\nline", "../escape", "/abs/name", "x" * 5000, "é/ü",
         "\ud800", "__metadata__", " ", "embed.weight", "lm_head.weight", "a" * 300)
ST_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
             "U64", "C64", "F4", "I4", "f32", "", "XYZ")
PATHS = ("../" + OUTSIDE_SHARD, "../" + OUTSIDE_BIN, "../" + OUTSIDE_DATA, "../" + SECRET_FILE,
         "sub/../../" + SECRET_FILE, "/etc/hostname", "", ".", "./", "..", "a\x00b", "missing.safetensors",
         "x" * 300, ("d" * 200 + "/") * 30 + "f",
         "model.onnx", "config.json", "nested/../model.safetensors", "\\..\\escape", "C:/windows", "~/.ssh/id_rsa")


def _raw_int(ch: Chooser) -> str:
    return str(ch.choice(BIG_INTS)) if ch.chance(70) else str(ch.integer(-3, 64))


def _raw_value(ch: Chooser) -> str:
    return ch.choice(RAW_JSON) if ch.chance(60) else _raw_int(ch)


def _name(ch: Chooser) -> str:
    return ch.choice(NAMES) if ch.chance(85) else ch.binary(1, 12).decode("latin-1")


# ---- a JSON reader/writer that keeps duplicate keys, key order and number texts -------------------


class Raw(str):
    """JSON text written as is (numbers, constants, and values the mutators inject)."""


class Obj(list):
    """A JSON object as an ordered list of (key, value) pairs (duplicate keys allowed)."""


def _dump(value: Any) -> str:
    """Write JSON back: objects keep their order and duplicates, Raw values go out as they came in."""
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, Raw):
        return str(value)
    return json.dumps(value)


def _load(text: str | bytes) -> Any:
    """loads_lossless, with every object as an :class:`Obj`; None when the text is not JSON (any more)."""
    try:
        value = json.loads(text, object_pairs_hook=Obj, parse_int=Raw, parse_float=Raw, parse_constant=Raw)
    except (ValueError, RecursionError):
        return None
    return value


def _set(obj: Obj, key: str, value: Any) -> None:
    for i, (k, _) in enumerate(obj):
        if k == key:
            obj[i] = (k, value)
            return
    obj.append((key, value))


def _get(obj: Obj, key: str) -> Any:
    return next((v for k, v in obj if k == key), None)


# ---- files ---------------------------------------------------------------------------------------

def model_files(model: Path) -> list[str]:
    """Regular files of a model folder, relative, sorted (what byte-level ops may pick)."""
    return sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file() and not p.is_symlink())


def _pick(files: list[str], n: int) -> str | None:
    return files[n % len(files)] if files else None


def _files_like(model: Path, suffix: str) -> list[str]:
    return [f for f in model_files(model) if f.endswith(suffix)]


# ---- safetensors header ops ----------------------------------------------------------------------

def _st_split(data: bytes) -> tuple[Obj, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    header = _load(data[8:8 + n])
    if not isinstance(header, Obj):
        return None
    return header, data[8 + n:]


def _st_join(header: Obj | bytes, rest: bytes, *, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else _dump(header).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + rest


def _tensor_keys(header: Obj) -> list[str]:
    return [k for k, _ in header if k != "__metadata__"]


def _edit_st(model: Path, op: dict, edit: Callable[[Obj, bytes], tuple[Obj | bytes, bytes] | None]) -> None:
    files = _files_like(model, ".safetensors")
    rel = op.get("file") if op.get("file") in files else _pick(files, op.get("n", 0))
    if rel is None:
        return
    path = model / rel
    split = _st_split(path.read_bytes())
    if split is None:
        return
    result = edit(*split)
    if result is not None:
        path.write_bytes(_st_join(result[0], result[1], pad=op.get("pad", True)))


def _nth_entry(header: Obj, n: int) -> tuple[int, str, Obj] | None:
    keys = [(i, k, v) for i, (k, v) in enumerate(header) if k != "__metadata__" and isinstance(v, Obj)]
    return keys[n % len(keys)] if keys else None


def apply_st_field(model: Path, case: Path, op: dict) -> None:
    """Set one field (dtype, shape, data_offsets, or a new one) of the n-th tensor entry to raw JSON."""
    def edit(header: Obj, rest: bytes):
        found = _nth_entry(header, op["t"])
        if found is None:
            return None
        _, _, entry = found
        if op.get("drop"):
            entry[:] = [(k, v) for k, v in entry if k != op["field"]]
        else:
            _set(entry, op["field"], Raw(op["raw"]))
        return header, rest
    _edit_st(model, op, edit)


def apply_st_rename(model: Path, case: Path, op: dict) -> None:
    def edit(header: Obj, rest: bytes):
        found = _nth_entry(header, op["t"])
        if found is None:
            return None
        i, _, entry = found
        header[i] = (op["name"], entry)
        return header, rest
    _edit_st(model, op, edit)


def apply_st_dup(model: Path, case: Path, op: dict) -> None:
    """Repeat the n-th tensor's key with another entry (JSON readers keep the last, serde may refuse)."""
    def edit(header: Obj, rest: bytes):
        found = _nth_entry(header, op["t"])
        other = _nth_entry(header, op["t"] + 1)
        if found is None or other is None:
            return None
        header.append((found[1], Obj(other[2])))
        return header, rest
    _edit_st(model, op, edit)


def apply_st_metadata(model: Path, case: Path, op: dict) -> None:
    def edit(header: Obj, rest: bytes):
        _set(header, "__metadata__", Raw(op["raw"]))
        return header, rest
    _edit_st(model, op, edit)


def apply_st_overlap(model: Path, case: Path, op: dict) -> None:
    """Point tensor a's data_offsets at (part of) tensor b's span, or shift one span by ``shift``."""
    def edit(header: Obj, rest: bytes):
        a, b = _nth_entry(header, op["t"]), _nth_entry(header, op["u"])
        if a is None or b is None:
            return None
        offs = _get(b[2], "data_offsets")
        if not isinstance(offs, list) or len(offs) != 2:
            return None
        try:
            begin, end = int(offs[0]) + op["shift"], int(offs[1]) + op["shift"]
        except ValueError:
            return None
        _set(a[2], "data_offsets", [Raw(str(begin)), Raw(str(end))])
        return header, rest
    _edit_st(model, op, edit)


def apply_st_add(model: Path, case: Path, op: dict) -> None:
    """Add a tensor: valid (its bytes appended after the data) unless ``raw`` gives its entry."""
    def edit(header: Obj, rest: bytes):
        if op.get("raw") is not None:
            header.append((op["name"], Raw(op["raw"])))
            return header, rest
        size = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1, "BF16": 2}[op["dtype"]]
        shape = op["shape"]
        numel = 1
        for d in shape:
            numel *= d
        fill = bytes.fromhex(op["fill"]) or b"\0"
        payload = (fill * (numel * size))[:numel * size]
        if op["dtype"] == "BOOL":
            payload = bytes(b & 1 for b in payload)
        entry = Obj([("dtype", op["dtype"]), ("shape", [Raw(str(d)) for d in shape]),
                     ("data_offsets", [Raw(str(len(rest))), Raw(str(len(rest) + len(payload)))])])
        header.append((op["name"], entry))
        return header, rest + payload
    _edit_st(model, op, edit)


def apply_st_header_raw(model: Path, case: Path, op: dict) -> None:
    """Replace the header's bytes (the length prefix follows unless ``keep_len``)."""
    files = _files_like(model, ".safetensors")
    rel = _pick(files, op.get("n", 0))
    if rel is None:
        return
    path = model / rel
    data = path.read_bytes()
    if len(data) < 8:
        return
    (n,) = struct.unpack("<Q", data[:8])
    n = min(n, len(data) - 8)
    new = bytes.fromhex(op["hex"]) if "hex" in op else op["text"].encode("utf-8", "surrogatepass")
    if op.get("keep_len"):
        new = (new + b" " * n)[:n]
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def apply_st_prefix(model: Path, case: Path, op: dict) -> None:
    """Overwrite the 8-byte header length (``value``, or the true length plus ``delta``)."""
    files = _files_like(model, ".safetensors")
    rel = _pick(files, op.get("n", 0))
    if rel is None:
        return
    path = model / rel
    data = bytearray(path.read_bytes())
    if len(data) < 8:
        return
    value = op["value"] if "value" in op else struct.unpack("<Q", data[:8])[0] + op["delta"]
    data[:8] = struct.pack("<Q", value % 2**64)
    path.write_bytes(bytes(data))


def draw_st_op(ch: Chooser, file: str) -> dict:
    kind = ch.choice(("field", "field", "field", "rename", "dup", "metadata", "overlap", "add", "add", "raw",
                      "prefix", "drop"))
    t = ch.integer(0, 7)
    if kind in ("field", "drop"):
        field = ch.choice(("dtype", "shape", "data_offsets", "extra"))
        if field == "dtype":
            raw = json.dumps(ch.choice(ST_DTYPES)) if ch.chance(60) else _raw_value(ch)
        elif field == "shape":
            raw = ("[" + ",".join(_raw_int(ch) for _ in range(ch.integer(0, 3))) + "]" if ch.chance(60)
                   else ch.choice(("[" + ",".join(["2"] * 70) + "]", "[4294967296,4294967296]", "[1.5]", '["3"]',
                                   "[3,-4]", "[0,3]", "[" + "1" * 5000 + "]")) if ch.chance(50) else _raw_value(ch))
        elif field == "data_offsets":
            raw = (f"[{_raw_int(ch)},{_raw_int(ch)}]" if ch.chance(60)
                   else ch.choice(("[0]", "[0,0,0]", "[1.0,2.0]", '["0","4"]')) if ch.chance(50) else _raw_value(ch))
        else:
            raw = _raw_value(ch)
        return {"op": "st_field", "file": file, "t": t, "field": field, "raw": raw, "drop": kind == "drop"}
    if kind == "rename":
        return {"op": "st_rename", "file": file, "t": t, "name": _name(ch)}
    if kind == "dup":
        return {"op": "st_dup", "file": file, "t": t}
    if kind == "metadata":
        raw = ch.choice(('{"format": "pt"}', '{"format": 1}', '{"a": {"b": "c"}}', '{"k": "' + "v" * 70000 + '"}',
                         "[]", '"pt"', '{"\\u0000": "x"}')) if ch.chance(60) else _raw_value(ch)
        return {"op": "st_metadata", "file": file, "raw": raw}
    if kind == "overlap":
        return {"op": "st_overlap", "file": file, "t": t, "u": ch.integer(0, 7),
                "shift": ch.choice((0, 0, -1, 1, -8, 8))}
    if kind == "add":
        if ch.chance(70):
            shape = [ch.integer(0, 5) for _ in range(ch.integer(0, 3))]
            return {"op": "st_add", "file": file, "name": _name(ch) if ch.chance(30) else f"added.{ch.integer(0, 9)}",
                    "dtype": ch.choice(("F32", "F16", "I64", "U8", "BOOL", "BF16")), "shape": shape,
                    "fill": ch.binary(1, 4).hex()}
        return {"op": "st_add", "file": file, "name": _name(ch), "raw": _raw_value(ch)}
    if kind == "raw":
        if ch.chance(50):
            return {"op": "st_header_raw", "file": file, "text": ch.choice(RAW_JSON), "keep_len": ch.chance(30)}
        return {"op": "st_header_raw", "file": file, "hex": ch.binary(0, 24).hex(), "keep_len": ch.chance(50)}
    if ch.chance(50):
        return {"op": "st_prefix", "file": file, "value": ch.choice((0, 1, 2, 7, 2**63, 2**64 - 1, 100_000_001, 8))}
    return {"op": "st_prefix", "file": file, "delta": ch.choice((-1, 1, -8, 8, 4096, -4096))}


# ---- pickle ops (torch zip's data.pkl, and legacy pickles) ---------------------------------------

def _encode_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _encode_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}


def _pickle_ops(buf: bytes, *, streams: int) -> list[tuple[str, int, int, Any]]:
    """(opcode name, start, end, arg) of the first ``streams`` pickles in a row at the start of ``buf``."""
    import io

    out: list[tuple[str, int, int, Any]] = []
    f = io.BytesIO(buf)
    for _ in range(streams):
        start = f.tell()
        if start >= len(buf):
            break
        try:
            ops = list(pickletools.genops(f))
        except Exception:  # noqa: BLE001 - a stream that stops parsing ends the listing; any error means that
            break
        for i, (op, arg, pos) in enumerate(ops):
            end = ops[i + 1][2] if i + 1 < len(ops) else f.tell()
            out.append((op.name, pos, end, arg))
        if ops and ops[-1][0].name != "STOP":
            break
    return out


def _edit_pickle(buf: bytes, op: dict, *, streams: int) -> bytes | None:
    ops = _pickle_ops(buf, streams=streams)
    if op["what"] == "int":
        sites = [o for o in ops if o[0] in _INT_OPS]
        new = _encode_int(op["value"])
    elif op["what"] == "str":
        sites = [o for o in ops if o[0] in _STR_OPS]
        new = _encode_str(op["value"])
    else:  # global
        sites = [o for o in ops if o[0] == "GLOBAL"]
        new = b"c" + op["value"].replace(" ", "\n", 1).encode() + b"\n"
    if not sites:
        return None
    _, start, end, _ = sites[op["site"] % len(sites)]
    return buf[:start] + new + buf[end:]


GLOBALS = ("torch FloatStorage", "torch HalfStorage", "torch LongStorage", "torch BFloat16Storage",
           "torch BoolStorage", "torch ByteStorage", "torch DoubleStorage", "torch._utils _rebuild_tensor_v2",
           "torch._utils _rebuild_parameter",
           "torch._utils _rebuild_sparse_tensor", "torch._tensor _rebuild_from_type_v2", "collections OrderedDict",
           "torch Size", "builtins set", "os system", "builtins eval", "posix system", "torch._utils _rebuild_qtensor",
           "torch._utils _rebuild_wrapper_subclass", "torch._utils _rebuild_meta_tensor_no_storage", "nosuch.module X")


def draw_pickle_op(ch: Chooser, file: str) -> dict:
    what = ch.choice(("int", "int", "int", "str", "global"))
    op = {"op": "pickle", "file": file, "what": what, "site": ch.integer(0, 60)}
    if what == "int":
        op["value"] = ch.choice(BIG_INTS) if ch.chance(50) else ch.integer(-2, 40)
    elif what == "str":
        op["value"] = ch.choice(("0", "1", "2", "9", "", "cpu", "cuda", "meta", "data", "../x", "lm_head.weight",
                                 "embed.weight", "storage", "\x00", "x" * 5000, "little", "big"))
    else:
        op["value"] = ch.choice(GLOBALS)
    return op


def apply_pickle(model: Path, case: Path, op: dict) -> None:
    path = model / op["file"]
    if not path.is_file():
        return
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        members = _zip_members(path)
        if members is None:
            return
        for i, (name, content) in enumerate(members):
            if name.endswith("data.pkl"):
                new = _edit_pickle(content, op, streams=1)
                if new is None:
                    return
                members[i] = (name, new)
                _zip_write(path, members)
                return
        return
    new = _edit_pickle(data, op, streams=5)  # legacy: magic, protocol, sys info, the dict, the storage keys
    if new is not None:
        path.write_bytes(new)


def apply_legacy_storage(model: Path, case: Path, op: dict) -> None:
    """Legacy pickles end with, per storage, an 8-byte element count then its bytes: rewrite the first count."""
    path = model / op["file"]
    if not path.is_file() or zipfile.is_zipfile(path):
        return
    data = path.read_bytes()
    ops = _pickle_ops(data, streams=5)
    at = ops[-1][2] if ops else 0
    if at + 8 <= len(data):
        path.write_bytes(data[:at] + struct.pack("<q", op["value"]) + data[at + 8:])


# ---- zip record ops ------------------------------------------------------------------------------

def _zip_members(path: Path) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return [(i.filename, z.read(i)) for i in z.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, NotImplementedError, RuntimeError):
        return None


def _zip_write(path: Path, members: list[tuple[str, bytes]]) -> None:
    import warnings

    tmp = path.with_name(path.name + ".rewrite")
    with warnings.catch_warnings(), zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the edits
        for name, content in members:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    os.replace(tmp, path)


def apply_zip(model: Path, case: Path, op: dict) -> None:
    """Edit the archive's records: resize a data record, drop, rename, duplicate, or replace one."""
    path = model / op["file"]
    if not path.is_file():
        return
    members = _zip_members(path)
    if not members:
        return
    data_idx = [i for i, (n, _) in enumerate(members) if "/data/" in n and not n.endswith(".pkl")]
    pool = data_idx if op["action"] == "resize" and data_idx else list(range(len(members)))
    i = pool[op["m"] % len(pool)]
    name, content = members[i]
    if op["action"] == "resize":
        size = max(0, len(content) + op["delta"]) if "delta" in op else op["size"]
        content = (content * (size // max(1, len(content)) + 1))[:size] if content else b"\0" * size
        members[i] = (name, content)
    elif op["action"] == "drop":
        del members[i]
    elif op["action"] == "rename":
        members[i] = (op["name"], content)
    elif op["action"] == "duplicate":
        members.append((name, op.get("content", "").encode() or content[::-1]))
    elif op["action"] == "replace":
        members[i] = (name, op["content"].encode("utf-8", "surrogatepass"))
    _zip_write(path, members)


def draw_zip_op(ch: Chooser, file: str) -> dict:
    action = ch.choice(("resize", "resize", "resize", "drop", "rename", "duplicate", "replace"))
    op: dict[str, Any] = {"op": "zip", "file": file, "action": action, "m": ch.integer(0, 12)}
    if action == "resize":
        if ch.chance(70):
            op["delta"] = ch.choice((-1, -2, -4, -8, -12, -16, 1, 4, 8, 64))
        else:
            op["size"] = ch.choice((0, 1, 3, 1 << 16))
    elif action == "rename":
        op["name"] = ch.choice(("archive/data/99", "../evil", "/abs", "archive/data.pkl", "other/data.pkl",
                                "archive/byteorder", "archive/data/0", "a\x00b"))
    elif action == "duplicate":
        op["content"] = ch.choice(("", "big", "x"))
    elif action == "replace":
        op["content"] = ch.choice(("big", "little", "middle", "", "3", "99", "\x00", "x" * 300))
    return op


# ---- index JSON ops ------------------------------------------------------------------------------

def _index_file(model: Path) -> Path | None:
    found = sorted(model.glob("*.index.json"))
    return found[0] if found else None


def apply_index(model: Path, case: Path, op: dict) -> None:
    path = _index_file(model)
    if path is None:
        return
    index = _load(path.read_bytes())
    if not isinstance(index, Obj):
        return
    wm = _get(index, "weight_map")
    action = op["action"]
    if action == "raw":
        path.write_text(op["text"], encoding="utf-8", errors="surrogatepass")
        return
    if action == "weight_map":
        _set(index, "weight_map", Raw(op["raw"]))
    elif action == "total_size":
        meta = _get(index, "metadata")
        if isinstance(meta, Obj):
            _set(meta, "total_size", Raw(op["raw"]))
        else:
            _set(index, "metadata", Raw(op["raw"]))
    elif isinstance(wm, Obj) and wm:
        i = op["t"] % len(wm)
        key, rel = wm[i]
        if action == "path":
            target = op["path"]
            if target == "<absolute-outside>":
                target = str((case / (OUTSIDE_SHARD if str(rel).endswith(".safetensors") else OUTSIDE_BIN)).resolve())
            elif target == "<link-outside>":
                link = model / "linked-shard"
                with contextlib.suppress(OSError):
                    link.symlink_to(Path("..") / (OUTSIDE_SHARD if str(rel).endswith(".safetensors") else OUTSIDE_BIN))
                target = "linked-shard"
            elif target == "<loop>":
                with contextlib.suppress(OSError):
                    (model / "loop-a").symlink_to("loop-b")
                    (model / "loop-b").symlink_to("loop-a")
                target = "loop-a"
            elif target == "<dir>":
                (model / "adir").mkdir(exist_ok=True)
                target = "adir"
            wm[i] = (key, target)
        elif action == "drop":
            del wm[i]
        elif action == "add":
            wm.append((op["name"], rel))
        elif action == "rename":
            wm[i] = (op["name"], rel)
        elif action == "value":
            wm[i] = (key, Raw(op["raw"]))
        elif action == "dup":
            wm.append((key, wm[(i + 1) % len(wm)][1]))
    else:
        return
    path.write_text(_dump(index), encoding="utf-8", errors="surrogatepass")


def draw_index_op(ch: Chooser) -> dict:
    action = ch.choice(("path", "path", "path", "drop", "add", "rename", "value", "dup", "weight_map", "total_size",
                        "raw"))
    op: dict[str, Any] = {"op": "index", "action": action, "t": ch.integer(0, 9)}
    if action == "path":
        op["path"] = ch.choice(PATHS + ("<absolute-outside>", "<link-outside>", "<loop>", "<dir>"))
    elif action in ("add", "rename"):
        op["name"] = _name(ch) if ch.chance(50) else f"not.in.shard.{ch.integer(0, 9)}"
    elif action in ("value", "weight_map", "total_size"):
        op["raw"] = _raw_value(ch)
    elif action == "raw":
        op["text"] = ch.choice(RAW_JSON + ('{"weight_map": {"a": "b"', '{"weight_map": {}}', "\x00", ""))
    return op


# ---- hf folder ops -------------------------------------------------------------------------------

CONFIG_VALUES = {
    "torch_dtype": ('{}', '[]', '"float99"', '"bfloat16"', '"float16"', "5", "null", '"int8"'),
    "dtype": ('{}', '"float64"', "[1]"),
    "tie_word_embeddings": ('"no"', "{}", "false", "0", "null", "[]"),
    "architectures": ("[5]", '"GPT2LMHeadModel"', "[]", '["NoSuchModel"]', '["__import__"]', "null", "[{}]",
                      '["GPT2LMHeadModel", "LlamaForCausalLM"]', '["os.system"]'),
    "model_type": ('"no-such-model"', "5", '""', '"llama"', "null", '"../../etc"'),
    "n_embd": ("-1", "0", "1" * 5000, "1.5", '"4"', "4294967296"),
    "vocab_size": ("-8", "0", "2e400", "null"),
    "text_config": ('{"tie_word_embeddings": "x"}', "[]", '"s"', "{}"),
    "quantization_config": ('{"quant_method": "bitsandbytes"}', "[]", "5"),
}


def apply_config(model: Path, case: Path, op: dict) -> None:
    path = model / "config.json"
    if op["action"] == "raw":
        path.write_text(op["text"], encoding="utf-8", errors="surrogatepass")
        return
    if op["action"] == "auto_map":
        # A model folder's own code: if anything imports it, it leaves a marker beside the model.
        marker = (case / CODE_RAN_MARKER).resolve()
        (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PretrainedConfig\n"
                                       "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n",
                                       encoding="utf-8")
        config = _load(path.read_bytes()) if path.is_file() else None
        if not isinstance(config, Obj):
            return
        _set(config, "model_type", "evil")
        _set(config, "auto_map", Obj([("AutoConfig", "evil.EvilConfig"), ("AutoModelForCausalLM", "evil.EvilModel")]))
        _set(config, "architectures", ["EvilModel"])
        path.write_text(_dump(config), encoding="utf-8")
        return
    config = _load(path.read_bytes()) if path.is_file() else None
    if not isinstance(config, Obj):
        return
    _set(config, op["key"], Raw(op["raw"]))
    path.write_text(_dump(config), encoding="utf-8", errors="surrogatepass")


def draw_config_op(ch: Chooser) -> dict:
    action = ch.choice(("set", "set", "set", "raw", "auto_map"))
    if action == "raw":
        return {"op": "config", "action": "raw", "text": ch.choice(RAW_JSON + ("\x00", "", "{", "\ufeff{}"))}
    if action == "auto_map":
        return {"op": "config", "action": "auto_map"}
    key = ch.choice(tuple(CONFIG_VALUES))
    raw = ch.choice(CONFIG_VALUES[key]) if ch.chance(70) else _raw_value(ch)
    return {"op": "config", "action": "set", "key": key, "raw": raw}


def apply_extra_file(model: Path, case: Path, op: dict) -> None:
    """Add a file beside the weights: a link out of the folder, a link loop, odd names, a subfolder."""
    what = op["what"]
    with contextlib.suppress(OSError):
        if what == "link-secret":
            (model / op["name"]).symlink_to(Path("..") / SECRET_FILE)
        elif what == "link-absolute":
            (model / op["name"]).symlink_to((case / SECRET_FILE).resolve())
        elif what == "link-dir":
            (model / op["name"]).symlink_to("..")
        elif what == "link-loop":
            (model / op["name"]).symlink_to(op["name"])
        elif what == "link-dangling":
            (model / op["name"]).symlink_to("nowhere")
        elif what == "fifo":
            os.mkfifo(model / op["name"])
        elif what == "subdir":
            (model / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
            (model / "sub" / "deeper" / op["name"]).write_text("x", encoding="utf-8")
        else:
            (model / op["name"]).write_bytes(b"x")


def draw_extra_file_op(ch: Chooser) -> dict:
    what = ch.choice(("link-secret", "link-secret", "link-absolute", "link-dir", "link-loop", "link-dangling", "fifo",
                      "subdir", "plain"))
    name = ch.choice(("README.md", "tokenizer.json", "special_tokens_map.json", "generation_config.json", "vocab.txt",
                      "\x1b[31mx", "new\nline.txt", "x" * 250, "model.safetensors", "config.json",
                      "pytorch_model.bin", "model.onnx"))
    return {"op": "extra_file", "what": what, "name": name}


# ---- ONNX proto ops ------------------------------------------------------------------------------

def _onnx_edit(model: Path, edit: Callable[[Any], bool]) -> None:
    from google.protobuf.message import DecodeError
    from onnx import ModelProto

    path = model / "model.onnx"
    if not path.is_file():
        return
    proto = ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError):
        return
    if edit(proto):
        path.write_bytes(proto.SerializeToString())


def apply_onnx(model: Path, case: Path, op: dict) -> None:
    from onnx import TensorProto

    def edit(proto: Any) -> bool:
        inits = proto.graph.initializer
        if not inits:
            return False
        t = inits[op["t"] % len(inits)]
        action = op["action"]
        if action == "dup":
            copy = inits.add()
            copy.CopyFrom(t)
            if copy.raw_data:
                copy.raw_data = bytes(reversed(copy.raw_data))
            elif copy.float_data:
                copy.float_data[0] += 1.0
        elif action == "sparse":
            s = proto.graph.sparse_initializer.add()
            s.dims.extend([4, 3])
            s.values.name = op.get("name", "S")
            s.values.data_type = TensorProto.FLOAT
            s.values.dims.append(2)
            s.values.float_data.extend([1.5, -2.0])
            s.indices.name = s.values.name + "_idx"
            s.indices.data_type = TensorProto.INT64
            s.indices.dims.append(2)
            s.indices.int64_data.extend(op.get("indices", [0, 5]))
        elif action == "dims":
            del t.dims[:]
            t.dims.extend(op["dims"])
        elif action == "dtype":
            t.data_type = op["value"]
        elif action == "name":
            t.name = op["name"]
        elif action == "ext":
            if t.data_location != TensorProto.EXTERNAL:
                if not op.get("force"):
                    return False
                t.data_location = TensorProto.EXTERNAL
                t.ClearField("raw_data")
            kv = {e.key: e for e in t.external_data}
            key = op["key"]
            value = op["value"]
            if value == "<absolute-outside>":
                value = str((case / OUTSIDE_DATA).resolve())
            elif value == "<link-outside>":
                with contextlib.suppress(OSError):
                    (model / "linked.bin").symlink_to(Path("..") / OUTSIDE_DATA)
                value = "linked.bin"
            if op.get("remove"):
                if key in kv:
                    t.external_data.remove(kv[key])
            elif key in kv:
                kv[key].value = value
            else:
                e = t.external_data.add()
                e.key, e.value = key, value
        elif action == "typed":
            # raw_data -> typed field (a valid spelling), or both at once (contradictory).
            import numpy as np

            if t.data_type == TensorProto.FLOAT and t.raw_data:
                values = np.frombuffer(t.raw_data, dtype="<f4").tolist()
                if not op.get("both"):
                    t.ClearField("raw_data")
                t.float_data.extend(values[::-1] if op.get("both") else values)
            elif t.float_data and op.get("both"):
                t.raw_data = np.asarray(t.float_data, dtype="<f4")[::-1].tobytes()
            else:
                return False
        elif action == "inline_external":
            t.data_location = TensorProto.EXTERNAL  # inline bytes, but marked external
        elif action == "ir":
            proto.ir_version = op["value"]
        elif action == "subgraph":
            # An If node whose branch holds an initializer of its own (another weight llmconv must list).
            from onnx import helper

            branch_init = helper.make_tensor(op.get("name", "sub.W"), TensorProto.FLOAT, [2], [1.0, 2.0])
            out = helper.make_tensor_value_info("sub_out", TensorProto.FLOAT, [2])
            g = helper.make_graph([helper.make_node("Identity", [branch_init.name], ["sub_out"])], "branch", [],
                                  [out], [branch_init])
            cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
            proto.graph.initializer.append(cond)
            proto.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=g, else_branch=g))
        return True

    _onnx_edit(model, edit)


def draw_onnx_op(ch: Chooser, *, external: bool) -> dict:
    actions = ["dup", "sparse", "dims", "dims", "dtype", "name", "typed", "inline_external", "ir", "subgraph"]
    if external:
        actions += ["ext"] * 6
    action = ch.choice(actions)
    op: dict[str, Any] = {"op": "onnx", "action": action, "t": ch.integer(0, 5)}
    if action == "dims":
        op["dims"] = ([ch.integer(0, 6) for _ in range(ch.integer(0, 3))] if ch.chance(50)
                      else [ch.choice((-1, 2**31, 2**40, 2**62, 0, 1 << 20)) for _ in range(ch.integer(1, 3))])
    elif action == "dtype":
        op["value"] = ch.choice((0, 2, 3, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 99, -1))
    elif action in ("name", "sparse", "subgraph"):
        op["name"] = ch.choice(("W", "B", "H", "", "\x00", "\x1b[2J", "x" * 5000, "shape", "new.weight"))
        if action == "sparse":
            op["indices"] = ch.choice(([0, 5], [0, 99], [-1, 2], [3, 3]))
    elif action == "ext":
        key = ch.choice(("location", "offset", "offset", "length", "length", "checksum", "basepath"))
        if key == "location":
            value = ch.choice(PATHS + ("<absolute-outside>", "<link-outside>", "weights.bin", "model.onnx"))
        elif key in ("offset", "length"):
            value = ch.choice(("-1", "0", "1", "4", "16", "47", "48", "64", "4096", "1e3", "x", "", " 4",
                               "18446744073709551616", "1" * 5000))
        else:
            value = "x"
        op.update(key=key, value=value, remove=ch.chance(15), force=ch.chance(20))
    elif action == "typed":
        op["both"] = ch.chance(50)
    elif action == "ir":
        op["value"] = ch.choice((0, 3, 11, 13, 99, -1))
    return op


# ---- byte-level ops (any file) -------------------------------------------------------------------

def apply_bytes(model: Path, case: Path, op: dict) -> None:
    files = model_files(model)
    rel = op["file"] if op["file"] in files else _pick(files, op.get("n", 0))
    if rel is None:
        return
    path = model / rel
    data = bytearray(path.read_bytes())
    action = op["action"]
    pos = op.get("pos", 0) % (len(data) + 1)
    if action == "flip" and data:
        pos %= len(data)
        data[pos] ^= op["xor"] or 1
    elif action == "set":
        new = bytes.fromhex(op["hex"])
        data[pos:pos + len(new)] = new
    elif action == "truncate":
        del data[pos:]
    elif action == "extend":
        data += bytes.fromhex(op["hex"]) * op.get("times", 1)
    elif action == "insert":
        data[pos:pos] = bytes.fromhex(op["hex"])
    elif action == "delete":
        del data[pos:pos + op["len"]]
    elif action == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


def draw_bytes_op(ch: Chooser, files: list[str], sizes: dict[str, int]) -> dict:
    file = ch.choice(files)
    size = max(1, sizes.get(file, 1))
    action = ch.choice(("flip", "flip", "flip", "set", "truncate", "truncate", "extend", "insert", "delete", "empty"))
    # Positions favour the start (headers, length prefixes, zip local headers) and the end (zip directory).
    region = ch.integer(0, 2)
    pos = ch.integer(0, min(size - 1, 63)) if region == 0 else (
        ch.integer(max(0, size - 64), size - 1) if region == 1 else ch.integer(0, size - 1))
    op: dict[str, Any] = {"op": "bytes", "file": file, "action": action, "pos": pos}
    if action == "flip":
        op["xor"] = ch.choice((1, 2, 4, 8, 16, 32, 64, 128, 255))
    elif action in ("set", "insert"):
        op["hex"] = ch.choice((b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff" * 8, b"\x00" * 8, b'"', b"{", b"\\")).hex() \
            if ch.chance(60) else ch.binary(1, 8).hex()
    elif action == "extend":
        op["hex"] = ch.binary(1, 8).hex()
        op["times"] = ch.choice((1, 1, 7, 1000))
    elif action == "delete":
        op["len"] = ch.integer(1, 16)
    return op


# ---- cases ---------------------------------------------------------------------------------------

APPLY: dict[str, Callable[[Path, Path, dict], None]] = {
    "st_field": apply_st_field, "st_rename": apply_st_rename, "st_dup": apply_st_dup,
    "st_metadata": apply_st_metadata, "st_overlap": apply_st_overlap, "st_add": apply_st_add,
    "st_header_raw": apply_st_header_raw, "st_prefix": apply_st_prefix, "pickle": apply_pickle,
    "legacy_storage": apply_legacy_storage, "zip": apply_zip, "index": apply_index, "config": apply_config,
    "extra_file": apply_extra_file, "onnx": apply_onnx, "bytes": apply_bytes,
}


def seed_files(seed_case: Path) -> dict[str, int]:
    model = seed_case / MODEL_DIR
    return {f: (model / f).stat().st_size for f in model_files(model)}


def _structured_op(ch: Chooser, kind: str, files: dict[str, int]) -> dict:
    st_files = [f for f in files if f.endswith(".safetensors")]
    bin_files = [f for f in files if f.endswith(".bin") and f != "weights.bin"]
    if kind == "st_single":
        return draw_st_op(ch, ch.choice(st_files))
    if kind == "st_sharded":
        return draw_index_op(ch) if ch.chance(45) else draw_st_op(ch, ch.choice(st_files))
    if kind in ("pt_zip", "pt_legacy"):
        if kind == "pt_legacy" and ch.chance(15):
            return {"op": "legacy_storage", "file": bin_files[0],
                    "value": ch.choice((-1, 0, 1, 2**31, 2**40, 2**62, 3, 100))}
        return draw_zip_op(ch, bin_files[0]) if kind == "pt_zip" and ch.chance(45) else draw_pickle_op(ch, bin_files[0])
    if kind == "pt_sharded":
        r = ch.integer(0, 2)
        return draw_index_op(ch) if r == 0 else (draw_zip_op(ch, ch.choice(bin_files)) if r == 1
                                                 else draw_pickle_op(ch, ch.choice(bin_files)))
    if kind == "hf":
        r = ch.integer(0, 2)
        return draw_config_op(ch) if r == 0 else (draw_extra_file_op(ch) if r == 1 else draw_st_op(ch, st_files[0]))
    if kind in ("onnx_inline", "onnx_external"):
        return draw_onnx_op(ch, external=kind == "onnx_external")
    raise KeyError(kind)


def draw_case(ch: Chooser, kind: str, files: dict[str, int]) -> dict:
    """Draw one case of ``kind`` (``files``: the seed's file sizes, from :func:`seed_files`).

    Mostly one or two structured edits, sometimes with byte-level damage after them, sometimes
    bytes only; the destination format of ``convert`` is drawn too.
    """
    dest = "safetensors" if SEEDS[kind].onnx or ch.chance(65) else "pytorch"
    ops = []
    mode = ch.integer(0, 9)
    if mode < 7:  # structured
        ops += [_structured_op(ch, kind, files) for _ in range(ch.integer(1, 2))]
    if mode >= 5:  # byte-level
        ops += [draw_bytes_op(ch, sorted(files), files) for _ in range(ch.integer(1, 2))]
    return {"kind": kind, "dest": dest, "ops": ops}


def apply_case(case_dir: Path, spec: dict) -> None:
    """Apply ``spec``'s ops, in order, to the seed copied at ``case_dir``."""
    model = case_dir / MODEL_DIR
    for op in spec["ops"]:
        APPLY[op["op"]](model, case_dir, op)


def describe(spec: dict) -> str:
    """One line per op, long values cut, for notes and reports."""
    def short(v: Any) -> str:
        s = repr(v)
        return s if len(s) <= 60 else s[:40] + f"...({len(s)} chars)"
    return "; ".join(f"{op['op']}(" + ", ".join(f"{k}={short(v)}" for k, v in op.items() if k != "op") + ")"
                     for op in spec["ops"]) or "(seed unchanged)"
