"""`wyckoff-lab hull --elements A,B,C`: an ML convex hull from dataset references, and candidates placed on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from wyckoff_lab.app.cli import CommandError, emit


def register(subparsers) -> None:
    p = subparsers.add_parser("hull", help="convex hull of a chemical system with ML energies; e_above_hull of CIFs")
    p.add_argument("--elements", required=True, help="comma-separated elements, e.g. Li,Fe,O")
    p.add_argument("--candidates", type=Path, default=None, help="folder of candidate CIFs to place on the hull")
    p.add_argument("--potential", default=None, help="mattersim or chgnet (default: MatterSim if it can be had)")
    p.add_argument("--dataset", default="mp_20", help="dataset whose phases are the references (default mp_20)")
    p.add_argument("--split", default="all", help="dataset split for references (default: all splits)")
    p.add_argument("--max-references", type=int, default=3,
                   help="keep the N lowest-DFT-energy polymorphs per formula (default 3; 0 = all)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="maximum FIRE steps per relaxation (default 500)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pymatgen.core import Element

    from wyckoff_lab.app.commands.relax import read_structure
    from wyckoff_lab.core.hull import HullReference
    from wyckoff_lab.core.relax import POTENTIALS, PotentialError

    t0 = time.perf_counter()
    elements = [e.strip() for e in args.elements.split(",") if e.strip()]
    unknown = [e for e in elements if not Element.is_valid_symbol(e)]
    if unknown or not elements:
        raise CommandError(f"unknown element(s) in --elements {args.elements!r}: {', '.join(unknown) or 'none given'}")
    if args.potential is not None and args.potential not in POTENTIALS:
        raise CommandError(f"unknown potential {args.potential!r}; choose one of {', '.join(POTENTIALS)}")
    files = []
    if args.candidates is not None:
        if not args.candidates.is_dir():
            raise CommandError(f"--candidates {args.candidates}: not a folder")
        files = sorted(args.candidates.glob("*.cif"))
        if not files:
            raise CommandError(f"--candidates {args.candidates}: no *.cif files")
    structures = [read_structure(f) for f in files]
    for f, s in zip(files, structures):
        outside = {str(el) for el in s.composition.elements} - set(elements)
        if outside:
            raise CommandError(f"{f}: contains {', '.join(sorted(outside))}, not in --elements {args.elements}")

    try:
        hull = HullReference.build(
            elements,
            potential=args.potential,
            dataset=args.dataset,
            split=args.split,
            max_references=args.max_references or None,
            fmax=args.fmax,
            max_steps=args.max_steps,
            device=args.device,
        )
        t_candidates = time.perf_counter()
        points = hull.e_above_hull(structures)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    candidate_time_s = time.perf_counter() - t_candidates

    summary = hull.summary()
    summary["candidates"] = [
        {
            "file": str(f),
            "formula": p.formula,
            "status": p.status,
            "energy_per_atom_eV": p.energy_per_atom,
            "e_above_hull_eV": p.e_above_hull,
            "decomposition": p.decomposition,
            "steps": p.result.steps,
        }
        for f, p in zip(files, points)
    ]
    summary["candidate_time_s"] = candidate_time_s
    summary["wall_time_s"] = time.perf_counter() - t0
    emit(summary, args.json, _text(summary))
    return 0


def _text(summary: dict) -> str:
    def num(x, fmt=".4f"):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"hull {'-'.join(summary['elements'])}  potential {summary['potential']}  "
        f"{summary['n_references']} references ({summary['n_on_hull']} on hull)",
        f"time: references {summary['relax_time_s']:.1f} s" + (" (cached)" if summary["from_cache"] else "")
        + f", candidates {summary['candidate_time_s']:.1f} s, total {summary['wall_time_s']:.1f} s",
        "",
        f"{'reference':<14}{'E/atom eV':>11}{'E_hull eV':>11}  {'on hull':<8}{'status':<15}source",
    ]
    for r in sorted(summary["references"], key=lambda r: (r["formula"], r["e_above_hull_eV"] or 0.0)):
        lines.append(
            f"{r['formula']:<14}{num(r['energy_per_atom_eV']):>11}{num(r['e_above_hull_eV']):>11}  "
            f"{'yes' if r['on_hull'] else '':<8}{r['status']:<15}{r['source']}"
        )
    if summary["candidates"]:
        lines += ["", f"{'candidate':<30}{'formula':<12}{'E/atom eV':>11}{'E_hull eV':>11}  decomposition"]
        for c in summary["candidates"]:
            decomposition = " + ".join(f"{f:.2f} {formula}" for formula, f in c["decomposition"].items())
            status = "" if c["status"] == "converged" else f"  [{c['status']}]"
            lines.append(
                f"{Path(c['file']).name:<30}{c['formula']:<12}{num(c['energy_per_atom_eV']):>11}"
                f"{num(c['e_above_hull_eV']):>11}  {decomposition}{status}"
            )
    return "\n".join(lines)
