"""`wyckoff-lab bench`: generators side by side on one machine.

`generate`: throughput and sample quality. `sun`: S.U.N. and M.S.U.N. after relaxing every sample with an ML potential
and placing it on an ML hull of MP-20 references. `recover`: how many known, held-out MP-20 structures of a few
ternary systems a generator finds within a sampling budget (the Al-Ca-Cu experiment of Matra-Genoa, Sec. II.C).
`potentials`: each potential's cost per FIRE step and how its own hulls of MP-20 rows agree with MP-20's DFT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from wyckoff_lab.app.cli import CommandError, emit
from wyckoff_lab.app.generator_flags import generator_names, given_options

WARMUP_STRUCTURES = 2  # generated untimed first, so lazy loading (weights, tables, CUDA) is not charged
# Bench key -> key of `metrics.evaluate` (novelty against MP-20 train, distances to MP-20 test).
EVALUATE_KEYS = {"structural_validity": "struct_validity", "bond_consistency": "bond_consistency",
                 "spacegroup_consistency": "sg_consistency", "uniqueness": "uniqueness", "novelty": "novelty",
                 "p1_rate": "p1_rate", "js_distance_spacegroup": "sg_js_distance",
                 "js_distance_wyckoff": "wyckoff_js_distance"}
RATE_KEYS = ("sequence_validity", *EVALUATE_KEYS)  # every per-run value in [0, 1]
# The papers' conventions beside ours (`metrics.evaluate` documents each): both StructureMatcher settings, P1 as
# pymatgen finds it at 0.01 Å, atoms per primitive cell, and what a perfect sampler's JS distances would be.
PROTOCOL_KEYS = {"comp_validity": "comp_validity",
                 "uniqueness_pymatgen_tol": "uniqueness_pymatgen_tol", "uniqueness_adit_tol": "uniqueness_adit_tol",
                 "novelty_pymatgen_tol": "novelty_pymatgen_tol", "novelty_adit_tol": "novelty_adit_tol",
                 "p1_rate_pymatgen": "p1_rate_pymatgen", "num_atoms_wasserstein_primitive": "num_atoms_wasserstein",
                 "density_wasserstein": "density_wasserstein", "js_floor_spacegroup": "sg_js_floor",
                 "js_floor_wyckoff": "wyckoff_js_floor"}


GENERATORS_HELP = "comma-separated registered generators, or 'all' (default)"
# `bench potentials`: core.potential_agreement.BENCH_SYSTEMS (not imported here: registering stays light)
AGREEMENT_SYSTEMS = ("Li-Mn-O", "Li-Fe-O", "Al-Ca-Cu", "Gd-Ge-Pt", "Ba-O-Ti", "Cu-S-Sn", "Mg-N-Si", "Mn-Ni-Sb")


def register(subparsers: argparse._SubParsersAction) -> None:
    from wyckoff_lab.app.generator_flags import add_generator_flags
    bench = subparsers.add_parser("bench", help="benchmark generators on this machine")
    actions = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    p = actions.add_parser("generate", help="valid structures per minute and sample quality of each generator")
    p.add_argument("--n", type=int, default=1000, help="structures requested per generator and temperature")
    p.add_argument("--generators", default="all", help=GENERATORS_HELP)
    p.add_argument("--temperatures", default="0.7,1.0,1.3",
                   help="sampling temperatures (generators without one run once, under '1.0')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--symprec", type=float, default=0.1, help="spglib tolerance in Å (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_generator_flags(p)
    p.set_defaults(func=run_generate)

    p = actions.add_parser("sun", help="S.U.N. / M.S.U.N. rates after ML relaxation and ML hulls")
    p.add_argument("--n", type=int, default=200, help="structures per generator (failed attempts are retried)")
    p.add_argument("--relax", default=None, metavar="POTENTIAL",
                   help="chgnet, sevennet or mattersim, for samples and hull references alike (default: MatterSim "
                        "if it can be had, else CHGNet)")
    p.add_argument("--generators", default="all", help=GENERATORS_HELP)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--stability", choices=["low", "high"], default=None,
                   help="stability token to condition on, for generators that support it (the transformer)")
    p.add_argument("--max-references", type=int, default=3,
                   help="hull references: the N lowest-DFT-energy MP-20 polymorphs per formula (default 3; 0 = all)")
    p.add_argument("--systems", default=None,
                   help="comma-separated chemical systems (e.g. Li-Fe-O,Al-Ca-Cu): condition every generator on "
                        "them, --n split evenly, so only their hulls are built (default: unconditioned samples, a "
                        "hull per system they land in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_generator_flags(p)
    p.set_defaults(func=run_sun)

    p = actions.add_parser("potentials", help="each potential's ms per FIRE step and agreement of its own hulls "
                                              "with MP-20's DFT (stable phases kept, formation-energy differences)")
    p.add_argument("--systems", default=",".join(AGREEMENT_SYSTEMS), help="comma-separated chemical systems")
    p.add_argument("--potentials", default="chgnet,sevennet",
                   help="comma-separated potentials (default chgnet,sevennet)")
    p.add_argument("--max-per-system", type=int, default=None,
                   help="relax a seeded subset of N MP-20 rows per system (its elements always kept; default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_potentials)

    p = actions.add_parser("discover", help="distinct S.U.N. / M.S.U.N. per CPU-hour of each discovery strategy "
                                            "(each generator alone, with the pre-screen, the pooled funnel)")
    p.add_argument("--systems", default=None, help="comma-separated chemical systems (default: the eight of "
                                                   "issue 16, Li-Mn-O,...,Mn-Ni-Sb)")
    p.add_argument("--strategies", default="all", help="comma-separated strategies or 'all'")
    p.add_argument("--budget-min", type=float, default=5.0,
                   help="minutes of full relaxations per strategy and system (default 5)")
    p.add_argument("--samples", type=int, default=50, help="samples per generator (default 50)")
    p.add_argument("--max-steps", type=int, default=None, help="FIRE steps per relaxation (default: the pipeline's)")
    p.add_argument("--potential", default=None, help="potential (default: as relax: MatterSim, else CHGNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_discover)

    p = actions.add_parser("recover", help="known held-out MP-20 structures found within sampling budgets")
    p.add_argument("--systems", default="auto",
                   help="'auto' (held-out ternary systems chosen from MP-20) or comma-separated systems, "
                        "e.g. Al-Ca-Cu,Ga-La-O")
    p.add_argument("--budgets", default="100,500,2000", help="comma-separated sample counts to report at")
    p.add_argument("--generators", default="all", help=GENERATORS_HELP)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--relax", default=None, metavar="POTENTIAL",
                   help="also match each sample of a known formula after a short relaxation with this potential "
                        "(chgnet, sevennet or mattersim; default: no relaxation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for --relax (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_generator_flags(p)
    p.set_defaults(func=run_recover)


def run_generate(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.paths import DataUnavailableError

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    temperatures = _parse_temperatures(args.temperatures)
    names = generator_names(args.generators)
    progress = sys.stderr.isatty()
    generators = load_generators(names, args)
    if _nothing_to_run("generate", generators, args.json):
        return 1
    try:
        train, test_stats = load_references(args.symprec, progress, generators)
    except DataUnavailableError as exc:
        raise CommandError(f"the benchmark needs MP-20 (train for novelty, test for distributions): {exc}") from None

    report: dict = {"machine": machine_info(), "n": args.n, "seed": args.seed, "options": given_options(args),
                    "novelty_reference_size": len(train), "generators": {}}
    for name, generator in generators.items():
        if isinstance(generator, Exception):
            report["generators"][name] = {"error": str(generator)}
            continue
        generator.generate(WARMUP_STRUCTURES, seed=args.seed)
        runs = temperatures if generator.uses_temperature else [1.0]
        report["generators"][name] = {
            str(t): bench_generator(generator, args.n, t, args.seed, train, test_stats, args.symprec)
            for t in runs}
    report["ratios_over_baseline"] = generate_ratios(report["generators"])
    emit(report, args.json, format_report(report))
    return _exit_code("generate", {name: row.get("error") for name, row in report["generators"].items()})


def generate_ratios(rows: dict) -> dict:
    """{"<generator> T=<t>": valid structures per minute / the baseline's, measured in this run}."""
    baseline = _baseline_name(rows)
    if baseline is None or "error" in rows[baseline]:
        return {}
    base = next(iter(rows[baseline].values()))["valid_per_min"]  # a baseline without temperature runs once
    return {f"{name} T={t}": round(row["valid_per_min"] / base, 2) if base else None
            for name, runs in rows.items() if name != baseline and "error" not in runs for t, row in runs.items()}


def _nothing_to_run(benchmark: str, generators: dict, as_json: bool) -> bool:
    """True, after saying why (stderr, and a JSON error object with --json), when no generator loaded: the
    benchmark then stops before loading references or relaxing anything."""
    if not generators or not all(isinstance(g, Exception) for g in generators.values()):
        return False
    message = f"bench {benchmark} ran no generator: " + "; ".join(f"{name}: {exc}" for name, exc in generators.items())
    if as_json:
        print(json.dumps({"error": "NoGeneratorRan", "message": message,
                          "generators": {name: {"error": str(exc)} for name, exc in generators.items()}}))
    print(f"wyckoff-lab: error: {message}", file=sys.stderr)
    return True


def _exit_code(benchmark: str, errors: dict) -> int:
    """0 if every generator asked for ran; otherwise 1, after one stderr line per generator that did not (the
    report alone, JSON or table, exits 0 and reads like a result)."""
    failed = {name: error for name, error in errors.items() if error}
    for name, error in failed.items():
        print(f"wyckoff-lab: error: bench {benchmark}: {name} did not run: {error}", file=sys.stderr)
    return 1 if failed else 0


def load_references(symprec: float, progress: bool, generators: dict):
    """The novelty reference (see `novelty_reference`) and the symmetry statistics of MP-20 test for the
    distribution distances."""
    from wyckoff_lab.app.commands.evaluate import load_reference

    train = novelty_reference(generators, progress)
    _, test_stats = load_reference("mp_20", "test", symprec, progress)
    return train, test_stats


def novelty_reference(generators: dict, progress: bool):
    """MP-20 train, plus the extra rows a loaded transformer was trained on (`--extra-data`): a structure the
    model saw is not novel. Every generator is judged against the same reference."""
    from wyckoff_lab.core.datasets import load_dataset, mp36k_training_rows
    from wyckoff_lab.core.metrics import ReferenceIndex

    structures = list(load_dataset("mp_20", "train", progress=progress).structures)
    extra = {(getattr(g, "metadata", None) or {}).get("train_config", {}).get("extra_data")
             for g in generators.values() if not isinstance(g, Exception)}
    if "mp_36k" in extra:
        structures += mp36k_training_rows(progress=progress).structures
    return ReferenceIndex(structures)


def bench_generator(generator, n: int, temperature: float, seed: int, train, test_stats, symprec: float) -> dict:
    """Time `generate` (sampling and decoding to Structures), then score the sample with `metrics.evaluate`."""
    from tqdm import tqdm

    from wyckoff_lab.core.metrics import evaluate

    bar = tqdm(total=n, desc=f"{generator.name} T={temperature:g}", unit="crystal", file=sys.stderr, disable=None)

    def progress(done, total):
        bar.n = done
        bar.refresh()

    start = time.perf_counter()
    result = generator.generate(n, temperature=temperature, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    bar.close()
    structures = [c.structure for c in result.candidates]
    metrics = evaluate(structures, train, intended_spacegroups=[c.intended_spacegroup for c in result.candidates],
                       symprec=symprec, reference_stats=test_stats, n_attempts=result.attempts)
    # Sequences that decoded into a structure, whether kept or turned down by the generator's quality gate (and
    # sampled again, which the rate per minute pays for).
    decoded = result.attempts - sum(result.failures.values())
    row = {"valid_per_min": round(60 * metrics["n_struct_valid"] / seconds, 1),
           "sequence_validity": round(decoded / result.attempts, 4)}
    for key, source in (EVALUATE_KEYS | PROTOCOL_KEYS).items():
        row[key] = None if metrics[source] is None else round(metrics[source], 4)
    # The fraction of draws the sample keeps: 1 without a gate; below 1, the rates above are of gated samples,
    # which the papers' protocols (every raw sample scored) do not describe: their rows are the ungated run's.
    row["kept_per_draw"] = round(len(structures) / result.attempts, 4) if result.attempts else None
    return row | {"structures": len(structures), "attempts": result.attempts, "seconds": round(seconds, 2),
                  "failures": result.failures, "rejected": result.rejected, "ranked_out": result.ranked_out,
                  "rejection_rate": round(sum(result.rejected.values()) / result.attempts, 4)}


def machine_info() -> dict:
    """What the timings depend on: CPU model, usable cores, torch and its device, Python, OS."""
    info = {"cpu": _cpu_model(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": None, "device": "cpu", "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_generators(names: list[str], args: argparse.Namespace) -> dict:
    """name -> Generator, or the ValueError that loading it raised (an unknown name, or weights not shipped or
    unreadable: ModelLoadError), so that one missing generator is reported without stopping the others. Each gets
    the generator flags given that it declares (e.g. --weights, --oversample for the transformer); a flag that
    no generator of the run declares is refused."""
    from wyckoff_lab.app.generator_flags import check_options_used, generator_kwargs
    from wyckoff_lab.core.generators import get_generator

    check_options_used(names, args)
    generators: dict = {}
    for name in names:
        try:
            generators[name] = get_generator(name, **generator_kwargs(name, args, strict=False))
        except ValueError as exc:
            generators[name] = exc
    return generators


def _baseline_name(rows: dict) -> str | None:
    from wyckoff_lab.core.generators import available_generators, generator_class

    return next((n for n in rows if n in available_generators() and generator_class(n).is_baseline), None)


def baseline_ratios(rows: dict, key: str) -> dict:
    """{generator: its `key` / the baseline's} for every generator beside the run's baseline (the registered
    generator with `is_baseline`, e.g. PyXtal); None where either value is missing or the baseline's is 0."""
    baseline = _baseline_name(rows)
    if baseline is None or "error" in rows[baseline]:
        return {}
    base = rows[baseline].get(key)
    return {name: (row.get(key) / base if row.get(key) is not None and base else None)
            for name, row in rows.items() if name != baseline and "error" not in row}


def _parse_temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CommandError(f"--temperatures takes comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(t) or t <= 0 for t in values):
        raise CommandError(f"--temperatures must be positive numbers, got {text!r}")
    return values


def format_report(report: dict) -> str:
    machine = report["machine"]
    lines = [f"{machine['cpu']} ({machine['cores']} cores), device {machine['device']}, torch {machine['torch']}, "
             f"Python {machine['python']}; n={report['n']} per run, seed {report['seed']}", ""]
    header = ("generator", "T", "valid/min", "seq.val", "struct", "bonds", "SG cons", "unique", "novel", "P1",
              "JS dist SG", "JS dist Wy")
    widths = (20, 5, 10) + (8,) * (len(header) - 5) + (10, 10)
    lines.append(" ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for name, runs in report["generators"].items():
        if "error" in runs:
            lines.append(f"{name.ljust(widths[0])} error: {runs['error']}")
            continue
        for temperature, row in runs.items():
            cells = [f"{row['valid_per_min']:.1f}"] + ["n/a" if row[k] is None else f"{row[k]:.3f}" for k in RATE_KEYS]
            lines.append(" ".join([name.ljust(widths[0]), temperature.ljust(widths[1])]
                                  + [c.rjust(w) for c, w in zip(cells, widths[2:])]))
    lines += ["", *format_protocols(report)]
    baseline = _baseline_name(report["generators"])
    for run, ratio in report.get("ratios_over_baseline", {}).items():
        lines.append(f"valid/min of {run} over {baseline}: {'n/a' if ratio is None else f'{ratio:.2f}x'}")
    return "\n".join(lines)


def format_protocols(report: dict) -> list[str]:
    """The papers' conventions beside ours, one line per run: kept/draw says whether a quality gate resampled (the
    papers score every raw sample, so their comparison is a run without the gate); uniqueness and novelty under
    pymatgen's default matcher and ADiT's (stol 0.5, angle_tol 10, ltol 0.3); P1 at the run's symprec (first
    table) and as pymatgen finds it at 0.01 Å; Wasserstein distances of atoms per primitive cell and density; the
    JS distances a perfect sampler of MP-20 test would score at this n (the first table's JS distances' floor)."""
    header = ("generator", "T", "kept/draw", "SMACT", "uniq pmg", "uniq ADiT", "nov pmg", "nov ADiT", "P1 0.01",
              "W1 atoms", "W1 dens", "JS SG floor", "JS Wy floor")
    keys = ("kept_per_draw", "comp_validity", "uniqueness_pymatgen_tol", "uniqueness_adit_tol",
            "novelty_pymatgen_tol", "novelty_adit_tol", "p1_rate_pymatgen", "num_atoms_wasserstein_primitive",
            "density_wasserstein", "js_floor_spacegroup", "js_floor_wyckoff")
    widths = (20, 5) + (9,) * (len(header) - 4) + (12, 12)
    lines = ["papers' conventions:",
             " ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for name, runs in report["generators"].items():
        if "error" in runs:
            continue
        for temperature, row in runs.items():
            cells = ["n/a" if row.get(k) is None else f"{row[k]:.3f}" for k in keys]
            lines.append(" ".join([name.ljust(widths[0]), temperature.ljust(widths[1])]
                                  + [c.rjust(w) for c, w in zip(cells, widths[2:])]))
    return lines


# -- bench sun -------------------------------------------------------------------------------------------------------


def run_sun(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.pipeline import HullBook
    from wyckoff_lab.core.paths import DataUnavailableError
    from wyckoff_lab.core.relax import PotentialError, resolve_potential

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise CommandError(f"--temperature must be a positive number, got {args.temperature}")
    if args.max_references < 0:
        raise CommandError(f"--max-references must be 0 (all) or more, got {args.max_references}")
    systems = _parse_systems(args.systems) if args.systems else [None]
    if len(systems) > args.n:
        raise CommandError(f"--n {args.n} is fewer than the {len(systems)} systems asked for")
    names = generator_names(args.generators)
    progress = sys.stderr.isatty()
    try:
        potential = resolve_potential(args.relax, args.device)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    generators = load_generators(names, args)
    if _nothing_to_run("sun", generators, args.json):
        return 1
    try:  # before any relaxation, so a missing dataset fails fast
        train = novelty_reference(generators, progress)
    except DataUnavailableError as exc:
        raise CommandError(f"S.U.N. needs MP-20 (train for novelty, all splits for hulls): {exc}") from None

    book = HullBook(potential, args.max_references or None)  # the candidates' relaxation settings, too
    report: dict = {"machine": machine_info(), "n": args.n, "potential": potential.name,
                    "potential_identity": potential.identity, "temperature": args.temperature,
                    "stability": args.stability, "options": given_options(args),
                    "max_references": args.max_references, "seed": args.seed,
                    "systems": None if systems == [None] else systems, "novelty_reference_size": len(train),
                    "generators": {}}
    for name, generator in generators.items():
        if isinstance(generator, Exception):
            report["generators"][name] = {"error": str(generator)}
            continue
        report["generators"][name] = sun_of_generator(generator, args, systems, book, train, progress)
    report["ratios_over_baseline"] = {rate: baseline_ratios(report["generators"], rate)
                                      for rate in ("sun_rate", "msun_rate")}
    report |= book.as_dict()
    report = _strict(report)
    emit(report, args.json, format_sun(report))
    return _exit_code("sun", {name: row.get("error") for name, row in report["generators"].items()})


def sun_of_generator(generator, args: argparse.Namespace, systems: list[str | None], book, train,
                     progress: bool) -> dict:
    """Sample (args.n split evenly over `systems`, None meaning unconditioned), relax every structure, place it on
    its system's hull from `book`, then count S.U.N. and its kin under each protocol (`core.pipeline`).

    The stability condition goes only to generators that honour it: PyXtal has no such control, and refusing the
    whole run for it would leave the baseline out.
    """
    from wyckoff_lab.core.benchmarks import merge_samples, sample_structures
    from wyckoff_lab.core.generators import Conditions
    from wyckoff_lab.core.pipeline import relax_and_place, sun_summary

    stability = args.stability if "stability" in generator.supported_conditions else None
    shares = [args.n // len(systems) + (i < args.n % len(systems)) for i in range(len(systems))]
    samples = [sample_structures(generator, share, Conditions(elements=tuple(system.split("-")) if system else None,
                                                             stability=stability),
                                 args.temperature, args.seed, progress,
                                 desc=f"{generator.name} sampling {system or ''}")
               for system, share in zip(systems, shares)]
    sample = merge_samples(samples)
    placed = relax_and_place([c.structure for c in sample.candidates], book, progress,
                             desc=f"{generator.name} relaxing")
    return {"stability_condition": stability, "requested": sample.requested, "structures": len(sample.candidates),
            "attempts": sample.attempts, "generation_failures": sample.failures,
            "generation_s": round(sample.seconds, 2)} | placed.as_dict() | sun_summary(
        placed.structures, placed.e_above_hull, train).as_dict()


def _strict(value):
    """NaN and infinities become None, so `--json` prints strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def format_sun(report: dict) -> str:
    def pct(row, rate, count):
        return "n/a" if row[rate] is None else f"{100 * row[rate]:.1f}% ({row[count]})"

    def ev(x):
        return "n/a" if x is None else f"{x:.3f}"

    machine = report["machine"]
    lines = [f"{machine['cpu']} ({machine['cores']} cores), device {machine['device']}; potential "
             f"{report['potential']}, n={report['n']} per generator, T={report['temperature']:g}, stability "
             f"{report['stability'] or 'not conditioned'}, seed {report['seed']}", ""]
    header = ("generator", "n", "relaxed", "conv.", "S.U.N.", "M.S.U.N.", "E_hull mean", "median", "relax s",
              "hull s")
    widths = (20, 5, 8, 6, 14, 14, 12, 8, 9, 9)
    lines.append(" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for name, row in report["generators"].items():
        if "error" in row:
            lines.append(f"{name.ljust(widths[0])} error: {row['error']}")
            continue
        cells = [str(row["structures"]), str(row["relaxed"]), str(row["converged"]),
                 pct(row, "sun_rate", "n_sun"), pct(row, "msun_rate", "n_msun"), ev(row["e_above_hull_mean"]),
                 ev(row["e_above_hull_median"]), f"{row['relax_s']:.1f}", f"{row['hull_s']:.1f}"]
        lines.append(" ".join([name.ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells, widths[1:])]))
    lines.append("")
    for name, row in report["generators"].items():
        if "error" in row:
            continue
        failures = f" (failed: {row['generation_failures']})" if row["generation_failures"] else ""
        lines.append(f"{name}: {row['attempts']} attempts for {row['structures']} structures{failures}; "
                     f"relaxations {row['relax_status']}; {row['hull_failed']} left without a hull; "
                     f"{row['hull_systems']} chemical systems")
        within = ", ".join(f"< {t} eV/atom: {k}" for t, k in row["n_sun_within_ev"].items())
        lines.append(f"  S.U.N. by threshold: {within}")
        protocols = ", ".join(f"{p['label']} {p['n']}" for p in row["sun_protocols"].values())
        lines.append(f"  by protocol (of {row['structures']}): {protocols}")
        for system, reason in row["hull_failures"].items():
            lines.append(f"  no hull for {system}: {reason}")
    baseline = _baseline_name(report["generators"])
    for label, key in (("S.U.N.", "sun_rate"), ("M.S.U.N.", "msun_rate")):
        for name, ratio in report["ratios_over_baseline"].get(key, {}).items():
            lines.append(f"{label} ratio {name} / {baseline}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    lines.append("S.U.N.: relaxed, valid, unique, novel vs MP-20 train, >= 2 elements, E_hull <= 0 eV/atom; M.S.U.N.: "
                 "the same below 0.1 eV/atom")
    lines.append(f"{report['hull_systems']} hulls ({report['hull_systems_from_cache']} from cache) in "
                 f"{report['hull_total_s']:.1f} s")
    return "\n".join(lines)


# -- bench recover ---------------------------------------------------------------------------------------------------


def run_potentials(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.paths import DataUnavailableError
    from wyckoff_lab.core.potential_agreement import benchmark, format_table
    from wyckoff_lab.core.relax import POTENTIALS

    names = list(dict.fromkeys(n.strip() for n in args.potentials.split(",") if n.strip()))
    unknown = [n for n in names if n not in POTENTIALS]
    if not names or unknown:
        raise CommandError(f"--potentials takes comma-separated names from {', '.join(POTENTIALS)}, got "
                           f"{args.potentials!r}")
    if args.max_per_system is not None and args.max_per_system < 1:
        raise CommandError(f"--max-per-system must be at least 1, got {args.max_per_system}")
    try:
        report = benchmark(names, _parse_systems(args.systems), args.max_per_system, args.seed, args.device,
                           progress=sys.stderr.isatty())
    except DataUnavailableError as exc:
        raise CommandError(f"bench potentials needs MP-20 (all splits): {exc}") from None
    report = _strict({"machine": machine_info()} | report)
    emit(report, args.json, format_table(report))
    return _exit_code("potentials", {name: row.get("error") for name, row in report["potentials"].items()})


def run_discover(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.discover_bench import DEFAULT_SYSTEMS, STRATEGIES, benchmark, format_table
    from wyckoff_lab.core.generators import get_generator
    from wyckoff_lab.core.relax import PotentialError, resolve_potential

    strategies = list(STRATEGIES) if args.strategies == "all" else \
        list(dict.fromkeys(s.strip() for s in args.strategies.split(",") if s.strip()))
    unknown = [s for s in strategies if s not in STRATEGIES]
    if not strategies or unknown:
        raise CommandError(f"--strategies takes 'all' or names from {', '.join(STRATEGIES)}, got {args.strategies!r}")
    if not args.budget_min > 0 or args.samples < 1:
        raise CommandError("--budget-min must be > 0 and --samples >= 1")
    systems = [s.split("-") for s in _parse_systems(args.systems or ",".join(DEFAULT_SYSTEMS))]
    try:
        potential = resolve_potential(args.potential, args.device)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    names = {n for s in strategies for n in (STRATEGIES[s][0] or ("wyckoff-transformer", "pyxtal", "substitution"))}
    generators = {name: get_generator(name) for name in sorted(names)}
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if sys.stderr.isatty() else (lambda m: None)
    report = benchmark(systems, strategies, args.budget_min, args.samples, args.seed, potential, generators,
                       args.max_steps, progress=say)
    report = _strict({"machine": machine_info()} | report)
    emit(report, args.json, format_table(report))
    return 0


def run_recover(args: argparse.Namespace) -> int:
    import pandas as pd

    from wyckoff_lab.core.benchmarks import (
        AUTO_SELECTION_RULE,
        MAX_AUTO_SYSTEMS,
        RECOVER_RELAX_STEPS,
        known_structures,
        recovery_table,
        select_held_out_systems,
    )
    from wyckoff_lab.core.datasets import load_dataset, mp20_train_systems
    from wyckoff_lab.core.paths import DataUnavailableError
    from wyckoff_lab.core.relax import PotentialError, resolve_potential

    budgets = _parse_budgets(args.budgets)
    names = generator_names(args.generators)
    auto = args.systems.strip() == "auto"
    systems = None if auto else _parse_systems(args.systems)
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise CommandError(f"--temperature must be a positive number, got {args.temperature}")
    progress = sys.stderr.isatty()
    try:
        potential = resolve_potential(args.relax, args.device) if args.relax else None
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    try:
        held_out = [load_dataset("mp_20", split, progress=progress) for split in ("val", "test")]
        train_systems = mp20_train_systems()
    except DataUnavailableError as exc:
        raise CommandError(f"the recovery benchmark needs MP-20 (val and test hold the known structures): "
                           f"{exc}") from None
    if auto:
        systems = select_held_out_systems(pd.concat([d.frame for d in held_out]), train_systems)
        selection = AUTO_SELECTION_RULE.format(limit=MAX_AUTO_SYSTEMS)
    else:
        selection = "given with --systems"
    known = {system: known_structures(system, held_out) for system in systems}
    empty = [system for system, (structures, _) in known.items() if not structures]
    if empty:
        raise CommandError(f"no MP-20 val/test structure in {', '.join(empty)}: nothing to recover")

    generators = load_generators(names, args)
    report: dict = {"machine": machine_info(), "budgets": budgets, "temperature": args.temperature,
                    "seed": args.seed, "relax": potential.name if potential else None,
                    "relax_steps": RECOVER_RELAX_STEPS if potential else None, "selection": selection,
                    "systems": {}}
    for system in systems:
        structures, rows = known[system]
        entries = {}
        for name, generator in generators.items():
            if isinstance(generator, Exception):
                entries[name] = {"known": len(structures), "error": str(generator)}
            else:
                entries[name] = recover_with(generator, system, structures, budgets, args, potential, progress)
        report["systems"][system] = {"known": len(structures), "held_out_rows": rows,
                                     "in_train": system in train_systems,
                                     "known_structures": [k.describe() for k in structures], "generators": entries}
    report["totals"] = _recovery_totals(report["systems"], names, budgets)
    report["table"] = recovery_table(report["systems"], names, budgets, report["totals"])
    emit(report, args.json, format_recover(report))
    # A generator refused on some systems (an element it never saw) still ran; one refused on all did not.
    return _exit_code("recover", {name: "; ".join(dict.fromkeys(
        report["systems"][system]["generators"][name]["error"] for system in total["failed_systems"]))
        for name, total in report["totals"].items() if len(total["failed_systems"]) == len(systems)})


def recover_with(generator, system: str, known, budgets: list[int], args: argparse.Namespace, potential,
                 progress: bool) -> dict:
    """Sample max(budgets) structures of one chemical system and find the known structures among them.

    With a potential, samples whose reduced formula is a known one are also tried after a short relaxation; the
    formula filter keeps that to a small share of the samples.
    """
    from wyckoff_lab.core.benchmarks import RECOVER_RELAX_STEPS, count_within, first_matches, sample_structures
    from wyckoff_lab.core.generators import Conditions
    from wyckoff_lab.core.pipeline import relax_candidates

    try:
        sample = sample_structures(generator, max(budgets), Conditions(elements=tuple(system.split("-"))),
                                   args.temperature, args.seed, progress, desc=f"{generator.name} {system}")
    except ValueError as exc:  # a condition the generator cannot honour (e.g. an element it never saw)
        return {"known": len(known), "error": str(exc)}
    structures = [c.structure for c in sample.candidates]
    formulas = {k.formula for k in known}
    # Samples of a known formula: the only ones that can match, so the only ones worth relaxing.
    chosen = [i for i, s in enumerate(structures) if s.composition.reduced_formula in formulas]
    forms = [[structure] for structure in structures]
    entry: dict = {}
    if potential is not None:
        relaxation = relax_candidates([structures[i] for i in chosen], potential, max_steps=RECOVER_RELAX_STEPS,
                                      progress=progress, desc=f"{generator.name} {system} relaxing")
        for i, result, usable in zip(chosen, relaxation.results, relaxation.usable):
            if usable:
                forms[i].append(result.final)
        entry = relaxation.as_dict()
    start = time.perf_counter()
    first = first_matches(forms, known)
    return {"known": len(known), "recovered": count_within(first, budgets),
            "first_match_sample": {k.material_id: None if f is None else f + 1 for k, f in zip(known, first)},
            "known_formula_samples": count_within(chosen, budgets),
            "structures": len(structures), "attempts": sample.attempts, "failures": sample.failures,
            "sampling_s": round(sample.seconds, 2), "matching_s": round(time.perf_counter() - start, 2)} | entry


def _recovery_totals(systems: dict, names: list[str], budgets: list[int]) -> dict:
    """Per generator: known and recovered summed over the systems it ran on (failed systems are listed)."""
    totals = {}
    for name in names:
        entries = {system: data["generators"][name] for system, data in systems.items()}
        ran = [e for e in entries.values() if "error" not in e]
        totals[name] = {"known": sum(e["known"] for e in ran),
                        "recovered": {str(b): sum(e["recovered"][str(b)] for e in ran) for b in budgets},
                        "failed_systems": [system for system, e in entries.items() if "error" in e]}
    return totals


def _parse_budgets(text: str) -> list[int]:
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise CommandError(f"--budgets takes comma-separated whole numbers, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise CommandError(f"--budgets must be positive whole numbers, got {text!r}")
    return budgets


def _parse_systems(text: str) -> list[str]:
    """'Al-Ca-Cu,Ga-La-O' or 'Al,Ca,Cu; Ga,La,O' -> ['Al-Ca-Cu', 'Ga-La-O'] (elements sorted as MP-20 writes
    chemsys)."""
    from wyckoff_lab.app.generator_flags import chemical_systems

    return list(dict.fromkeys("-".join(sorted(system)) for system in chemical_systems(text, "--systems")))


def format_recover(report: dict) -> str:
    lines = [f"budgets {', '.join(map(str, report['budgets']))}; T={report['temperature']:g}, seed {report['seed']}; "
             f"systems: {report['selection']}"]
    if report["relax"]:
        lines.append(f"samples of a known formula also matched after {report['relax_steps']} FIRE steps with "
                     f"{report['relax']}")
    lines += ["", report["table"]]
    for system, data in report["systems"].items():
        for name, entry in data["generators"].items():
            if "error" in entry:
                lines.append(f"{name} on {system}: {entry['error']}")
    return "\n".join(lines)
