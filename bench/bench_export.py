#!/usr/bin/env python
"""llmconv's ONNX export (export + outputs verification) vs ``optimum-cli export onnx`` alone, in one run.

On a seeded random Llama of about 100M parameters (hf folder, safetensors, fp32) it runs, each in a
fresh process, alternating and repeated ``--reps`` times:

  optimum   optimum-cli export onnx --model DIR --task text-generation-with-past OUT
            (optimum's export and its own post-export validation, which only warns)
  llmconv   llmconv convert DIR OUT --to onnx --force --json
            (optimum's exporter in-process, then ``verify`` in outputs mode: PyTorch vs onnxruntime,
            2 samples at two sequence lengths, logits and every present.* compared)

A thread samples VmRSS and RssAnon of the process and its children from /proc every ~20 ms.
Figures: wall seconds (start-up and imports included, the same for both), their ratio, best of the
reps and of the medians (target: llmconv <= 1.0x optimum), peak RSS and peak RssAnon over all reps
(target: llmconv's peak <= optimum's). Other work on the machine shows as spread between reps: run
it on a quiet machine, with --reps 5 or more.

Then, in one more process, the verifier's overhead: ``compare_outputs(DIR, OUT/model.onnx,
decode_steps=0, generate=0)`` (the forward checks) against the bare work it stands for, written by hand
with transformers and onnxruntime: load the PyTorch model, run it on the same feeds, release it, open the
onnxruntime session, run it on the same feeds (target: verify <= 1.2x bare); and the default verification,
with the cached decode loop and greedy generation, against the forward checks alone (target <= 1.5x).
Each is timed ``--reps`` times, alternating; the best of each is kept.

Example:
    python bench/bench_export.py --reps 2 --json bench/out/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _procmem import run_sampled  # bench/ is on sys.path: the script's own folder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# ~106M parameters: 2 x 32000 x 768 embeddings/head + 8 layers of attention (768^2 x 4) and MLP (3 x 768 x 2048).
CONFIG = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
          "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 1024,
          "tie_word_embeddings": False}


def make_model(folder: Path) -> None:
    """Save a seeded random Llama to ``folder``."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(folder)


