"""`wyckoff-lab bench generate`: throughput and sample quality of generators, run side by side on one machine."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from wyckoff_lab.app.cli import CommandError, emit

WARMUP_STRUCTURES = 2  # generated untimed first, so lazy loading (weights, tables, CUDA) is not charged
# Bench key -> key of `metrics.evaluate` (novelty against MP-20 train, distances to MP-20 test).
EVALUATE_KEYS = {"structural_validity": "struct_validity", "bond_consistency": "bond_consistency",
                 "spacegroup_consistency": "sg_consistency", "uniqueness": "uniqueness", "novelty": "novelty",
                 "p1_rate": "p1_rate", "jsd_spacegroup": "sg_jsd", "jsd_wyckoff": "wyckoff_jsd"}
RATE_KEYS = ("sequence_validity", *EVALUATE_KEYS)  # every per-run value in [0, 1]


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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.generators import get_generator
    from wyckoff_lab.core.paths import DataUnavailableError

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    temperatures = _parse_temperatures(args.temperatures)
    names = [name.strip() for name in args.generators.split(",") if name.strip()]
    if not names:
        raise CommandError("--generators names no generator")
    progress = sys.stderr.isatty()
    try:
        train, test_stats = load_references(args.symprec, progress)
    except DataUnavailableError as exc:
        raise CommandError(f"the benchmark needs MP-20 (train for novelty, test for distributions): {exc}") from None

    report: dict = {"machine": machine_info(), "n": args.n, "seed": args.seed, "generators": {}}
    for name in names:
        try:
            generator = get_generator(name)
        except ValueError as exc:  # unknown name, or weights not shipped / unreadable (ModelLoadError)
            report["generators"][name] = {"error": str(exc)}
            continue
        generator.generate(WARMUP_STRUCTURES, seed=args.seed)
        runs = temperatures if generator.uses_temperature else [1.0]
        report["generators"][name] = {
            str(t): bench_generator(generator, args.n, t, args.seed, train, test_stats, args.symprec)
            for t in runs}
    emit(report, args.json, format_report(report))
    return 0


def load_references(symprec: float, progress: bool):
    """MP-20 train, indexed for novelty, and the symmetry statistics of MP-20 test for the distribution distances."""
    from wyckoff_lab.app.commands.evaluate import load_reference
    from wyckoff_lab.core.datasets import load_dataset
    from wyckoff_lab.core.metrics import ReferenceIndex

    train = ReferenceIndex(load_dataset("mp_20", "train", progress=progress).structures)
    _, test_stats = load_reference("mp_20", "test", symprec, progress)
    return train, test_stats


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
    row = {"valid_per_min": round(60 * metrics["n_struct_valid"] / seconds, 1),
           "sequence_validity": round(len(structures) / result.attempts, 4)}
    for key, source in EVALUATE_KEYS.items():
        row[key] = None if metrics[source] is None else round(metrics[source], 4)
    return row | {"structures": len(structures), "attempts": result.attempts, "seconds": round(seconds, 2),
                  "failures": result.failures}


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
