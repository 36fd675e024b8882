"""The `Generator` interface every generator implements, the conditions a user can set, and the registry."""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Iterable

from pymatgen.core import Composition, Element, Structure

from wyckoff_lab.core.symmetry import detected_spacegroup, spacegroup

# Every condition a generator may honour; the app enables exactly the controls a generator declares.
CONDITION_NAMES = ("elements", "formula", "spacegroup", "template", "stability", "max_atoms", "properties",
                   "charge_balanced")
STABILITY_VALUES = ("low", "high")  # e_above_hull below / above 0.075 eV/atom (Matra-Genoa)
STABILITY_THRESHOLD_EV = 0.075
CHARGE_BALANCE_MAX_ATOMS = 20  # the cell size a charge-balance check assumes when the conditions set no max_atoms


class UnsupportedConditionError(ValueError):
    """A generator was asked for a condition it cannot honour."""


@dataclass(frozen=True)
class Conditions:
    """What the user asks of generated crystals. Unset fields (None / empty) are left to the generator.

    elements: the chemical system — every element appears and no other does.
    formula: exact reduced formula; any number of formula units within `max_atoms`.
    spacegroup: ITA number. template: (element, Wyckoff label) orbits that must be present.
    stability: 'low' or 'high' energy above hull. max_atoms: atoms in the primitive cell.
    properties: numeric targets such as {"band_gap": 1.5} (eV) for generators that take them.
    charge_balanced: only compositions where one oxidation state per element sums to zero (SMACT's rule, as
    `core.compositions`); elements and all-metal systems (alloys) count as balanced. A generator that declares
    it makes only such compositions; for any other, `quality.generate_charge_balanced` samples again what is not.
    """

    elements: tuple[str, ...] | None = None
    formula: str | None = None
    spacegroup: int | None = None
    template: tuple[tuple[str, str], ...] = ()
    stability: str | None = None
    max_atoms: int | None = None
    properties: tuple[tuple[str, float], ...] = ()
    charge_balanced: bool = False

    def __post_init__(self) -> None:
        if self.elements is not None:
            elements = tuple(sorted({str(e).strip() for e in self.elements}, key=lambda e: _element(e).Z))
            if not elements:
                raise ValueError("an empty chemical system: give at least one element")
            object.__setattr__(self, "elements", elements)
        if self.formula is not None:
            try:
                comp = Composition(self.formula)
            except Exception as exc:
                raise ValueError(f"cannot read formula {self.formula!r}: {exc}") from None
            for el in comp:
                _element(str(getattr(el, "symbol", el)))
            object.__setattr__(self, "formula", comp.reduced_formula)
            formula_elements = {el.symbol for el in comp}
            if self.elements is not None and formula_elements != set(self.elements):
                raise ValueError(f"formula {comp.reduced_formula} is not in the chemical system "
                                 f"{'-'.join(self.elements)}")
        if self.spacegroup is not None:
            object.__setattr__(self, "spacegroup", spacegroup(self.spacegroup).number)
        from wyckoff_lab.core.templates import wyckoff_position

        template = tuple((str(el), str(label)) for el, label in self.template)
        for el, label in template:
            _element(el)
            if self.spacegroup is not None:
                wyckoff_position(spacegroup(self.spacegroup), label)  # a ValueError naming the group's positions
        if template and self.spacegroup is None:
            raise ValueError("a Wyckoff template needs a space group")
        system = self.chemical_system
        outside = sorted({el for el, _ in template} - set(system or {el for el, _ in template}))
        if outside:
            raise ValueError(f"the template places {', '.join(outside)}, which is not in the chemical system "
                             f"{'-'.join(system)}")
        object.__setattr__(self, "template", template)
        if self.stability is not None and self.stability not in STABILITY_VALUES:
            raise ValueError(f"stability must be one of {STABILITY_VALUES}, got {self.stability!r}")
        if self.max_atoms is not None and int(self.max_atoms) < 1:
            raise ValueError(f"max_atoms must be at least 1, got {self.max_atoms}")
        object.__setattr__(self, "properties", tuple(sorted((str(k), float(v)) for k, v in dict(self.properties).items())))
        object.__setattr__(self, "charge_balanced", bool(self.charge_balanced))
        if self.charge_balanced:
            self._check_charge_balance_possible()

    def _check_charge_balance_possible(self) -> None:
        """A charge-balanced request no composition can satisfy is refused now, saying why."""
        from wyckoff_lab.core.compositions import candidate_compositions, is_charge_balanced

        if self.formula is not None:
            if not is_charge_balanced(Composition(self.formula)):
                raise ValueError(f"formula {self.formula} is not charge balanced (no oxidation state per element "
                                 "sums to zero), so charge_balanced cannot hold")
            return
        system = self.chemical_system
        if system is not None and not candidate_compositions(system, self.max_atoms or CHARGE_BALANCE_MAX_ATOMS):
            raise ValueError(f"no charge-balanced composition of {'-'.join(system)} has at most "
                             f"{self.max_atoms or CHARGE_BALANCE_MAX_ATOMS} atoms")

    @property
    def chemical_system(self) -> tuple[str, ...] | None:
        """The elements implied by `elements` or `formula`."""
        if self.elements is not None:
            return self.elements
        if self.formula is not None:
            return tuple(sorted((el.symbol for el in Composition(self.formula)), key=lambda e: Element(e).Z))
        return None

    def set_names(self) -> set[str]:
        """Names of the conditions that are set (what a generator must honour)."""
        names = {name for name in ("elements", "formula", "spacegroup", "stability", "max_atoms")
                 if getattr(self, name) is not None}
        if self.template:
            names.add("template")
        names |= {f"properties.{key}" for key, _ in self.properties}
        if self.charge_balanced:
            names.add("charge_balanced")
        return names

    def as_dict(self) -> dict:
        data = asdict(self)
        data["properties"] = dict(self.properties)
        return data


