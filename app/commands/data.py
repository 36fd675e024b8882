"""`wyckoff-lab data`: statistics of a crystal dataset, and parsing + caching it ahead of use."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from wyckoff_lab.app.cli import CommandError, emit

if TYPE_CHECKING:
    from wyckoff_lab.core.datasets import CrystalDataset, DatasetSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect and prepare the crystal datasets")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    stats = actions.add_parser("stats", help="rows, parse failures, elements, space groups and cell sizes")
    stats.add_argument("--dataset", default="mp_20", help="mp_20, mpts_52, perov_5 or mp_36k (default mp_20)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_stats)

    prepare = actions.add_parser("prepare", help="parse and cache every split (and MP-20's hull) now")
    prepare.add_argument("--dataset", default="mp_20", help="mp_20, mpts_52, perov_5 or mp_36k (default mp_20)")
    prepare.add_argument("--json", action="store_true", help="print one JSON object")
    prepare.set_defaults(func=_prepare)


def _stats(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.datasets import load_dataset

    spec = _spec(args.dataset)
    progress = sys.stderr.isatty()
    splits = {split: load_dataset(spec.name, split, progress=progress) for split in spec.available_splits()}
    result = _summarize(spec.name, splits)
    emit(result, args.json, _format_stats(result))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.datasets import load_dataset, mp20_e_above_hull
    from wyckoff_lab.core.paths import cache_dir

    spec = _spec(args.dataset)
    result: dict[str, Any] = {"dataset": spec.name, "cache": str(cache_dir() / "datasets"), "splits": {}}
    if spec.recompute_hull:
        start = time.perf_counter()
        mp20_e_above_hull(progress=True)
        result["hull_seconds"] = round(time.perf_counter() - start, 1)
    for split in spec.available_splits():
        start = time.perf_counter()
        dataset = load_dataset(spec.name, split, progress=True)
        result["splits"][split] = {
            "rows": len(dataset),
            "failures": dataset.failures,
            "seconds": round(time.perf_counter() - start, 1),
        }
    lines = [f"{spec.name}: cached in {result['cache']}"]
    if "hull_seconds" in result:
        lines.append(f"  e_above_hull: {result['hull_seconds']} s")
    for split, info in result["splits"].items():
        lines.append(f"  {split}: {info['rows']} rows, failures {_failures(info['failures'])}, {info['seconds']} s")
    emit(result, args.json, "\n".join(lines))
    return 0


def _spec(name: str) -> DatasetSpec:
    from wyckoff_lab.core.datasets import DATASETS

    if name not in DATASETS:
        raise CommandError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def _summarize(name: str, splits: dict[str, CrystalDataset]) -> dict[str, Any]:
    """Counts over all splits together; rows and failures also per split."""
    import pandas as pd

    frame = pd.concat([dataset.frame for dataset in splits.values()], ignore_index=True)
    element_rows = Counter(el for chemsys in frame["chemsys"] for el in chemsys.split("-"))
    spacegroups = frame["spacegroup"].value_counts(dropna=False).sort_index()
    atoms = frame["num_atoms"]
    return {
        "dataset": name,
        "rows": len(frame),
        "splits": {split: {"rows": len(ds), "failures": ds.failures} for split, ds in splits.items()},
        "elements": {"distinct": len(element_rows), "rows_per_element": dict(element_rows.most_common())},
        "spacegroups": {("unknown" if pd.isna(sg) else int(sg)): int(n) for sg, n in spacegroups.items()},
        "atoms_per_cell": {
            "min": int(atoms.min()),
            "mean": round(float(atoms.mean()), 2),
            "max": int(atoms.max()),
            "histogram": {int(n): int(count) for n, count in atoms.value_counts().sort_index().items()},
        },
    }


def _format_stats(result: dict[str, Any]) -> str:
    lines = [f"{result['dataset']}: {result['rows']} structures"]
    for split, info in result["splits"].items():
        lines.append(f"  {split:<6} {info['rows']:>7} rows   parse failures: {_failures(info['failures'])}")
    elements = result["elements"]
    lines.append(f"\nelements: {elements['distinct']} distinct (rows containing each)")
    lines += _columns([f"{el:<3}{n:>7}" for el, n in elements["rows_per_element"].items()])
    lines.append(f"\nspace groups: {len(result['spacegroups'])} distinct (number: rows)")
    lines += _columns([f"{sg:>7}:{n:>6}" for sg, n in result["spacegroups"].items()])
    atoms = result["atoms_per_cell"]
    lines.append(f"\natoms per cell: min {atoms['min']}, mean {atoms['mean']}, max {atoms['max']} (atoms: rows)")
    lines += _columns([f"{n:>4}:{count:>7}" for n, count in atoms["histogram"].items()])
    return "\n".join(lines)


def _columns(cells: list[str], per_line: int = 8) -> list[str]:
    return ["  " + "  ".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]


def _failures(failures: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(failures.items())) or "none"
