"""The ``eqm`` command line: sample, convert, serve, api, worker, train-digits, eval-digits."""
from __future__ import annotations

import argparse
import sys

from models.checkpoint import CheckpointError
from models.codecs import CodecError


class UsageError(Exception):
    """Bad command-line input (one-line message, no traceback)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqm", description="Equilibrium Matching inference service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from service import cli_offline
    cli_offline.register(sub)
    for module in ("service.cli_worker", "service.cli_service", "service.cli_digits"):
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        sys.modules[module].register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CheckpointError, CodecError, UsageError, ValueError, FileNotFoundError) as exc:
        print(f"eqm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
