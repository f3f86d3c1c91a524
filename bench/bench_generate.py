#!/usr/bin/env python
"""Generation speed of llmconv's graphs against onnxruntime-genai's model builder, side by side in one run.

Part 1, speed, on a seeded random Llama of about 99M parameters (hidden 768, intermediate 2048, 8 layers,
12 heads / 4 KV heads, vocabulary 32000, untied head; GPT-2's tokenizer files beside it, as a real model
has). Every contender is built from the same hf folder, each build in a fresh process:

  llmconv fp32                   llmconv convert LLAMA OUT --to onnx (the exporter's plain graph)
  llmconv int8                   llmconv quantize LLAMA OUT --target cpu --no-verify (fused graph, int8-dynamic)
  llmconv int4                   llmconv quantize LLAMA OUT --target cpu --method int4 --no-verify (fused)
  llmconv int4 --no-optimize     ... --method int4 --no-optimize (the plain graph, for reference)
  builder int4                   python -m onnxruntime_genai.models.builder -i LLAMA -o OUT -p int4 -e cpu
                                 --extra_options accuracy_level=4 (its CPU default, written out)

(random weights fail verification: ``--no-verify`` on this model only). Then each graph is run in one of two
runtimes, batch 1, 2 intra-op threads (``--threads``), 1 inter-op thread:

  onnxruntime    an InferenceSession and this script's decode loop: input_ids, attention_mask (all ones),
                 position_ids where the graph takes them, past_key_values.N.key/value in, present.* out
  Generator      onnxruntime-genai's og.Model / og.Generator, greedy (the folder's genai_config.json with
                 session_options overlaid for the thread counts)

The rows: the four llmconv graphs in onnxruntime, the builder's int4 in both runtimes, and llmconv's int4 in the
Generator too (the head-to-head of issue 12: same graph kind, same runtime), and the builder's folder is loaded
a second time into the Generator ("#2"): two copies of one graph, whose ratio is the noise floor. A fused graph's
GroupQueryAttention cannot mask left padding, so everything runs batch 1.

A run is a prefill of a seeded 128-token prompt (``--prompt``) and 64 greedy steps through the KV cache
(``--steps``): prefill ms is the forward pass of the prompt (and the pick of its first token); decode tokens/s
is steps / the time of the 64 single-token forward passes, each with its argmax. In the Generator that is
``append_tokens(prompt)``, then 1 + 64 ``generate_next_token()`` calls (the first picks from the prefill's
logits); min_length = max_length keeps the end-of-sequence token from stopping it, and the onnxruntime loop
masks that token too, so both runtimes pick the same way. All contenders are loaded at once and warmed up with
one run; then, round after round (``--rounds``), each does one run, in an order that rotates every round.
Figures are medians; ratios are medians over rounds of that round's speed ratio (tokens/s over tokens/s:
above 1 is faster) to llmconv fp32 and to the builder's int4 in its Generator. Top-1 is the agreement of the
prefill logits' argmax (128 positions) with the fp32 graph's: random weights give flat logits, so it is harsh.
``nodes`` counts the graph's nodes as written (before onnxruntime's own optimizations), ``MB`` the graph and
its data files; ``build s`` and ``build MB`` are the wall time and peak RssAnon (bench/_procmem.py) of the
build process; ``run MB`` is the RssAnon this process gained loading the contender and running it once.

Part 2, quality. On the bundled trained GPT-2 (fixtures/models/trained-gpt2: not fusable, the builder does not
support GPT-2, so llmconv's plain graph), ``llmconv quantize --text fixtures/data/heldout.txt --json`` for
int8 and int4: the perplexity of its verification (reference: the fp32 export), the top-1 agreement on the
held-out text and the greedy agreement (4 prompts x 6 tokens) it reports. If fixtures/models/trained-llama
exists, the same for llmconv's fused int8 and int4 (reference: the PyTorch model) and for the builder's int4
(``llmconv verify trained-llama BUILDER/model.onnx --profile int4 --text ... --json``, config.json copied
beside it).

Targets (issue 12): llmconv int4 decode >= 1.0x the builder's int4, both in the Generator; llmconv int8 decode
>= 2.5x llmconv fp32. On a shared machine the rounds spread: compare ratios from one run, not tokens/s across
runs; the load average before and after is printed.

Example:
    python bench/bench_generate.py --rounds 15 --json bench/out/generate.json
    python bench/bench_generate.py --quick            # a 2-layer model, 3 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _models import REPO, TRAINED_GPT2, log, random_llama, work_dir  # bench/ is on sys.path: the script's own folder
from _procmem import memory, run_sampled

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PY = sys.executable
MB = 1e6
TRAINED_LLAMA = REPO / "fixtures" / "models" / "trained-llama"
HELDOUT = REPO / "fixtures" / "data" / "heldout.txt"

# ~99M parameters: 2 x 32000 x 768 embedding/head + 8 layers of attention (768^2 x 2 + 768 x 256 x 2) and MLP.
FULL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}
QUICK = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 8000, "max_position_embeddings": 512, "tie_word_embeddings": False}

INT4_VS_BUILDER_TARGET = 1.0
INT8_VS_FP32_TARGET = 2.5

FP32 = "llmconv fp32"
INT8 = "llmconv int8"
INT4 = "llmconv int4"
INT4_PLAIN = "llmconv int4 --no-optimize"
BUILDER = "builder int4"
OURS_GEN = "llmconv int4 (Generator)"
BUILDER_GEN = "builder int4 (Generator)"
BUILDER_ORT = "builder int4 (onnxruntime)"
BUILDER_GEN2 = "builder int4 (Generator) #2"
# build name -> command (after the python executable), {src} and {out} filled in
BUILDS: dict[str, list[str]] = {
    FP32: ["-m", "llmconv", "convert", "{src}", "{out}", "--to", "onnx", "--force", "--json"],
    INT8: ["-m", "llmconv", "quantize", "{src}", "{out}", "--target", "cpu", "--no-verify", "--force", "--json"],
    INT4: ["-m", "llmconv", "quantize", "{src}", "{out}", "--target", "cpu", "--method", "int4", "--no-verify",
           "--force", "--json"],
    INT4_PLAIN: ["-m", "llmconv", "quantize", "{src}", "{out}", "--target", "cpu", "--method", "int4",
                 "--no-optimize", "--no-verify", "--force", "--json"],
    BUILDER: ["-m", "onnxruntime_genai.models.builder", "-i", "{src}", "-o", "{out}", "-p", "int4", "-e", "cpu",
              "-c", "{out}-cache", "--extra_options", "accuracy_level=4"],
}
# row -> (build, runtime), in the table's order
ROWS: dict[str, tuple[str, str]] = {
    FP32: (FP32, "onnxruntime"),
    INT8: (INT8, "onnxruntime"),
    INT4: (INT4, "onnxruntime"),
    INT4_PLAIN: (INT4_PLAIN, "onnxruntime"),
    BUILDER_ORT: (BUILDER, "onnxruntime"),
    OURS_GEN: (INT4, "Generator"),
    BUILDER_GEN: (BUILDER, "Generator"),
    BUILDER_GEN2: (BUILDER, "Generator"),  # the same folder loaded again: its ratio to BUILDER_GEN is the noise floor
}



def slug(name: str) -> str:
    return name.replace(" ", "-").replace("--", "")


def run_tool(cmd: list[str], *, ok_codes: tuple[int, ...] = (0,)) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, peak RssAnon of its tree, stdout, exit status."""
    return run_sampled(cmd, cwd=REPO, env=dict(os.environ, TQDM_DISABLE="1"), ok_codes=ok_codes)


