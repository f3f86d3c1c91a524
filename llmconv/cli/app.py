"""The root app: registers the commands and holds the one error handler.

Exit codes (../CONTRACT): 0 done/equivalent, 1 not equivalent, 2 bad usage or input, 3 internal error.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

from llmconv.cli import convert_cmd, formats_cmd, inspect_cmd, prune_cmd, quantize_cmd, verify_cmd
from llmconv.cli.output import emit_error

# click's base error, found through a public subclass: typer vendors click in some versions.
_ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Group(TyperGroup):
    """The root command, with usage errors reported as the contract wants: one line (and the JSON
    error object with --json), not click's usage box."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except _ClickError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `llmconv convert` alone: its help, as before
                return super().main(argv, prog_name, complete_var, True, **extra)
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "llmconv"
            command = ctx.info_name if ctx is not None and ctx.parent is not None else ""
            emit_error(command, e.exit_code, f"{e.format_message()} (see '{where} --help')", as_json="--json" in argv)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="llmconv",
    help="Move LLM checkpoints between formats and prove the result is still the same model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Terminated(BaseException):
    """SIGTERM (a CI timeout, ``docker stop``, a killed ``make -j``), raised in the main thread so that
    an output in progress is removed on the way out, as on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def debug_enabled() -> bool:
    return os.environ.get("LLMCONV_DEBUG", "") not in ("", "0", "false", "no")


def guarded(command: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; turn library errors into one line and the contract's exit code."""
    from llmconv.errors import LlmconvError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_output"))
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except LlmconvError as e:
            if debug_enabled():
                import traceback

                traceback.print_exc()
            emit_error(command, e.exit_code, str(e), as_json=as_json, report=getattr(e, "report", None))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            emit_error(command, 130, "interrupted; the destination was left as it was", as_json=as_json)
            raise typer.Exit(130) from None
        except Terminated:
            emit_error(command, 143, "terminated (SIGTERM); the destination was left as it was", as_json=as_json)
            raise typer.Exit(143) from None
        except Exception as e:  # a bug of ours: exit 3, never dressed up as the user's mistake
            if debug_enabled():
                import traceback

                traceback.print_exc()
            hint = "" if debug_enabled() else "; rerun with LLMCONV_DEBUG=1 for the traceback and report it"
            emit_error(command, 3, f"internal error: {type(e).__name__}: {e}{hint}", as_json=as_json)
            raise typer.Exit(3) from None

    return wrapper


for _name, _module in (("inspect", inspect_cmd), ("convert", convert_cmd), ("verify", verify_cmd),
                       ("quantize", quantize_cmd), ("prune", prune_cmd), ("formats", formats_cmd)):
    app.command(_name, help=_module.HELP, epilog=_module.EPILOG,
                no_args_is_help=_name != "formats")(guarded(_name, _module.command))


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from llmconv import __version__

        typer.echo(f"llmconv {__version__}")
        raise typer.Exit(0)


def main() -> None:
    """Console entry point (``llmconv`` and ``python -m llmconv``)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write("llmconv: interrupted\n")
        code = 130
    except Terminated:
        sys.stderr.write("llmconv: terminated\n")
        code = 143
    _exit(code)


def _exit(code: int) -> None:
    """End the process without tearing the heavy modules down.

    Finalizing torch, transformers, optimum and onnxruntime at interpreter exit took ~1 s here on
    every command that loaded them (and on every target of a batch Makefile). By now each output
    is complete, closed and renamed into place; only the standard streams may hold buffered text.
    """
    if "torch" not in sys.modules:
        sys.exit(code)
    import logging

    logging.shutdown()
    import contextlib

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            stream.flush()
    os._exit(code)
