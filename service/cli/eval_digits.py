"""``eqm eval-digits``: the quality report of the digits model (``bench/eval_digits.py``, source tree only)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVAL_SCRIPT = ROOT / "bench" / "eval_digits.py"


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval-digits", help="quality report of the digits model (writes bench/RESULTS.md)",
                       description="Measure the digits model on the held-out test split: classifier accuracy of "
                                   "samples, adaptive stopping, composition, denoising PSNR and OOD AUROC.")
    add_arguments(e)
    e.set_defaults(handler=run_eval)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The report's options (``bench/eval_digits.py`` takes the same ones)."""
    p.add_argument("--checkpoint", default="digits", help="bundled name or file (default: the bundled digits model)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 50; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="a few samples only (seconds): a smoke test, not a measurement")
    p.add_argument("--seed", type=int, default=1000, help="first noise seed")
    p.add_argument("--no-write", action="store_true", help="print the report without touching bench/RESULTS.md")
    from service.cli.threads import add_threads_argument
    add_threads_argument(p)


def _load_eval():
    from service.cli import UsageError
    if not EVAL_SCRIPT.is_file():
        raise UsageError(f"{EVAL_SCRIPT}: not found (eval-digits runs from the source tree)")
    if "eval_digits" in sys.modules:
        return sys.modules["eval_digits"]
    spec = importlib.util.spec_from_file_location("eval_digits", EVAL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_digits"] = module
    spec.loader.exec_module(module)
    return module


def run_eval(args: argparse.Namespace) -> int:
    return _load_eval().run(args)
