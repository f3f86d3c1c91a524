#!/usr/bin/env python
"""``llmconv merge`` (LoRA into its base) vs PEFT's ``merge_and_unload`` + ``save_pretrained``, and ``cp``.

On a seeded random Llama of about 1 GB in float32 (hidden 1024, intermediate 2816, 16 heads / 4 KV heads,
vocabulary 32000, untied head, as many layers as ``--size`` needs: 16 for 1 GB (984 MB); safetensors from
``save_pretrained``) and a LoRA adapter made on it by PEFT (r 16, alpha 32, q/k/v/o and gate/up/down projections,
``init_lora_weights=False`` so that B is not zero, each B then scaled so that its update is a quarter of its weight
by norm, as fixtures/adapters.py does; saved by ``save_pretrained``), both built once under ``--work`` and reused,
each contender writes the merged model in a fresh process:

  llmconv CLI          ``llmconv merge BASE ADAPTER OUT --no-verify --force --json``
  llmconv API          ``llmconv.merge.merge(BASE, [ADAPTER], OUT, verify=False)`` from a small script
  PEFT                 the usual recipe: ``AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)``,
                       ``PeftModel.from_pretrained(model, ADAPTER)``, ``merge_and_unload()``,
                       ``save_pretrained(OUT, safe_serialization=True)``
  cp                   ``cp -r BASE OUT``: the same bytes copied, the physical floor
  llmconv verified     ``llmconv merge BASE ADAPTER OUT --force --json`` (verification on: weights read back,
                       outputs against the unmerged adapters run by PEFT): shown, not compared, since PEFT's
                       recipe verifies nothing

After a warm-up run of each (which also fills the page cache with the base), rounds (``--rounds``) run every
contender once in an order that rotates every round; the previous output is deleted and ``sync`` is called before
each run.

Figures: ``e2e s`` the median wall time of the process (start-up and imports included), ``work s`` the median time
inside it after the imports (the scripts' own clock, started once torch, transformers and peft are imported; the
CLI's ``seconds`` from ``--json``, which includes the imports of transformers and peft that the CLI makes lazily,
~4 s here: compare the CLI by e2e, the API by either), ``x PEFT`` the median
over rounds of that round's e2e ratio to PEFT's (``work x`` of the work times), ``x cp`` the same against ``cp``,
``peak MB`` the largest peak RssAnon of the process tree over all rounds (bench/_procmem.py: mapped file pages are
not counted), ``+MB`` that peak minus the peak of a process that only imports torch, transformers, peft,
safetensors and llmconv's merge and CLI. Then every merged output is read back tensor by tensor and compared with
PEFT's: the same tensor names, the number of bit-identical tensors, the largest absolute difference (and the
tensor where it is).

On a shared machine the rounds spread: compare ratios from one run; the load average before and after is printed.

Example:
    python bench/bench_merge.py --json bench/out/merge.json
    python bench/bench_merge.py --size 2             # a ~2 GB base
    python bench/bench_merge.py --small              # a ~100 MB base, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _models import REPO, log, random_llama, read_back, work_dir  # bench/ is on sys.path: the script's own folder
from _procmem import run_sampled

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PY = sys.executable
MB = 1e6

# The Llama of bench_gguf.py, its depth set by the size: 2 x 32000 x 1024 embedding/head (262 MB in float32)
# + per layer attention (1024^2 x 2 + 1024 x 256 x 2) and MLP (3 x 1024 x 2816), 45 MB in float32.
WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
        "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
# ~26M parameters, 102 MB.
SMALL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 8000, "max_position_embeddings": 1024,
         "tie_word_embeddings": False}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
        "init_lora_weights": False}

CLI = "llmconv CLI"
API = "llmconv API"
PEFT = "PEFT"
CP = "cp"
VERIFIED = "llmconv verified"
CONTENDERS = (CLI, API, PEFT, CP, VERIFIED)
MERGED = (CLI, API, PEFT, VERIFIED)  # the contenders whose output is a merged model


def slug(name: str) -> str:
    return name.replace(" ", "-")


def layers_for(size_gb: float) -> int:
    """Layers of the WIDE Llama whose float32 weights come closest to ``size_gb`` x 10^9 bytes."""
    h, i, kv = WIDE["hidden_size"], WIDE["intermediate_size"], WIDE["hidden_size"] // 4
    fixed = 2 * WIDE["vocab_size"] * h + h  # embedding, head, final norm
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return max(1, round((size_gb * 1e9 / 4 - fixed) / per_layer))


def lora_adapter(folder: Path, base: Path, *, seed: int = 1) -> Path:
    """A PEFT LoRA adapter (``LORA``) on ``base`` at ``folder``, saved by PEFT's ``save_pretrained``; built once.

    ``init_lora_weights=False`` draws A and B at Kaiming scale (PEFT's default B is zero: every merge would be the
    identity); the update is then 10-70x its weight, which no fine-tune makes, so each B is scaled so that its
    update is a quarter of its weight by norm (fixtures/adapters.py does the same)."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import peft
    import torch
    import transformers as tf

    log(f"building the LoRA adapter in {folder}")
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=False)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    sys.path.insert(0, str(REPO))
    from fixtures.adapters import scale_updates

    with torch.no_grad():
        scale_updates(wrapped)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


