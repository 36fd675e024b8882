"""`wyckoff-lab discover --elements Li,Mn,O --budget-min 30 --out DIR`: the discovery funnel (core.discover)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

from wyckoff_lab.app.cli import CommandError, emit
from wyckoff_lab.app.commands.relax import add_progress_flag, show_progress
from wyckoff_lab.app.commands.sample import EXIT_INTERRUPTED, _interrupt_deferred

# What `discover --out` writes, and so what --overwrite may clear.
OWN_OUTPUT = re.compile(r"\d{3,}_[A-Za-z0-9()]+_sg\d+\.cif|candidates\.(csv|json)|hull\.png|discover\.json")
TABLE_FIELDS = ("rank", "formula", "spacegroup", "spacegroup_generated", "spacegroup_relaxed", "generator",
                "prescreen", "prescreen_status", "e_above_hull", "status", "unique", "novel", "sun", "msun", "steps",
                "cached", "file")
JSON_FIELDS = ("formula", "spacegroup", "generator", "prescreen", "e_above_hull", "status", "file")


def register(subparsers) -> None:
    from wyckoff_lab.core.discover import DEFAULT_SAMPLES, PRESCREENS, SHORT_RELAX_STEPS

    p = subparsers.add_parser(
        "discover", help="new stable crystals of a chemical system within a time budget",
        description="Pool candidates of every generator that serves the system (or --generators), drop duplicates "
                    "and known MP-20 structures, build the system's hull with the potential, pre-screen every "
                    "candidate cheaply, then fully relax the best first until --budget-min is spent. Every "
                    "relaxation is cached as it finishes: Ctrl-C keeps what was done (exit "
                    f"{EXIT_INTERRUPTED}) and the same command again resumes.")
    p.add_argument("--elements", required=True, help="chemical system of 1-5 elements, e.g. Li,Mn,O or Li-Mn-O")
    p.add_argument("--budget-min", type=float, required=True,
                   help="wall minutes for the full relaxations (> 0); pool, hull and pre-screen come on top")
    p.add_argument("--generators", default=None,
                   help="comma-separated registered generators, or all (default: every one that honours "
                        "--elements)")
    p.add_argument("--potential", default=None, help="a potential by name (default: MatterSim if it can be had, "
                                                     "else CHGNet)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"candidates asked of each generator (default {DEFAULT_SAMPLES})")
    p.add_argument("--prescreen", choices=PRESCREENS, default="single_point",
                   help="single_point (default), short_relax (a few FIRE steps) or none (pool order)")
    p.add_argument("--prescreen-steps", type=int, default=SHORT_RELAX_STEPS,
                   help=f"FIRE steps of short_relax (default {SHORT_RELAX_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator (default 0: reruns resume)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="maximum FIRE steps per relaxation (default 500)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", required=True, type=Path,
                   help="new or empty folder for the relaxed CIFs, candidates.csv/json and hull.png (written "
                        "beside it, then renamed into place)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder of an earlier discover run (refused if it holds other files)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from wyckoff_lab.app.generator_flags import chemical_system, generator_names
    from wyckoff_lab.core.discover import DiscoveryPlan, discover
    from wyckoff_lab.core.relax import POTENTIALS, PotentialError

    t0 = time.perf_counter()
    elements = chemical_system(args.elements)
    if args.potential is not None and args.potential not in POTENTIALS:
        raise CommandError(f"unknown potential {args.potential!r}; choose one of {', '.join(POTENTIALS)}")
    if not math.isfinite(args.budget_min) or args.budget_min <= 0:
        raise CommandError(f"--budget-min must be a number of minutes > 0, not {args.budget_min:g} (with no "
                           "budget nothing would be relaxed)")
    try:
        plan = DiscoveryPlan(elements, args.budget_min,
                             generators=tuple(generator_names(args.generators)) if args.generators else None,
                             samples=args.samples, seed=args.seed, potential=args.potential,
                             prescreen=args.prescreen, prescreen_steps=args.prescreen_steps, fmax=args.fmax,
                             max_steps=args.max_steps, device=args.device)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    out = _check_out(args.out, args.overwrite)  # before any work
    bars = _StageBars(show_progress(args))
    try:
        result = discover(plan, on_event=bars)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        bars.close()
        print("wyckoff-lab: interrupted before the full relaxations; the relaxations done so far (hull, "
              "pre-screen) are cached, so the same command resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bars.close()

    with _interrupt_deferred(reraise=False):  # a Ctrl-C now would leave half a folder
        rows, notes = _write(out, result)
    summary = {"system": result.system, "minutes": round((time.perf_counter() - t0) / 60, 3),
               "stage_minutes": result.minutes, "stage_cpu_minutes": result.cpu_minutes, "stopped": result.stopped,
               "potential": result.potential, "hull": result.hull_plan, "skipped_generators": result.skipped,
               "made": result.made, "counts": result.counts(), "out": str(out), "notes": notes,
               "candidates": [{k: row[k] for k in JSON_FIELDS} for row in rows]}
    emit(summary, args.json, _text(summary, rows))
    if result.stopped == "interrupted":
        print(f"wyckoff-lab: interrupted: kept {summary['counts']['relaxed']} relaxed candidates in {out}; the "
              "same command resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


class _StageBars:
    """One tqdm bar per stage on stderr, fed by discover's on_event."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        from tqdm import tqdm

        if not self.enabled or stage == "done":
            return
        if self.bar is None or stage != self.stage or self.bar.total != total:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="crystal", file=sys.stderr, leave=False)
        self.bar.n = min(done, total)
        self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _check_out(text, overwrite: bool):
    """The --out folder, checked before any work (see cli.checked_out_folder)."""
    from wyckoff_lab.app.cli import checked_out_folder

    return checked_out_folder(text, overwrite, OWN_OUTPUT, "discover")


