"""Which pre-screen predicts the final E_hull best per second: Spearman ρ and recall of final M.S.U.N. in the top
10 % / 25 % for a single point and short FIRE relaxations, on generated Al-Ca-Cu candidates fully relaxed.

Run: WYCKOFF_LAB_DATA=... OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tests/prescreen_study.py [--samples 20]
     [--steps 5,10,20] [--out /tmp/prescreen_study.json]
Every generator that serves the system gives --samples candidates (seed 0); the funnel (prescreen "none", a budget
no pool exhausts) relaxes each fully as the pipeline does; then each pre-screen is computed on the same candidates
(primitive cells, CHGNet) and compared with the final E_hull. Timings are those of relaxations not yet cached
(a second run reports None for them); the recall a perfect ranking reaches is reported beside each recall, since
the top 10 % cannot hold more M.S.U.N. than it has places.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from scipy.stats import spearmanr

from wyckoff_lab.core.discover import DiscoveryPlan, discover
from wyckoff_lab.core.hull import USABLE_STATUSES
from wyckoff_lab.core.pipeline import relax_candidates


def top(n: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * n))


def recall(scores: np.ndarray, positives: np.ndarray, fraction: float) -> float | None:
    """Share of the positives among the best `fraction` of the candidates by score (ties by order)."""
    if not positives.any():
        return None
    best = np.argsort(scores, kind="stable")[:top(len(scores), fraction)]
    return float(positives[best].sum() / positives.sum())


def best_recall(positives: np.ndarray, fraction: float) -> float | None:
    """The recall a perfect ranking reaches: the top fraction cannot hold more positives than it has places."""
    if not positives.any():
        return None
    return min(1.0, top(len(positives), fraction) / positives.sum())


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", default="Al,Ca,Cu")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--steps", default="5,10,20", help="FIRE steps of the short relaxations compared")
    parser.add_argument("--potential", default="chgnet")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    plan = DiscoveryPlan(tuple(args.elements.split(",")), budget_min=10_000, samples=args.samples,
                         potential=args.potential, prescreen="none")
    t0 = time.perf_counter()
    result = discover(plan, on_event=lambda stage, done, total, message: print(
        f"{time.perf_counter() - t0:7.0f} s {stage} {done}/{total} {message}", flush=True)
        if done == total or stage == "relax" else None)
    relaxed = [c for c in result.candidates if c.result is not None]
    final = np.array([c.e_above_hull for c in relaxed], dtype=float)
    msun = np.array([bool(c.msun) for c in relaxed])
    sun = np.array([bool(c.sun) for c in relaxed])
    uncached = sum(not c.result.cached for c in relaxed)
    report = {"system": result.system, "potential": result.potential, "made": result.made,
              "n_relaxed": len(relaxed), "n_final_e_hull": int(np.isfinite(final).sum()), "n_msun": int(msun.sum()),
              "n_sun": int(sun.sum()), "stage_minutes": result.minutes,
              # The stage's wall time over the relaxations it computed (batched, a chunk at a time); a
              # RelaxResult's own wall_time_s runs from its batch's start, so it overstates batched ones.
              "full_relaxation_s_per_candidate": result.minutes["relax"] * 60 / uncached if uncached else None,
              "full_uncached": uncached,
              "best_recall": {"msun_top10": best_recall(msun, 0.10), "msun_top25": best_recall(msun, 0.25),
                              "sun_top10": best_recall(sun, 0.10), "sun_top25": best_recall(sun, 0.25)},
              "prescreens": {}, "candidates": []}
    known = np.isfinite(final)
    hull = result.hull
    per_candidate = [{"formula": c.formula, "generator": c.generator, "e_above_hull": float(e), "msun": bool(m),
                      "sun": bool(u)} for c, e, m, u in zip(relaxed, final, msun, sun)]
    report["candidates"] = per_candidate
    screens = [("single_point", 0)] + [(f"short_relax_{n}", int(n)) for n in args.steps.split(",")]
    for name, steps in screens:
        start = time.perf_counter()
        run = relax_candidates([c.structure for c in relaxed], hull.potential, plan.fmax, steps)
        seconds = time.perf_counter() - start
        scores = np.array([hull.e_above_hull([r])[0].e_above_hull if r.status in USABLE_STATUSES else math.inf
                           for r in run.results], dtype=float)
        scores = np.where(np.isfinite(scores), scores, np.inf)
        finite = known & np.isfinite(scores)
        rho = spearmanr(scores[finite], final[finite]).statistic if finite.sum() > 2 else None
        uncached = sum(not r.cached for r in run.results)
        report["prescreens"][name] = {
            "steps": steps, "spearman_rho": None if rho is None else float(rho),
            "seconds_per_candidate": seconds / uncached if uncached else None, "uncached": uncached,
            "msun_recall_top10": recall(scores, msun, 0.10), "msun_recall_top25": recall(scores, msun, 0.25),
            "sun_recall_top10": recall(scores, sun, 0.10), "sun_recall_top25": recall(scores, sun, 0.25)}
        print(name, report["prescreens"][name], flush=True)
        for row, score in zip(per_candidate, scores):
            row[name] = float(score) if math.isfinite(score) else None
    report["wall_min"] = (time.perf_counter() - t0) / 60
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