# ---- the contenders' scripts (each run as ``python -c``) ------------------------------------------------

_BASELINE = r'''
import time, torch, transformers, peft, safetensors
from transformers import AutoModelForCausalLM
from peft import PeftModel
from llmconv.merge import merge
from llmconv.cli import app
time.sleep(0.3)
'''

# argv: BASE ADAPTER OUT. What llmconv imports lazily inside merge (transformers for the architecture, PEFT for its
# version) is imported before the clock starts, as the PEFT script does, so that the work times compare.
_API = r'''
import json, sys, time
import torch, transformers, peft, safetensors
from transformers import AutoModelForCausalLM
from llmconv.merge import merge
t0 = time.perf_counter()
merge(sys.argv[1], [sys.argv[2]], sys.argv[3], verify=False, force=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''

# argv: BASE ADAPTER OUT
_PEFT = r'''
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=False)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], safe_serialization=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''

# argv: REFERENCE OUT...: each OUT folder's safetensors tensors against REFERENCE's, one tensor at a time.
_CHECK = r'''
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
def tensors(folder):
    where = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        h = safe_open(str(f), framework="pt")
        where.update({k: h for k in h.keys()})
    return where
ref = tensors(sys.argv[1])
out = {}
for p in sys.argv[2:]:
    got = tensors(p)
    common = [k for k in ref if k in got]
    identical, worst, worst_name, worst_rel, dtypes = 0, 0.0, None, 0.0, set()
    for k in common:
        a, b = ref[k].get_tensor(k), got[k].get_tensor(k)
        dtypes.add(str(b.dtype).replace("torch.", ""))
        if a.shape != b.shape or a.dtype != b.dtype:
            worst, worst_name = float("inf"), k
            continue
        if torch.equal(a, b):
            identical += 1
            continue
        d = float((a.double() - b.double()).abs().max())
        if d > worst:
            worst, worst_name = d, k
            worst_rel = d / max(float(a.abs().max()), 1e-30)
    out[p] = {"tensors": len(got), "reference_tensors": len(ref), "same_names": set(got) == set(ref),
              "identical": identical, "max_abs_diff": worst, "worst_tensor": worst_name,
              "worst_relative": worst_rel, "dtypes": sorted(dtypes)}
print(json.dumps(out))
'''


def command(name: str, base: Path, adapter: Path, out: Path) -> list[str]:
    if name in (CLI, VERIFIED):
        return [PY, "-m", "llmconv", "merge", str(base), str(adapter), str(out), "--force", "--json"] + (
            ["--no-verify"] if name == CLI else [])
    if name == API:
        return [PY, "-c", _API, str(base), str(adapter), str(out)]
    if name == PEFT:
        return [PY, "-c", _PEFT, str(base), str(adapter), str(out)]
    if name == CP:
        return ["cp", "-r", str(base), str(out)]
    raise ValueError(name)


def shown(cmd: list[str]) -> str:
    """The command line as printed: a ``-c`` script as ``-c <script>``."""
    return " ".join(cmd[:2] + ["<script>"] + cmd[3:] if cmd[1:2] == ["-c"] else cmd)