def timed(cmd: list[str], *, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS and peak RssAnon of its process tree."""
    return run_sampled(cmd, cwd=REPO, env=env)


_OVERHEAD = r'''
import json, sys, time
from pathlib import Path
import numpy as np, torch, onnxruntime as ort, transformers as tf
from llmconv.verification.outputs import compare_outputs
from llmconv.verification.runners import describe, settle_task
from llmconv.verification.inputs import InputPlan, synthetic_inputs
ref, cand, reps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rs, cs = describe(ref), describe(cand)
plan = InputPlan(wants=rs.inputs | cs.inputs, vocab_size=rs.vocab_size, max_positions=rs.max_positions,
                 past=cs.past)
feeds = synthetic_inputs(plan, batch=2, seq_len=16, samples=2, seed=0)
names = [o.name for o in ort.InferenceSession(str(cs.model_path)).get_outputs()]

def bare():
    model = tf.AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for f in feeds:
            o = model(input_ids=torch.from_numpy(f["input_ids"]), attention_mask=torch.from_numpy(f["attention_mask"]),
                      position_ids=torch.from_numpy(f["position_ids"]), use_cache=True)
            outs.append(o.logits.numpy())
    del model
    s = ort.InferenceSession(str(cs.model_path), providers=["CPUExecutionProvider"])
    want = {i.name for i in s.get_inputs()}
    for f in feeds:
        s.run(names, {k: v for k, v in f.items() if k in want})
    del s

def verify(**decode):
    r = compare_outputs(ref, cand, **decode)
    assert r.passed, r.summary()
    return r

bare(); verify()  # warm the page cache and lazy imports for both
tb, tv, tf_ = [], [], []
for _ in range(reps):
    t = time.perf_counter(); bare(); tb.append(time.perf_counter() - t)
    t = time.perf_counter(); verify(decode_steps=0, generate=0); tf_.append(time.perf_counter() - t)
    t = time.perf_counter(); r = verify(); tv.append(time.perf_counter() - t)
worst = max((c for c in r.checks if "max_abs" in c.figures), key=lambda c: c.figures["max_abs"])
gen = next(c for c in r.checks if c.name == "generation").figures
print(json.dumps({"bare_s": min(tb), "verify_forward_s": min(tf_), "verify_s": min(tv), "bare_all": tb,
                  "verify_forward_all": tf_, "verify_all": tv,
                  "worst_output": worst.name, "worst_max_abs": worst.figures["max_abs"],
                  "logits_max_abs": r.checks[0].figures["max_abs"],
                  "decode": {k: v for k, v in r.extra["decode"].items() if k != "prompt_ids"},
                  "generation_identical": f"{gen['identical']}/{gen['prompts']}"}))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="timed runs of each side (default 2)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="llmconv-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama-100m"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
    from llmconv.inspection import inspect

    params = inspect(model_dir)["parameters"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.pop("LLMCONV_ORT_THREADS", None)

    optimum_cmd = [str(BIN / "optimum-cli"), "export", "onnx", "--model", str(model_dir), "--task",
                   "text-generation-with-past", str(work / "optimum-out")]
    llmconv_cmd = [sys.executable, "-m", "llmconv", "convert", str(model_dir), str(work / "llmconv-out"),
                   "--to", "onnx", "--force", "--json"]
    runs: dict[str, list[dict]] = {"optimum": [], "llmconv": []}
    for _ in range(args.reps):
        for name, cmd in (("optimum", optimum_cmd), ("llmconv", llmconv_cmd)):
            shutil.rmtree(work / f"{name}-out", ignore_errors=True)
            subprocess.run(["sync"], check=False)
            runs[name].append(timed(cmd, env=env))
    report = json.loads(runs["llmconv"][-1]["stdout"])
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    anon = {k: max(r["peak_anon_mb"] for r in v) for k, v in runs.items()}

    ov = subprocess.run([sys.executable, "-c", _OVERHEAD, str(model_dir), str(work / "llmconv-out" / "model.onnx"),
                         str(args.reps)], capture_output=True, text=True, cwd=REPO, env=env)
    if ov.returncode != 0:
        sys.stderr.write(ov.stderr[-3000:])
        raise SystemExit("overhead measurement failed")
    overhead = json.loads(ov.stdout.strip().splitlines()[-1])

    ratio = best["llmconv"]["wall_s"] / best["optimum"]["wall_s"]
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": {"parameters": params, **CONFIG},
        "optimum_wall_s": [round(r["wall_s"], 2) for r in runs["optimum"]],
        "llmconv_wall_s": [round(r["wall_s"], 2) for r in runs["llmconv"]],
        "llmconv_inside_s": report.get("seconds"),
        "ratio_llmconv_over_optimum": round(ratio, 3),
        "ratio_of_medians": round(med["llmconv"] / med["optimum"], 3),
        "peak_rss_mb": {k: round(v) for k, v in peak.items()},
        "peak_anon_mb": {k: round(v) for k, v in anon.items()},
        "verify_s": round(overhead["verify_s"], 3), "verify_forward_only_s": round(overhead["verify_forward_s"], 3),
        "bare_forwards_s": round(overhead["bare_s"], 3),
        "verify_overhead": round(overhead["verify_forward_s"] / overhead["bare_s"], 3),
        "decode_overhead": round(overhead["verify_s"] / overhead["verify_forward_s"], 3),
        "decode": overhead["decode"], "generation_identical": overhead["generation_identical"],
        "logits_max_abs_diff": overhead["logits_max_abs"],
        "worst_output": f"{overhead['worst_output']} {overhead['worst_max_abs']:.3g}",
    }
    print(f"model: random Llama, {figures['model']['parameters']:,} parameters (fp32), {figures['machine']}")
    print(f"optimum-cli export onnx : {' '.join(f'{x:.2f}' for x in figures['optimum_wall_s'])} s   "
          f"peak RSS {peak['optimum']:.0f} MB, RssAnon {anon['optimum']:.0f} MB")
    print(f"llmconv convert --to onnx (export + verify): {' '.join(f'{x:.2f}' for x in figures['llmconv_wall_s'])} s"
          f"   peak RSS {peak['llmconv']:.0f} MB, RssAnon {anon['llmconv']:.0f} MB")
    print(f"wall-time ratio llmconv / optimum (best of {args.reps}): {ratio:.2f}x, of medians: "
          f"{med['llmconv'] / med['optimum']:.2f}x  (target <= 1.0x)")
    print(f"peak RSS ratio: {peak['llmconv'] / peak['optimum']:.2f}x, RssAnon ratio: "
          f"{anon['llmconv'] / anon['optimum']:.2f}x  (target <= 1.0x)")
    print(f"verify overhead: {overhead['verify_forward_s']:.2f} s (forward checks only: --decode-steps 0 --generate 0) "
          f"vs {overhead['bare_s']:.2f} s of bare load+forward passes = {figures['verify_overhead']:.2f}x  "
          "(target <= 1.2x)")
    d = overhead["decode"]
    print(f"decode loop and generation ({d['prompts']} prompts, {d['decode_steps']} cached steps, {d['generate']} "
          f"tokens; {overhead['generation_identical']} identical): verify {overhead['verify_s']:.2f} s vs "
          f"{overhead['verify_forward_s']:.2f} s without = {figures['decode_overhead']:.2f}x  (target <= 1.5x)")
    print(f"largest difference found by verify: logits {overhead['logits_max_abs']:.3g}, worst output "
          f"{figures['worst_output']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
