"""llmconv verify REFERENCE CANDIDATE"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llmconv.cli import options as o
from llmconv.cli.output import escape, fmt_num, out, print_json

HELP = ("Check that CANDIDATE is the same model as REFERENCE: weights tensor by tensor (bit-exact by default), "
        "or outputs on the same inputs. Exit 0 equivalent, 1 not equivalent, 2 bad input.")
EPILOG = ("Examples: [bold]llmconv verify model.bin model.safetensors[/]  ·  "
          "[bold]llmconv verify hf-folder model.onnx --profile fp32 --json --junit verify.xml[/]")
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.verify/1).
JSON_FIELDS = ("mode", "profile", "reference", "candidate", "inputs", "checks", "missing", "unexpected", "tied",
               "thresholds", "runners", "decode", "localization", "graphs", "kept", "notes", "seconds")

# Columns shown per mode, in order; the JSON report has every figure (mean abs, top-5, worst index, ...).
_WEIGHT_COLS = ("shape", "reference_dtype", "candidate_dtype", "equal", "max_abs")
_OUTPUT_COLS = ("shape", "max_abs", "max_rel", "cosine", "top1_agreement", "kl", "nan_inf")
_MAX_ROWS = 20
# Short headers keep the table readable at 80 columns (CI logs, pipes).
_HEADERS = {"reference_dtype": "ref dtype", "candidate_dtype": "cand dtype", "max_abs": "max abs",
            "mean_abs": "mean abs", "max_rel": "max rel", "cosine": "cosine", "top1_agreement": "top1",
            "top5_agreement": "top5", "nan_inf": "nan/inf"}


def _figure(figures: dict[str, Any], key: str) -> Any:
    if key == "nan_inf":
        return None if "nan" not in figures else f"{figures['nan']}/{figures.get('inf', 0)}"
    return figures.get(key)


def _cell(key: str, value: Any) -> str:
    if key == "shape" and isinstance(value, (list, tuple)):
        return "x".join(str(d) for d in value) or "scalar"
    if key in ("cosine", "top1_agreement", "top5_agreement") and isinstance(value, float):
        return f"{value:.6g}"  # 0.99998 must not read as 1
    return fmt_num(value)


def render_report(report: Any, *, console: Console = out) -> None:
    """A table of the checks, failing ones first (worst first), then a verdict line."""
    cols = _WEIGHT_COLS if report.mode == "weights" else _OUTPUT_COLS
    fails = report.failures()
    # Many tensors: show only the failing ones (worst first); few outputs: show them all.
    listed = fails if len(report.checks) > _MAX_ROWS or fails and report.mode == "weights" else report.checks
    shown = listed[:_MAX_ROWS]
    title = (f"{len(fails)} failing of {len(report.checks)} checks" if fails
             else f"{len(report.checks)} checks")
    table = Table(title=f"{report.mode} · profile {report.profile} · {title}", title_justify="left")
    table.add_column("name", overflow="fold", min_width=18)
    present = [c for c in cols if any(_figure(ch.figures, c) is not None for ch in shown)]
    for c in present:
        table.add_column(_HEADERS.get(c, c), justify="right", no_wrap=True)
    table.add_column("result")
    for ch in shown:
        result = "[green]pass[/]" if ch.passed else "[red]FAIL[/]"
        table.add_row(escape(ch.name), *(_cell(c, _figure(ch.figures, c)) for c in present), result)
    if shown:
        console.print(table)
        for ch in shown:  # reasons under the table: in a column they fold into a tall, narrow strip
            if not ch.passed:
                console.print(f"[red]FAIL[/] {escape(ch.name)}: {escape(ch.reason)}")
    elif report.checks:
        exact = sum(1 for c in report.checks if c.figures.get("equal"))
        if report.mode != "weights":
            how = "all passed"
        elif exact == len(report.checks):
            how = f"{exact} bit-exact"
        else:
            how = f"all within tolerance ({exact} bit-exact)"
        console.print(f"{report.mode} · profile {report.profile} · {len(report.checks)} checks, {how}")
    hidden = len(listed) - len(shown)
    if hidden > 0:
        console.print(f"  ... and {hidden} more (see --json)")
    for label, names in (("missing in candidate", report.missing), ("unexpected in candidate", report.unexpected)):
        if names:
            console.print(f"[red]{label}[/] ({len(names)}): {escape(', '.join(names[:10]))}"
                          + (" ..." if len(names) > 10 else ""))
    if report.tied:
        console.print(f"tied (stored once on one side): {escape(', '.join(report.tied[:10]))}")
    for ch in report.checks:
        if "reference_ppl" in ch.figures:
            f = ch.figures
            change = f"{f['relative_change']:+.3%}" if f["relative_change"] is not None else "-"
            console.print(f"perplexity: reference {fmt_num(f['reference_ppl'])}, candidate "
                          f"{fmt_num(f['candidate_ppl'])}, change {change} (budget {f['budget']:.2%}, "
                          f"{f['tokens']} tokens)")
    for ch in report.checks:
        if ch.name == "generation":
            console.print(escape(generation_line(ch.figures)))
    loc = report.extra.get("localization")
    if isinstance(loc, dict) and loc.get("summary"):
        console.print(f"[bold]where they part[/]: {escape(str(loc['summary']))}")
    for key, value in report.extra.items():
        if key == "localization":
            continue
        if isinstance(value, dict):
            # Long lists (the prompts' token ids) are for --json.
            shown = {k: v for k, v in value.items() if not (isinstance(v, list) and v and isinstance(v[0], list))}
            console.print(f"{key}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={fmt_num(v)}"
                                                 for k, v in shown.items()))
    for note in report.notes:
        console.print(f"note: {escape(note)}")


def generation_line(f: dict[str, Any]) -> str:
    """One line on greedy generation: how many prompts stayed identical and where the others parted."""
    rows = f.get("per_prompt") or []
    parted = [r for r in rows if r.get("first_divergence") is not None]
    line = (f"generation: {f.get('prompts')} prompts x {f.get('new_tokens')} tokens, {f.get('identical')} identical, "
            f"agreement {fmt_num(f.get('agreement'))}")
    if f.get("min_agreement") is not None:
        line += f" (min {fmt_num(f['min_agreement'])})"
    if parted:
        line += "; parted: " + ", ".join(f"prompt {r['prompt']} at token {r['first_divergence']}"
                                         + (" (a tie)" if r.get("tie") else "") for r in parted[:6])
        if len(parted) > 6:
            line += f" and {len(parted) - 6} more"
    return line


def command(
    reference: Annotated[Path, typer.Argument(help="The model taken as right.", show_default=False,
                                              metavar="REFERENCE")],
    candidate: Annotated[Path, typer.Argument(help="The model checked.", show_default=False,
                                              metavar="CANDIDATE")],
    mode: Annotated[str, typer.Option("--mode", help="auto|weights|outputs.")] = "auto",
    profile: o.Profile = "auto",
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    inputs: o.Inputs = None,
    text: o.Text = None,
    batch: Annotated[int, typer.Option("--batch", help="Synthetic inputs: batch size.", min=1)] = 2,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Synthetic inputs: sequence length.", min=1)] = 16,
    samples: Annotated[int, typer.Option("--samples", help="Synthetic inputs: number of batches.", min=1)] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Synthetic inputs: random seed.")] = 0,
    max_ppl_increase: o.MaxPplIncrease = None,
    decode_steps: o.DecodeSteps = None,
    generate: o.Generate = None,
    prompts: o.Prompts = None,
    localize: Annotated[bool, typer.Option(
        "--localize", help="When the models differ, name the first node (ONNX vs ONNX) or decoder layer (PyTorch "
                           "vs ONNX) whose output leaves the profile.")] = False,
    provider: o.Provider = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No status line and no table: the verdict line "
                                                                "alone (and the exit code).")] = False,
    json_output: o.Json = False,
    junit: o.Junit = None,
    keep_failed: o.KeepFailed = None,
) -> None:
    from llmconv.io import keep_failed as keeping
    from llmconv.verification.api import verify

    t0 = time.perf_counter()
    outputs_options: dict[str, Any] = {}
    if inputs is not None:
        outputs_options["inputs"] = inputs
    if text is not None:
        outputs_options["text"] = text
    if mode != "weights":
        outputs_options.update(batch=batch, seq_len=seq_len, samples=samples, seed=seed, provider=provider)
        if max_ppl_increase is not None:
            outputs_options["max_ppl_increase"] = max_ppl_increase
        outputs_options.update(decode_steps=decode_steps, generate=generate, prompts=prompts, localize=localize)
    if junit is not None:
        from llmconv.verification.junit import check_report_path

        # An error from here on (exit 2, 3) is recorded in the file by the root command (app._record_junit).
        check_report_path(junit, models=[reference, candidate], reads={"--inputs": inputs, "--text": text,
                                                                         "--prompts": prompts})
    with keeping(keep_failed):
        report = verify(reference, candidate, mode=mode, profile=profile, atol=atol, rtol=rtol, **outputs_options)
    report.seconds = time.perf_counter() - t0
    if junit is not None:
        from llmconv.verification.junit import write_junit

        write_junit(report, junit, seconds=report.seconds)
    if json_output:
        obj = report.to_json()
        if not report.passed:
            kept = (report.extra.get("kept") or {}).get("report")
            obj["error"] = {"code": 1, "message": report.summary(), "kept": kept}
        print_json(obj)
    else:
        if not quiet:
            render_report(report)
        verdict = "[green]EQUIVALENT[/]" if report.passed else "[red]NOT EQUIVALENT[/]"
        out.print(f"{verdict}: {escape(report.summary())}")
    if not report.passed:
        raise typer.Exit(1)