def run_once(name: str, base: Path, adapter: Path, out: Path) -> dict:
    """One run of a contender into ``out`` (deleted first), after ``sync``."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    r = run_sampled(command(name, base, adapter, out), cwd=REPO, env=env)
    r["work_s"] = r["wall_s"]
    if name != CP:
        lines = [x for x in r["stdout"].strip().splitlines() if x.startswith("{")]
        with contextlib.suppress(ValueError, IndexError):
            text = r["stdout"] if name in (CLI, VERIFIED) else lines[-1]
            r["work_s"] = float(json.loads(text).get("seconds") or r["wall_s"])
    r["size_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / MB
    return r


def baseline_mb(reps: int = 3) -> float:
    """Peak RssAnon of a process that only imports what the contenders import (median of ``reps``)."""
    return statistics.median(run_sampled([PY, "-c", _BASELINE], cwd=REPO)["peak_anon_mb"] for _ in range(reps))


def check(outputs: dict[str, Path]) -> dict[str, dict]:
    """Each merged output against PEFT's."""
    return read_back(_CHECK, outputs[PEFT], {n: p for n, p in outputs.items() if n != PEFT},
                     what="reading the merged outputs back")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.0, help="the base's float32 size in 10^9 bytes (default 1)")
    ap.add_argument("--small", action="store_true", help="a ~100 MB base (hidden 512, 6 layers, vocab 8000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 2 with --small)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmconv-bench-merge"),
                    help="where the models and the outputs go (the models are reused by later runs)")
    ap.add_argument("--no-verified", action="store_true", help="leave out the verified llmconv merge")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.small else 3)
    config = SMALL if args.small else {**WIDE, "num_hidden_layers": layers_for(args.size)}
    work = work_dir(args.work, quick=args.small)
    if not args.small:
        work = work / f"{config['num_hidden_layers']}-layers"
        work.mkdir(exist_ok=True)
    base = random_llama(work / "llama-hf", config)
    adapter = lora_adapter(work / "llama-lora", base)
    base_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / MB
    adapter_mb = sum(p.stat().st_size for p in adapter.glob("*.safetensors")) / MB
    contenders = [n for n in CONTENDERS if not (args.no_verified and n == VERIFIED)]
    outs = work / "outputs"
    outs.mkdir(exist_ok=True)
    path = {n: outs / slug(n) for n in contenders}
    floor = baseline_mb()
    log(f"base {base_mb:.0f} MB, adapter {adapter_mb:.1f} MB; import-only baseline RssAnon {floor:.0f} MB")

    for name in contenders:  # warm-up: fills the page cache, loads each contender's code once
        r = run_once(name, base, adapter, path[name])
        log(f"  warm-up {name}: {r['wall_s']:.1f} s, peak RssAnon {r['peak_anon_mb']:.0f} MB")

    load = [os.getloadavg()]
    runs: dict[str, list[dict]] = {n: [] for n in contenders}
    for i in range(rounds):
        k = i % len(contenders)
        for name in contenders[k:] + contenders[:k]:
            runs[name].append(run_once(name, base, adapter, path[name]))
        log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {runs[n][-1]['wall_s']:.1f}s" for n in contenders))
    load.append(os.getloadavg())

    rows: dict[str, dict] = {}
    for name in contenders:
        rs = runs[name]
        rows[name] = {
            "e2e_s": statistics.median(r["wall_s"] for r in rs),
            "work_s": statistics.median(r["work_s"] for r in rs),
            "x_peft": statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(rs, runs[PEFT], strict=True)),
            "work_x_peft": statistics.median(a["work_s"] / b["work_s"] for a, b in zip(rs, runs[PEFT], strict=True)),
            "x_cp": statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(rs, runs[CP], strict=True)),
            "peak_anon_mb": max(r["peak_anon_mb"] for r in rs),
            "size_mb": rs[-1]["size_mb"], "all_e2e_s": [r["wall_s"] for r in rs],
            "command": shown(command(name, base, adapter, path[name])),
        }
    for name, c in check({n: path[n] for n in contenders if n in MERGED}).items():
        rows[name]["check"] = c

    from importlib.metadata import version

    print(f"\nllmconv merge benchmark: peft {version('peft')}, transformers {version('transformers')}, torch "
          f"{version('torch')}, Python {platform.python_version()}, {os.cpu_count()} cores; load average "
          f"{load[0][0]:.2f} before, {load[1][0]:.2f} after")
    c = config
    print(f"random Llama {base_mb:.0f} MB float32 (hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
          f"{c['num_hidden_layers']} layers, vocab {c['vocab_size']}, untied); LoRA r {LORA['r']} alpha "
          f"{LORA['lora_alpha']} on {'/'.join(t.split('_')[0] for t in TARGETS)}, {adapter_mb:.1f} MB; medians of "
          f"{rounds} interleaved rounds; import-only baseline RssAnon {floor:.0f} MB")
    head = (f"{'contender':<17} {'e2e s':>7} {'work s':>7} {'x PEFT':>7} {'work x':>7} {'x cp':>6} {'peak MB':>8} "
            f"{'+MB':>6} {'out MB':>7}  vs PEFT's merged tensors")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        ch = r.get("check")
        if name == PEFT:
            same = "(reference)"
        elif ch is None:
            same = "-"
        else:
            same = (f"names {'same' if ch['same_names'] else 'DIFFER'}, {ch['identical']}/{ch['tensors']} "
                    f"bit-identical, max |diff| {ch['max_abs_diff']:.2e}"
                    + (f" ({ch['worst_tensor']}, {ch['worst_relative']:.1e} of its max)" if ch["worst_tensor"] else ""))
        x_peft = "(shown)" if name == VERIFIED else f"{r['x_peft']:.2f}"
        work_x = "" if name == VERIFIED else f"{r['work_x_peft']:.2f}"
        print(f"{name:<17} {r['e2e_s']:>7.2f} {r['work_s']:>7.2f} {x_peft:>7} {work_x:>7} {r['x_cp']:>6.2f} "
              f"{r['peak_anon_mb']:>8.0f} {'-' if name == CP else format(r['peak_anon_mb'] - floor, '.0f'):>6} "
              f"{r['size_mb']:>7.1f}  {same}")
    if VERIFIED in contenders:
        print("note  'llmconv verified' also reads the written weights back and runs the merged model against the "
              "base with the adapters unmerged (PEFT): its time is shown, not compared with PEFT's unverified recipe")
    for name, r in rows.items():
        print(f"cmd   {name}: {r['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                               "load_average": [x[0] for x in load]},
                   "model": {"config": config, "safetensors_mb": base_mb, "lora": LORA, "adapter_mb": adapter_mb},
                   "rounds": rounds, "baseline_anon_mb": floor, "results": rows}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
