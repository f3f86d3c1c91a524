"""What the benchmarks share besides memory sampling: the log line, the work folder, the seeded random Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINED_GPT2 = REPO / "fixtures" / "models" / "trained-gpt2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def work_dir(work: Path, *, quick: bool) -> Path:
    """``work/quick`` or ``work/full``, made; a folder inside the repository is refused (models are GBs)."""
    work = work.resolve()
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work {work} is inside the repository: give a folder outside it")
    work = work / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    return work


def random_llama(folder: Path, config: dict) -> Path:
    """A seeded random Llama (float32 safetensors) at ``folder``, with the trained GPT-2's tokenizer files, built
    once: a later run reuses it. Written under a temporary name and renamed when complete."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as tf

    log(f"building the random Llama in {folder}")
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.LlamaForCausalLM(tf.LlamaConfig(**config)).eval().save_pretrained(tmp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(TRAINED_GPT2 / f, tmp / f)
    tmp.rename(folder)
    return folder


def read_back(script: str, anchor: Path, outputs: dict[str, Path], *, what: str) -> dict[str, dict]:
    """Run ``script`` (``python -c``) on ``anchor`` and the other outputs; it prints one JSON object mapping each
    output's path to its comparison with the anchor's. Returns name -> that comparison."""
    r = subprocess.run([sys.executable, "-c", script, str(anchor)] + [str(p) for p in outputs.values()],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"{what} failed")
    found = json.loads(r.stdout.strip().splitlines()[-1])
    return {n: found[str(p)] for n, p in outputs.items()}
