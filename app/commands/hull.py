"""`wyckoff-lab hull --elements A,B,C`: an ML convex hull from dataset references, and candidates placed on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wyckoff_lab.app.cli import CommandError, emit
from wyckoff_lab.app.commands.relax import add_progress_flag

# More reference relaxations not yet cached than this need --yes: six elements mean ~400 of them, which run for
# tens of minutes on a CPU.
CONFIRM_ABOVE_UNCACHED = 50


def register(subparsers) -> None:
    p = subparsers.add_parser("hull", help="convex hull of a chemical system with ML energies; e_above_hull of CIFs")
    p.add_argument("--elements", required=True, help="chemical system, e.g. Li,Fe,O or Li-Fe-O")
    p.add_argument("--candidates", type=Path, default=None, help="folder of candidate CIFs to place on the hull")
    p.add_argument("--potential", default=None,
                   help="mattersim, chgnet or sevennet (default: MatterSim if it can be had)")
    p.add_argument("--dataset", default="mp_20", help="dataset whose phases are the references (default mp_20)")
    p.add_argument("--split", default="all", help="dataset split for references (default: all splits)")
    p.add_argument("--max-references", type=int, default=3,
                   help="keep the N lowest-DFT-energy polymorphs per formula (default 3; 0 = all)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="maximum FIRE steps per relaxation (default 500)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--yes", action="store_true",
                   help=f"start even if more than {CONFIRM_ABOVE_UNCACHED} reference relaxations are not cached yet")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time


    from wyckoff_lab.app.commands.relax import check_settings, show_progress
    from wyckoff_lab.app.generator_flags import chemical_system
    from wyckoff_lab.core.pipeline import RelaxBar
    from wyckoff_lab.core.relax import relax_progress
    from wyckoff_lab.core.datasets import dataset_spec
    from wyckoff_lab.core.hull import HullPlan, HullReference
    from wyckoff_lab.core.relax import PotentialError
    from wyckoff_lab.core.structures import StructureInputError, read_input_files

    t0 = time.perf_counter()
    elements = list(chemical_system(args.elements))
    check_settings(args)
    if args.max_references < 0:
        raise CommandError(f"--max-references must be >= 0 (0 = all), not {args.max_references}")
    try:
        dataset_spec(args.dataset).check_split(args.split)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    files, structures, skipped = [], [], []
    if args.candidates is not None:
        if not args.candidates.is_dir():
            raise CommandError(f"--candidates {args.candidates}: not a folder")
        try:
            # The reader `evaluate` uses too: an unreadable CIF is skipped and named, never the end of the run.
            pairs, skipped = read_input_files(args.candidates, (".cif",))
        except StructureInputError as exc:
            raise CommandError(f"--candidates {args.candidates}: {exc}") from None
        files = [args.candidates / name for name, _ in pairs]
        structures = [structure for _, structure in pairs]
    for f, s in zip(files, structures):
        outside = {str(el) for el in s.composition.elements} - set(elements)
        if outside:
            raise CommandError(f"{f}: contains {', '.join(sorted(outside))}, not in --elements {args.elements}")

    def confirm(plan: HullPlan) -> None:
        if plan.n_uncached > CONFIRM_ABOVE_UNCACHED and not args.yes:
            raise CommandError(f"{plan.describe()}; more than {CONFIRM_ABOVE_UNCACHED} new relaxations: pass --yes "
                               "to start them (or fewer elements, or a smaller --max-references)")
        print(plan.describe(), file=sys.stderr)  # stderr: --json keeps stdout to the one JSON object

    bar = RelaxBar(f"{'-'.join(elements)} references", show_progress(args))
    try:
        with relax_progress(bar):  # the references' relaxations, then the candidates', each with its bar
            hull = HullReference.build(
                elements,
                potential=args.potential,
                dataset=args.dataset,
                split=args.split,
                max_references=args.max_references or None,
                fmax=args.fmax,
                max_steps=args.max_steps,
                device=args.device,
                before_relax=confirm,
            )
            bar.close()
            bar.desc = "candidates"
            t_candidates = time.perf_counter()
            points = hull.e_above_hull(structures)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    finally:
        bar.close()
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
    summary["skipped"] = skipped
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
    lines += [f"skipped {f['file']}: {f['reason']}" for f in summary["skipped"]]
    return "\n".join(lines)
