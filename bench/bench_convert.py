#!/usr/bin/env python
"""llmconv convert vs ``cp`` of the same bytes, side by side in one run, with peak anonymous memory.

For each size (default 0.5 GB and 1.5 GB) it generates a seeded random fp32 checkpoint with a
Llama-like layout, once as a PyTorch state dict (``torch.save``) and once as safetensors, then times

  pt->st       model.bin          -> out.safetensors
  st->pt       model.safetensors  -> out.bin
  st->shards   model.safetensors  -> out/ (safetensors shards + index, --shard-size)

each with ``--verify`` (the default, which reads both files again) and ``--no-verify``, interleaved
with ``cp`` of the source file (the same bytes; for shards the same total bytes) in the same run.
Every conversion is ``python -m llmconv convert SRC DST --force --json`` in a fresh process while a
thread samples RssAnon of it and its children from /proc every ~20 ms. Max RSS (``/usr/bin/time``)
would count the mapped file pages that streaming relies on; RssAnon does not.

Figures:
  convert s   ``seconds`` from the JSON report: the conversion inside the process (detect, open,
              write, verify, rename), without the interpreter's start-up and imports
  e2e s       wall time of the whole subprocess, start-up included (a fixed cost, see "startup")
  cp s        wall time of ``cp SRC DST``
  ratio       median convert s / median cp s (the figure judged); "best" is fastest / fastest, which
              shows the cost with the least interference on a shared machine
  peak+MB     peak RssAnon of the conversion process minus the interpreter baseline (a process that
              only imports torch and llmconv's CLI and formats)
Targets: convert s <= 1.3x cp s, peak+MB <= 300.

The page cache is warm (dropping it needs root): sources are read once before timing, outputs are
deleted and ``sync`` is called before every timed run so that no earlier write-back overlaps it.

Example:
    python bench/bench_convert.py --sizes 0.5,1.5 --reps 5 --json bench/out/convert.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _procmem import PeakSampler  # bench/ is on sys.path: the script's own folder

REPO = Path(__file__).resolve().parents[1]
RATIO_TARGET = 1.3
ANON_TARGET_MB = 300.0
MB = 1e6

# A Llama-like decoder with grouped-query attention; the layer count is chosen to reach the size.
HIDDEN, KV, INTERMEDIATE, VOCAB = 1024, 256, 2816, 32000

CASES = {
    "pt->st": ("model.bin", "out.safetensors", []),
    "st->pt": ("model.safetensors", "out.bin", []),
    "st->shards": ("model.safetensors", "out-shards", ["--to", "safetensors"]),
}

_BASELINE_CODE = (
    "import time, torch, safetensors.torch, llmconv.cli.app, llmconv.conversion\n"
    "from llmconv.formats import registry\n"
    "registry.all_formats()\n"
    "time.sleep(0.3)\n"
)


# ---- the checkpoint -------------------------------------------------------------------------------

def layout(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama-like fp32 model of at least ``target_bytes``."""
    per_layer = (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * INTERMEDIATE * HIDDEN + 2 * HIDDEN) * 4
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 4
    layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def generate(folder: Path, target_bytes: int, seed: int, *, regen: bool) -> dict:
    """Write model.bin and model.safetensors under ``folder`` (reused when the manifest matches)."""
    shapes = layout(target_bytes)
    nbytes = sum(4 * math.prod(s) for _, s in shapes)
    manifest = {"seed": seed, "layers": (len(shapes) - 3) // 9, "tensors": len(shapes), "bytes": nbytes,
                "hidden": HIDDEN, "kv": KV, "intermediate": INTERMEDIATE, "vocab": VOCAB, "dtype": "float32"}
    mpath = folder / "manifest.json"
    files = [folder / "model.bin", folder / "model.safetensors"]
    if not regen and mpath.is_file() and all(f.is_file() for f in files):
        with open(mpath) as f:
            if json.load(f) == manifest:
                return manifest
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes:
        if len(shape) == 1:
            sd[name] = torch.ones(shape) + 0.01 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g).mul_(0.02)
    torch.save(sd, files[0])
    save_file(sd, str(files[1]), metadata={"format": "pt"})
    del sd
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    print(f"  generated {nbytes / 1e9:.3f} GB ({manifest['layers']} layers, {len(shapes)} tensors) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return manifest


# ---- measuring ------------------------------------------------------------------------------------

def run_measured(cmd: list[str], *, cwd: Path) -> dict:
    """Run ``cmd``; return its wall time, exit code, stdout and peak RssAnon (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    return {"wall": wall, "rc": proc.returncode, "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace"), "peak_anon_mb": sampler.peak_anon / MB,
            "samples": sampler.samples}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _settle(dst: Path) -> None:
    """Remove the last output and flush dirty pages so the next timed run starts from the same state."""
    _remove(dst)
    os.sync()


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.readinto(bytearray(1 << 24)):
            pass


def measure_baseline(reps: int, cwd: Path) -> dict:
    runs = [run_measured([sys.executable, "-c", _BASELINE_CODE], cwd=cwd) for _ in range(reps)]
    for r in runs:
        if r["rc"] != 0:
            raise SystemExit(f"baseline process failed:\n{r['stderr']}")
    return {"peak_anon_mb": statistics.median(r["peak_anon_mb"] for r in runs),
            "startup_s": statistics.median(r["wall"] - 0.3 for r in runs),
            "runs": [round(r["peak_anon_mb"], 1) for r in runs]}


def bench_case(case: str, folder: Path, *, verify: bool, reps: int, shard_size: str, baseline_mb: float) -> dict:
    src_name, dst_name, extra = CASES[case]
    src = folder / src_name
    dst, cp_dst = folder / dst_name, folder / ("cp-" + src_name)
    cmd = [sys.executable, "-m", "llmconv", "convert", str(src), str(dst), "--force", "--json",
           "--verify" if verify else "--no-verify", *extra]
    if case == "st->shards":
        cmd += ["--shard-size", shard_size]
    conv, cps = [], []
    for rep in range(reps):
        # Alternate which goes first so that drift in machine load hits both sides alike.
        order = ("llmconv", "cp") if rep % 2 == 0 else ("cp", "llmconv")
        for which in order:
            if which == "cp":
                _settle(cp_dst)
                r = run_measured(["cp", str(src), str(cp_dst)], cwd=folder)
                if r["rc"] != 0:
                    raise SystemExit(f"cp failed: {r['stderr']}")
                cps.append(r)
            else:
                _settle(dst)
                r = run_measured(cmd, cwd=folder)
                if r["rc"] != 0:
                    raise SystemExit(f"llmconv failed ({' '.join(cmd)}):\n{r['stdout']}\n{r['stderr']}")
                report = json.loads(r["stdout"])
                r["convert_s"] = report["seconds"]
                r["files"] = len(report["files"])
                r["bytes_written"] = report["bytes_written"]
                conv.append(r)
    _remove(dst)
    _remove(cp_dst)
    convert_s = statistics.median(r["convert_s"] for r in conv)
    e2e_s = statistics.median(r["wall"] for r in conv)
    cp_s = statistics.median(r["wall"] for r in cps)
    peak = max(r["peak_anon_mb"] for r in conv)
    over = peak - baseline_mb
    ratio = convert_s / cp_s
    best_ratio = min(r["convert_s"] for r in conv) / min(r["wall"] for r in cps)
    return {
        "case": case, "verify": verify, "convert_s": round(convert_s, 3), "e2e_s": round(e2e_s, 3),
        "cp_s": round(cp_s, 3), "ratio": round(ratio, 3), "best_ratio": round(best_ratio, 3),
        "e2e_ratio": round(e2e_s / cp_s, 3),
        "peak_anon_mb": round(peak, 1), "anon_over_baseline_mb": round(over, 1),
        "files": conv[0]["files"], "bytes_written": conv[0]["bytes_written"],
        "ratio_ok": ratio <= RATIO_TARGET, "memory_ok": over <= ANON_TARGET_MB,
        "runs": {"convert_s": [r["convert_s"] for r in conv], "e2e_s": [round(r["wall"], 3) for r in conv],
                 "cp_s": [round(r["wall"], 3) for r in cps],
                 "peak_anon_mb": [round(r["peak_anon_mb"], 1) for r in conv],
                 "cp_peak_anon_mb": [round(r["peak_anon_mb"], 1) for r in cps]},
    }


# ---- output ---------------------------------------------------------------------------------------

def print_table(rows: list[dict]) -> None:
    head = ("case", "size GB", "verify", "convert s", "e2e s", "cp s", "ratio", "best", "e2e ratio", "peak+MB",
            "result")
    lines = [head]
    for r in rows:
        verdict = "pass" if r["ratio_ok"] and r["memory_ok"] else "FAIL(" + ",".join(
            w for w, ok in (("time", r["ratio_ok"]), ("memory", r["memory_ok"])) if not ok) + ")"
        lines.append((r["case"], f"{r['size_gb']:.3f}", "yes" if r["verify"] else "no", f"{r['convert_s']:.2f}",
                      f"{r['e2e_s']:.2f}", f"{r['cp_s']:.2f}", f"{r['ratio']:.2f}x", f"{r['best_ratio']:.2f}x",
                      f"{r['e2e_ratio']:.2f}x", f"{r['anon_over_baseline_mb']:.0f}", verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = (c.ljust(w) if j in (0, 2, 10) else c.rjust(w) for j, (c, w) in pairs)
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cp_version() -> str:
    try:
        return subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def _filesystem(path: Path) -> str:
    best, fs = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, parts[2]
    return fs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llmconv-bench"),
                    help="where the checkpoints and outputs go (outside the repository)")
    ap.add_argument("--sizes", default="0.5,1.5", help="checkpoint sizes in GB (10**9 bytes), comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each side (median reported)")
    ap.add_argument("--cases", default=",".join(CASES), help="subset of " + ",".join(CASES))
    ap.add_argument("--verify", choices=("both", "yes", "no"), default="both", help="--verify, --no-verify or both")
    ap.add_argument("--shard-size", default="500MB", help="--shard-size for the st->shards case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--regen", action="store_true", help="regenerate the checkpoints even if present")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints (default: delete at the end)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)

    workdir = args.workdir.resolve()
    if workdir == REPO or REPO in workdir.parents:
        ap.error(f"--workdir {workdir} is inside the repository; checkpoints of gigabytes must not land there")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    sizes = [float(s) for s in args.sizes.split(",")]
    verifies = {"both": (True, False), "yes": (True,), "no": (False,)}[args.verify]
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    need = sum(4.2 * s * 1e9 for s in sizes)  # two sources, one output, one cp copy per size
    if free < need:
        raise SystemExit(f"{workdir} has {free / 1e9:.1f} GB free; this run needs about {need / 1e9:.1f} GB")

    print(f"llmconv convert vs cp, {args.reps} interleaved reps, median; workdir {workdir} "
          f"({_filesystem(workdir)}), warm page cache, sync before each run", flush=True)
    baseline = measure_baseline(3, workdir)
    print(f"interpreter baseline: RssAnon {baseline['peak_anon_mb']:.0f} MB, start-up and imports "
          f"{baseline['startup_s']:.2f} s", flush=True)
    rows: list[dict] = []
    made: list[Path] = []
    try:
        for size in sizes:
            folder = workdir / f"{size:g}GB"
            made.append(folder)
            print(f"size {size:g} GB:", flush=True)
            manifest = generate(folder, int(size * 1e9), args.seed, regen=args.regen)
            for name in ("model.bin", "model.safetensors"):
                _warm(folder / name)
            for case in cases:
                for verify in verifies:
                    r = bench_case(case, folder, verify=verify, reps=args.reps, shard_size=args.shard_size,
                                   baseline_mb=baseline["peak_anon_mb"])
                    r["size_gb"] = manifest["bytes"] / 1e9
                    r["tensors"] = manifest["tensors"]
                    rows.append(r)
                    print(f"  {case:<10} verify={'yes' if verify else 'no ':<3}  convert {r['convert_s']:.2f} s  "
                          f"cp {r['cp_s']:.2f} s  ratio {r['ratio']:.2f}x  peak+{r['anon_over_baseline_mb']:.0f} MB",
                          flush=True)
    finally:
        if not args.keep:
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)

    print()
    print_table(rows)
    ok = all(r["ratio_ok"] and r["memory_ok"] for r in rows)
    print(f"\ntargets: convert s <= {RATIO_TARGET}x cp s, peak RssAnon <= baseline + {ANON_TARGET_MB:.0f} MB: "
          f"{'all met' if ok else 'MISSED'}; e2e adds {baseline['startup_s']:.2f} s of start-up and imports per run")
    if args.json:
        import torch

        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "schema": "llmconv.bench.convert/1",
            "targets": {"ratio_to_cp": RATIO_TARGET, "anon_over_baseline_mb": ANON_TARGET_MB},
            "baseline": baseline, "reps": args.reps, "shard_size": args.shard_size, "seed": args.seed,
            "environment": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                            "torch": torch.__version__, "cp": _cp_version(), "filesystem": _filesystem(workdir),
                            "loadavg": os.getloadavg()},
            "results": rows, "all_met": ok,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 1 if args.fail_on_miss and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
