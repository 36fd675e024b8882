"""Command-line flags made from what the registered generators declare, and the chemical-system syntax of every
command (`Al,Ca,Cu` and `Al-Ca-Cu` alike)."""

from __future__ import annotations

import argparse
import re

ALL = "all"  # --generators all: every registered generator


def chemical_system(text: str, flag: str = "--elements") -> tuple[str, ...]:
    """Element symbols of one chemical system written `Al,Ca,Cu`, `Al-Ca-Cu` or `Al Ca Cu`, in order of atomic
    number; an unknown symbol or an empty system is a clear error."""
    from pymatgen.core import Element

    from wyckoff_lab.app.cli import CommandError

    symbols = [part.strip() for part in re.split(r"[,\-\s]+", text or "") if part.strip()]
    unknown = [s for s in symbols if not Element.is_valid_symbol(s)]
    if unknown:
        raise CommandError(f"{flag}: unknown element{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                           f"{text!r} (write a chemical system as Al,Ca,Cu or Al-Ca-Cu)")
    if not symbols:
        raise CommandError(f"{flag}: no element given (write a chemical system as Al,Ca,Cu or Al-Ca-Cu)")
    return tuple(sorted(set(symbols), key=lambda s: Element(s).Z))


def chemical_systems(text: str, flag: str = "--systems") -> list[tuple[str, ...]]:
    """Several chemical systems: separated by `;` or spaces (`Al,Ca,Cu; Ga,La,O`), or by commas when each is
    written with dashes (`Al-Ca-Cu,Ga-La-O`)."""
    from wyckoff_lab.app.cli import CommandError

    text = (text or "").strip()
    if ";" in text or (" " in text and "," not in text):
        items = re.split(r"[;\s]+", text)
    elif "-" in text:
        items = text.split(",")
        if any("-" not in item for item in items if item.strip()) and len(items) > 1:
            raise CommandError(f"{flag}: cannot tell where one system ends in {text!r}; separate systems with ';' "
                               "(Al,Ca,Cu; Ga,La,O) or write each with dashes (Al-Ca-Cu,Ga-La-O)")
    else:
        items = [text]  # `Al,Ca,Cu`: one system
    systems = [chemical_system(item, flag) for item in items if item.strip()]
    if not systems:
        raise CommandError(f"{flag} names no chemical system")
    return systems


def generator_names(text: str, flag: str = "--generators") -> list[str]:
    """`all` (every registered generator) or comma-separated registered names; an unknown name is kept, so the
    caller reports it beside the generators that do run."""
    from wyckoff_lab.app.cli import CommandError
    from wyckoff_lab.core.generators import available_generators

    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise CommandError(f"{flag} names no generator")
    if ALL in names:
        registered = available_generators()
        return registered + [n for n in names if n != ALL and n not in registered]
    return list(dict.fromkeys(names))


def declared_options() -> dict[str, list]:
    """CLI flag -> [(generator name, GeneratorOption)] over every registered generator."""
    from wyckoff_lab.core.generators import available_generators, generator_class

    flags: dict[str, list] = {}
    for name in available_generators():
        for option in generator_class(name).options:
            flags.setdefault(option.cli_flag, []).append((name, option))
    return flags


def add_generator_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option any registered generator declares (values parsed per generator, see
    `generator_kwargs`), its help naming the generators that take it."""
    group = parser.add_argument_group("generator options", "each applies to the generators that declare it")
    for flag, declared in declared_options().items():
        _, option = declared[0]
        takers = ", ".join(name for name, _ in declared)
        if option.kind == "bool":
            group.add_argument(flag, dest=_dest(option), action=argparse.BooleanOptionalAction, default=None,
                               help=f"{option.help} ({takers}; default {option.default})")
        else:
            default = "" if option.default is None else f"; default {option.default}"
            group.add_argument(flag, dest=_dest(option), default=None, metavar=option.kind.upper(),
                               help=f"{option.help} ({takers}{default})")


def _dest(option) -> str:
    return "generator_option_" + option.cli_flag.lstrip("-").replace("-", "_")


def given_options(args: argparse.Namespace) -> dict[str, object]:
    """CLI flag -> raw value of the generator flags given on this command line."""
    return {flag: getattr(args, _dest(declared[0][1]))
            for flag, declared in declared_options().items()
            if getattr(args, _dest(declared[0][1]), None) is not None}


def generator_kwargs(name: str, args: argparse.Namespace, strict: bool = True) -> dict:
    """The keywords for `get_generator(name, ...)` from the generator flags given: each parsed and checked by
    the option `name` declares. With `strict`, a given flag `name` does not declare is an error (a single
    generator was chosen); otherwise it is left to the generators that do declare it."""
    from wyckoff_lab.app.cli import CommandError
    from wyckoff_lab.core.generators import generator_class

    cls = generator_class(name)
    kwargs = {}
    for flag, value in given_options(args).items():
        option = next((o for o in cls.options if o.cli_flag == flag), None)
        if option is None:
            if strict:
                takers = ", ".join(n for n, _ in declared_options()[flag])
                raise CommandError(f"{flag} is an option of {takers}, not {name}")
            continue
        try:
            kwargs[option.name] = option.parse(value)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    return kwargs


def check_options_used(names: list[str], args: argparse.Namespace) -> None:
    """Refuse generator flags that none of the generators of this run declares (they would do nothing)."""
    from wyckoff_lab.app.cli import CommandError
    from wyckoff_lab.core.generators import available_generators

    running = [n for n in names if n in available_generators()]
    for flag in given_options(args):
        takers = [n for n, _ in declared_options()[flag]]
        if running and not set(takers) & set(running):
            raise CommandError(f"{flag} is an option of {', '.join(takers)}, none of which runs here "
                               f"({', '.join(running)})")
