"""Re-measure issue 17's relaxation figures: Al-Ca-Cu candidates of the shipped Wyckoff transformer relaxed with CHGNet
as the app relaxes them, free and under FixSymmetry; how many change space group, converge, and converge above fmax.

Run: WYCKOFF_LAB_DATA=... OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tests/remeasure_relax_symmetry.py [--n 100]
[--out figures.json]. Relaxations go to a fresh cache folder (nothing reused from earlier runs) unless --cache names
one. The figures are printed as JSON; the README quotes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

SYSTEM = ["Al", "Ca", "Cu"]


def generate(n: int, seed: int):
    """n candidates as the app's Generate panel makes them: the panel's request (Al-Ca-Cu, its default max atoms,
    temperature 1, no stability token, the generator's default options), one worker (the transformer is not
    parallel-safe), the shared charge-balance / quality resampler."""
    from wyckoff_lab.core.generators import get_generator
    from wyckoff_lab.widgets.chemistry import DEFAULT_MAX_ATOMS
    from wyckoff_lab.widgets.generate import request_for
    from wyckoff_lab.widgets.jobs import conditions_for, configured_generator, generate_in_workers

    request = request_for("wyckoff-transformer", n, {"elements": SYSTEM, "max_atoms": DEFAULT_MAX_ATOMS}, {}, 1.0,
                          seed, "", {}, False)
    generator = configured_generator(get_generator("wyckoff-transformer"), request.options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generate_in_workers(generator, n, conditions_for(request), request.temperature, request.seed, 1,
                                   lambda done, total: None)


def operations_per_atom(structure, symprec: float) -> float:
    """Symmetry operations per atom of the primitive cell (point-group order / atoms in the primitive cell), with
    the tolerances of the space-group numbers compared (pymatgen's SpacegroupAnalyzer, as
    `records.spacegroup_number`): for the same atoms, a supergroup has more, a subgroup fewer. 0 where spglib
    finds no dataset. The primitive cell, because a given cell may not be invariant under every operation (a
    tetragonal cell of a cubic crystal), and spglib then leaves those out."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        primitive = SpacegroupAnalyzer(structure, symprec=symprec).find_primitive()
        rotations = SpacegroupAnalyzer(primitive, symprec=symprec).get_symmetry_dataset().rotations
    except Exception:  # no dataset for a degenerate cell
        return 0.0
    return len(rotations) / len(primitive)


def relax_and_count(candidates, potential, fix_symmetry: bool) -> dict:
    """Relax the candidates as the app's "Relax all" does (its fmax and max steps, the cell as generated) and count:
    statuses, space group changed (spglib at SYMPREC, generated vs relaxed), converged above fmax."""
    from pymatgen.core import Structure

    from wyckoff_lab.core.pipeline import relax_candidates
    from wyckoff_lab.widgets.context import LabSettings
    from wyckoff_lab.widgets.jobs import USABLE
    from wyckoff_lab.widgets.records import SYMPREC, relaxed_spacegroup, spacegroup_number

    settings = LabSettings()
    structures = [Structure.from_dict(c.structure.as_dict()) for c in candidates]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        relaxation = relax_candidates(structures, potential, settings.relax_fmax, settings.relax_max_steps,
                                      primitive=False, fix_symmetry=fix_symmetry, progress=True,
                                      desc="relaxing (symmetry kept)" if fix_symmetry else "relaxing (free)")
    seconds = time.perf_counter() - started
    changes, direction, forces_above = Counter(), Counter(), []
    changed = usable = 0
    for candidate, result in zip(candidates, relaxation.results):
        if result.status not in USABLE:
            continue
        usable += 1
        before = candidate.spacegroup_at(SYMPREC)
        if before is None:
            before = spacegroup_number(candidate.structure)
        after = relaxed_spacegroup(result.final)
        if after != before:
            changed += 1
            changes[f"{before} -> {after}"] += 1
            # more symmetry operations per atom: a supergroup; fewer: a subgroup
            ratio = operations_per_atom(result.final, SYMPREC) / max(
                operations_per_atom(candidate.structure, SYMPREC), 1e-9)
            gained, lost = ratio > 1 + 1e-6, ratio < 1 - 1e-6
            direction["gained symmetry"] += gained
            direction["lost symmetry"] += lost
            direction["same number of operations"] += not (gained or lost)
        if result.status == "converged" and math.isfinite(result.max_force) and result.max_force > settings.relax_fmax:
            forces_above.append(round(result.max_force, 4))
    statuses = Counter(r.status for r in relaxation.results)
    converged_forces = [r.max_force for r in relaxation.results if r.status == "converged"]
    return {
        "fix_symmetry": fix_symmetry, "fmax": settings.relax_fmax, "max_steps": settings.relax_max_steps,
        "symprec": SYMPREC, "relaxed": len(relaxation.results), "usable": usable, "statuses": dict(statuses),
        "spacegroup_changed": changed, "changes": dict(changes.most_common()),
        "change_direction": dict(direction),
        "converged_above_fmax": len(forces_above), "converged_above_fmax_forces": sorted(forces_above),
        "converged_max_force_max": round(max(converged_forces), 4) if converged_forces else None,
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="relaxation cache folder (default: a fresh temporary one)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--modes", default="free,kept",
                        help="relaxations to run: free (no constraint) and/or kept (FixSymmetry), comma-separated")
    args = parser.parse_args(argv)
    os.environ["WYCKOFF_LAB_CACHE"] = args.cache or tempfile.mkdtemp(prefix="wl-remeasure-cache-")

    from wyckoff_lab.core.relax import load_potential
    from wyckoff_lab.widgets.records import SYMPREC

    started = time.perf_counter()
    generation = generate(args.n, args.seed)
    candidates = generation.candidates
    print(f"generated {len(candidates)} candidates in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    potential = load_potential("chgnet", "cpu")
    figures = {"system": "-".join(SYSTEM), "generator": "wyckoff-transformer", "seed": args.seed,
               "asked": args.n, "generated": len(candidates),
               "generated_spacegroups": dict(Counter(c.spacegroup_at(SYMPREC) for c in candidates).most_common()),
               # the same seed gives the same candidates: runs in separate processes can be compared through this
               "candidates_digest": hashlib.sha256(json.dumps([c.structure.as_dict() for c in candidates],
                                                              sort_keys=True).encode()).hexdigest()[:16],
               "runs": []}
    modes = {"free": False, "kept": True}
    for fix_symmetry in [modes[m.strip()] for m in args.modes.split(",")]:
        figures["runs"].append(relax_and_count(candidates, potential, fix_symmetry))
        print(json.dumps(figures["runs"][-1]), file=sys.stderr, flush=True)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(figures, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return figures


if __name__ == "__main__":
    main()
