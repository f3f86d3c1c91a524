"""llmconv quantize SRC DST --target cpu|gpu"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llmconv.cli import options as o
from llmconv.cli.output import err, escape, fmt_num, kv_table, out, print_json, run_recorded

HELP = ("Quantize a model for CPU or GPU with onnxruntime's own tools (int8 dynamic/static, int4 MatMulNBits, "
        "fp16), or cast weights to fp16/bf16; the output is verified against the source before it is put in "
        "place (exit 1 and nothing written if it is not within the method's profile). "
        "Defaults: --target cpu is int8-dynamic, --target gpu is fp16. hf folders are exported to ONNX first. "
        "int4 MatMulNBits and fp16 graphs also run on onnxruntime's CUDA provider; without a GPU they are "
        "verified on the CPU provider.")
EPILOG = ("Examples: [bold]llmconv quantize onnx-folder out-int8 --target cpu[/] (a folder: loads in "
          "ORTModelForCausalLM)  ·  [bold]llmconv quantize hf-folder out-int4 --target gpu --method int4[/]  ·  "
          "[bold]llmconv quantize model.onnx model-int8.onnx --target cpu[/] (the graph alone)  ·  "
          "[bold]llmconv quantize model.onnx static.onnx --target cpu --method int8-static "
          "--calibration fixtures/data/heldout.txt[/]  ·  [bold]llmconv quantize model.safetensors half.safetensors "
          "--target gpu[/]")
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.quantize/1).
JSON_FIELDS = ("source", "destination", "source_format", "destination_format", "target", "method", "profile",
               "size_before", "size_after", "size_ratio", "bytes_written", "files", "linear_ops", "ops_quantized",
               "embeddings_quantized", "ops_before", "ops_after", "tensors_cast", "options", "attempts", "notes",
               "seconds", "verified", "verification")


def command(
    src: o.Src,
    dst: o.Dst,
    target: Annotated[str, typer.Option("--target", help="cpu|gpu: picks the default method and settings.",
                                        show_default=False)],
    method: Annotated[str, typer.Option(
        "--method", help="auto|int8-dynamic|int8-static|int4|fp16|bf16 (auto: int8-dynamic for cpu, fp16 for "
                         "gpu; bf16 is for weights files); for a .gguf DST: q8_0|q4_0|q4_1|q5_0|q5_1 (auto: "
                         "q8_0).")] = "auto",
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", metavar="FILE", help="int8-static: inputs as .npz (name -> array), or a text file "
                                              "tokenized with the model's tokenizer; default: seeded synthetic.")
    ] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="int8: one scale per output channel.")] = False,
    block_size: Annotated[int | None, typer.Option(
        "--block-size", help="int4: weights per quantization block (default 32).")] = None,
    op_types: Annotated[str | None, typer.Option(
        "--op-types", help="Comma list of op types to quantize (int8/int4): MatMul,Gemm,Gather. Default "
                           "MatMul,Gemm (+Gather, the embedding, for int8-dynamic).")] = None,
    text: o.Text = None,
    inputs: o.Inputs = None,
    max_ppl_increase: o.MaxPplIncrease = None,
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    provider: o.Provider = "cpu",
    decode_steps: o.DecodeSteps = None,
    generate: o.Generate = None,
    cpu: Annotated[str, typer.Option(
        "--cpu", help="int8 for --target cpu: the CPU the settings are for: auto (this one)|avx2|avx512|"
                      "avx512-vnni|arm64. Without VNNI weights are 7-bit (reduce_range); verification runs here."
    )] = "auto",
    calibration_samples: Annotated[int | None, typer.Option(
        "--calibration-samples", min=1, help="int8-static: calibration batches (default 8).")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize/--no-optimize",
        help="hf causal LMs onnxruntime-genai's model builder knows (Llama, Mistral, Qwen2/3, Phi-3, Gemma, "
             "Granite): quantize a fused generation graph (GroupQueryAttention with rotary inside, fused "
             "norms, packed Q/K/V; genai_config.json in a folder output). --no-optimize: the exporter's "
             "plain graph.")] = True,
    verify: o.Verify = True,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    junit: o.Junit = None,
    keep_failed: o.KeepFailed = None,
) -> None:
    from llmconv.io import human_size
    from llmconv.transforms.quantize import PROFILES, quantize

    t0 = time.perf_counter()
    if junit is not None:
        from llmconv.verification.junit import check_report_path

        check_report_path(junit, models=[src], writes=[dst],
                          reads={"--calibration": calibration, "--text": text, "--inputs": inputs})
    types = [t.strip() for t in op_types.split(",") if t.strip()] if op_types is not None else None

    def show_attempts(e: Any) -> None:
        tried = getattr(e.report, "extra", {}).get("attempts", [])
        if len(tried) > 1 and not (json_output or quiet):
            err.print(attempts_table(tried))  # every setting tried, above the closest one's checks

    report = run_recorded(
        "quantize", lambda: quantize(src, dst, target=target, method=method, calibration=calibration,
                                     per_channel=per_channel, block_size=block_size, op_types=types, text=text,
                                     inputs=inputs, atol=atol, rtol=rtol, max_ppl_increase=max_ppl_increase,
                                     provider=provider, calibration_samples=calibration_samples, verify=verify,
                                     force=force, cpu=cpu, decode_steps=decode_steps, generate=generate,
                                     optimize=optimize),
        junit=junit, keep=keep_failed, t0=t0, failed=show_attempts,
        summary=lambda r: f"{r.method} for {r.target}: {human_size(r.size_before)} -> {human_size(r.size_after)}")
    if json_output:
        print_json(report.to_json())
        return
    if quiet:
        return
    out.print(f"[green]quantized[/] {escape(report.source)} ({report.source_format}) -> "
              f"{escape(report.destination)}: {report.method} for {report.target}")
    rows = [("method", f"{report.method} (profile {PROFILES[report.method]})")]
    graph = report.options.get("graph")
    if graph:
        rows.append(("graph", f"fused by the {graph['tool']}" if graph.get("fused")
                     else f"the exporter's, not fused ({graph.get('why')})"))
    if report.linear_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in report.ops_quantized.items()) or "none"
        label = "converted to fp16" if report.method == "fp16" else "quantized"
        rows.append(("linear ops", f"{sum(report.ops_quantized.values())} of {report.linear_ops} {label} ({ops})"))
        if report.embeddings_quantized:
            rows.append(("embeddings", f"{report.embeddings_quantized} {label}"))
        if report.ops_after:
            rows.append(("ops after", ", ".join(f"{k} x{v}" for k, v in report.ops_after.items())))
    if report.tensors_cast:
        rows.append(("tensors cast", report.tensors_cast))
    cpu_plan = report.options.get("cpu")
    if cpu_plan:
        this = cpu_plan["this_cpu"]
        here = this["isa"] + (f", {this['model']}" if this.get("model") else "")
        rows.append(("cpu", f"settings for {cpu_plan['settings_for']}; "
                            + (f"verified on this CPU ({here})" if cpu_plan.get("verified_on")
                               else f"not verified (this CPU: {here})")))
    if "weight_type" in report.options:
        weights = report.options["weight_type"].split(" (")[0]
        weights += ", 7-bit (reduce_range)" if report.options.get("reduce_range") else ", full range"
        rows.append(("weights", weights))
    if report.options.get("kept_float"):
        rows.append(("kept float32", f"{len(report.options['kept_float'])} node(s)"))
    for key in ("op_types", "per_channel", "block_size", "activation_type", "kept_fp32_ops", "calibration"):
        if key in report.options:
            value = report.options[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ",".join(value)
            rows.append((key.replace("_", " "), value))
    rows.append(("size", f"{human_size(report.size_before)} -> {human_size(report.size_after)} "
                         f"({fmt_num(report.size_ratio)}x)"))
    rows.append(("time", f"{report.seconds:.2f} s"))
    out.print(kv_table(rows))
    if len(report.attempts) > 1:
        out.print(attempts_table([a.to_json() for a in report.attempts]))
    for note in report.notes:
        out.print(f"  note: {escape(note)}")
    v = report.verification
    if v is None:
        err.print("  [yellow]not verified[/] (--no-verify); onnxruntime loads the output")
        return
    from llmconv.cli.verify_cmd import render_report

    render_report(v)
    out.print(f"[green]verified[/] ({v.mode}, profile {v.profile}): {escape(v.summary())}")


def attempts_table(attempts: list[dict[str, Any]]) -> Any:
    """The settings tried (their JSON form), in order, with the figures that decided each."""
    from rich.table import Table

    t = Table(title="attempts", title_justify="left", box=None, pad_edge=False)
    for col in ("#", "setting", "verdict", "figures", "time"):
        t.add_column(col, overflow="fold")
    digits = {"cosine": ".6f", "top1_agreement": ".4f", "top5_agreement": ".4f", "kl": ".3g"}
    for i, a in enumerate(attempts, 1):
        figs = a.get("figures", {})
        main = figs.get("logits") or figs.get("last_hidden_state") or next(iter(figs.values()), {})
        shown = ", ".join(f"{k.replace('_agreement', '')} {format(v, digits.get(k, '.4g'))}"
                          for k, v in main.items() if k in digits)
        if "perplexity" in figs and figs["perplexity"].get("relative_change") is not None:
            shown += f", ppl {figs['perplexity']['relative_change']:+.2%}"
        passed = a.get("passed")
        verdict = "[green]pass[/]" if passed else ("[red]fail[/]" if passed is False else "not verified")
        took = f"{a.get('seconds', 0.0):.1f} s"
        if a.get("measured_nodes"):  # the nodes were measured on this attempt, after it
            took += f" + {a.get('measure_seconds', 0.0):.1f} s measuring"
        t.add_row(str(i), escape(a.get("setting", "")), verdict, escape(shown), took)
    return t
