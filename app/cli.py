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


def checked_out_folder(text, overwrite: bool, own_output, command: str):
    """An --out folder checked before any work: new, empty, or (with --overwrite) an earlier `command` run's
    outputs, which `own_output` (a compiled pattern of the file names that command writes) recognises. Its parent
    is created; anything else there is refused, never replaced."""
    from pathlib import Path

    out = Path(text)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; --out names a folder (a new one, or an earlier {command} run's)")
    if out.is_dir():
        entries = sorted(out.iterdir())
        foreign = [p.name for p in entries if not (p.is_file() and own_output.fullmatch(p.name))]
        if entries and not overwrite:
            raise CommandError(f"--out {out} is not empty ({len(entries)} entries); give --overwrite to replace "
                               f"an earlier {command} run's outputs, or a new folder")
        if foreign:
            raise CommandError(f"--out {out} holds files {command} did not write ({', '.join(foreign[:5])}"
                               f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the folder for --out {out}: {exc}") from None
    return out


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
