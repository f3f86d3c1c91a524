"""The root app: registers the commands and holds the one error handler.

Exit codes (../CONTRACT): 0 done/equivalent, 1 not equivalent, 2 bad usage or input, 3 internal error.
"""

from __future__ import annotations

import os
import signal
import sys


def _leave_now(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM while the program starts or after it is done: nothing is being written, so
    leave at once with the contract's one line and code, not with a traceback from inside an import."""
    os.write(2, b"llmconv: interrupted\n" if signum == signal.SIGINT else b"llmconv: terminated\n")
    os._exit(128 + signum)


def _started_as_program() -> bool:
    """Whether this process is the llmconv program (``llmconv`` or ``python -m llmconv``), not a host
    (pytest, a notebook) that imports the app and keeps its own signal handling."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name in ("llmconv", "llmconv.__main__"):
        return True
    name = os.path.basename(getattr(main, "__file__", None) or "")
    return name in ("llmconv", "llmconv-script.py", "llmconv.exe")


# Signals ignored when the program started (``nohup``, a background job of a script) stay ignored.
_IGNORED: set[int] = set()


def _set_handlers(handler: Callable[[int, Any], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                _IGNORED.add(sig)
            if sig not in _IGNORED:
                signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals are not ours to handle there
            return


# Installed first, before even the standard modules below: a Ctrl-C while typer, rich and the command
# modules are imported (~0.1 s) used to print a 20-line traceback from the middle of an import.
if _started_as_program():
    _set_handlers(_leave_now)

import functools  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from llmconv.cli import (  # noqa: E402
    convert_cmd,
    env_cmd,
    formats_cmd,
    inspect_cmd,
    merge_cmd,
    prune_cmd,
    quantize_cmd,
    verify_cmd,
)
from llmconv.cli.output import emit_error, last_error, run_seconds, run_started, status_display  # noqa: E402

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
        run_started()
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except _ClickError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `llmconv convert` alone: its help, as before
                return super().main(argv, prog_name, complete_var, True, **extra)
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "llmconv"
            command = ctx.info_name if ctx is not None and ctx.parent is not None else ""
            message = f"{e.format_message()} (see '{where} --help')"
            emit_error(command, e.exit_code, message, as_json="--json" in argv)
            _record_junit(argv, ctx.command if command else None, command, e.exit_code, message)
            sys.exit(e.exit_code)
        code = code if isinstance(code, int) else 0
        reported = last_error()
        if code not in (0, 1) and reported is not None:  # exit 0 and 1 have a report: the command wrote it
            _record_junit(argv, self.commands.get(reported[0]), reported[0], code, reported[2])
        sys.exit(code)


def _record_junit(argv: list[str], cmd: Any, command: str, code: int, message: str) -> None:
    """``--junit FILE`` on a run that ended without a report (a usage error, bad input, a bug, an interrupt):
    FILE gets one ``<error>`` case for this run, so a dashboard never shows an earlier run's verdict for it."""
    if cmd is None or not any(a == "--junit" or a.startswith("--junit=") for a in argv):
        return
    if not any("--junit" in getattr(p, "opts", ()) for p in getattr(cmd, "params", ())):
        return  # a command without --junit: the flag was the usage error
    from llmconv.verification.junit import write_run_error

    write_run_error(argv, command=command, code=code, message=message, seconds=run_seconds())


app = typer.Typer(
    cls=_Group,
    name="llmconv",
    help="Move LLM checkpoints between formats and prove the result is still the same model.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Terminated(BaseException):
    """SIGTERM (a CI timeout, ``docker stop``, a killed ``make -j``), raised in the main thread so that
    an output in progress is removed on the way out, as on Ctrl-C."""


# The interrupt raised and not yet reported by the CLI (KeyboardInterrupt or Terminated), if any.
_pending: list[type[BaseException]] = []
# How often a raised interrupt is checked on until the CLI reports it.
_RECHECK_S = 0.25


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM while a command runs: raise, so that the output in progress is removed on the way
    out. A library may swallow the exception (mpmath tries its optional backends in a bare ``except:``,
    transformers probes devices in one), so until the CLI has reported it, it is raised again every
    ``_RECHECK_S`` seconds (SIGALRM) whenever it is no longer on its way out."""
    kind = KeyboardInterrupt if signum == signal.SIGINT else Terminated
    if not _pending:
        _pending.append(kind)
        if hasattr(signal, "setitimer"):
            signal.signal(signal.SIGALRM, _recheck)
            signal.setitimer(signal.ITIMER_REAL, _RECHECK_S, _RECHECK_S)
    elif _unwinding():
        return  # the first one is on its way out, running cleanups: let them finish
    if _importing(frame):
        return  # raised by _recheck once the import is done
    raise _pending[0]()


def _recheck(signum: int, frame: Any) -> None:
    # Not while io.held_signals() holds interrupts around a rename: it delivers them itself afterwards.
    if _pending and not _unwinding() and not _importing(frame) and signal.getsignal(signal.SIGTERM) is _on_signal:
        raise _pending[0]()


def _raise_pending() -> None:
    """io.before_commit's check: an interrupt that came (deferred in an import, or swallowed by a library)
    stops the run now, before the output is renamed into place."""
    if _pending and not _unwinding():
        raise _pending[0]()


def _importing(frame: Any) -> bool:
    """Whether a module is being imported. An exception raised there may cross a C++ extension's module
    initialisation (torch's pybind11 code calls back into Python), which then aborts the whole process
    (std::terminate, no cleanup, no exit code of ours); the lazy imports take a second or two at most."""
    depth = 0
    while frame is not None and depth < 500:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def _unwinding() -> bool:
    """Whether an interrupt is being handled right now (an ``except``/``finally`` cleaning up after it)."""
    e = sys.exc_info()[1]
    seen = 0
    while e is not None and seen < 100:
        if isinstance(e, (KeyboardInterrupt, Terminated)):
            return True
        e, seen = e.__context__, seen + 1
    return False


def _unraisable(info: Any) -> None:
    """``sys.unraisablehook``: an interrupt raised while a finalizer (``__del__``, a weakref callback) ran is
    lost there; Python would print "Exception ignored in ..." and a traceback. It is raised again by
    ``_recheck`` where it can propagate, so nothing is printed for it."""
    if isinstance(info.exc_value, (KeyboardInterrupt, Terminated)):
        return
    sys.__unraisablehook__(info)


def _reported() -> None:
    """The interrupt reached the CLI and was reported: stop raising it again."""
    _pending.clear()
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def debug_enabled() -> bool:
    return os.environ.get("LLMCONV_DEBUG", "") not in ("", "0", "false", "no")


def _check_path_args(kwargs: dict[str, Any]) -> None:
    """Refuse a path argument that no file operation can use, before a command touches it: one with a
    name longer than the filesystem allows, or with symbolic links that loop. Whether it exists is each
    command's business (a destination usually does not)."""
    from llmconv.io import check_usable_path

    for value in kwargs.values():
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, Path):
                check_usable_path(path, must_exist=False)


# The commands whose library call always reports its steps (llmconv.progress) before it returns.
_REPORTING = ("convert", "verify", "quantize", "prune")


def guarded(command: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; turn library errors into one line and the contract's exit code."""
    from llmconv.errors import LlmconvError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmconv.io import forget_commits, interrupt_outcome

        as_json = bool(kwargs.get("json_output"))
        forget_commits()
        try:
            try:
                _check_path_args(kwargs)
                # What the library reports on its long steps, on a terminal only (never with --json or --quiet).
                with status_display(enabled=not (as_json or kwargs.get("quiet")),
                                    starting=f"starting {command}" if command in _REPORTING else None):
                    return fn(*args, **kwargs)
            except Exception as e:
                # After an interrupt a library swallowed, what fails next is its consequence (a module left
                # half-imported: numpy's "cannot load module more than once per process"): the user asked
                # to stop, and that is what is reported.
                if _pending:
                    raise _pending[0]() from e
                raise
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except LlmconvError as e:
            if debug_enabled():
                import traceback

                traceback.print_exc()
            emit_error(command, e.exit_code, str(e), as_json=as_json, report=getattr(e, "report", None),
                       quiet=bool(kwargs.get("quiet")))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _reported()
            emit_error(command, 130, f"interrupted; {interrupt_outcome()}", as_json=as_json)
            raise typer.Exit(130) from None
        except Terminated:
            _reported()
            emit_error(command, 143, f"terminated (SIGTERM); {interrupt_outcome()}", as_json=as_json)
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
                       ("quantize", quantize_cmd), ("prune", prune_cmd), ("merge", merge_cmd),
                       ("formats", formats_cmd), ("env", env_cmd)):
    app.command(_name, help=_module.HELP, epilog=_module.EPILOG,
                no_args_is_help=_name not in ("formats", "env"))(guarded(_name, _module.command))


def _print_version(value: bool) -> None:
    """``--version``: handled while the flags are read (eager), so it needs no command after it."""
    if value:
        from llmconv import __version__

        typer.echo(f"llmconv {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit (all versions: llmconv env).",
                                 is_eager=True, callback=_print_version),
) -> None:
    """Move LLM checkpoints between formats and prove the result is still the same model."""


def main() -> None:
    """Console entry point (``llmconv`` and ``python -m llmconv``)."""
    from llmconv.io import set_interrupt_check

    _set_handlers(_on_signal)
    set_interrupt_check(_raise_pending)
    sys.unraisablehook = _unraisable
    unreported: type[BaseException] | None = None
    try:
        app(prog_name="llmconv")  # also under `python -m llmconv`: its usage lines and completion
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (KeyboardInterrupt, Terminated) as e:
        unreported = type(e)
    # An interrupt outside a command (while typer reads the flags; typer turns Ctrl-C there into a silent
    # exit 130) was reported by nobody: say it here.
    unreported = unreported or (_pending[0] if _pending else None)
    if unreported is not None:
        from llmconv.io import interrupt_outcome

        ctrl_c = issubclass(unreported, KeyboardInterrupt)
        outcome = interrupt_outcome()  # the run may have put its output in place before the interrupt counted
        what = "interrupted" if ctrl_c else "terminated"
        sys.stderr.write(f"llmconv: {what}\n" if outcome.startswith("the destination was left")
                         else f"llmconv: {what}; {outcome}\n")
        code = 130 if ctrl_c else 143
        _reported()
    _set_handlers(_leave_now)  # done: a late signal ends the process without a traceback from the teardown
    _exit(code)


def _exit(code: int) -> None:
    """End the process without tearing the heavy modules down.

    Finalizing torch, transformers, optimum and onnxruntime at interpreter exit took ~1 s here on
    every command that loaded them (and on every target of a batch Makefile). By now each output
    is complete, closed and renamed into place; only the standard streams may hold buffered text.
    """
    # After an interrupt, always the hard way: CPython 3.11 marks the interpreter when a KeyboardInterrupt
    # goes through eval() (typer evaluates the commands' string annotations with it), and a marked
    # interpreter leaving through sys.exit kills itself with SIGINT instead of exiting 130.
    if "torch" not in sys.modules and code not in (130, 143):
        sys.exit(code)
    import logging

    logging.shutdown()
    import contextlib

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            stream.flush()
    os._exit(code)
