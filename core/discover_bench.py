"""`bench discover`: distinct S.U.N. and M.S.U.N. per CPU-hour of each discovery strategy, per chemical system, at one
time budget, with PyXtal-relax-everything as the ratio's denominator in the same run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from wyckoff_lab.core.discover import DiscoveryPlan, discover
from wyckoff_lab.core.paths import CACHE_ENV, cache_dir
from wyckoff_lab.core.pipeline import MAX_STEPS, HullBook

# name -> (generators, pre-screen). "relax-all": every sample relaxed in pool order; "+prescreen": ranked first by
# the single-point estimate; "funnel": every generator that takes a chemical system, pooled (the app's default).
STRATEGIES = {
    "pyxtal-relax-all": (("pyxtal",), "none"),
    "pyxtal+prescreen": (("pyxtal",), "single_point"),
    "wyckoff-transformer-relax-all": (("wyckoff-transformer",), "none"),
    "wyckoff-transformer+prescreen": (("wyckoff-transformer",), "single_point"),
    "substitution-relax-all": (("substitution",), "none"),
    "substitution+prescreen": (("substitution",), "single_point"),
    "funnel": (None, "single_point"),
}
BASELINE = "pyxtal-relax-all"
DEFAULT_SYSTEMS = ("Li-Mn-O", "Li-Fe-O", "Al-Ca-Cu", "Gd-Ge-Pt", "Ba-O-Ti", "Cu-S-Sn", "Mg-N-Si", "Mn-Ni-Sb")


@contextlib.contextmanager
def fresh_relaxation_cache():
    """A cache folder of its own for one strategy: the parsed datasets and the built hulls are shared (linked and
    copied from the user's cache), relaxations are not, so no strategy is served another's relaxations."""
    base = cache_dir()
    folder = Path(tempfile.mkdtemp(prefix="wyckoff-lab-bench-discover-"))
    try:
        if (base / "datasets").exists():
            (folder / "datasets").symlink_to(base / "datasets", target_is_directory=True)
        if (base / "hull").exists():
            shutil.copytree(base / "hull", folder / "hull")
        previous = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(folder)
        try:
            yield folder
        finally:
            if previous is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = previous
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_strategy(system: Sequence[str], strategy: str, budget_min: float, samples: int, seed: int, potential,
                 generators: dict, max_steps: int | None = None) -> dict:
    """One strategy on one system in a fresh relaxation cache: what it found and what it cost (minutes on one
    core: every stage, pool and pre-screen included; the hull's reference relaxations are shared and not counted)."""
    names, prescreen = STRATEGIES[strategy]
    kwargs = {} if max_steps is None else {"max_steps": max_steps}
    plan = DiscoveryPlan(tuple(system), budget_min, generators=names, samples=samples, seed=seed,
                         prescreen=prescreen, **kwargs)
    with fresh_relaxation_cache():
        t0, c0 = time.perf_counter(), time.process_time()
        result = discover(plan, generators, potential)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    counts = result.counts()
    hours = wall / 3600
    return {"counts": counts, "minutes": round(wall / 60, 3), "cpu_minutes": round(cpu / 60, 3),
            "stage_minutes": result.minutes, "stopped": result.stopped, "made": result.made,
            "skipped": result.skipped, "sun": counts["sun"], "msun": counts["msun"],
            "sun_per_cpu_hour": counts["sun"] / hours if hours else None,
            "msun_per_cpu_hour": counts["msun"] / hours if hours else None}


def benchmark(systems: Sequence[Sequence[str]], strategies: Sequence[str], budget_min: float, samples: int,
              seed: int, potential, generators: dict, max_steps: int | None = None,
              progress: Callable[[str], None] = lambda message: None) -> dict:
    """Every strategy on every system, then totals per strategy and each one's M.S.U.N. per CPU-hour over the
    baseline's (PyXtal-relax-everything, when it was run)."""
    per_system: dict[str, dict] = {}
    for system in systems:
        name = "-".join(system)
        # Built once in the user's cache, with the funnel's settings: every strategy's fresh cache copies it.
        book = HullBook(potential, max_steps=max_steps or MAX_STEPS)
        progress(f"{name}: hull")
        book.get(tuple(system))
        per_system[name] = {}
        for strategy in strategies:
            progress(f"{name}: {strategy}")
            try:
                per_system[name][strategy] = run_strategy(system, strategy, budget_min, samples, seed, potential,
                                                          generators, max_steps)
            except ValueError as exc:  # a system a generator cannot serve: said, and the others go on
                per_system[name][strategy] = {"error": str(exc)}
    totals = {}
    for strategy in strategies:
        rows = [per_system[s][strategy] for s in per_system if "error" not in per_system[s][strategy]]
        minutes = sum(r["minutes"] for r in rows)
        msun, sun = sum(r["msun"] for r in rows), sum(r["sun"] for r in rows)
        totals[strategy] = {"systems": len(rows), "minutes": round(minutes, 2), "sun": sun, "msun": msun,
                            "relaxed": sum(r["counts"]["relaxed"] for r in rows),
                            "pooled": sum(r["counts"]["pooled"] for r in rows),
                            "msun_per_cpu_hour": msun / (minutes / 60) if minutes else None,
                            "sun_per_cpu_hour": sun / (minutes / 60) if minutes else None}
    base = totals.get(BASELINE, {}).get("msun_per_cpu_hour")
    for row in totals.values():
        rate = row["msun_per_cpu_hour"]
        row["msun_per_cpu_hour_vs_pyxtal"] = rate / base if base and rate is not None else None
    return {"budget_min": budget_min, "samples": samples, "seed": seed, "potential": potential.identity,
            "strategies": list(strategies), "systems": per_system, "totals": totals}


def format_table(report: dict) -> str:
    lines = [f"bench discover: {report['budget_min']:g} min of full relaxations per strategy and system, "
             f"{report['samples']} samples per generator, {report['potential']}",
             f"{'strategy':32s} {'systems':>7s} {'pooled':>6s} {'relaxed':>7s} {'S.U.N.':>6s} {'M.S.U.N.':>8s} "
             f"{'minutes':>8s} {'M.S.U.N./h':>10s} {'vs PyXtal':>9s}"]
    for name, row in report["totals"].items():
        rate, ratio = row["msun_per_cpu_hour"], row["msun_per_cpu_hour_vs_pyxtal"]
        lines.append(f"{name:32s} {row['systems']:7d} {row['pooled']:6d} {row['relaxed']:7d} {row['sun']:6d} "
                     f"{row['msun']:8d} {row['minutes']:8.1f} {rate if rate is not None else float('nan'):10.1f} "
                     f"{ratio if ratio is not None else float('nan'):8.2f}x")
    return "\n".join(lines)
