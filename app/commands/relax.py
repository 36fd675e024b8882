"""`wyckoff-lab relax FILE`: relax one structure with a universal potential and report energy, steps and status."""

from __future__ import annotations

import argparse
from pathlib import Path

from wyckoff_lab.app.cli import CommandError, emit


def register(subparsers) -> None:
    p = subparsers.add_parser("relax", help="relax a structure (CIF/POSCAR) with MatterSim, CHGNet or SevenNet")
    p.add_argument("file", type=Path, help="structure file (CIF, POSCAR, ...)")
    p.add_argument("--potential", default=None,
                   help="mattersim, chgnet or sevennet (default: MatterSim if it can be had)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="maximum FIRE steps (default 500; 0 = single point)")
    p.add_argument("--fixed-cell", action="store_true", help="relax positions only, keep the cell")
    p.add_argument("--fix-symmetry", action="store_true",
                   help="keep the space group (ASE FixSymmetry at 0.1 Å: forces and stress symmetrised)")
    add_progress_flag(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write the on-disk result cache")
    p.add_argument("--out", type=Path, default=None, help="write the relaxed structure here (CIF if *.cif)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def add_progress_flag(parser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal; stdout stays the "
                             "result, pure JSON with --json)")


def show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress, else bars only when stderr is a terminal (not in logs and pipes)."""
    import sys

    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def read_structure(path: Path):
    """Read an ordered structure from a file, turning every failure into a one-line CommandError."""
    from pymatgen.core import Structure

    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    try:
        structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many types for malformed files; the user needs only the reason
        raise CommandError(f"{path}: cannot read a structure ({type(exc).__name__}: {exc})") from None
    if not structure.is_ordered:
        raise CommandError(f"{path}: disordered structure (partial occupancies); order it before relaxing")
    return structure


def check_settings(args: argparse.Namespace) -> None:
    """--potential, --fmax and --max-steps of relax and hull, checked before anything is loaded."""
    import math

    from wyckoff_lab.core.relax import POTENTIALS

    if args.potential is not None and args.potential not in POTENTIALS:
        raise CommandError(f"unknown potential {args.potential!r}; choose one of {', '.join(POTENTIALS)}")
    if args.max_steps < 0:
        raise CommandError(f"--max-steps must be >= 0 (0 = single point), not {args.max_steps}")
    if not (math.isfinite(args.fmax) and args.fmax > 0):
        raise CommandError(f"--fmax must be a finite number > 0 (eV/Å), not {args.fmax}")


def run(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.pipeline import RelaxBar
    from wyckoff_lab.core.relax import PotentialError, relax

    check_settings(args)
    structure = read_structure(args.file)
    bar = RelaxBar(f"relaxing {args.file.name}", show_progress(args), unit="structure")
    try:
        (result,) = relax(
            structure,
            potential=args.potential,
            fmax=args.fmax,
            max_steps=args.max_steps,
            relax_cell=not args.fixed_cell,
            device=args.device,
            cache=not args.no_cache,
            fix_symmetry=args.fix_symmetry,
            progress=bar,
        )
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    finally:
        bar.close()
    if args.out is not None:
        result.final.to(filename=str(args.out))
    summary = {"file": str(args.file), "num_atoms": len(structure)} | result.summary()
    summary["out"] = str(args.out) if args.out is not None else None
    text = "\n".join(
        [
            f"{summary['formula']}  ({len(structure)} atoms, {args.file})  potential {result.potential}",
            f"status          {result.status}" + (f" ({result.message})" if result.message else ""),
            f"criterion       {summary['criterion']}",
            f"energy          {result.energy_per_atom:.4f} eV/atom  ({result.energy:.4f} eV)",
            f"steps           {result.steps}",
            f"max force       {result.max_force:.4f} eV/Å",
            f"RMSD to start   {result.rmsd_to_start:.4f} Å",
            f"time            {result.wall_time_s:.2f} s" + ("  (cached)" if result.cached else ""),
        ]
        + ([f"wrote           {args.out}"] if args.out is not None else [])
    )
    emit(summary, args.json, text)
    return 0 if result.status in ("converged", "not_converged") else 1
