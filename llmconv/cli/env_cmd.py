"""llmconv env"""

from __future__ import annotations

from llmconv.cli import options as o
from llmconv.cli.output import escape, kv_table, out, print_json, run_seconds

HELP = ("Show this machine as llmconv sees it: versions, the CPU's int8 features and the int8 settings "
        "quantize --target cpu picks for it, and the execution providers onnxruntime has.")
EPILOG = "Example: [bold]llmconv env --json[/]"
JSON_FIELDS = ("llmconv", "python", "platform", "executable", "packages", "cpu", "int8_rule", "execution_providers",
               "seconds")


def command(json_output: o.Json = False) -> None:
    from llmconv.environment import environment

    env = environment()
    if json_output:
        print_json({**env, "seconds": round(run_seconds(), 3)})
        return
    cpu, rule = env["cpu"], env["int8_rule"]
    rows = [("llmconv", env["llmconv"]), ("python", f"{env['python']} ({env['platform']})")]
    rows += [(name, version or "-") for name, version in env["packages"].items()]
    rows.append(("cpu", f"{cpu['isa']}" + (f" ({cpu['model']})" if cpu.get("model") else "")))
    rows.append(("cpu features", ", ".join(cpu["features"]) or "-"))
    rows.append(("int8 kernels", "U8S8 saturates (no VNNI)" if cpu["int8_saturates"] else "no saturation"))
    rows.append(("int8 rule", f"{rule['weights']} for {rule['for']}"))
    rows.append(("providers", ", ".join(env["execution_providers"]) or "onnxruntime not installed"))
    out.print(kv_table([(k, escape(str(v))) for k, v in rows]))
