"""The ``ckaad-fast`` command: a thin layer over the Python API.

Each subcommand lives in its own module of this package with two functions:
``add_parser(subparsers)``, which registers the subcommand with help text for every option and
sets ``func`` to ``run``, and ``run(args) -> int``, which calls the Python API.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order --help lists them.
_COMMANDS = ("train", "eval", "score", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckaad-fast",
        description="Train, evaluate and run CKAAD anomaly detectors with fused GPU kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # Expected failures (bad paths, bad data, bad checkpoints) are shown as one clear line;
        # anything else is a bug and keeps its traceback.
        print(f"ckaad-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
