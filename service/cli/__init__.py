"""The ``eqm`` command line: one module per command, each with ``register(sub)`` and its handler.

Building the parser imports no torch (every ``--help`` answers at once); a handler imports what it
runs. ``python -m service.cli`` is the same as ``eqm``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order ``eqm --help`` lists them.
COMMANDS = ("serve", "api", "worker", "sample", "convert", "train_digits", "eval_digits", "eval")


class UsageError(Exception):
    """Bad command-line input (one-line message, no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqm", description="Equilibrium Matching inference service",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"service.cli.{name}").register(sub)
    # No prefix matching: an option is spelled in full (``--dt`` must never be read as ``--dtype``).
    for command in sub.choices.values():
        command.allow_abbrev = False
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, printed as one line: the checkpoint and codec errors count only
    once their modules are loaded (a handler that never loaded them cannot raise them)."""
    errors: list[type[BaseException]] = [UsageError, ValueError, FileNotFoundError]
    for module, name in (("models.files", "CheckpointError"), ("models.codecs", "CodecError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from models.packages import missing_package
        message = missing_package(exc)          # a package this machine lacks: what to install, not a traceback
        if message is None and not isinstance(exc, _user_errors()):
            raise
        print(f"eqm {args.command}: error: {message or exc}", file=sys.stderr)
        return 2
