"""`wyckoff-lab represent`: show a structure's Wyckoff form, check invertibility on a dataset, regenerate tables."""

from __future__ import annotations

from wyckoff_lab.app.cli import positive_float


def register(subparsers) -> None:
    parser = subparsers.add_parser("represent", help="the Wyckoff representation of crystals")
    sub = parser.add_subparsers(dest="represent_command", metavar="ACTION", required=True)

    roundtrip = sub.add_parser("roundtrip", help="Structure -> Wyckoff -> Structure match rate on a dataset split")
    roundtrip.add_argument("--dataset", default="mp_20")
    roundtrip.add_argument("--split", default="test")
    roundtrip.add_argument("--limit", type=int, default=None, help="first N rows only")
    roundtrip.add_argument("--symprec", type=positive_float, default=0.1, help="spglib tolerance in Å (default 0.1)")
    roundtrip.add_argument("--processes", type=int, default=None)
    roundtrip.add_argument("--json", action="store_true")
    roundtrip.set_defaults(func=_roundtrip)

    show = sub.add_parser("show", help="print the Wyckoff representation of a CIF")
    show.add_argument("file")
    show.add_argument("--symprec", type=positive_float, default=0.1)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    tabulate = sub.add_parser("tabulate", help="regenerate the shipped space-group tables from pyxtal")
    tabulate.add_argument("--out", default=None, help="write here instead of the package resource")
    tabulate.add_argument("--json", action="store_true")
    tabulate.set_defaults(func=_tabulate)


def _roundtrip(args) -> int:
    from collections import Counter

    from wyckoff_lab.app.cli import emit
    from wyckoff_lab.core.datasets import load_dataset
    from wyckoff_lab.core.wyckoff import roundtrip_failures

    dataset = load_dataset(args.dataset, args.split, progress=not args.json)
    structures = dataset.structures[: args.limit] if args.limit else dataset.structures
    reasons = roundtrip_failures(structures, args.symprec, args.processes, progress=not args.json)
    failures = Counter(r for r in reasons if r is not None)
    if not args.limit:
        # Rows the loader could not parse count against the rate: nothing is silently dropped.
        failures.update({f"load_{reason}": n for reason, n in dataset.failures.items() if n})
    n = len(structures) + (0 if args.limit else sum(dataset.failures.values()))
    matched = reasons.count(None)
    result = {"dataset": args.dataset, "split": args.split, "symprec": args.symprec, "n": n, "matched": matched,
              "rate": matched / n if n else 0.0, "failures": dict(failures)}
    text = (f"{args.dataset}/{args.split}: {matched}/{n} round-trip matches ({result['rate']:.2%}); failures: "
            + (", ".join(f"{k}={v}" for k, v in failures.items()) or "none"))
    emit(result, args.json, text)
    return 0


def _show(args) -> int:
    from wyckoff_lab.app.cli import CommandError, emit
    from wyckoff_lab.core.structures import read_structure
    from wyckoff_lab.core.wyckoff import WyckoffCrystal, WyckoffError

    structure = read_structure(args.file)
    try:
        crystal = WyckoffCrystal.from_structure(structure, symprec=args.symprec)
    except WyckoffError as exc:
        raise CommandError(f"{args.file}: {exc}") from None
    group = crystal.group
    lines = [f"{crystal.composition.reduced_formula}: space group {crystal.spacegroup} ({group.symbol}, "
             f"{group.crystal_system}), {crystal.num_sites} atoms in the conventional cell",
             "lattice " + " ".join(f"{v:.4f}" for v in crystal.lattice)
             + f"  (free: {', '.join(group.lattice_family.free_parameters)})"]
    for orbit in crystal.orbits:
        params = ", ".join(f"{n}={v:.4f}" for n, v in zip(orbit.position.free_parameter_names, orbit.free_params))
        lines.append(f"  {orbit.element:>2} {orbit.label:>4} {orbit.position.site_symmetry:>8}  {params}")
    emit(crystal.as_dict(), args.json, "\n".join(lines))
    return 0


def _tabulate(args) -> int:
    from wyckoff_lab.app.cli import emit
    from wyckoff_lab.core import symmetry

    symmetry.write_resource(args.out)
    symmetry._tables.cache_clear()
    symmetry.orbit_vocabulary.cache_clear()
    n_positions = sum(len(g.wyckoff_positions) for g in symmetry.all_spacegroups()) if not args.out else None
    result = {"written": str(args.out or symmetry.RESOURCE), "wyckoff_positions": n_positions,
              "orbit_tokens": len(symmetry.orbit_vocabulary()) if not args.out else None}
    emit(result, args.json)
    return 0
