"""llmconv inspect PATH"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmconv.cli import options as o
from llmconv.cli.output import escape, fmt_num, kv_table, out, print_json

_SPARSE_SHOWN = 10
_VALUE_SHOWN = 100
HELP = "Show what a checkpoint holds: format, tensors, parameters, dtypes, bytes, shards, metadata, ties."
EPILOG = ("Examples: [bold]llmconv inspect fixtures/models/trained-gpt2[/]  ·  "
          "[bold]llmconv inspect model.onnx --json[/]")
# The JSON object's keys besides schema, ok and error, on every exit (llmconv.inspect/1); the format's own
# details follow them on success (ONNX: opset, ir_version, producer, ops, inputs, outputs, ...).
JSON_FIELDS = ("path", "format", "weights_format", "tensors", "parameters", "bytes", "size_on_disk", "dtypes",
               "bytes_by_dtype", "files", "shards", "metadata", "tied", "architecture", "model_type", "extra_files",
               "tie_word_embeddings", "tied_by_config", "largest", "sparsity", "seconds")


def _short(value: object) -> str:
    """A metadata value on one line: a long string (a chat template) cut, with its length."""
    text = str(value)
    if len(text) > _VALUE_SHOWN:
        return f"{text[:_VALUE_SHOWN]}... ({len(text):,} characters, see --json)"
    return text


def command(
    path: Annotated[Path, typer.Argument(help="A checkpoint: a file or a folder.", show_default=False,
                                         metavar="PATH")],
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Also count zeros in weight matrices.")] = False,
    json_output: o.Json = False,
) -> None:
    from llmconv.inspection import inspect
    from llmconv.io import human_size

    info = inspect(path, sparsity=sparsity)
    if json_output:
        print_json(info)
        return
    rows: list[tuple[str, object]] = [("path", info["path"]), ("format", info["format"])]
    if info.get("weights_format") and info["weights_format"] != info["format"]:
        rows.append(("weights", info["weights_format"]))
    gguf = "gguf_types" in info
    if gguf:
        # llama.cpp's architecture name, as the file says it, and the class it reads back as.
        back = f", reads back as {info['architecture']}" if info.get("architecture") else ""
        rows.append(("architecture", f"{info.get('gguf_architecture') or '-'} (GGUF v{info.get('gguf_version')}"
                                     f"{back})"))
        types = sorted(info["gguf_types"].items(), key=lambda kv: (-kv[1], kv[0]))
        sizes = info.get("gguf_type_bytes") or {}
        rows.append(("gguf types", ", ".join(f"{k} {v} ({human_size(sizes[k])})" if k in sizes else f"{k} {v}"
                                             for k, v in types) or "-"))
        if info.get("unreadable_types"):
            rows.append(("unreadable", f"{', '.join(info['unreadable_types'])} (llmconv does not dequantize these: "
                                       "inspect reads the header only, convert refuses the file)"))
    elif info.get("architecture") or info.get("model_type"):
        rows.append(("architecture", f"{info.get('architecture')} ({info.get('model_type')})"))
    adapter = info.get("adapter")
    if adapter:
        rows += _adapter_rows(adapter)
    for key in ("opset", "ir_version", "producer"):
        if key in info:
            rows.append((key, info[key]))
    rows += [
        ("tensors", f"{info['tensors']}" + (f" (+{len(info['tied'])} tied)" if info.get("tied") else "")),
        ("parameters", f"{info['parameters']:,}"),
        ("bytes read back" if gguf else "bytes", f"{human_size(info['bytes'])} ({info['bytes']:,})"
         + (", as llmconv reads it (dequantized); the file holds the gguf types above" if gguf else "")),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()) or "-"),
        ("shards", info["shards"]),
    ]
    if info.get("external_data"):
        rows.append(("external data", ", ".join(info["external_data"])))
    if info.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in info["metadata"].items())))
    if info.get("tied"):
        rows.append(("tied", ", ".join(f"{a} -> {c}" for a, c in info["tied"].items())))
    if info.get("tied_by_config"):
        names = ", ".join(info["tied_by_config"])
        rows.append(("tied", f"{names} = input embedding (by config: stored once, tied on load)"))
    elif info.get("tie_word_embeddings") is not None:
        rows.append(("tie_word_embeddings", fmt_num(info["tie_word_embeddings"])))
    if info.get("ops"):
        rows.append(("ops", ", ".join(f"{k} x{v}" for k, v in info["ops"].items())))
    for key in ("inputs", "outputs"):
        for io in info.get(key, []):
            rows.append((key[:-1], f"{io['name']} {io.get('dtype', '')} {io.get('shape', '')}"))
    if info.get("sparsity"):
        rows.append(("sparsity", f"{info['sparsity']['overall']:.2%} of weight-matrix elements are zero"))
    rows += [("note", note) for note in info.get("notes") or []]
    out.print(kv_table(rows))
    if gguf and info.get("gguf_metadata"):
        out.print(kv_table([(escape(k), _short(v)) for k, v in info["gguf_metadata"].items()], title="GGUF metadata"))
    per_tensor = (info.get("sparsity") or {}).get("per_tensor") or {}
    if any(per_tensor.values()):
        from rich.table import Table

        sparse = Table(title="sparsest weight matrices", title_justify="left", box=None, pad_edge=False)
        sparse.add_column("name", overflow="fold")
        sparse.add_column("zeros", justify="right")
        for name, share in sorted(per_tensor.items(), key=lambda kv: (-kv[1], kv[0]))[:_SPARSE_SHOWN]:
            sparse.add_row(escape(name), f"{share:.2%}")
        out.print(sparse)
        if len(per_tensor) > _SPARSE_SHOWN:
            out.print(f"  ... {len(per_tensor) - _SPARSE_SHOWN} more (see --json)")
    if info.get("largest"):
        from rich.table import Table

        table = Table(title="largest tensors", title_justify="left", box=None, pad_edge=False)
        for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "right"), ("bytes", "right")):
            table.add_column(col, justify=justify, overflow="fold" if col == "name" else None)
        for t in info["largest"]:
            table.add_row(escape(t["name"]), t["dtype"], "x".join(map(str, t["shape"])) or "scalar",
                          human_size(t["bytes"]))
        out.print(table)


def _adapter_rows(a: dict) -> list[tuple[str, object]]:
    """A LoRA adapter's summary (``inspect``'s ``adapter`` object) as table rows."""
    targets = a.get("target_modules")
    rows: list[tuple[str, object]] = [
        ("adapter", f"{a.get('peft_type')} ({a.get('task_type') or 'no task type'}), "
                    f"PEFT {a.get('peft_version') or '?'}"),
        ("base model", a.get("base_model") or "- (not named in adapter_config.json)"),
        ("rank", f"r={a.get('r')}" + (f", per module {a['rank_pattern']}" if a.get("rank_pattern") else "")),
        ("alpha", f"{a.get('lora_alpha')}" + (f", per module {a['alpha_pattern']}" if a.get("alpha_pattern") else "")
         + (f" (scale {a['scale']:g}{', rsLoRA alpha/sqrt(r)' if a.get('use_rslora') else ', alpha/r'})"
            if a.get("scale") is not None else "")),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("dropout", a.get("lora_dropout")),
        ("modules saved in full", ", ".join(a.get("modules_to_save") or []) or "-"),
        ("LoRA modules", f"{a.get('lora_modules')} ({a.get('lora_parameters'):,} parameters)"),
    ]
    if a.get("saved_in_full"):
        rows.append(("full tensors", f"{len(a['saved_in_full'])} ({a['saved_in_full_parameters']:,} parameters): "
                                     + ", ".join(a["saved_in_full"][:4]) + (" ..." if len(a["saved_in_full"]) > 4
                                                                            else "")))
    if a.get("use_dora"):
        rows.append(("DoRA", "yes (llmconv merge refuses it)"))
    rows.append(("adapter size", f"{a.get('size')} ({a.get('parameters'):,} parameters)"))
    return rows
