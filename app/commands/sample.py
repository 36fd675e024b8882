"""`wyckoff-lab sample`: generate crystals with a registered generator and write them as CIF + extxyz + JSON."""

from __future__ import annotations

import json
import math
import re
import sys

# Generation runs in chunks written as they are made, so memory stays flat and an interrupt keeps what was made.
# The layout depends on --n only (a short first chunk, which also times the run, then full ones), so a seed
# reproduces the same structures.
FIRST_CHUNK = 64
CHUNK = 256
HUGE_RUN = 10_000  # above this many structures, say how long and how much disk before going on
PARTIAL_NAME = "candidates.partial.jsonl"  # one JSON record per line, appended and flushed per chunk
# What `sample --out` writes, and so what --overwrite may clear: numbered CIFs and the candidates files.
OWN_OUTPUT = re.compile(r"\d{5,}_[A-Za-z0-9()]+(_sg\d+)?\.cif|candidates\.(json|extxyz)|candidates\.partial\.jsonl")
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT


def register(subparsers) -> None:
    from wyckoff_lab.app.generator_flags import add_generator_flags
    from wyckoff_lab.core.generators import default_generator_name

    parser = subparsers.add_parser(
        "sample", help="generate crystal structures",
        description="Generate crystal structures. Runs are cut into chunks of "
                    f"{FIRST_CHUNK}, then {CHUNK} structures, written as they are made (Ctrl-C keeps those made, "
                    f"exit code {EXIT_INTERRUPTED}); with --seed S, chunk 0 is sampled with seed S and chunk i with "
                    "numpy's SeedSequence(S, spawn_key=(i,)), so the same seed and --n give the same structures.")
    parser.add_argument("--generator", default=None,
                        help="a registered generator (default: the most preferred one, "
                             f"{default_generator_name()}); its options below")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--elements", default=None, help="chemical system, e.g. Al,Ca,Cu or Al-Ca-Cu")
    parser.add_argument("--formula", default=None)
    parser.add_argument("--spacegroup", type=int, default=None)
    parser.add_argument("--template", default=None, help="pinned orbits, e.g. Ca:2a,Cu:4d (needs --spacegroup)")
    parser.add_argument("--stability", choices=["low", "high"], default=None)
    parser.add_argument("--max-atoms", type=int, default=None, help="atoms in the primitive cell")
    parser.add_argument("--charge-balanced", action="store_true",
                        help="charge-balanced compositions only (one oxidation state per element sums to zero; "
                             "alloys count as balanced); what a generator makes unbalanced is sampled again")
    parser.add_argument("--temperature", type=float, default=1.0, help="a finite number > 0 (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="makes the run reproducible (see above)")
    parser.add_argument("--out", default=None,
                        help="new or empty folder for CIFs, candidates.extxyz and candidates.json (written in a "
                             "temporary folder beside it, then renamed into place)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out folder of an earlier sample run (refused if it holds other files)")
    parser.add_argument("--json", action="store_true")
    add_generator_flags(parser)
    parser.set_defaults(func=_sample)


def parse_template(text: str | None, spacegroup_number: int | None = None) -> tuple[tuple[str, str], ...]:
    from wyckoff_lab.core.templates import parse_template as parse

    return parse(text, spacegroup_number)


def chunk_seed(seed: int | None, index: int) -> int | None:
    """The seed of chunk `index`: the run's seed for chunk 0 (a one-chunk run is the generator's own draw), and
    a spawned SeedSequence for the others (spawn keys, so they never equal the generator's own per-round seeds)."""
    if seed is None or index == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


def chunk_sizes(n: int) -> list[int]:
    sizes = [min(n, FIRST_CHUNK)] if n > 0 else []
    left = n - sum(sizes)
    return sizes + [CHUNK] * (left // CHUNK) + ([left % CHUNK] if left % CHUNK else [])


def _sample(args) -> int:
    from collections import Counter

    from tqdm import tqdm

    from wyckoff_lab.app.cli import CommandError, emit
    from wyckoff_lab.app.generator_flags import chemical_system, generator_kwargs
    from wyckoff_lab.core.generators import (Conditions, default_generator_name, describe_failure, generator_class,
                                            get_generator)
    from wyckoff_lab.core.generators.quality import generate_charge_balanced

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    # Checked here, not by argparse, so main() returns 2 with one line: NaN breaks the sampler, inf the JSON.
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        raise CommandError(f"--temperature must be a finite number > 0, got {args.temperature}")
    args.generator = args.generator or default_generator_name()
    kwargs = generator_kwargs(args.generator, args)  # unknown generator, foreign or bad option: before any work
    conditions = Conditions(
        elements=chemical_system(args.elements) if args.elements else None,
        formula=args.formula, spacegroup=args.spacegroup, template=parse_template(args.template, args.spacegroup),
        stability=args.stability, max_atoms=args.max_atoms, charge_balanced=args.charge_balanced)
    _check_feasible(conditions, generator_class(args.generator).default_max_atoms, args.generator)
    out = _check_out(args.out, args.overwrite) if args.out else None  # before any sampling
    generator = get_generator(args.generator, **kwargs)
    options = {key: value for key, value in kwargs.items() if key != "weights"}

    try:
        writer = _Writer(out) if out else None
    except OSError as exc:  # e.g. no write permission beside --out: say so before sampling, not as a traceback
        raise CommandError(f"cannot write beside --out {out}: {exc}") from None
    totals = {"structures": 0, "attempts": 0, "ranked_out": 0, "seconds": 0.0}
    failures, rejected, spacegroups = Counter(), Counter(), Counter()
    bar = tqdm(total=args.n, disable=args.json, desc=f"sampling {args.generator}", unit="crystal", file=sys.stderr)
    interrupted = False
    try:
        base = 0
        for index, size in enumerate(chunk_sizes(args.n)):
            def progress(done, total, base=base):
                bar.n = base + done
                bar.refresh()

            result = generate_charge_balanced(generator, size, conditions, args.temperature,
                                              chunk_seed(args.seed, index), progress)
            with _interrupt_deferred():  # a chunk is written whole or not at all
                if writer:
                    writer.add(result.candidates)
                totals["structures"] += len(result.candidates)
                totals["attempts"] += result.attempts
                totals["ranked_out"] += result.ranked_out
                totals["seconds"] += result.seconds
                failures.update(result.failures)
                rejected.update(result.rejected)
                spacegroups.update(c.intended_spacegroup for c in result.candidates)
            base += size
            if index == 0 and args.n > HUGE_RUN:
                _say_estimate(args.n, size, result.seconds, writer)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        if writer:
            writer.discard()
        raise
    finally:
        bar.close()
    written = writer.finish() if writer else None

    made = totals["structures"]
    summary = {"generator": args.generator, "requested": args.n, "structures": made,
               "attempts": totals["attempts"], "failures": dict(failures), "resampled": dict(rejected),
               "ranked_out": totals["ranked_out"], "seconds": round(totals["seconds"], 3),
               "conditions": conditions.as_dict(), "temperature": args.temperature, "seed": args.seed,
               "options": options, "top_spacegroups": dict(spacegroups.most_common(10)), "out": written,
               "interrupted": interrupted}
    if not made and failures:
        summary["failure_reasons"] = {reason: describe_failure(reason) for reason in failures}
    text = (f"{made}/{args.n} structures from {args.generator} in {totals['seconds']:.2f} s"
            + (f"; written to {written}" if written else "")
            + (f"; failures {dict(failures)}" if failures else "")
            + (f"; sampled again after the quality gate: {dict(rejected)}" if rejected else ""))
    emit(summary, args.json, text)
    if interrupted:
        print(f"wyckoff-lab: interrupted: kept {made} structures" + (f" in {written}" if written else
              " (none written: no --out)"), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not made:
        reasons = "; ".join(f"{count} x {reason}: {describe_failure(reason)}" for reason, count in
                            failures.most_common()) or "the generator returned none"
        print(f"wyckoff-lab: error: no structure was made from {totals['attempts']} attempts: {reasons}",
              file=sys.stderr)
        return 1
    return 0


def _check_feasible(conditions, default_max_atoms: int | None = None, generator: str = "") -> None:
    """Refuse, with the reason, conditions no sample can meet, before loading a model (the generator's atom limit
    is its class's `default_max_atoms`): each attempt would otherwise end in a dead end, counted but unexplained."""
    from pymatgen.core import Composition

    from wyckoff_lab.app.cli import CommandError
    from wyckoff_lab.core.templates import template_problems

    if conditions.template and conditions.spacegroup:
        problems = template_problems(conditions.spacegroup, conditions.template)
        if problems:
            raise CommandError("impossible template: " + "; ".join(problems))
    limit = conditions.max_atoms or default_max_atoms
    if limit is None:
        return
    where = (f"--max-atoms {limit}" if conditions.max_atoms
             else f"the {limit} atoms {generator} allows without --max-atoms")
    if conditions.formula:
        atoms = int(Composition(conditions.formula).num_atoms)
        if atoms > limit:
            raise CommandError(f"formula {conditions.formula} has {atoms} atoms per formula unit, more than "
                               f"{where}: no cell can hold it")
    system = conditions.chemical_system or ()
    if len(system) > limit:
        raise CommandError(f"the chemical system {'-'.join(system)} has {len(system)} elements, more than "
                           f"{where}: no cell can hold one atom of each")


def _check_out(text, overwrite: bool):
    """The --out folder, checked before any work (see cli.checked_out_folder)."""
    from wyckoff_lab.app.cli import checked_out_folder

    return checked_out_folder(text, overwrite, OWN_OUTPUT, "sample")


class _Writer:
    """Writes candidates chunk by chunk into a temporary folder beside `out` (CIFs, extxyz frames appended, one
    JSON line each), then renames it into place: readers never see half a run, nor two runs mixed."""

    def __init__(self, out):
        import tempfile
        from pathlib import Path

        self.out = Path(out)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        self.partial = self.folder / PARTIAL_NAME
        self.partial.touch()
        self.count = 0

    def add(self, candidates) -> None:
        import os

        from ase.io import write
        from pymatgen.io.ase import AseAtomsAdaptor

        frames, lines = [], []
        for candidate in candidates:
            structure = candidate.structure
            name = f"{self.count:05d}_{structure.composition.reduced_formula}"
            if candidate.intended_spacegroup:
                name += f"_sg{candidate.intended_spacegroup}"
            structure.to(filename=str(self.folder / f"{name}.cif"))
            atoms = AseAtomsAdaptor.get_atoms(structure)
            atoms.info.update({"name": name, "generator": candidate.generator,
                               "intended_spacegroup": candidate.intended_spacegroup or 0})
            frames.append(atoms)
            lines.append(json.dumps({"name": name, **candidate.as_dict()}, default=str))
            self.count += 1
        if frames:
            write(self.folder / "candidates.extxyz", frames, format="extxyz", append=True)
        with open(self.partial, "a") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())

    def bytes_written(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())

    def finish(self) -> str:
        """candidates.json from the JSON lines (streamed, not held in memory), then the folder into place."""
        import os
        import shutil

        with _interrupt_deferred(reraise=False):  # finishing is what a Ctrl-C asks for by now
            with open(self.folder / "candidates.json", "w") as out, open(self.partial) as f:
                out.write("[")
                for i, line in enumerate(f):
                    out.write(("," if i else "") + line.rstrip("\n"))
                out.write("]")
            self.partial.unlink()
            old = None
            if self.out.exists():  # empty, or an earlier run's outputs (checked before sampling)
                old = self.folder.with_name(self.folder.name.removesuffix(".partial") + ".old")
                os.rename(self.out, old)
            os.rename(self.folder, self.out)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        return str(self.out)

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _say_estimate(n: int, size: int, seconds: float, writer) -> None:
    """Before a huge run goes on: its time and disk from the first chunk. Memory stays flat (written as made)."""
    import resource

    per = seconds / max(1, size)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    disk = f", about {writer.bytes_written() / max(1, size) * n / 1e9:.1f} GB on disk" if writer else ""
    print(f"wyckoff-lab: sampling {n} structures takes about {_duration(per * n)} ({1000 * per:.1f} ms each, timed on "
          f"the first {size}){disk}; memory stays near {rss_mb:.0f} MB as chunks are written as they are made. "
          "Ctrl-C keeps what was made.", file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _interrupt_deferred:
    """Hold a Ctrl-C until the block ends (main thread only), so a chunk's files are never left half written."""

    def __init__(self, reraise: bool = True):
        self.reraise = reraise

    def __enter__(self):
        import signal
        import threading

        self.caught = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._catch)
        return self

    def _catch(self, signum, frame):
        self.caught = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught and self.reraise:
            raise KeyboardInterrupt
        return False
