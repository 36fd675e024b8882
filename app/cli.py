"""The `wyckoff-lab` command line: subcommands for data, representation, relaxation, hulls and evaluation."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from wyckoff_lab.app.commands import COMMAND_MODULES


class CommandError(Exception):
    """A user-facing failure: printed as one clear line (or a JSON error object), never a traceback."""


def positive_float(text: str) -> float:
    """argparse type for tolerances and other quantities that must be finite and > 0 (spglib segfaults on -1)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Print a command's result: JSON when asked, otherwise the given human text (or pretty JSON)."""
    if as_json:
        print(json.dumps(_finite(result), indent=None, allow_nan=False, default=_json_default))
    else:
        print(text if text is not None else json.dumps(_finite(result), indent=2, allow_nan=False,
                                                        default=_json_default))


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities (numpy's too) as None: JSON has no such numbers, and `NaN` breaks readers."""
    import math

    import numpy as np

    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wyckoff-lab",
        description="Generate, relax and judge symmetric crystal structures.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"wyckoff_lab.app.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CommandError, FileNotFoundError, ValueError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        else:
            print(f"wyckoff-lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
