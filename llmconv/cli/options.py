"""Options declared once, reused by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (human output goes to stderr).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or tables; errors still print.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing destination.")]
Verify = Annotated[bool, typer.Option("--verify/--no-verify",
                                      help="Verify the output against the source before putting it in place.")]
Src = Annotated[Path, typer.Argument(help="Source checkpoint: a file or a folder.", show_default=False,
                                     metavar="SRC")]
Dst = Annotated[Path, typer.Argument(help="Destination file or folder (written atomically).", show_default=False,
                                     metavar="DST")]
Atol = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance (overrides the profile).")]
Rtol = Annotated[float | None, typer.Option("--rtol", help="Relative tolerance (overrides the profile).")]
Profile = Annotated[str, typer.Option("--profile", help="Tolerance profile: auto|exact|fp32|fp16|bf16|int8|int4.")]
Provider = Annotated[str, typer.Option("--provider", help="onnxruntime execution provider: cpu|cuda.")]
Junit = Annotated[Path | None, typer.Option(
    "--junit", metavar="FILE", help="Also write a JUnit XML report to FILE: one test case per check (and one for "
                                    "the command's own step); a run that ends in an error writes one <error> case.")]
KeepFailed = Annotated[Path | None, typer.Option(
    "--keep-failed", metavar="DIR", help="Keep an output that fails verification, with its report, in DIR (outside "
                                         "DST) instead of deleting it.")]
Text = Annotated[Path | None, typer.Option(
    "--text", metavar="FILE", help="Also compare perplexity of both models on this text file (causal LMs), tokenized "
                                   "with the model's own tokenizer.")]
Inputs = Annotated[Path | None, typer.Option(
    "--inputs", metavar="FILE", help="Run both models on these inputs (.npz, name -> array) instead of seeded "
                                     "synthetic ones; needed for models whose inputs llmconv cannot make up.")]
MaxPplIncrease = Annotated[float | None, typer.Option(
    "--max-ppl-increase", help="With --text: largest relative perplexity increase accepted, e.g. 0.02 for +2% "
                               "(default: the profile's budget, e.g. fp16 0.005, int8 0.02, int4 0.1; prune 0.5).")]
DecodeSteps = Annotated[int | None, typer.Option(
    "--decode-steps", metavar="K", min=0,
    help="Causal LMs: decode K tokens through each model's own KV cache after a left-padded prefill and compare "
         "the logits at every step and the caches (default 4; 0 turns it off).")]
Generate = Annotated[int | None, typer.Option(
    "--generate", metavar="N", min=0,
    help="Causal LMs: generate N tokens greedily from each prompt with both models and compare them "
         "(default 6; 0 turns it off).")]
Prompts = Annotated[Path | None, typer.Option(
    "--prompts", metavar="FILE", help="Prompts for the decode and generation checks, one per line, tokenized with "
                                      "the model's tokenizer (default: cut from --text, else sampled token ids).")]
