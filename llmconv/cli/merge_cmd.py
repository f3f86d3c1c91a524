"""llmconv merge BASE ADAPTER DST"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmconv.cli import options as o
from llmconv.cli.output import escape, out, print_json, run_recorded

HELP = ("Merge LoRA adapters (PEFT folders) into their base model, streamed one tensor at a time, verified against "
        "the unmerged adapters before it is put in place.")
EPILOG = ("Examples: [bold]llmconv merge llama-hf my-lora llama-merged[/]  ·  "
          "[bold]llmconv merge llama-hf lora-a llama-ab --adapter lora-b --weights 1,0.5[/]  ·  "
          "[bold]llmconv merge llama-hf my-lora merged --to pytorch --json[/]")
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.merge/1).
JSON_FIELDS = ("base", "adapters", "destination", "destination_format", "weights_format", "tensors", "parameters",
               "merged", "replaced", "bytes_written", "files", "dtype", "reference", "notes", "seconds", "verified",
               "verification", "weights_verification", "unrounded_verification")


def command(
    base: Annotated[Path, typer.Argument(help="The base model's Hugging Face folder (config.json + weights).",
                                         show_default=False)],
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder (adapter_config.json + "
                                                 "adapter_model.safetensors or .bin).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Destination folder (written atomically).", show_default=False)],
    more: Annotated[list[Path] | None, typer.Option(
        "--adapter", help="Another adapter merged with the first (repeat the option).")] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Each adapter's factor, comma-separated, in order (default 1 each), e.g. 1,0.5.")] = None,
    to: Annotated[str | None, typer.Option(
        "--to", help="hf (the base's weight format, the default), safetensors or pytorch: an hf folder with "
                     "those weights.")] = None,
    shard_size: Annotated[str | None, typer.Option(
        "--shard-size", help="Largest shard, e.g. 2GB (default: the base's, when it is sharded).")] = None,
    reference: Annotated[str, typer.Option(
        "--reference", help="Who runs the unmerged reference: auto (PEFT when installed, else llmconv), "
                            "peft, llmconv.")] = "auto",
    decode_steps: o.DecodeSteps = None,
    generate: o.Generate = None,
    verify: o.Verify = True,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    junit: o.Junit = None,
    keep_failed: o.KeepFailed = None,
) -> None:
    from llmconv.io import human_size
    from llmconv.merge import merge, parse_weights

    t0 = time.perf_counter()
    adapters = [adapter, *(more or [])]
    factors = parse_weights(weights, len(adapters))
    if junit is not None:
        from llmconv.verification.junit import check_report_path

        check_report_path(junit, models=[base, *adapters], writes=[dst], reads={})
    report = run_recorded(
        "merge", lambda: merge(base, adapters, dst, weights=factors, to=to, shard_size=shard_size, verify=verify,
                               force=force, reference=reference, decode_steps=decode_steps, generate=generate),
        junit=junit, keep=keep_failed, t0=t0,
        summary=lambda r: f"{len(r.adapters)} adapter(s) merged into {len(r.merged)} tensors, "
                          f"{human_size(r.bytes_written)} in {len(r.files)} file(s)")
    if json_output:
        print_json(report.to_json())
        return
    if quiet:
        return
    out.print(f"[green]merged[/] {len(report.adapters)} adapter(s) into {escape(report.base)} -> "
              f"{escape(report.destination)} (hf folder, {report.weights_format} weights, {report.dtype})")
    for ad in report.adapters:
        out.print(f"  {escape(ad['path'])}: weight {ad['weight']:g}, r {ad['r']}, alpha {ad['lora_alpha']}, scale "
                  f"{ad['scale']}, {ad['modules']} modules" + (f", {len(ad['replaced'])} tensors replaced"
                                                              if ad["replaced"] else ""))
    out.print(f"  {len(report.merged)} tensors merged, {len(report.replaced)} replaced, {report.tensors} in all, "
              f"{human_size(report.bytes_written)} in {len(report.files)} file(s), {report.seconds:.2f} s")
    for note in report.notes:
        out.print(f"  note: {escape(note)}")
    v = report.verification
    if v is not None:
        out.print(f"  [green]verified[/] against {escape(report.reference or '')}: {escape(v.summary())} "
                  f"({v.mode}, {v.profile}); weights read back: {escape(report.weights_verification.summary())}")
        u = report.unrounded_verification
        if u is not None:
            out.print(f"  [green]verified[/] at float32, the merged tensors before their rounding to {report.dtype}: "
                      f"{escape(u.summary())} ({u.mode}, {u.profile})")
    else:
        out.print("  [yellow]not verified[/] (--no-verify)")
