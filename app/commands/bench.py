"""`wyckoff-lab bench`: generators side by side on one machine.

`generate`: throughput and sample quality. `sun`: S.U.N. and M.S.U.N. after relaxing every sample with an ML potential
and placing it on an ML hull of MP-20 references. `recover`: how many known, held-out MP-20 structures of a few
ternary systems a generator finds within a sampling budget (the Al-Ca-Cu experiment of Matra-Genoa, Sec. II.C).
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

TRANSFORMER, PYXTAL = "wyckoff-transformer", "pyxtal"
WARMUP_STRUCTURES = 2  # generated untimed first, so lazy loading (weights, tables, CUDA) is not charged
# Bench key -> key of `metrics.evaluate` (novelty against MP-20 train, distances to MP-20 test).
EVALUATE_KEYS = {"structural_validity": "struct_validity", "bond_consistency": "bond_consistency",
                 "spacegroup_consistency": "sg_consistency", "uniqueness": "uniqueness", "novelty": "novelty",
                 "p1_rate": "p1_rate", "jsd_spacegroup": "sg_jsd", "jsd_wyckoff": "wyckoff_jsd"}
RATE_KEYS = ("sequence_validity", *EVALUATE_KEYS)  # every per-run value in [0, 1]


WEIGHTS_HELP = "Wyckoff transformer weights folder (default: the shipped assets/models/wyckoff_transformer)"
OVERSAMPLE_HELP = ("the transformer draws K times the structures asked for and keeps those the model finds most "
                   "likely per token (default 1: no ranking)")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmark generators on this machine")
    actions = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    p = actions.add_parser("generate", help="valid structures per minute and sample quality of each generator")
    p.add_argument("--n", type=int, default=1000, help="structures requested per generator and temperature")
    p.add_argument("--generators", default="wyckoff-transformer,pyxtal", help="comma-separated generator names")
    p.add_argument("--temperatures", default="0.7,1.0,1.3",
                   help="sampling temperatures (generators without one run once, under '1.0')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--symprec", type=float, default=0.1, help="spglib tolerance in Å (default 0.1)")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--oversample", type=int, default=1, metavar="K", help=OVERSAMPLE_HELP)
    p.add_argument("--no-resample", action="store_true",
                   help="the transformer without its quality gate (no resampling of structures with sites closer "
                        "than 0.7 Å or a space group other than the sampled one): the raw model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_generate)

    p = actions.add_parser("sun", help="S.U.N. / M.S.U.N. rates after ML relaxation and ML hulls")
    p.add_argument("--n", type=int, default=200, help="structures per generator (failed attempts are retried)")
    p.add_argument("--relax", default=None, metavar="POTENTIAL",
                   help="chgnet or mattersim, for samples and hull references alike (default: MatterSim if it "
                        "can be had, else CHGNet)")
    p.add_argument("--generators", default="wyckoff-transformer,pyxtal", help="comma-separated generator names")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--oversample", type=int, default=1, metavar="K", help=OVERSAMPLE_HELP)
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
    p.set_defaults(func=run_sun)

    p = actions.add_parser("recover", help="known held-out MP-20 structures found within sampling budgets")
    p.add_argument("--systems", default="auto",
                   help="'auto' (held-out ternary systems chosen from MP-20) or comma-separated systems, "
                        "e.g. Al-Ca-Cu,Ga-La-O")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--oversample", type=int, default=1, metavar="K", help=OVERSAMPLE_HELP)
    p.add_argument("--budgets", default="100,500,2000", help="comma-separated sample counts to report at")
    p.add_argument("--generators", default="wyckoff-transformer,pyxtal", help="comma-separated generator names")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--relax", default=None, metavar="POTENTIAL",
                   help="also match each sample of a known formula after a short relaxation with this potential "
                        "(chgnet or mattersim; default: no relaxation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for --relax (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_recover)


def run_generate(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.paths import DataUnavailableError

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    temperatures = _parse_temperatures(args.temperatures)
    names = _parse_names(args.generators)
    progress = sys.stderr.isatty()
    generators = load_generators(names, raw_transformer=args.no_resample, weights=args.weights,
                                 oversample=args.oversample)
    if _nothing_to_run("generate", generators, args.json):
        return 1
    try:
        train, test_stats = load_references(args.symprec, progress, generators)
    except DataUnavailableError as exc:
        raise CommandError(f"the benchmark needs MP-20 (train for novelty, test for distributions): {exc}") from None

    report: dict = {"machine": machine_info(), "n": args.n, "seed": args.seed, "resample": not args.no_resample,
                    "oversample": args.oversample,
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
    emit(report, args.json, format_report(report))
    return _exit_code("generate", {name: row.get("error") for name, row in report["generators"].items()})


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
                       symprec=symprec, reference_stats=test_stats)
    # Sequences that decoded into a structure, whether kept or turned down by the generator's quality gate (and
    # sampled again, which the rate per minute pays for).
    decoded = result.attempts - sum(result.failures.values())
    row = {"valid_per_min": round(60 * metrics["n_struct_valid"] / seconds, 1),
           "sequence_validity": round(decoded / result.attempts, 4)}
    for key, source in EVALUATE_KEYS.items():
        row[key] = None if metrics[source] is None else round(metrics[source], 4)
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


def load_generators(names: list[str], raw_transformer: bool = False, weights: str | None = None,
                    oversample: int = 1) -> dict:
    """name -> Generator, or the ValueError that loading it raised (an unknown name, or weights not shipped or
    unreadable: ModelLoadError), so that one missing generator is reported without stopping the others.
    `weights` is a transformer weights folder other than the shipped one (e.g. a run's `best/`); `oversample` the
    likelihood ranking (`Generator.ranked`) of every generator that has one; the others run as they are."""
    from wyckoff_lab.core.generators import get_generator

    if oversample < 1:
        raise CommandError(f"--oversample must be at least 1, got {oversample}")
    generators: dict = {}
    for name in names:
        options = {}
        if name == TRANSFORMER:
            options = ({"resample": False} if raw_transformer else {}) | ({"weights": weights} if weights else {})
        try:
            generator = get_generator(name, **options)
            generators[name] = generator.ranked(oversample) if generator.ranks_by_likelihood else generator
        except ValueError as exc:
            generators[name] = exc
    return generators


def _parse_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CommandError("--generators names no generator")
    return names


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
              "JSD SG", "JSD Wyck")
    widths = (20, 5, 10) + (8,) * (len(header) - 3)
    lines.append(" ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for name, runs in report["generators"].items():
        if "error" in runs:
            lines.append(f"{name.ljust(widths[0])} error: {runs['error']}")
            continue
        for temperature, row in runs.items():
            cells = [f"{row['valid_per_min']:.1f}"] + ["n/a" if row[k] is None else f"{row[k]:.3f}" for k in RATE_KEYS]
            lines.append(" ".join([name.ljust(widths[0]), temperature.ljust(widths[1])]
                                  + [c.rjust(w) for c, w in zip(cells, widths[2:])]))
    return "\n".join(lines)


# -- bench sun -------------------------------------------------------------------------------------------------------


def run_sun(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.benchmarks import HullBook
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
    names = _parse_names(args.generators)
    progress = sys.stderr.isatty()
    try:
        potential = resolve_potential(args.relax, args.device)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    generators = load_generators(names, weights=args.weights, oversample=args.oversample)
    if _nothing_to_run("sun", generators, args.json):
        return 1
    try:  # before any relaxation, so a missing dataset fails fast
        train = novelty_reference(generators, progress)
    except DataUnavailableError as exc:
        raise CommandError(f"S.U.N. needs MP-20 (train for novelty, all splits for hulls): {exc}") from None

    book = HullBook(potential, args.max_references or None)
    report: dict = {"machine": machine_info(), "n": args.n, "potential": potential.name,
                    "potential_identity": potential.identity, "temperature": args.temperature,
                    "stability": args.stability, "oversample": args.oversample,
                    "max_references": args.max_references, "seed": args.seed,
                    "systems": None if systems == [None] else systems, "novelty_reference_size": len(train),
                    "generators": {}}
    for name, generator in generators.items():
        if isinstance(generator, Exception):
            report["generators"][name] = {"error": str(generator)}
            continue
        report["generators"][name] = sun_of_generator(generator, args, systems, potential, book, train, progress)
    for rate in ("sun_rate", "msun_rate"):
        rates = {name: row.get(rate) for name, row in report["generators"].items()}
        report[f"{rate.removesuffix('_rate')}_ratio_transformer_over_pyxtal"] = (
            rates[TRANSFORMER] / rates[PYXTAL] if rates.get(TRANSFORMER) is not None and rates.get(PYXTAL) else None)
    report["hull_systems"] = len(book.seconds)
    report["hull_systems_from_cache"] = sum(book.from_cache.values())
    report["hull_total_s"] = round(sum(book.seconds.values()), 2)
    report = _strict(report)
    emit(report, args.json, format_sun(report))
    return _exit_code("sun", {name: row.get("error") for name, row in report["generators"].items()})


def sun_of_generator(generator, args: argparse.Namespace, systems: list[str | None], potential, book, train,
                     progress: bool) -> dict:
    """Sample (args.n split evenly over `systems`, None meaning unconditioned), relax every structure, place it on
    its system's hull, then count S.U.N. and M.S.U.N.

    The stability condition goes only to generators that honour it: PyXtal has no such control, and refusing the
    whole run for it would leave the baseline out.
    """
    from collections import Counter

    from wyckoff_lab.core.benchmarks import merge_samples, place_on_hulls, relax_all, sample_structures, sun_summary
    from wyckoff_lab.core.generators import Conditions
    from wyckoff_lab.core.hull import USABLE_STATUSES

    stability = args.stability if "stability" in generator.supported_conditions else None
    shares = [args.n // len(systems) + (i < args.n % len(systems)) for i in range(len(systems))]
    samples = [sample_structures(generator, share, Conditions(elements=tuple(system.split("-")) if system else None,
                                                             stability=stability),
                                 args.temperature, args.seed, progress,
                                 desc=f"{generator.name} sampling {system or ''}")
               for system, share in zip(systems, shares)]
    sample = merge_samples(samples)
    results, relax_s = relax_all([c.structure for c in sample.candidates], potential, progress=progress,
                                 desc=f"{generator.name} relaxing")
    placement = place_on_hulls(results, book, progress)
    usable = [r.status in USABLE_STATUSES for r in results]
    relaxed = [r.final if ok else r.initial for r, ok in zip(results, usable)]
    statuses = Counter(r.status for r in results)
    return {"stability_condition": stability, "requested": sample.requested, "structures": len(sample.candidates),
            "attempts": sample.attempts, "generation_failures": sample.failures,
            "generation_s": round(sample.seconds, 2),
            "relaxed": sum(usable), "converged": statuses["converged"], "relax_status": dict(statuses),
            "relax_s": round(relax_s, 2), "hull_systems": len(placement.systems),
            "hull_s": round(placement.seconds(book), 2), "hull_failed": placement.n_hull_failed,
            "hull_failures": placement.failures} | sun_summary(relaxed, placement.e_above_hull, train)


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
        for system, reason in row["hull_failures"].items():
            lines.append(f"  no hull for {system}: {reason}")
    if TRANSFORMER in report["generators"] and PYXTAL in report["generators"]:
        for label, key in (("S.U.N.", "sun"), ("M.S.U.N.", "msun")):
            ratio = report[f"{key}_ratio_transformer_over_pyxtal"]
            lines.append(f"{label} ratio {TRANSFORMER} / {PYXTAL}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    lines.append("S.U.N.: relaxed, valid, unique, novel vs MP-20 train, >= 2 elements, E_hull <= 0 eV/atom; M.S.U.N.: "
                 "the same below 0.1 eV/atom")
    lines.append(f"{report['hull_systems']} hulls ({report['hull_systems_from_cache']} from cache) in "
                 f"{report['hull_total_s']:.1f} s")
    return "\n".join(lines)


# -- bench recover ---------------------------------------------------------------------------------------------------


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
    names = _parse_names(args.generators)
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

    generators = load_generators(names, weights=args.weights, oversample=args.oversample)
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
    from collections import Counter

    from wyckoff_lab.core.benchmarks import (
        RECOVER_RELAX_STEPS,
        count_within,
        first_matches,
        relax_all,
        sample_structures,
    )
    from wyckoff_lab.core.generators import Conditions
    from wyckoff_lab.core.hull import USABLE_STATUSES

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
        results, relax_s = relax_all([structures[i] for i in chosen], potential, RECOVER_RELAX_STEPS, progress,
                                     desc=f"{generator.name} {system} relaxing")
        for i, result in zip(chosen, results):
            if result.status in USABLE_STATUSES:
                forms[i].append(result.final)
        entry = {"relax_status": dict(Counter(r.status for r in results)), "relax_s": round(relax_s, 2)}
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
    """'Al-Ca-Cu, Ga-La-O' -> ['Al-Ca-Cu', 'Ga-La-O'], elements checked and sorted as MP-20 writes chemsys."""
    from pymatgen.core import Element

    systems = []
    for item in text.split(","):
        elements = sorted({e.strip() for e in item.split("-") if e.strip()})
        unknown = [e for e in elements if not Element.is_valid_symbol(e)]
        if unknown or not elements:
            raise CommandError(f"--systems: cannot read {item.strip()!r} as a chemical system like Al-Ca-Cu")
        systems.append("-".join(elements))
    return list(dict.fromkeys(systems))


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
