"""`wyckoff-lab sample`: generate crystals with a registered generator and write them as CIF + extxyz + JSON."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate crystal structures")
    parser.add_argument("--generator", default="wyckoff-transformer")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--elements", default=None, help="chemical system, e.g. Al,Ca,Cu")
    parser.add_argument("--formula", default=None)
    parser.add_argument("--spacegroup", type=int, default=None)
    parser.add_argument("--template", default=None, help="pinned orbits, e.g. Ca:2a,Cu:4d (needs --spacegroup)")
    parser.add_argument("--stability", choices=["low", "high"], default=None)
    parser.add_argument("--max-atoms", type=int, default=None, help="atoms in the primitive cell")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: keep the smallest set of tokens reaching this probability "
                             "(wyckoff-transformer; default 1.0, off)")
    parser.add_argument("--oversample", type=int, default=None, metavar="K",
                        help="draw K times --n structures and keep those the model finds most likely per token "
                             "(wyckoff-transformer; default 1)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for CIFs, candidates.extxyz and candidates.json")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_sample)


def parse_template(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        element, sep, label = item.strip().partition(":")
        if not sep:
            raise ValueError(f"template entries look like Element:label (e.g. Ca:2a), got {item!r}")
        pairs.append((element.strip(), label.strip()))
    return tuple(pairs)


def _sample(args) -> int:
    from collections import Counter
    from pathlib import Path

    from tqdm import tqdm

    from wyckoff_lab.app.cli import CommandError, emit
    from wyckoff_lab.core.generators import Conditions, get_generator
    from wyckoff_lab.core.structures import write_candidates

    conditions = Conditions(
        elements=tuple(e.strip() for e in args.elements.split(",")) if args.elements else None,
        formula=args.formula, spacegroup=args.spacegroup, template=parse_template(args.template),
        stability=args.stability, max_atoms=args.max_atoms)
    if args.top_p is not None and args.generator != "wyckoff-transformer":
        raise CommandError(f"--top-p is an option of wyckoff-transformer, not {args.generator}")
    generator = get_generator(args.generator, **({"top_p": args.top_p} if args.top_p is not None else {}))
    if args.oversample is not None:
        generator = generator.ranked(args.oversample)  # refused by generators without a likelihood
    options = {key: value for key, value in (("top_p", args.top_p), ("oversample", args.oversample))
               if value is not None}
    bar = tqdm(total=args.n, disable=args.json, desc=f"sampling {args.generator}", unit="crystal")

    def progress(done, total):
        bar.n = done
        bar.refresh()

    result = generator.generate(args.n, conditions, args.temperature, args.seed, progress)
    bar.close()
    written = write_candidates(result.candidates, Path(args.out)) if args.out else None
    spacegroups = Counter(c.intended_spacegroup for c in result.candidates)
    summary = {"generator": args.generator, "requested": args.n, "structures": len(result.candidates),
               "attempts": result.attempts, "failures": result.failures, "resampled": result.rejected,
               "ranked_out": result.ranked_out,
               "seconds": round(result.seconds, 3),
               "conditions": conditions.as_dict(), "temperature": args.temperature, "seed": args.seed,
               "options": options,
               "top_spacegroups": dict(spacegroups.most_common(10)), "out": written}
    text = (f"{len(result.candidates)}/{args.n} structures from {args.generator} in {result.seconds:.2f} s"
            + (f"; written to {written}" if written else "")
            + (f"; failures {result.failures}" if result.failures else "")
            + (f"; sampled again after the quality gate: {result.rejected}" if result.rejected else ""))
    emit(summary, args.json, text)
    return 0