def build(name: str, src: Path, out: Path, *, reuse: bool) -> dict:
    """Build one contender into ``out`` (reused when complete and ``reuse``)."""
    stamp = out / ".bench-build.json"
    if reuse and stamp.is_file() and (out / "model.onnx").is_file():
        return json.loads(stamp.read_text())
    tmp = out.with_name(out.name + "-partial")
    for p in (out, tmp, Path(f"{tmp}-cache")):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [PY] + [a.format(src=src, out=tmp) for a in BUILDS[name]]
    log(f"  building {name}: {' '.join(cmd[1:])}")
    r = run_tool(cmd)
    shutil.rmtree(Path(f"{tmp}-cache"), ignore_errors=True)
    tmp.rename(out)
    info = {"seconds": r["wall_s"], "peak_anon_mb": r["peak_anon_mb"], "command": " ".join(cmd[1:])}
    stamp.write_text(json.dumps(info))
    return info


def graph_facts(model: Path) -> dict:
    """Nodes of the graph as written, its size with its data files, and the op kinds that matter here."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    extra = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    size = model.stat().st_size + sum((model.parent / x).stat().st_size for x in extra)
    ops = {n.op_type for n in m.graph.node}
    kinds = sorted(f"{n.domain}:{n.op_type}:" + ",".join(sorted(str(a).replace("\n", " ") for a in n.attribute))
                   for n in m.graph.node)
    data = hashlib.sha256()
    for x in sorted(extra):
        with open(model.parent / x, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                data.update(chunk)
    return {"nodes": len(m.graph.node), "size_mb": size / MB, "fused": "GroupQueryAttention" in ops,
            "int4": "MatMulNBits" in ops, "int8": bool(ops & {"MatMulInteger", "DynamicQuantizeMatMul"}),
            "ops_sha256": hashlib.sha256("\n".join(kinds).encode()).hexdigest(), "data_sha256": data.hexdigest()}


# ---- the two runtimes ---------------------------------------------------------------------------------


class OrtRunner:
    """A graph in an onnxruntime InferenceSession, with a greedy decode loop through its KV cache."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, *, threads: int, config: dict, eos: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // heads
        self.eos = eos

    def generate(self, prompt, steps: int) -> dict:
        import numpy as np

        n = len(prompt)
        feeds: dict[str, Any] = {"input_ids": np.asarray(prompt, dtype=np.int64)[None],
                                 "attention_mask": np.ones((1, n), dtype=np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        feeds.update({name: empty for name in self.past})
        t0 = time.perf_counter()
        outs = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        logits = outs["logits"]
        tok = self._pick(logits[0, -1])
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(steps):
            feeds = {"input_ids": np.array([[tok]], dtype=np.int64),
                     "attention_mask": np.ones((1, n + 1), dtype=np.int64)}
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.array([[n]], dtype=np.int64)
            feeds.update({name: outs["present." + name.removeprefix("past_key_values.")] for name in self.past})
            outs = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
            tok = self._pick(outs["logits"][0, -1])
            tokens.append(tok)
            n += 1
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens, "prefill_top1": logits[0].argmax(-1)}

    def _pick(self, row) -> int:
        if self.eos is not None and 0 <= self.eos < row.shape[-1]:
            row = row.copy()
            row[self.eos] = -float("inf")  # as the Generator's min_length does
        return int(row.argmax())


class GenaiRunner:
    """A folder with genai_config.json in onnxruntime-genai's own runtime: og.Model and og.Generator, greedy."""

    runtime = "Generator"

    def __init__(self, folder: Path, *, threads: int, config: dict, eos: int | None):
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)

    def generate(self, prompt, steps: int) -> dict:
        import numpy as np

        og = self.og
        total = len(prompt) + steps + 1
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        gen.generate_next_token()  # picks the first token from the prefill's logits: no forward pass
        t1 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        t2 = time.perf_counter()
        seq = gen.get_sequence(0)
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": [int(t) for t in seq[len(prompt):]]}

    def prefill_top1(self, prompt):
        """The argmax of the prefill's logits at every prompt position."""
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        return gen.get_output("logits")[0].argmax(-1)