def _write(out: Path, result) -> tuple[list[dict], list[str]]:
    """Relaxed CIFs (symmetrised), candidates.csv / candidates.json and hull.png, in a folder beside `out`
    renamed into place; returns the table's rows (ranked) and notes on what could not be drawn."""
    import os
    import shutil
    import tempfile

    from wyckoff_lab.core.structures import symmetrized_cif

    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        rows, notes = [], []
        for position, candidate in enumerate(result.ranked()):
            row = candidate.row() | {"file": None}
            if candidate.relaxed is not None:
                name = f"{position:03d}_{candidate.formula}_sg{candidate.spacegroup_relaxed or 1}.cif"
                text, _ = symmetrized_cif(candidate.relaxed)
                (folder / name).write_text(text)
                row["file"] = name
            rows.append(row)
        with open(folder / "candidates.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: "" if row[k] is None else row[k] for k in TABLE_FIELDS} for row in rows)
        (folder / "candidates.json").write_text(json.dumps(rows, indent=1))
        note = write_hull_png(result, folder / "hull.png")
        if note:
            notes.append(note)
        old = None
        if out.exists():  # empty, or an earlier run's outputs (checked before any work)
            old = folder.with_name(folder.name.removesuffix(".partial") + ".old")
            os.rename(out, old)
        os.rename(folder, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return rows, notes


def write_hull_png(result, path: Path) -> str | None:
    """The hull of the references with the relaxed candidates added (pymatgen's PDPlotter, matplotlib backend:
    pymatgen depends on matplotlib, while plotly's static export needs kaleido, which may be absent); stable
    candidates become vertices, those within 0.1 eV/atom are drawn above it. Returns why none was drawn, if so."""
    import logging
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDEntry, PDPlotter, PhaseDiagram

    if not 2 <= len(result.plan.elements) <= 4:
        return f"no hull.png: pymatgen draws hulls of 2 to 4 elements, not {len(result.plan.elements)}"
    # References by formula (their names are material ids), candidates by formula and place in the relaxation order.
    entries = [PDEntry(e.composition, e.energy, name=e.composition.reduced_formula)
               for e in result.hull.diagram.all_entries]
    for c in result.candidates:
        if c.relaxed is not None and math.isfinite(c.e_above_hull):
            entries.append(PDEntry(c.relaxed.composition, c.result.energy, name=f"{c.formula} #{c.rank}"))
    quiet = logging.getLogger("matplotlib")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Ignoring fixed y limits ...", on every ternary pymatgen draws
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diagram = PhaseDiagram(entries)
            ax = PDPlotter(diagram, show_unstable=0.1, backend="matplotlib").get_plot(label_unstable=False)
            ax.set_title(f"{result.system} hull, {result.potential.split(':')[0]} energies (#: relaxation order)")
            figure = ax.get_figure()
            figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(figure)
    finally:
        quiet.setLevel(level)
    return None


def _text(summary: dict, rows: list[dict]) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    counts = summary["counts"]
    lines = [f"discover {summary['system']}  potential {summary['potential']}  {summary['minutes']:.1f} min "
             f"(stages: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_minutes"].items()) + ")",
             f"pooled {counts['pooled']} ({summary['made']}), duplicates {counts['duplicates']}, known "
             f"{counts['known']}, relaxed {counts['relaxed']} ({counts['relaxed_cached']} cached, stopped: "
             f"{summary['stopped']}), S.U.N. {counts['sun']}, M.S.U.N. {counts['msun']}",
             summary["hull"]]
    lines += [f"skipped {name}: {why}" for name, why in summary["skipped_generators"].items()]
    lines += ["", f"{'formula':<14}{'sg':>5}  {'generator':<28}{'prescreen':>10}{'E_hull':>9}  status"]
    for row in rows:
        if row["file"] is None and row["status"] in ("duplicate", "known"):
            continue
        flag = " M.S.U.N." if row["msun"] else ""
        lines.append(f"{row['formula']:<14}{row['spacegroup'] or '?':>5}  {row['generator']:<28}"
                     f"{num(row['prescreen']):>10}{num(row['e_above_hull']):>9}  {row['status']}{flag}")
    lines += [f"note: {n}" for n in summary["notes"]] + [f"written to {summary['out']}"]
    return "\n".join(lines)
