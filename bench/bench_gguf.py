#!/usr/bin/env python
"""llmconv's GGUF writer vs the gguf package's own writer used as llama.cpp's converter uses it, side by side.

On a seeded random Llama of about 1 GB in float32 (hidden 1024, intermediate 2816, 17 layers, 16 heads / 4 KV
heads, vocabulary 32000, untied head; safetensors from ``save_pretrained``, with the trained GPT-2's tokenizer
files beside it: its 1024 ids, the rest written as [PADi]), each contender writes a GGUF file, f16 and q8_0,
each run in a fresh process:

  llmconv              ``write_gguf`` called from a small script (open the folder, ``cast_source`` to fp16
                       for f16, ``method="q8_0"`` for q8_0): the table of tensors first, then each tensor read,
                       laid out, converted and written before the next is read
  llmconv CLI          ``llmconv convert MODEL OUT.gguf --dtype fp16 --no-verify --force`` (f16) and
                       ``llmconv quantize MODEL OUT.gguf --target cpu --method q8_0 --no-verify --force``
                       (q8_0); dropped, with the reason printed, when the command fails
  gguf writer (eager)  the anchor: ``gguf.GGUFWriter(None, arch)``, every tensor read with
                       ``safetensors.safe_open(framework="pt")``, laid out (the same names, types and Q/K
                       permutation as llmconv: ``llmconv.formats.gguf.plan`` and ``gguf_arch``), converted
                       (``astype(float16)``, or ``gguf.quants.quantize(data, Q8_0)``; 1-D tensors float32) and
                       given to ``writer.add_tensor(name, data, raw_dtype=...)``; then the metadata,
                       ``write_header_to_file``, ``write_kv_data_to_file``, ``write_tensors_to_file``,
                       ``close``, as llama.cpp's ``ModelBase.write`` does. Every converted tensor is held until
                       written: the "~1x model size" of the issue
  gguf writer (lazy)   the same, each tensor given as a ``gguf.LazyNumpyTensor`` that reads, lays out and
                       converts it when the writer writes it: llama.cpp's default (its ``--no-lazy`` is off)
  cp                   ``cp`` of the model's safetensors file: the physical floor

The metadata (hyper-parameters, vocabulary, merges, special ids) is the same in all of them, so the files
differ only where the writers do. After a warm-up run of each (which also fills the page cache with the
source), rounds (``--rounds``) run every contender once per format, in an order that rotates every round; the
previous output is deleted and ``sync`` is called before each run.

Figures, per format: ``e2e s`` the median wall time of the process (start-up and imports included, the same
for all), ``work s`` the median time inside it after the imports (from the script's own clock; the CLI's
``seconds`` from ``--json``), ``x writer`` the median over rounds of that round's e2e ratio to the eager
writer (and ``work x`` of the work times), ``x cp`` the same against ``cp``, ``peak MB`` the largest peak
RssAnon of the process tree over all rounds (bench/_procmem.py: mapped file pages are not counted), ``+MB``
that peak minus the peak of a process that only imports torch, safetensors, gguf and llmconv's GGUF module.
Then every output is opened with ``gguf.GGUFReader`` and compared with the eager writer's: tensor names and
types, tensor data byte for byte, metadata keys and values.

Targets (the issue): llmconv's time <= 1.0x the eager writer's; its memory flat, about one tensor (the
largest here: the 32000 x 1024 embedding, 131 MB in float32), where the eager writer holds about the whole
converted model. On a shared machine the rounds spread: compare ratios from one run; the load average before
and after is printed.

Example:
    python bench/bench_gguf.py --rounds 3 --json bench/out/gguf.json
    python bench/bench_gguf.py --quick          # a ~100 MB model, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from _models import REPO, log, random_llama, read_back, work_dir  # bench/ is on sys.path: the script's own folder
from _procmem import run_sampled

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PY = sys.executable
MB = 1e6

# ~257M parameters, 1.03 GB in float32: 2 x 32000 x 1024 embedding/head + 17 layers of attention
# (1024^2 x 2 + 1024 x 256 x 2) and MLP (3 x 1024 x 2816).
FULL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 17, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False}
# ~26M parameters, 102 MB.
QUICK = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 8000, "max_position_embeddings": 1024,
         "tie_word_embeddings": False}
FORMATS = ("f16", "q8_0")
TIME_TARGET = 1.0

LLMCONV = "llmconv"
CLI = "llmconv CLI"
EAGER = "gguf writer (eager)"
LAZY = "gguf writer (lazy)"
CP = "cp"
CONTENDERS = (LLMCONV, CLI, EAGER, LAZY, CP)



def slug(name: str) -> str:
    return name.replace(" ", "-").replace("(", "").replace(")", "")


# ---- the contenders' scripts (each run as ``python -c``) ------------------------------------------------

_BASELINE = r'''
import time, numpy, torch, safetensors, gguf
from llmconv.formats import gguf as _g, registry
registry.all_formats()
time.sleep(0.3)
'''

# argv: MODEL OUT FORMAT
_LLMCONV = r'''
import json, sys, time
from pathlib import Path
import torch
from llmconv.checkpoint import cast_source
from llmconv.formats import registry
from llmconv.formats.gguf import write_gguf
model, out, fmt = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
src = registry.open_checkpoint(model)
if fmt == "f16":
    write_gguf(cast_source(src, torch.float16)[0], out, method=None)
else:
    write_gguf(src, out, method=fmt)
src.close()
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''

# argv: MODEL OUT FORMAT eager|lazy. llama.cpp's ModelBase.write: add every tensor, then the metadata, then
# write_header_to_file, write_kv_data_to_file, write_tensors_to_file, close. Names, types and layout from
# llmconv's plan (the comparison is of writing strategies, not of naming).
_WRITER = r'''
import json, sys, time
from pathlib import Path
import numpy as np, torch, gguf
from safetensors import safe_open
from llmconv.checkpoint import cast_source
from llmconv.formats import registry
from llmconv.formats import gguf as G
model, out, fmt, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
T = gguf.GGMLQuantizationType
src = registry.open_checkpoint(model)  # the config, tokenizer files and tensor names; no tensor is read here
method = None if fmt == "f16" else fmt
cls, arch, entries, _ = G.plan(cast_source(src, torch.float16)[0] if method is None else src, method)
config = src.config
handles, where = [], {}
for f in sorted(model.glob("*.safetensors")):
    h = safe_open(str(f), framework="pt")
    handles.append(h)
    where.update({k: h for k in h.keys()})

def laid_out(e):
    t = where[e.src_name].get_tensor(e.src_name)
    return arch.hf_to_gguf(e.name, t, config).numpy()

def convert(data, e):
    if e.gtype == T.F32:
        return data.astype(np.float32)
    if e.gtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), e.gtype)

writer = gguf.GGUFWriter(path=None, arch=arch.gguf, use_temp_file=False)
for e in entries:
    if mode == "lazy":
        meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(np.float32, e.shape)
        data = convert(gguf.LazyNumpyTensor(meta=meta, args=(e,), func=laid_out), e)
    else:
        data = convert(laid_out(e), e)
    writer.add_tensor(e.name, data, raw_dtype=None if e.gtype in (T.F32, T.F16) else e.gtype)
writer.add_type("model")
writer.add_name(str(config.get("_name_or_path") or model.name))
for key, name, value in G.gguf_arch.hyper_parameters(arch, config):
    getattr(writer, name)(value)
vocab = int(config.get("vocab_size") or 0)
writer.add_vocab_size(vocab)
writer.add_file_type(G._file_type(entries, method))
if method:
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
G._add_vocab(writer, src, vocab)
writer.write_header_to_file(path=out)
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
src.close()
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''

# argv: REFERENCE OUT...: each OUT against REFERENCE (tensor names and types, data, metadata).
_CHECK = r'''
import json, sys
import numpy as np, gguf
def load(p):
    r = gguf.GGUFReader(p, "r")
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, {t.name: t for t in r.tensors}, meta
ref, ref_t, ref_meta = load(sys.argv[1])
out = {}
for p in sys.argv[2:]:
    r, ts, meta = load(p)
    same_names = set(ts) == set(ref_t)
    common = [n for n in ref_t if n in ts]
    same_types = same_names and all(ts[n].tensor_type == ref_t[n].tensor_type for n in common)
    identical = sum(np.array_equal(np.asarray(ts[n].data).view(np.uint8), np.asarray(ref_t[n].data).view(np.uint8))
                    for n in common if ts[n].tensor_type == ref_t[n].tensor_type)
    diff_meta = sorted(k for k in set(meta) | set(ref_meta) if meta.get(k) != ref_meta.get(k))
    out[p] = {"tensors": len(ts), "same_names": same_names, "same_types": same_types, "identical": int(identical),
              "order_same": list(ts) == list(ref_t), "metadata_differs": diff_meta,
              "types": sorted({t.tensor_type.name for t in ts.values()})}
print(json.dumps(out))
'''


def command(name: str, fmt: str, model: Path, out: Path) -> list[str]:
    if name == LLMCONV:
        return [PY, "-c", _LLMCONV, str(model), str(out), fmt]
    if name == CLI and fmt == "f16":
        return [PY, "-m", "llmconv", "convert", str(model), str(out), "--dtype", "fp16", "--no-verify", "--force",
                "--json"]
    if name == CLI:
        return [PY, "-m", "llmconv", "quantize", str(model), str(out), "--target", "cpu", "--method", fmt,
                "--no-verify", "--force", "--json"]
    if name in (EAGER, LAZY):
        return [PY, "-c", _WRITER, str(model), str(out), fmt, "eager" if name == EAGER else "lazy"]
    if name == CP:
        return ["cp", str(next(model.glob("*.safetensors"))), str(out)]
    raise ValueError(name)


def run_once(name: str, fmt: str, model: Path, out: Path, *, probe: bool = False) -> dict:
    """One run of a contender into ``out`` (deleted first), after ``sync``."""
    out.unlink(missing_ok=True)
    subprocess.run(["sync"], check=False)
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    r = run_sampled(command(name, fmt, model, out), cwd=REPO, env=env,
                    ok_codes=tuple(range(256)) if probe else (0,))
    r["work_s"] = r["wall_s"]
    if r["rc"] == 0 and name != CP:
        lines = [x for x in r["stdout"].strip().splitlines() if x.startswith("{")]
        with contextlib.suppress(ValueError, IndexError):
            r["work_s"] = float(json.loads(lines[-1] if name != CLI else r["stdout"]).get("seconds") or r["wall_s"])
    r["size_mb"] = out.stat().st_size / MB if out.is_file() else None
    return r


def _error_text(stdout: str) -> str:
    """The message of a failed ``--json`` command (its report's error), else its last line."""
    try:
        rep = json.loads(stdout)
        err = rep.get("error") or rep
        return str(err.get("message") if isinstance(err, dict) and err.get("message") else err)[:200]
    except ValueError:
        lines = [x.strip() for x in stdout.splitlines() if x.strip()]
        return lines[-1][:200] if lines else "(no output)"


def baseline_mb(reps: int = 3) -> float:
    """Peak RssAnon of a process that only imports what the contenders import (median of ``reps``)."""
    return statistics.median(run_sampled([PY, "-c", _BASELINE], cwd=REPO)["peak_anon_mb"] for _ in range(reps))


def largest_tensor(model: Path) -> tuple[str, int]:
    """The name and float32 size (bytes) of the checkpoint's largest tensor, from the safetensors header."""
    best = ("", 0)
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__" and v["data_offsets"][1] - v["data_offsets"][0] > best[1]:
                best = (k, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def check(outputs: dict[str, Path]) -> dict[str, dict]:
    """Each output against the eager writer's."""
    return read_back(_CHECK, outputs[EAGER], {n: p for n, p in outputs.items() if n != EAGER},
                     what="reading the outputs back with gguf.GGUFReader")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a ~100 MB model (hidden 512, 6 layers, vocab 8000)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmconv-bench-gguf"),
                    help="where the model and the outputs go (the model is reused by later runs)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="f16,q8_0 (default both)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    config = QUICK if args.quick else FULL
    formats = [f for f in args.formats.split(",") if f]
    work = work_dir(args.work, quick=args.quick)
    model = random_llama(work / "llama-hf", config)
    model_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / MB
    big_name, big_bytes = largest_tensor(model)
    outs = work / "outputs"
    outs.mkdir(exist_ok=True)
    path = {(n, f): outs / f"{f}-{slug(n)}.{'safetensors' if n == CP else 'gguf'}" for n in CONTENDERS
            for f in formats}
    base = baseline_mb()
    log(f"model {model_mb:.0f} MB; import-only baseline RssAnon {base:.0f} MB")

    # Warm-up: every contender once (fills the page cache; finds whether the CLI writes GGUF).
    active: dict[str, list[str]] = {}
    dropped: dict[str, str] = {}
    for fmt in formats:
        active[fmt] = []
        for name in CONTENDERS:
            if name == CP and fmt != formats[0]:
                active[fmt].append(name)
                continue
            r = run_once(name, fmt, model, path[name, fmt], probe=True)
            if r["rc"] != 0:
                if name != CLI:
                    raise SystemExit(f"{name} failed on {fmt}: {' '.join(command(name, fmt, model, path[name, fmt]))}")
                dropped[f"{name} {fmt}"] = f"exit {r['rc']}: {_error_text(r['stdout'])}"
                log(f"  warm-up {fmt} {name}: failed ({dropped[f'{name} {fmt}']}): left out")
                continue
            active[fmt].append(name)
            log(f"  warm-up {fmt} {name}: {r['wall_s']:.1f} s, peak RssAnon {r['peak_anon_mb']:.0f} MB")

    load = [os.getloadavg()]
    runs: dict[tuple[str, str], list[dict]] = {(n, f): [] for f in formats for n in active[f]}
    order = [(n, f) for f in formats for n in active[f] if not (n == CP and f != formats[0])]
    for i in range(rounds):
        k = i % len(order)
        for name, fmt in order[k:] + order[:k]:
            runs[name, fmt].append(run_once(name, fmt, model, path[name, fmt]))
        log(f"  round {i + 1}/{rounds}: " + ", ".join(
            f"{f} {n} {runs[n, f][-1]['wall_s']:.1f}s" for n, f in order))
    load.append(os.getloadavg())
    for fmt in formats[1:]:
        runs[CP, fmt] = runs[CP, formats[0]]

    rows: dict[str, dict[str, dict]] = {}
    for fmt in formats:
        ref = runs[EAGER, fmt]
        cp = runs[CP, fmt]
        rows[fmt] = {}
        for name in active[fmt]:
            rs = runs[name, fmt]
            rows[fmt][name] = {
                "e2e_s": statistics.median(r["wall_s"] for r in rs),
                "work_s": statistics.median(r["work_s"] for r in rs),
                "x_writer": statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(rs, ref, strict=True)),
                "work_x_writer": statistics.median(a["work_s"] / b["work_s"] for a, b in zip(rs, ref, strict=True)),
                "x_cp": statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(rs, cp, strict=True)),
                "peak_anon_mb": max(r["peak_anon_mb"] for r in rs),
                "size_mb": rs[-1]["size_mb"], "all_e2e_s": [r["wall_s"] for r in rs],
            }
        checked = check({n: path[n, fmt] for n in active[fmt] if n != CP})
        for n, c in checked.items():
            rows[fmt][n]["check"] = c

    from importlib.metadata import version

    print(f"\nllmconv GGUF benchmark: gguf {version('gguf')}, safetensors {version('safetensors')}, "
          f"Python {platform.python_version()}, {os.cpu_count()} cores; "
          f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after")
    c = config
    print(f"random Llama {model_mb:.0f} MB float32 (hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
          f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab "
          f"{c['vocab_size']}, untied); largest tensor {big_name} {big_bytes / MB:.0f} MB float32; medians of "
          f"{rounds} interleaved rounds; import-only baseline RssAnon {base:.0f} MB")
    for fmt in formats:
        print(f"\n{fmt}")
        head = (f"{'contender':<20} {'e2e s':>7} {'work s':>7} {'x writer':>8} {'work x':>7} {'x cp':>6} "
                f"{'peak MB':>8} {'+MB':>6} {'out MB':>7}  same as eager writer")
        print(head)
        print("-" * len(head))
        for name, r in rows[fmt].items():
            ch = r.get("check")
            if name == EAGER:
                same = "(reference)"
            elif ch is None:
                same = "-"
            else:
                same = (f"names {'yes' if ch['same_names'] else 'NO'}, types {'yes' if ch['same_types'] else 'NO'}, "
                        f"data {ch['identical']}/{ch['tensors']} identical"
                        + (", metadata same" if not ch["metadata_differs"] else
                           f", metadata differs: {','.join(ch['metadata_differs'][:3])}"))
            size = "-" if r["size_mb"] is None else f"{r['size_mb']:.1f}"
            print(f"{name:<20} {r['e2e_s']:>7.2f} {r['work_s']:>7.2f} {r['x_writer']:>8.2f} "
                  f"{r['work_x_writer']:>7.2f} {r['x_cp']:>6.2f} {r['peak_anon_mb']:>8.0f} "
                  f"{'-' if name == CP else format(r['peak_anon_mb'] - base, '.0f'):>6} {size:>7}  {same}")
    for what, why in dropped.items():
        print(f"note  {what} left out: {why}")
    print("note  llama.cpp converts lazily by default (the lazy row); the eager row is the writer holding every "
          "converted tensor until written")
    print()
    for fmt in formats:
        ours, ref = rows[fmt][LLMCONV], rows[fmt][EAGER]
        ok = ours["x_writer"] <= TIME_TARGET
        print(f"{'PASS' if ok else 'MISS'}  {fmt}: llmconv time <= {TIME_TARGET}x the eager writer's: "
              f"{ours['x_writer']:.2f}x e2e, {ours['work_x_writer']:.2f}x work")
        lazy = rows[fmt].get(LAZY)
        if lazy is not None and lazy["e2e_s"]:
            vs_lazy = ours["e2e_s"] / lazy["e2e_s"]
            print(f"{'PASS' if vs_lazy <= TIME_TARGET else 'MISS'}  {fmt}: llmconv time <= {TIME_TARGET}x the lazy "
                  f"writer's (llama.cpp's default): {vs_lazy:.2f}x e2e")
        print(f"info  {fmt}: llmconv peak RssAnon {ours['peak_anon_mb'] - base:+.0f} MB over the baseline "
              f"(largest tensor {big_bytes / MB:.0f} MB f32), eager writer {ref['peak_anon_mb'] - base:+.0f} MB, "
              f"output {ours['size_mb']:.0f} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                               "load_average": [x[0] for x in load]},
                   "model": {"config": config, "safetensors_mb": model_mb, "largest_tensor": big_name,
                             "largest_tensor_mb": big_bytes / MB},
                   "rounds": rounds, "baseline_anon_mb": base, "dropped": dropped,
                   "commands": {f"{n} {f}": " ".join(command(n, f, model, path[n, f])[:2] + ["..."]
                                                     if command(n, f, model, path[n, f])[1] == "-c" else
                                                     command(n, f, model, path[n, f]))
                                for f in formats for n in active[f]},
                   "results": rows}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