# ---- part 1 ---------------------------------------------------------------------------------------------


def speed(args: argparse.Namespace, hf: Path, folders: dict[str, Path]) -> dict[str, dict]:
    import numpy as np

    config = json.loads((hf / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    prompt = np.random.default_rng(0).integers(3, config["vocab_size"], size=args.prompt).tolist()
    runners: dict[str, Any] = {}
    rows: dict[str, dict] = {}
    for name, (built, runtime) in ROWS.items():
        before = memory(os.getpid())[1]
        cls = OrtRunner if runtime == "onnxruntime" else GenaiRunner
        runner = cls(folders[built], threads=args.threads, config=config, eos=eos)
        first = runner.generate(prompt, args.steps)  # warm-up
        top1 = first.get("prefill_top1")
        if top1 is None:
            top1 = runner.prefill_top1(prompt)
        rows[name] = {"runtime": runtime, "build": built, "run_mb": (memory(os.getpid())[1] - before) / MB,
                      "tokens": first["tokens"], "_top1": top1, "prefill_s": [], "decode_s": []}
        runners[name] = runner
        log(f"  loaded {name}: warm-up prefill {first['prefill_s'] * 1000:.0f} ms, "
            f"decode {args.steps / first['decode_s']:.1f} tokens/s")
    ref = rows[FP32]["_top1"]
    for r in rows.values():
        r["top1"] = float((r.pop("_top1") == ref).mean())
    names = list(runners)
    args.load = [os.getloadavg()[0]]
    for i in range(args.rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            res = runners[n].generate(prompt, args.steps)
            rows[n]["prefill_s"].append(res["prefill_s"])
            rows[n]["decode_s"].append(res["decode_s"])
        log(f"  round {i + 1}/{args.rounds}: " + ", ".join(
            f"{n} {args.steps / rows[n]['decode_s'][-1]:.0f}" for n in (FP32, INT8, OURS_GEN, BUILDER_GEN,
                                                                   BUILDER_GEN2))
            + " tokens/s")
    args.load.append(os.getloadavg()[0])
    for r in rows.values():
        r["prefill_ms"] = statistics.median(r["prefill_s"]) * 1000
        r["decode_tps"] = args.steps / statistics.median(r["decode_s"])
        for key, base in (("fp32", FP32), ("builder", BUILDER_GEN)):
            b = rows[base]
            r[f"prefill_x_{key}"] = statistics.median(
                x / y for x, y in zip(b["prefill_s"], r["prefill_s"], strict=True))
            r[f"decode_x_{key}"] = statistics.median(
                x / y for x, y in zip(b["decode_s"], r["decode_s"], strict=True))
    return rows


# ---- part 2 ---------------------------------------------------------------------------------------------


def _figures(report: dict | None) -> dict:
    """Perplexity, held-out top-1 and greedy agreement from a verification report (llmconv.verify/1)."""
    if not report:
        return {}
    checks = {c["name"]: c for c in report.get("checks", [])}
    ppl = checks.get("perplexity", {})
    return {"verdict": "pass" if report.get("ok") else "fail", "ppl_ref": ppl.get("reference_ppl"),
            "ppl": ppl.get("candidate_ppl"), "ppl_change": ppl.get("relative_change"),
            "text_top1": checks.get("text.logits", {}).get("top1_agreement"),
            "greedy": checks.get("generation", {}).get("agreement"), "reference": report.get("reference")}


def quality(work: Path, text: Path, *, reuse: bool) -> list[dict]:
    rows: list[dict] = []
    models = [("trained GPT-2", TRAINED_GPT2)]
    if (TRAINED_LLAMA / "config.json").is_file():
        models.append(("trained Llama", TRAINED_LLAMA))
    else:
        log(f"no {TRAINED_LLAMA.relative_to(REPO)}: part 2 on the GPT-2 fixture only")
    for label, src in models:
        for method in ("int8-dynamic", "int4"):
            out = work / f"{src.name}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            log(f"  {label}: llmconv quantize --method {method} --text {text.name}")
            r = run_tool([PY, "-m", "llmconv", "quantize", str(src), str(out), "--target", "cpu", "--method", method,
                          "--text", str(text), "--force", "--json"], ok_codes=(0, 1))
            rep = json.loads(r["stdout"])
            graph = ((rep.get("options") or {}).get("graph") or {}).get("fused")
            rows.append({"model": label, "variant": f"llmconv {method.split('-')[0]}",
                         "graph": "fused" if graph else "plain", **_figures(rep.get("verification"))})
        if label == "trained Llama":
            out = work / f"{src.name}-builder-int4"
            info = build(BUILDER, src, out, reuse=reuse)
            shutil.copy(src / "config.json", out / "config.json")
            log(f"  {label}: builder int4 ({info['seconds']:.0f} s), llmconv verify --profile int4")
            r = run_tool([PY, "-m", "llmconv", "verify", str(src), str(out / "model.onnx"), "--profile", "int4",
                          "--text", str(text), "--json"], ok_codes=(0, 1))
            rows.append({"model": label, "variant": "builder int4", "graph": "fused",
                         **_figures(json.loads(r["stdout"]))})
    return rows


# ---- report ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_tables(rows: dict[str, dict], builds: dict[str, dict], facts: dict[str, dict], quality_rows: list[dict],
                 args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    import onnxruntime
    import onnxruntime_genai

    c = args.config
    params = args.params / 1e6
    print(f"\nllmconv generation benchmark: onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
          f"{onnxruntime_genai.__version__}; CPU {cpu_model()} ({os.cpu_count()} cores), {args.threads} intra-op "
          f"threads, batch 1; load average {args.load[0]:.2f} before, {args.load[1]:.2f} after")
    print(f"random Llama {params:.0f}M (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
          f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']}); prompt "
          f"{args.prompt} tokens + {args.steps} greedy steps; medians of {args.rounds} interleaved rounds; "
          "x = speed ratio per round (>1 faster)\n")
    head = (f"{'contender':<28} {'runtime':<11} {'nodes':>5} {'MB':>6} {'prefill ms':>10} {'decode t/s':>10} "
            f"{'prefill x fp32':>14} {'decode x fp32':>13} {'decode x builder':>16} {'top-1':>6} {'build s':>7} "
            f"{'build MB':>8} {'run MB':>6}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        f, b = facts[r["build"]], builds[r["build"]]
        print(f"{name:<28} {r['runtime']:<11} {f['nodes']:>5} {f['size_mb']:>6.1f} {r['prefill_ms']:>10.1f} "
              f"{r['decode_tps']:>10.1f} {r['prefill_x_fp32']:>14.2f} {r['decode_x_fp32']:>13.2f} "
              f"{r['decode_x_builder']:>16.2f} {r['top1']:>6.3f} {b['seconds']:>7.1f} {b['peak_anon_mb']:>8.0f} "
              f"{r['run_mb']:>6.0f}")
    if quality_rows:
        print(f"\nquality: perplexity on {args.text.name} (reference: the fp32 export for GPT-2, the PyTorch model "
              "for Llama), top-1 on its tokens, greedy agreement (4 prompts x 6 tokens)")
        qh = (f"{'model':<14} {'variant':<13} {'graph':<6} {'verdict':<7} {'ppl ref':>8} {'ppl':>8} {'change':>8} "
              f"{'top-1':>6} {'greedy':>6}")
        print(qh)
        print("-" * len(qh))
        for q in quality_rows:
            print(f"{q['model']:<14} {q['variant']:<13} {q['graph']:<6} {q.get('verdict', '-'):<7} "
                  f"{_f(q.get('ppl_ref'), '.3f'):>8} {_f(q.get('ppl'), '.3f'):>8} {_f(q.get('ppl_change'), '+.2%'):>8} "
                  f"{_f(q.get('text_top1'), '.3f'):>6} {_f(q.get('greedy'), '.3f'):>6}")
    ours, int8 = rows[OURS_GEN]["decode_x_builder"], rows[INT8]["decode_x_fp32"]
    floor = rows[BUILDER_GEN2]["decode_x_builder"]
    checks = [(f"llmconv int4 decode >= {INT4_VS_BUILDER_TARGET}x builder int4 (both in the Generator)",
               ours >= INT4_VS_BUILDER_TARGET, f"{ours:.2f}x (the builder's graph against a second copy of "
                                               f"itself: {floor:.2f}x)"),
              (f"llmconv int8 decode >= {INT8_VS_FP32_TARGET}x llmconv fp32 (onnxruntime)",
               int8 >= INT8_VS_FP32_TARGET, f"{int8:.2f}x")]
    print()
    for label, ok, figure in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {figure}")
    same = [(a, b) for a, b in ((INT4, OURS_GEN), (BUILDER_ORT, BUILDER_GEN))
            if rows[a]["tokens"] == rows[b]["tokens"]]
    print(f"note  same greedy tokens in both runtimes for {len(same)} of 2 graphs (llmconv int4, builder int4)")
    a, b = facts[INT4], facts[BUILDER]
    data = "byte-identical" if a["data_sha256"] == b["data_sha256"] else "different"
    nodes = "the same" if a["ops_sha256"] == b["ops_sha256"] else "different"
    print(f"note  llmconv int4 vs builder int4: weight data {data}, nodes (op, attributes) {nodes} "
          "(order and names aside)")
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer model (hidden 256, vocab 8000): a smoke run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmconv-bench-generate"),
                    help="where models and builds go (reused by later runs)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=64, help="greedy decode steps after the prefill")
    ap.add_argument("--text", type=Path, default=HELDOUT, help="part 2: held-out text for perplexity")
    ap.add_argument("--skip-quality", action="store_true", help="part 1 only")
    ap.add_argument("--rebuild", action="store_true", help="build every contender again")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.config = QUICK if args.quick else FULL
    work = work_dir(args.work, quick=args.quick)
    hf = random_llama(work / "llama-hf", args.config)
    args.params = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 4
    log("building the contenders (each in a fresh process)")
    folders = {name: work / slug(name) for name in BUILDS}
    builds = {name: build(name, hf, folders[name], reuse=not args.rebuild) for name in BUILDS}
    facts = {name: graph_facts(folders[name] / "model.onnx") for name in BUILDS}
    log(f"timing: {args.rounds} rounds, prompt {args.prompt} + {args.steps} steps, {args.threads} threads")
    rows = speed(args, hf, folders)
    quality_rows = [] if args.skip_quality else quality(work, args.text, reuse=not args.rebuild)
    checks = print_tables(rows, builds, facts, quality_rows, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"python": platform.python_version(), "cpu": cpu_model(), "cores": os.cpu_count(),
                               "threads": args.threads, "load_average": args.load},
                   "model": {"config": args.config, "parameters": args.params, "prompt": args.prompt,
                             "steps": args.steps, "rounds": args.rounds},
                   "builds": {n: {**builds[n], **facts[n]} for n in BUILDS},
                   "speed": {n: {k: v for k, v in r.items()} for n, r in rows.items()},
                   "quality": quality_rows,
                   "checks": [{"target": label, "met": ok, "figure": fig} for label, ok, fig in checks]}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