def _element(symbol: str) -> Element:
    if not Element.is_valid_symbol(symbol):
        raise ValueError(f"unknown element {symbol!r}")
    return Element(symbol)


@dataclass
class Candidate:
    """One generated crystal with its provenance."""

    structure: Structure
    generator: str
    conditions: Conditions
    intended_spacegroup: int | None = None
    wyckoff: dict | None = None  # WyckoffCrystal.as_dict() when the generator works in Wyckoff space
    tokens: list[str] | None = None  # or latents, for generators that have them
    sampling_time_s: float = 0.0  # this candidate's share of the batch's sampling + decoding time
    seed: int | None = None
    extra: dict = field(default_factory=dict)
    # spglib's space group of `structure` at `detected_symprec` Å, set when the generator already ran it (a
    # quality gate), so readers at the same tolerance need not run spglib again; None when nobody has looked.
    detected_spacegroup: int | None = None
    detected_symprec: float | None = None

    def spacegroup_at(self, symprec: float) -> int | None:
        """spglib's space group of the structure at `symprec` Å: the generator's verdict where it checked at that
        tolerance, otherwise found now (None if spglib finds none)."""
        if self.detected_symprec == symprec and self.detected_spacegroup is not None:
            return self.detected_spacegroup
        return detected_spacegroup(self.structure, symprec)

    def as_dict(self) -> dict:
        checked = {"detected_spacegroup": self.detected_spacegroup, "detected_symprec": self.detected_symprec}
        return {"structure": self.structure.as_dict(), "generator": self.generator,
                "conditions": self.conditions.as_dict(), "intended_spacegroup": self.intended_spacegroup,
                "wyckoff": self.wyckoff, "tokens": self.tokens, "sampling_time_s": self.sampling_time_s,
                "seed": self.seed, **({"extra": self.extra} if self.extra else {}),
                **(checked if self.detected_symprec is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        """The inverse of `as_dict` (a record read back from `candidates.json` or the app's session store)."""
        conditions = dict(data.get("conditions") or {})
        conditions["template"] = tuple(tuple(pair) for pair in conditions.get("template") or ())
        conditions["properties"] = tuple(dict(conditions.get("properties") or {}).items())
        if conditions.get("elements") is not None:
            conditions["elements"] = tuple(conditions["elements"])
        return cls(structure=Structure.from_dict(data["structure"]), generator=data["generator"],
                   conditions=Conditions(**conditions), intended_spacegroup=data.get("intended_spacegroup"),
                   wyckoff=data.get("wyckoff"), tokens=data.get("tokens"),
                   sampling_time_s=float(data.get("sampling_time_s", 0.0)), seed=data.get("seed"),
                   extra=dict(data.get("extra") or {}), detected_spacegroup=data.get("detected_spacegroup"),
                   detected_symprec=data.get("detected_symprec"))


@dataclass
class GenerationResult:
    """A batch of candidates plus the attempts that did not become structures (counted, not dropped).

    `failures`: attempts that gave no structure (e.g. a decoding dead end). `rejected`: attempts that gave a
    structure the generator's own quality gate turned down and sampled again (e.g. its space group came out
    higher than the one sampled); they are counted in `attempts` but are not failures of the sequence model.
    `ranked_out`: structures made and then left out by likelihood ranking (`Generator.ranked`), also in `attempts`.
    """

    candidates: list[Candidate]
    attempts: int
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    ranked_out: int = 0


# What each failure reason a generator counts means, for a user whose run made nothing.
FAILURE_REASONS = {
    "dead_end": "constrained decoding reached a point where no token keeps the conditions satisfiable (e.g. the "
                "composition or template cannot be completed within the atom limit)",
    "max_len": "the sequence reached the model's maximum length before it was complete",
    "degenerate_cell": "the sampled cell was degenerate (volume below 1 Å^3 per atom, or impossible angles)",
    "decode": "the sampled sequence did not decode into a crystal",
    "pyxtal_failed": "PyXtal found no arrangement of the atoms on the chosen Wyckoff positions",
    "no_feasible_spacegroup": "no space group's Wyckoff multiplicities add up to the composition within the atom "
                              "limit",
    "no_charge_balanced_composition": "no charge-balanced composition of the elements fits within the atom limit",
    "not_charge_balanced": "the structure's composition was not charge balanced (charge-balanced compositions only)",
    "no_prototype": "no known crystal could be exchanged into the drawn chemical system",
    "prototypes_exhausted": "every prototype that can be exchanged into the request was used (or was a duplicate)",
}


def describe_failure(reason: str) -> str:
    """A failure reason in words ('decode: <detail>' keeps its detail); unknown reasons as they are."""
    key, _, detail = reason.partition(": ")
    text = FAILURE_REASONS.get(key)
    if text is None:
        return reason
    return f"{text} ({detail})" if detail else text


ProgressCallback = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class GeneratorOption:
    """A setting a generator takes when it is made (a keyword of its class), declared so that the CLI's flags and
    the app's controls are made from it rather than written per generator.

    kind: "float", "int", "str", "bool" or "path". `minimum`/`maximum` bound numbers (inclusive); `choices`
    lists the allowed strings. `flag` is the CLI spelling (default `--<name with dashes>`).
    """

    name: str
    kind: str
    default: object
    help: str
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound (top-p is in (0, 1])
    choices: tuple[str, ...] = ()
    flag: str | None = None
    label: str | None = None  # the app's label (default: the name in words)
    # Settable per request on a loaded generator (`Generator.with_options`); False for what loading depends on
    # (weights, device), which only the CLI and the app's start-up settings set.
    per_request: bool = True

    @property
    def ui_label(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        low = (f"({self.above:g}" if self.above is not None else
               f"[{self.minimum:g}" if self.minimum is not None else None)
        if low and self.maximum is not None:
            return f"in {low}, {self.maximum:g}]"
        if low:
            return f"{'above' if self.above is not None else 'at least'} {low[1:]}"
        return f"at most {self.maximum:g}" if self.maximum is not None else "a finite number"

    def parse(self, value):
        """`value` (a string from the command line, or a value from the app) as this option's type, checked;
        a ValueError that names the option otherwise."""
        import math

        if value is None:
            return None
        if self.kind in ("float", "int"):
            try:
                parsed = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.cli_flag} must be a number, got {value!r}") from None
            if self.kind == "int":
                if not math.isfinite(parsed) or parsed != int(parsed):
                    raise ValueError(f"{self.cli_flag} must be a whole number, got {value!r}")
                parsed = int(parsed)
            in_range = (math.isfinite(parsed) and (self.minimum is None or parsed >= self.minimum)
                        and (self.maximum is None or parsed <= self.maximum)
                        and (self.above is None or parsed > self.above))
            if not in_range:  # NaN and infinities fail here too
                raise ValueError(f"{self.cli_flag} must be {self.range_text()}, got {parsed}")
            return parsed
        if self.kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        parsed = str(value)
        if self.choices and parsed not in self.choices:
            raise ValueError(f"{self.cli_flag} must be one of {', '.join(self.choices)}, got {parsed!r}")
        return parsed


@dataclass(frozen=True)
class TrainingRecipe:
    """How `wyckoff-lab train <generator>` trains a generator: `module` holds the config dataclass (`config`; it
    has an `out_dir`, may nest dataclasses, and every field is a setting of `--config FILE.toml` / `--set`) and the
    function (`function(config, progress=...) -> dict`) that trains, resumably, into `out_dir` and exports the
    best weights to `out_dir/best/`. `weights_name` is the folder under assets/models the weights install to."""

    module: str
    weights_name: str
    config: str = "TrainConfig"
    function: str = "train"

    def load(self) -> tuple[type, Callable[..., dict]]:
        """(config class, train function), imported now (torch and the data loaders are heavy)."""
        import importlib

        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.function)


class Generator(abc.ABC):
    """A source of crystal candidates. Subclasses set `name` and `supported_conditions` and implement `_generate`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    supported_conditions: ClassVar[frozenset[str]] = frozenset()
    uses_temperature: ClassVar[bool] = True
    # Samples are independent CPU work (no batched model), so a request may be split over forked processes.
    parallel_safe: ClassVar[bool] = False
    # The generator has a likelihood to rank its own samples by (see `ranked`).
    ranks_by_likelihood: ClassVar[bool] = False
    # The reference the benchmarks give every other generator's figures as ratios against (PyXtal).
    is_baseline: ClassVar[bool] = False
    # Where it comes in lists and which is chosen by default (lowest first; a baseline ranks after the models).
    preference: ClassVar[int] = 100
    # Atoms in the primitive cell when the conditions set no max_atoms (None: the generator has no limit).
    default_max_atoms: ClassVar[int | None] = None
    # It has learned embeddings of elements / space groups / Wyckoff positions to map (`learned_embeddings`).
    has_learned_embeddings: ClassVar[bool] = False
    # How to train it (None: nothing to train, e.g. a baseline); `wyckoff-lab train` lists those that have one.
    training: ClassVar[TrainingRecipe | None] = None
    # The keywords its class takes (weights, top-p, steps ...), from which CLI flags and app controls are made.
    options: ClassVar[tuple[GeneratorOption, ...]] = ()

    @classmethod
    def option(cls, name: str) -> GeneratorOption | None:
        return next((option for option in cls.options if option.name == name), None)

    def ranked(self, oversample: int) -> Generator:
        """This generator drawing `oversample` times the structures asked for and keeping the most likely ones,
        as a new object sharing the loaded model (so concurrent requests with other settings do not interfere)."""
        if oversample == 1:
            return self
        raise UnsupportedConditionError(f"generator {self.name!r} has no likelihood to rank its samples by")

    def with_options(self, **values) -> Generator:
        """This generator with per-request options set (each parsed and checked by its declaration; None leaves
        one as it is), as a new object sharing the loaded model, so concurrent requests do not interfere."""
        import copy

        parsed = {}
        for name, value in values.items():
            option = self.option(name)
            if option is None or not option.per_request:
                takes = ", ".join(o.name for o in self.options if o.per_request) or "none"
                raise UnsupportedConditionError(f"generator {self.name!r} has no option {name!r} to set per request "
                                                f"(it takes: {takes})")
            if value is not None and value != "":
                parsed[name] = option.parse(value)
        other = self.ranked(parsed.pop("oversample")) if "oversample" in parsed else self
        changed = {name: value for name, value in parsed.items() if getattr(other, name, None) != value}
        if changed:
            other = copy.copy(other) if other is self else other
            for name, value in changed.items():
                setattr(other, name, value)
        return other

    def learned_embeddings(self) -> dict:
        """{"elements": (symbols, vectors), "spacegroups": (numbers, vectors), ...}: the model's learned input
        embeddings, labelled, for the t-SNE maps (generators with `has_learned_embeddings`)."""
        raise UnsupportedConditionError(f"generator {self.name!r} has no learned embeddings")

    def check_conditions(self, conditions: Conditions) -> None:
        """Refuse, with a clear message, any condition this generator cannot honour."""
        unsupported = {c for c in conditions.set_names()
                       if c not in self.supported_conditions and c.split(".")[0] not in self.supported_conditions}
        if unsupported:
            raise UnsupportedConditionError(
                f"generator {self.name!r} cannot honour {', '.join(sorted(unsupported))}; it supports "
                f"{', '.join(sorted(self.supported_conditions)) or 'no conditions'}")

    def generate(self, n: int, conditions: Conditions | None = None, temperature: float = 1.0,
                 seed: int | None = None, progress: ProgressCallback | None = None) -> GenerationResult:
        """Propose `n` candidates (fewer if some attempts fail; failures are counted by reason)."""
        conditions = conditions or Conditions()
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self.check_conditions(conditions)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        start = time.perf_counter()
        result = self._generate(n, conditions, temperature, seed, progress)
        result.seconds = time.perf_counter() - start
        return result

    @abc.abstractmethod
    def _generate(self, n: int, conditions: Conditions, temperature: float, seed: int | None,
                  progress: ProgressCallback | None) -> GenerationResult:
        ...


MODELS_ENV = "WYCKOFF_LAB_MODELS"  # a folder of weights folders that replaces the shipped assets/models


def weights_folder(name: str):
    """Where model `name`'s weights live: `$WYCKOFF_LAB_MODELS/<name>` if that is set, else the package's
    assets/models/<name> (the shipped weights)."""
    import os
    from importlib import resources
    from pathlib import Path

    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]) / name
    return Path(str(resources.files("wyckoff_lab.assets").joinpath("models", name)))


_REGISTRY: dict[str, Callable[..., Generator]] = {}


def register_generator(name: str):
    """Class decorator / function: make a generator available by name (to the CLI, the app, the benchmarks)."""
    def decorate(factory):
        _REGISTRY[name] = factory
        return factory
    return decorate


def available_generators() -> list[str]:
    """Registered names, most preferred first (`Generator.preference`, then by name)."""
    _load_builtin()
    return sorted(_REGISTRY, key=lambda name: (getattr(_REGISTRY[name], "preference", 100), name))


def default_generator_name() -> str:
    """The generator `sample` and the app use when none is named: the most preferred one."""
    return available_generators()[0]


def generator_class(name: str) -> type[Generator]:
    """The registered class of `name` (its declared conditions and options), without loading any model."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown generator {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_generator(name: str, **kwargs) -> Generator:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown generator {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    """Import the built-in generator subpackages so they register themselves."""
    import importlib

    for module in BUILTIN_GENERATORS:
        importlib.import_module(module)


BUILTIN_GENERATORS: Iterable[str] = (
    "wyckoff_lab.core.generators.wyckoff_transformer",
    "wyckoff_lab.core.generators.pyxtal_baseline",
    "wyckoff_lab.core.generators.substitution",
)
