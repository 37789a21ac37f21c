"""The ``ckaad-fast`` command: a thin layer over the Python API.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)``, which registers the subcommand with help text for every option and
sets ``func`` to ``run`` (and ``interrupted`` to what Ctrl-C leaves behind), and
``run(args) -> int``, which calls the Python API. Every default,
protocol and rule lives in the API; the command only turns options into arguments and errors
back into the names of options.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import os
import re
import signal
import sys
import threading
import warnings

from .. import __version__
from ..errors import ArgumentError
from ..signal_stack import ensure_signal_stack

#: Exit codes: 0 done; 1 (score) finished, but some image could not be scored (see its error
#: column); 2 nothing or not all was done: a bad option, input, checkpoint, or a file that could not
#: be written; 130 interrupted (what was finished is kept).
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

#: The subcommands (one module each), in the order --help lists them, with the line it shows.
COMMANDS = {
    "train": "train a CKAAD detector and write OUT/checkpoint.pt and OUT/log.jsonl",
    "eval": "score a test split with a trained checkpoint and report image/pixel AUROC, F1, AUPRO",
    "calibrate": "pick the decision threshold on held-out data and store it in the checkpoint",
    "score": "score images with a trained checkpoint or an export folder; write scores.csv and anomaly maps",
    "export": "export the scoring forward (uint8 image -> score, normalized_score, is_anomalous, anomaly_map)",
    "experiment": "run one of the paper's tables (table1, table2, table3) and write OUT/results.csv and OUT/table.md",
    "demo": "make a small anomaly data set, train a small CKAAD on the CPU, score it, write a report",
}

# The option that sets each Python argument whose name differs from the option's.
_FLAGS = {
    "root": "--data",
    "resume_from": "--out",
    "ratio_labeled": "--ratio-labeled/--num-anomaly-classes",
    "data": "--data/--normal",
    "num_classes": "--num-anomaly-classes",
    "table": "TABLE",
    "runtime": "--engine",  # an export folder's runtime (score --checkpoint EXPORT_DIR)
}


def flag(name: str) -> str:
    """The command-line option of the Python argument or configuration field ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _message(e: Exception) -> str:
    if isinstance(e, ArgumentError):
        return f"{flag(e.name)}: {e.message}"
    # Configuration errors name the field ("TrainConfig.ae_lr must ..."): name the option instead.
    return re.sub(r"TrainConfig\.(\w+)", lambda m: flag(m.group(1)), str(e))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckaad-fast",
        description="Train, evaluate and run CKAAD anomaly detectors with fused GPU kernels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, line in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"{__name__}.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=line)
    return parser


def _command_of(argv) -> str:
    """The subcommand ``argv`` names ("" for none or an unknown one: argparse says which)."""
    word = next((a for a in argv if not a.startswith("-")), "")
    return word if word in COMMANDS else ""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a service manager stopping the job, ``kill``, torchrun ending its workers) ends a
    command as Ctrl-C does: it says what was kept, and every lock and temporary file is released
    on the way out. The previous handler comes back afterwards (main() also runs in-process)."""
    def handler(signum, frame):
        # Once: the command is already on its way out, so a second SIGTERM (a service manager
        # repeating itself) must not interrupt the clean-up that says what was kept.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    # A crash in native code (a runtime library, a driver) leaves a Python stack on stderr; and
    # faulthandler's small alternate signal stack is replaced by one the signal handlers fit in
    # (ckaad_fast.signal_stack says why).
    if not faulthandler.is_enabled():
        faulthandler.enable()
    ensure_signal_stack()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    try:
        with _sigterm_as_interrupt(), _warnings_as_lines(args.command):
            return _dispatch(args)
    except KeyboardInterrupt:
        # An interrupt that lands outside the command (while its context is entered or left):
        # the same status, so that a stopped job always ends with 130 and never by SIGINT.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """The ``ckaad-fast`` console script and ``python -m ckaad_fast``: :func:`main`, then exit. An
    interrupted command (Ctrl-C, SIGTERM) ends at once with 130 after its message: a late
    KeyboardInterrupt during the interpreter's teardown made CPython end the process by SIGINT
    instead (seen in 1 of about 12 runs of the SIGTERM test on a loaded machine)."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)  # results, locks and temporaries were settled by the command itself
    sys.exit(code)


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Warnings during a command as one line each, ``ckaad-fast CMD: warning: ...``, like its
    errors (not Python's file:line and source text). Only the format changes, so code that
    records warnings still gets them."""
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, *a, **k: f"ckaad-fast {command}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


def _dispatch(args) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", None)
        print("interrupted" + (f": {hint(args)}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # Expected failures (bad paths, bad data, bad checkpoints) are shown as one clear line;
        # anything else is a bug and keeps its traceback.
        print(f"ckaad-fast {args.command}: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        # A full disk, a read-only folder, a folder where a file was asked for: say which file.
        where = f" {e.filename!r}" if e.filename else ""
        print(f"ckaad-fast {args.command}: error: cannot write or read{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
