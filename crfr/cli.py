"""The ``crfr`` command line: one entry point, subcommands registered by ``crfr/commands/*``.

Errors the user can fix (``CrfrError``) print one line naming the file or setting and exit non-zero;
only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from crfr import __version__
from crfr.errors import CrfrError, StorageError

# Each module adds the command it is named for (crfr.commands.X: crfr X).
COMMAND_MODULES = (
    "crfr.commands.report",
    "crfr.commands.params",  # crfr params show
    "crfr.commands.data",
    "crfr.commands.train",
    "crfr.commands.evaluate",
    "crfr.commands.promote",
    "crfr.commands.embed",
    "crfr.commands.verify",
    "crfr.commands.identify",
    "crfr.commands.models",  # crfr models describe
    "crfr.commands.pipeline",
    "crfr.commands.bench",
    "crfr.commands.export",  # crfr export onnx
    "crfr.commands.gallery",
    "crfr.commands.serve",
)

OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
}


def add_params_args(parser: argparse.ArgumentParser) -> None:
    """``--params FILE`` and repeatable ``--set section.key=value``, shared by every step."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set teacher.epochs=1 (repeatable; VALUE is YAML)",
    )


def positive_int(text: str) -> int:
    """argparse ``type`` for counts such as ``--top-k``: an integer >= 1, refused by argparse otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_guarded(func: Callable[[], int | None]) -> int:
    """Run a command, turning ``CrfrError`` into ``crfr: error: ...`` and its exit code."""
    try:
        return int(func() or 0)
    except CrfrError as exc:
        print(f"crfr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crfr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `crfr ... | head`: the reader left; as the Python docs advise, stop writing without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # Last resort for a full disk or read-only path met where no writer named its output: still one line.
        writing = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
        fault = StorageError.from_os_error(exc, action="write" if writing else "access")
        if fault is None:
            raise
        print(f"crfr: error: {fault}", file=sys.stderr)
        return fault.exit_code


def step_main(
    step: str,
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """The CLI of one pipeline step, ``python -m components.<step>``: parse, run, report errors in one line.

    Args:
        step: module name under ``components``.
        doc: the step module's docstring (its ``--help``).
        add_arguments: adds the step's arguments (also used by the matching ``crfr`` subcommand).
        run: does the work with the parsed arguments; returns the exit code.
        argv: arguments (default: ``sys.argv[1:]``).
    """
    from crfr.process import usage as stage_usage

    started = time.monotonic()
    configure_logging()
    parser = argparse.ArgumentParser(prog=f"python -m components.{step}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    code = run_guarded(lambda: run(args))
    stage_usage.record(started, code)  # only under DVC with CRFR_STAGE_USAGE set (scripts/main.sh)
    return code


def configure_logging() -> None:
    """INFO lines with a timestamp on stderr: what a long step does shows in a log file too, where progress
    bars (drawn only on a terminal) do not."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crfr",
        description=(
            "Cross-resolution face recognition: train a ResNet teacher on HR faces, distil a WaveResNet "
            "student on degraded multi-scale LR faces, evaluate at 14/28/56/112 px, register, promote and use it."
        ),
    )
    parser.add_argument("--version", action="version", version=f"crfr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
