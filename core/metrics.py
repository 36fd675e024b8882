"""Metrics for generated crystals: validity, symmetry, uniqueness, novelty, distributions, S.U.N., match rate."""

from __future__ import annotations

import functools
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Composition, Structure

from wyckoff_lab.core.defaults import BOND_MIN_DISTANCE_A, PYMATGEN_SYMPREC, STRUCTURAL_MIN_DISTANCE_A, SYMPREC
from wyckoff_lab.core.structures import primitive_cell
from wyckoff_lab.core.symmetry import check_tolerance, detected_spacegroup, quiet_spglib

# --- thresholds, each from the seed that defines it (the shared ones live in core.defaults) ----------------------
STRUCT_MIN_DISTANCE = STRUCTURAL_MIN_DISTANCE_A  # Å; structural validity (CDVAE, as SymADiT / composable-crystals)
STRUCT_MIN_VOLUME = 0.1  # Å^3; same protocol
BOND_MIN_DISTANCE = BOND_MIN_DISTANCE_A  # Å; Matra-Genoa's "bond consistency" (no colliding atoms)
DEFAULT_SYMPREC = SYMPREC  # Å; the tolerance MP-20's space-group labels were computed with
STABLE_THRESHOLD = 0.0  # eV/atom; SymADiT: on or below the hull is stable
METASTABLE_THRESHOLD = 0.1  # eV/atom; SymADiT metastability, and the stability of composable-crystals' V.S.U.N.
MIN_STABLE_ELEMENTS = 2  # SymADiT counts only compounds (>= 2 elements) as (meta)stable
CSP_MATCHER_KWARGS = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}  # DiffCSP-style match rate tolerances
# The StructureMatcher settings uniqueness and novelty are reported under, each with who uses it. `evaluate`'s
# plain `uniqueness` / `novelty` (and S.U.N.) use the first; every setting also gets `<metric>_<name>` keys.
MATCHER_SETTINGS = {"pymatgen_tol": {}, "adit_tol": CSP_MATCHER_KWARGS}
MATCHER_LABELS = {"pymatgen_tol": "pymatgen defaults (ltol 0.2, stol 0.3, angle_tol 5): MatterGen, FlowMM",
                  "adit_tol": "stol 0.5, angle_tol 10, ltol 0.3: ADiT, SymADiT"}
# SMACT's 2014 oxidation-state table: Element.oxidation_states in SMACT < 3.0, so what the CDVAE-derived check
# computes under SMACT 2.6 (ADiT's pin); SMACT >= 3.0 defaults to ICSD24, CDVAE's pin 2.2.1 had older data.
SMACT_OXIDATION_SET = "smact14"


# ==================================================================================================================
# Validity
# ==================================================================================================================

# Integer combinations (-2..2)^3 \ {0} of a reduced basis: enough to find the shortest lattice vector.
_IMAGE_GRID = np.array([(i, j, k) for i in range(-2, 3) for j in range(-2, 3) for k in range(-2, 3)
                        if (i, j, k) != (0, 0, 0)], dtype=float)


def shortest_lattice_vector(lattice) -> float:
    """Length (Å) of the shortest non-zero lattice vector: the distance from an atom to its own periodic image."""
    basis = lattice.lll_matrix  # LLL-reduced rows: the shortest vector is a small integer combination of them
    return float(np.linalg.norm(_IMAGE_GRID @ basis, axis=1).min())


def min_interatomic_distance(structure: Structure) -> float:
    """Smallest distance (Å) between any two atoms of the periodic crystal, periodic images of an atom included.

    `distance_matrix` gives minimum-image distances between distinct sites; the self-image term covers one-atom
    cells (and any cell whose shortest lattice vector is shorter than every inter-site distance).
    """
    return _closest(structure, None)[0]


def min_contact_ratio(structure: Structure) -> float:
    """Smallest d_ij / (r_i + r_j) over all pairs of atoms (periodic images included), r the covalent radii of
    Cordero et al. (2008): 1 is a typical bond, and well below 0.5 two atoms overlap whatever their size (0.7 Å is
    a short Li–O contact but a Li–Mn pair on top of each other)."""
    return closest_contacts(structure)[1]


def closest_contacts(structure: Structure) -> tuple[float, float]:
    """(min_interatomic_distance, min_contact_ratio) from one distance matrix."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    radii = np.array([CovalentRadius.radius.get(el.symbol) or float(el.atomic_radius or 1.5)
                      for el in structure.species])  # the table stops at Cm
    return _closest(structure, radii)


def _closest(structure: Structure, radii: np.ndarray | None) -> tuple[float, float]:
    """Smallest distance and, with `radii`, smallest distance over radii sum (NaN without): the self-image term
    is the shortest lattice vector (over twice the largest radius for the ratio)."""
    if structure.volume < 1e-6:  # a collapsed cell: every atom sits on its images
        return 0.0, 0.0
    closest = shortest_lattice_vector(structure.lattice)
    ratio = closest / (2 * radii.max()) if radii is not None else math.nan
    if len(structure) > 1:
        pairs = np.triu_indices(len(structure), k=1)
        distances = structure.distance_matrix[pairs]
        closest = min(closest, float(distances.min()))
        if radii is not None:
            ratio = min(ratio, float((distances / (radii[pairs[0]] + radii[pairs[1]])).min()))
    return closest, float(ratio)


def min_distances(structures: Sequence[Structure]) -> np.ndarray:
    """`min_interatomic_distance` of each structure (Å); NaN where it cannot be computed."""
    out = np.full(len(structures), np.nan)
    for i, structure in enumerate(structures):
        try:
            out[i] = min_interatomic_distance(structure)
        except Exception:  # a degenerate lattice (e.g. NaN parameters) is simply not valid
            pass
    return out


def structural_validity(structures: Sequence[Structure], min_distance: float = STRUCT_MIN_DISTANCE,
                        min_volume: float = STRUCT_MIN_VOLUME, distances: np.ndarray | None = None) -> np.ndarray:
    """Per structure: all pairwise distances >= 0.5 Å and cell volume >= 0.1 Å^3 (the CDVAE structural validity)."""
    distances = min_distances(structures) if distances is None else distances
    volumes = np.array([s.volume for s in structures], dtype=float)
    with np.errstate(invalid="ignore"):
        return (distances >= min_distance) & (volumes >= min_volume)


def bond_consistency(structures: Sequence[Structure], min_distance: float = BOND_MIN_DISTANCE,
                     distances: np.ndarray | None = None) -> np.ndarray:
    """Per structure: no two atoms closer than 0.7 Å (Matra-Genoa's bond consistency, stricter than validity)."""
    distances = min_distances(structures) if distances is None else distances
    with np.errstate(invalid="ignore"):
        return distances >= min_distance


def _reduced_key(composition: Composition) -> tuple[tuple[str, int], ...]:
    """Composition as sorted (element, count) pairs divided by their gcd: the cache key of SMACT validity."""
    counts = {el.symbol: int(round(n)) for el, n in composition.element_composition.items()}
    divisor = functools.reduce(math.gcd, counts.values())
    return tuple(sorted((el, n // divisor) for el, n in counts.items()))


@functools.lru_cache(maxsize=None)
def _smact_valid_cached(key: tuple[tuple[str, int], ...]) -> bool:
    import warnings

    from smact.screening import smact_validity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No Pauling electronegativity for He": smact then skips the test, as CDVAE
        return bool(smact_validity(Composition(dict(key)), use_pauling_test=True, include_alloys=True,
                                   oxidation_states_set=SMACT_OXIDATION_SET))


def smact_valid(composition: Composition | str) -> bool:
    """CDVAE-style compositional validity of one composition.

    True when one element only, when every element is a metal (alloys count as valid), or when some combination of
    the elements' SMACT oxidation states is charge neutral at the composition's reduced stoichiometry and passes
    the Pauling electronegativity test (cations less electronegative than anions). Delegates to
    `smact.screening.smact_validity` with the 'smact14' oxidation-state table.

    This equals the check of ADiT and SymADiT, which run CDVAE's function under SMACT 2.6 (ADiT's pin), whose
    default table is smact14: on every MP-20 train formula it gives SMACT 2.6's own `smact_validity` verdict
    (README). It is not CDVAE's own pin (SMACT 2.2.1, also DiffCSP's and FlowMM's), whose data differ in Zr's
    Pauling electronegativity (0.33, fixed to 1.33 later) and one Ir state; nor SMACT >= 3.0's default (ICSD24
    states). It passes about 89 % of MP-20, matching SymADiT's "approximately 90 %". Cached per reduced composition.
    """
    composition = Composition(composition) if isinstance(composition, str) else composition
    return _smact_valid_cached(_reduced_key(composition))


def compositional_validity(structures: Sequence[Structure]) -> np.ndarray:
    """Per structure: `smact_valid` of its composition."""
    return np.array([smact_valid(s.composition) for s in structures], dtype=bool)


# ==================================================================================================================
# Symmetry
# ==================================================================================================================


@dataclass(frozen=True)
class SymmetryInfo:
    """Detected space group (None if detection failed) and the Wyckoff letter of every occupied orbit."""

    spacegroup: int | None
    wyckoff_letters: tuple[str, ...] = ()

    def as_list(self) -> list:
        return [self.spacegroup, list(self.wyckoff_letters)]

    @classmethod
    def from_list(cls, data: Sequence) -> "SymmetryInfo":
        return cls(None if data[0] is None else int(data[0]), tuple(data[1]))


def symmetry_info(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> SymmetryInfo:
    """Space group and orbit Wyckoff letters (ITA standard setting) via the project's Wyckoff representation.

    When the representation cannot be built (e.g. the standard setting is not reached) the space group alone is
    taken from spglib, so that the space-group metrics still count the structure.
    """
    from wyckoff_lab.core.wyckoff import WyckoffCrystal, WyckoffError

    symprec = check_tolerance(symprec)  # outside the try: a bad tolerance is the caller's error, not a failed detection
    try:
        crystal = WyckoffCrystal.from_structure(structure, symprec=symprec)
        return SymmetryInfo(int(crystal.spacegroup), tuple(o.letter for o in crystal.orbits))
    except WyckoffError:
        pass
    except Exception:  # spglib can choke on degenerate cells; treat as failed detection
        return SymmetryInfo(None)
    return SymmetryInfo(detected_spacegroup(structure, symprec))


def analyze_symmetry(structures: Sequence[Structure], symprec: float = DEFAULT_SYMPREC,
                     progress: bool = False) -> list[SymmetryInfo]:
    """`symmetry_info` of each structure (about 5 ms per MP-20 structure; a tqdm bar on stderr if `progress`)."""
    from tqdm import tqdm

    symprec = check_tolerance(symprec)
    with quiet_spglib():
        return [symmetry_info(s, symprec)
                for s in tqdm(structures, desc="symmetry", unit="crystal", disable=not progress, leave=False)]


def spacegroup_consistency(detected: Sequence[int | None], intended: Sequence[int | None]) -> np.ndarray:
    """Per structure: 1.0 if the re-detected space group equals the intended one, 0.0 if not, NaN if no intent.

    Matra-Genoa's "SPG consistency": the space group found after building the structure is the one sampled.
    A failed detection counts as inconsistent.
    """
    if len(detected) != len(intended):
        raise ValueError(f"{len(detected)} detected but {len(intended)} intended space groups")
    out = np.full(len(detected), np.nan)
    for i, (found, want) in enumerate(zip(detected, intended)):
        if want is not None:
            out[i] = float(found is not None and int(found) == int(want))
    return out


def p1_rate(spacegroups: Sequence[int | None]) -> float:
    """Fraction of structures whose detected space group is P1 (No. 1); failed detections count in the total."""
    return float(np.mean([sg == 1 for sg in spacegroups])) if len(spacegroups) else math.nan


def pymatgen_spacegroups(structures: Sequence[Structure], symprec: float = PYMATGEN_SYMPREC) -> list[int | None]:
    """Space group of each structure as pymatgen's `SpacegroupAnalyzer` finds it (its default angle tolerance,
    5°; `symprec` Å, pymatgen's default 0.01): SymADiT's P1 rate is "as determined by PyMatGen". None on failure."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    symprec = check_tolerance(symprec)
    out: list[int | None] = []
    with quiet_spglib():
        for structure in structures:
            try:
                out.append(int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()))
            except Exception:  # spglib gives up on degenerate cells: a failed detection, counted in the total
                out.append(None)
    return out


# ==================================================================================================================
# Uniqueness and novelty (StructureMatcher, prefiltered)
# ==================================================================================================================


def _default_matcher():
    return structure_matcher("pymatgen_tol")


def structure_matcher(setting: str):
    """A StructureMatcher with one of MATCHER_SETTINGS' tolerances."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    if setting not in MATCHER_SETTINGS:
        raise ValueError(f"unknown matcher setting {setting!r}; choose one of {', '.join(MATCHER_SETTINGS)}")
    return StructureMatcher(**MATCHER_SETTINGS[setting])


def _reduce_for_matching(structure: Structure, matcher) -> Structure | None:
    """The Niggli-reduced primitive cell StructureMatcher.fit would compute, or None if it cannot be built.

    Reducing once per structure and then fitting with `skip_structure_reduction=True` gives the same answer as
    plain `fit` while avoiding a primitive-cell search per pair, which dominates the cost for large groups.
    """
    try:
        return matcher._get_reduced_structure(structure, matcher._primitive_cell, True)
    except Exception:
        return None


def _fits(matcher, a: Structure | None, b: Structure | None) -> bool:
    if a is None or b is None or len(a) != len(b):  # equal primitive-cell sizes are required for a match anyway
        return False
    try:
        return bool(matcher.fit(a, b, skip_structure_reduction=True))
    except Exception:
        return False


def formula_keys(structures: Iterable[Structure]) -> list[str]:
    """Reduced formula of each structure: structures with different ones can never match (same-ratio comparator)."""
    return [s.composition.reduced_formula for s in structures]


def unique_flags(structures: Sequence[Structure], matcher=None, keys: Sequence[str] | None = None) -> np.ndarray:
    """Per structure: True for the first member of each StructureMatcher equivalence class (default tolerances).

    Only structures with the same reduced formula are compared, so the cost grows with the size of the largest
    same-formula group, not with n^2.
    """
    matcher = matcher or _default_matcher()
    keys = formula_keys(structures) if keys is None else keys
    flags = np.zeros(len(structures), dtype=bool)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    for members in groups.values():
        if len(members) == 1:
            flags[members[0]] = True
            continue
        representatives: list[Structure | None] = []
        for i in members:
            reduced = _reduce_for_matching(structures[i], matcher)
            if not any(_fits(matcher, reduced, rep) for rep in representatives):
                representatives.append(reduced)
                flags[i] = True
    return flags


def uniqueness(structures: Sequence[Structure], matcher=None) -> float:
    """Fraction of structures that are unique: number of equivalence classes / number of structures."""
    return float(unique_flags(structures, matcher).mean()) if len(structures) else math.nan


class ReferenceIndex:
    """Reference structures indexed by reduced formula, reduced for matching lazily and only once each."""

    def __init__(self, reference: Sequence[Structure], matcher=None, keys: Sequence[str] | None = None):
        self.structures = reference
        self.matcher = matcher or _default_matcher()
        self._by_formula: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(formula_keys(reference) if keys is None else keys):
            self._by_formula[key].append(i)
        self._reduced: dict[int, Structure | None] = {}

    def __len__(self) -> int:
        return len(self.structures)

    def with_matcher(self, matcher) -> "ReferenceIndex":
        """The same reference under other matcher tolerances, sharing the reduced cells already computed: the
        reduction (Niggli, primitive) does not depend on the tolerances, only on the primitive-cell setting."""
        if matcher._primitive_cell != self.matcher._primitive_cell:
            return ReferenceIndex(self.structures, matcher)
        view = ReferenceIndex.__new__(ReferenceIndex)
        view.structures, view.matcher, view._by_formula, view._reduced = (self.structures, matcher,
                                                                          self._by_formula, self._reduced)
        return view

    def _candidate(self, index: int) -> Structure | None:
        if index not in self._reduced:
            self._reduced[index] = _reduce_for_matching(self.structures[index], self.matcher)
        return self._reduced[index]

    def contains(self, structure: Structure, key: str | None = None) -> bool:
        """True if the structure matches any reference structure."""
        candidates = self._by_formula.get(key or structure.composition.reduced_formula, ())
        if not candidates:
            return False
        reduced = _reduce_for_matching(structure, self.matcher)
        return any(_fits(self.matcher, reduced, self._candidate(j)) for j in candidates)


def novel_flags(structures: Sequence[Structure], reference: Sequence[Structure] | ReferenceIndex,
                matcher=None) -> np.ndarray:
    """Per structure: True if it matches no reference structure (StructureMatcher, default tolerances)."""
    index = reference if isinstance(reference, ReferenceIndex) else ReferenceIndex(reference, matcher)
    return np.array([not index.contains(s) for s in structures], dtype=bool)


def novelty(structures: Sequence[Structure], reference: Sequence[Structure] | ReferenceIndex, matcher=None) -> float:
    """Fraction of structures not present in the reference set (e.g. the training data)."""
    return float(novel_flags(structures, reference, matcher).mean()) if len(structures) else math.nan


# ==================================================================================================================
# Distribution distances
# ==================================================================================================================


def js_distance(p_counts: Mapping, q_counts: Mapping) -> float:
    """Jensen-Shannon distance between two count histograms: `scipy.spatial.distance.jensenshannon(p, q, base=2)`.

    This is the square root of the base-2 JS divergence, in [0, 1] (0: identical, 1: disjoint supports). SymADiT
    calls its numbers "JS divergences" without the convention, but its Table 1 (ADiT: 99.01 % P1 -> 0.95 vs MP-20)
    is only reachable with this one: against MP-20 train a 99 % P1 sample scores between 0.948 and 0.969, while the
    squared base-2 value caps at 0.94 and natural-log variants at 0.83.
    """
    from scipy.spatial.distance import jensenshannon

    keys = sorted(set(p_counts) | set(q_counts), key=str)
    p = np.array([p_counts.get(k, 0) for k in keys], dtype=float)
    q = np.array([q_counts.get(k, 0) for k in keys], dtype=float)
    if p.sum() == 0 or q.sum() == 0:
        return math.nan
    return float(jensenshannon(p, q, base=2))


def spacegroup_js_distance(spacegroups: Sequence[int | None],
                           reference_spacegroups: Sequence[int | None]) -> float:
    """JS distance (base 2) between the space-group histograms of the sample and the reference; failures dropped."""
    return js_distance(Counter(sg for sg in spacegroups if sg is not None),
                       Counter(sg for sg in reference_spacegroups if sg is not None))


def wyckoff_histograms(infos: Iterable[SymmetryInfo]) -> dict[int, Counter]:
    """Per space group, how often each Wyckoff letter is occupied (one count per orbit)."""
    out: dict[int, Counter] = defaultdict(Counter)
    for info in infos:
        if info.spacegroup is not None and info.wyckoff_letters:
            out[info.spacegroup].update(info.wyckoff_letters)
    return out


def wyckoff_js_distance(infos: Sequence[SymmetryInfo],
                        reference_infos: Sequence[SymmetryInfo] | Mapping[int, Counter]) -> float:
    """SymADiT's Wyckoff-position distance: per-space-group JS distances, averaged with sample-count weights.

    Within each space group the distribution is over Wyckoff letters, one count per occupied orbit (a letter names
    a position unambiguously once the group is fixed). For every space group the sample uses, the JS distance
    (base 2, as `js_distance`) to the reference's letter distribution in the same group is taken; these are averaged
    weighted by the number of sample structures in each group. A group absent from the reference scores 1 (its
    positions are all unseen). Structures without a Wyckoff description are left out.
    """
    reference = reference_infos if isinstance(reference_infos, Mapping) else wyckoff_histograms(reference_infos)
    sample = wyckoff_histograms(infos)
    weights = Counter(i.spacegroup for i in infos if i.spacegroup is not None and i.wyckoff_letters)
    if not weights:
        return math.nan
    total = sum(weights.values())
    score = 0.0
    for sg, weight in weights.items():
        distance = js_distance(sample[sg], reference[sg]) if reference.get(sg) else 1.0
        score += weight * distance
    return score / total


# The short names the metrics had before their outputs were labelled as distances.
spacegroup_jsd, wyckoff_jsd = spacegroup_js_distance, wyckoff_js_distance
JS_FLOOR_DRAWS = 100  # n-samples per floor estimate: the floor's standard error is then ~1e-3 at n = 1,000


def js_distance_floor(reference_symmetry: Sequence[SymmetryInfo], n: int, draws: int = JS_FLOOR_DRAWS,
                      seed: int = 0) -> dict:
    """The JS distances a perfect sampler scores: the mean space-group and Wyckoff JS distance (base 2, as
    `spacegroup_js_distance` / `wyckoff_js_distance`) between the reference and `draws` samples of `n` structures
    drawn from it with replacement. A finite sample's histogram is never the reference's, so a generator's JS
    distance at this n is only as good as how close it comes to this, not to 0.

    Returns {'sg', 'wyckoff'} means, their standard deviations over the draws, n and draws; NaN for n = 0.
    """
    infos = [info for info in reference_symmetry if info.spacegroup is not None]
    if n < 1 or not infos:
        return {"sg": math.nan, "wyckoff": math.nan, "sg_std": math.nan, "wyckoff_std": math.nan, "n": n,
                "draws": draws}
    reference_spacegroups = [info.spacegroup for info in infos]
    reference_wyckoff = wyckoff_histograms(infos)
    rng = np.random.default_rng(seed)
    sg, wyckoff = [], []
    for _ in range(draws):
        sample = [infos[i] for i in rng.integers(len(infos), size=n)]
        sg.append(spacegroup_js_distance([info.spacegroup for info in sample], reference_spacegroups))
        wyckoff.append(wyckoff_js_distance(sample, reference_wyckoff))
    wyckoff = [w for w in wyckoff if not math.isnan(w)]  # NaN: no drawn structure had Wyckoff letters
    return {"sg": float(np.mean(sg)), "wyckoff": float(np.mean(wyckoff)) if wyckoff else math.nan,
            "sg_std": float(np.std(sg)), "wyckoff_std": float(np.std(wyckoff)) if wyckoff else math.nan, "n": n,
            "draws": draws}


def wasserstein(values: Sequence[float], reference_values: Sequence[float]) -> float:
    """1-D Wasserstein (earth mover's) distance between two samples, in the values' unit."""
    from scipy.stats import wasserstein_distance

    if len(values) == 0 or len(reference_values) == 0:
        return math.nan
    return float(wasserstein_distance(values, reference_values))


def primitive_num_atoms(structures: Sequence[Structure]) -> list[int]:
    """Atoms in each structure's primitive cell (`structures.primitive_cell`): a centred conventional cell counts
    its atoms once, not 2, 3 or 4 times."""
    return [len(primitive_cell(s)) for s in structures]


def num_atoms_wasserstein(structures: Sequence[Structure], reference: Sequence[Structure] | Sequence[int]) -> float:
    """Wasserstein distance (atoms) between the atoms-per-primitive-cell distributions, as the papers compare them
    (a generator writing conventional cells would otherwise be charged for the centring). `reference` is
    structures or their primitive atom counts (`ReferenceStats.num_atoms`)."""
    ref = [int(s) for s in reference] if len(reference) and not isinstance(reference[0], Structure) else \
        primitive_num_atoms(reference)
    return wasserstein(primitive_num_atoms(structures), ref)


def density_wasserstein(structures: Sequence[Structure], reference: Sequence[Structure] | Sequence[float]) -> float:
    """Wasserstein distance (g/cm^3) between the mass-density distributions."""
    ref = [float(s.density) if isinstance(s, Structure) else float(s) for s in reference]
    return wasserstein([float(s.density) for s in structures], ref)


# ==================================================================================================================
# Stability compounds: S.U.N., M.S.U.N., V.S.U.N.
# ==================================================================================================================


def stability_flags(e_above_hull: Sequence[float], n_elements: Sequence[int], threshold: float,
                    inclusive: bool, min_elements: int = MIN_STABLE_ELEMENTS) -> np.ndarray:
    """Per structure: E_hull (eV/atom) below `threshold` (<= if inclusive) and enough distinct elements; NaN fails."""
    e = np.asarray(e_above_hull, dtype=float)
    with np.errstate(invalid="ignore"):
        below = e <= threshold if inclusive else e < threshold
    return below & np.isfinite(e) & (np.asarray(n_elements) >= min_elements)


@dataclass(frozen=True)
class SunProtocol:
    """One paper's rule for a S.U.N.-type count: what is stable, which structures must be valid, among which
    structures uniqueness is decided. Counts are always fractions of all n structures (every decode, failed
    relaxations and failed hulls included: a NaN E_hull is never stable); novelty is against the caller's reference.

    validity: "none", "structural" (CDVAE: volume >= 0.1 Å^3, no pair closer than 0.5 Å) or "full" (structural and
    SMACT). unique_among: "valid" (first of each StructureMatcher class among the valid structures), "all" (among
    every structure, valid or not), "stable" (among the valid stable ones).
    """

    name: str
    label: str
    source: str
    threshold_ev: float  # eV/atom
    inclusive: bool  # E_hull <= threshold (else <)
    min_elements: int
    validity: str
    unique_among: str

    def flags(self, e_above_hull: Sequence[float], n_elements: Sequence[int], struct_valid: np.ndarray,
              comp_valid: np.ndarray, novel: np.ndarray, unique_among: Callable[[np.ndarray], np.ndarray]
              ) -> np.ndarray:
        """Per structure: counted by this protocol. `unique_among(mask)` gives the uniqueness flags of the
        structures in `mask` decided among those alone (False outside it)."""
        n = len(struct_valid)
        valid = {"none": np.ones(n, dtype=bool), "structural": np.asarray(struct_valid, bool),
                 "full": np.asarray(struct_valid, bool) & np.asarray(comp_valid, bool)}[self.validity]
        stable = valid & stability_flags(e_above_hull, n_elements, self.threshold_ev, self.inclusive,
                                         self.min_elements)
        domain = {"all": np.ones(n, dtype=bool), "valid": valid, "stable": stable}[self.unique_among]
        return stable & unique_among(domain) & np.asarray(novel, bool)

    def describe(self) -> str:
        rule = "<=" if self.inclusive else "<"
        elements = f", >= {self.min_elements} elements" if self.min_elements > 1 else ""
        validity = {"none": "", "structural": "structurally valid, ", "full": "valid (structure and SMACT), "}
        among = {"all": "all structures", "valid": "the valid ones", "stable": "the stable ones"}[self.unique_among]
        return (f"{validity[self.validity]}E_hull {rule} {self.threshold_ev:g} eV/atom{elements}, unique among "
                f"{among}, novel; over all n")


OURS_SUN = SunProtocol(
    "ours_sun", "S.U.N. (ours)", "SymADiT App. E/F: stable on or below the hull, compounds only; rates over all n "
    "as its footnote's product of V, U, N and S", STABLE_THRESHOLD, True, MIN_STABLE_ELEMENTS, "structural", "valid")
OURS_MSUN = SunProtocol(
    "ours_msun", "M.S.U.N. (ours)", "SymADiT: metastable below 0.1 eV/atom, compounds only", METASTABLE_THRESHOLD,
    False, MIN_STABLE_ELEMENTS, "structural", "valid")
MATTERGEN_SUN = SunProtocol(
    "mattergen_sun", "S.U.N. (MatterGen)", "MatterGen (Zeni et al. 2025): stable within 0.1 eV/atom of the hull, any "
    "number of elements, uniqueness over all generated structures", METASTABLE_THRESHOLD, True, 1, "none", "all")
FLOWMM_SUN = SunProtocol(
    "flowmm_sun", "S.U.N. (FlowMM)", "FlowMM (Miller et al. 2024): stable on or below the hull, uniqueness decided "
    "among the stable structures only", STABLE_THRESHOLD, True, 1, "none", "stable")
COMPOSABLE_VSUN = SunProtocol(
    "composable_vsun", "V.S.U.N. (Composable Crystals)", "Composable Crystals, App. C.3 Eq. 12 and Sec. 4.1: valid in "
    "structure (volume > 0.1, pairs >= 0.5 Å) and composition (charge neutrality, electronegativity), E_hull below "
    "0.1 eV/atom (following MatterGen), unique and novel; uniqueness among the valid ('only valid crystals are "
    "meaningful for the remaining properties'); no element rule", METASTABLE_THRESHOLD, False, 1, "full", "valid")
SUN_PROTOCOLS = (OURS_SUN, OURS_MSUN, MATTERGEN_SUN, FLOWMM_SUN, COMPOSABLE_VSUN)


def sun_metrics(e_above_hull: Sequence[float] | None, *, struct_valid: Sequence[bool], comp_valid: Sequence[bool],
                unique: Sequence[bool], novel: Sequence[bool], n_elements: Sequence[int]) -> dict:
    """Stability compound rates over all n structures (fractions of the whole generated set).

    - stable: E_hull <= 0.0 eV/atom ("on or below the hull", SymADiT App. E) and >= 2 elements (SymADiT App. F).
    - metastable: E_hull < 0.1 eV/atom and >= 2 elements (SymADiT).
    - sun_rate: OURS_SUN, structurally valid & unique & novel & stable, / n (SymADiT's footnote: the product of
      validity, uniqueness, novelty and stability rates is the fraction of all generated materials).
    - msun_rate: OURS_MSUN, the same with metastable.
    - vsun_rate: COMPOSABLE_VSUN, Composable Crystals' V.S.U.N. (no element rule).
    `unique` / `novel` are per-structure flags (False where not evaluated), uniqueness decided among the
    structurally valid: that is each of these protocols' own rule (matched structures share a formula, so they
    are SMACT-valid alike). E_hull None gives NaN rates; NaN entries (failed relaxations) count as unstable.
    """
    names = ("stable_rate", "metastable_rate", "sun_rate", "msun_rate", "vsun_rate")
    n = len(struct_valid)
    if e_above_hull is None or n == 0:
        return {name: math.nan for name in names} | {"n_stable": None, "n_metastable": None, "n_sun": None,
                                                      "n_msun": None, "n_vsun": None}
    if len(e_above_hull) != n:
        raise ValueError(f"{len(e_above_hull)} energies above hull for {n} structures")
    stable = stability_flags(e_above_hull, n_elements, STABLE_THRESHOLD, inclusive=True)
    metastable = stability_flags(e_above_hull, n_elements, METASTABLE_THRESHOLD, inclusive=False)
    struct_valid, comp_valid = np.asarray(struct_valid, bool), np.asarray(comp_valid, bool)
    unique = np.asarray(unique, bool)

    def counted(protocol: SunProtocol) -> int:
        return int(protocol.flags(e_above_hull, n_elements, struct_valid, comp_valid, novel,
                                  lambda domain: unique & domain).sum())

    counts = {"n_stable": int(stable.sum()), "n_metastable": int(metastable.sum()), "n_sun": counted(OURS_SUN),
              "n_msun": counted(OURS_MSUN), "n_vsun": counted(COMPOSABLE_VSUN)}
    rates = dict(zip(names, (counts[k] / n for k in ("n_stable", "n_metastable", "n_sun", "n_msun", "n_vsun"))))
    return rates | counts


class SunFlags:
    """The per-structure facts every S.U.N. protocol combines, each computed once: validity, element counts,
    novelty of every structure against `reference`, and uniqueness decided among any subset (each subset once)."""

    def __init__(self, structures: Sequence[Structure], reference: Sequence[Structure] | ReferenceIndex,
                 matcher=None):
        self.structures = list(structures)
        n = len(self.structures)
        self.matcher = matcher
        self.struct_valid = structural_validity(self.structures) if n else np.zeros(0, dtype=bool)
        self.comp_valid = compositional_validity(self.structures) if n else np.zeros(0, dtype=bool)
        self.n_elements = [len(s.composition.elements) for s in self.structures]
        self._keys = formula_keys(self.structures)
        self.novel = novel_flags(self.structures, reference, matcher) if n else np.zeros(0, dtype=bool)
        self._unique: dict[bytes, np.ndarray] = {}

    def unique_among(self, mask: np.ndarray) -> np.ndarray:
        """Uniqueness of the structures in `mask`, decided among those alone (False outside it)."""
        mask = np.asarray(mask, bool)
        if mask.tobytes() not in self._unique:
            members = np.flatnonzero(mask)
            flags = np.zeros(len(self.structures), dtype=bool)
            flags[members] = unique_flags([self.structures[i] for i in members], self.matcher,
                                          [self._keys[i] for i in members])
            self._unique[mask.tobytes()] = flags
        return self._unique[mask.tobytes()]

    def counted(self, protocol: SunProtocol, e_above_hull: Sequence[float]) -> np.ndarray:
        """Per structure: counted by `protocol` at these energies above hull (eV/atom, NaN: none)."""
        if len(e_above_hull) != len(self.structures):
            raise ValueError(f"{len(e_above_hull)} energies above hull for {len(self.structures)} structures")
        return protocol.flags(e_above_hull, self.n_elements, self.struct_valid, self.comp_valid, self.novel,
                              self.unique_among)


def sun_protocols(flags: SunFlags, e_above_hull: Sequence[float],
                  protocols: Sequence[SunProtocol] = SUN_PROTOCOLS) -> dict[str, dict]:
    """Each protocol's count and rate over all n structures, labelled: {name: {label, definition, n, rate}}."""
    n = len(flags.structures)
    out = {}
    for protocol in protocols:
        count = int(flags.counted(protocol, e_above_hull).sum())
        out[protocol.name] = {"label": protocol.label, "definition": protocol.describe(), "source": protocol.source,
                              "n": count, "rate": count / n if n else math.nan}
    return out


# ==================================================================================================================
# Structure prediction: top-k match rate and RMSD
# ==================================================================================================================


def csp_matcher():
    """StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3): the CSP match-rate tolerances of the seeds."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**CSP_MATCHER_KWARGS)


def match_rate_and_rmsd(candidates: Sequence[Sequence[Structure]], targets: Sequence[Structure],
                        k: int | None = None, matcher=None, valid_only: bool = False) -> dict:
    """Top-k match rate and mean RMSD of crystal structure prediction.

    For each target, the first k candidates are compared with `get_rms_dist`; the target counts as matched when
    any of them matches, and its RMSD is the smallest normalized RMS displacement (divided by (V/n)^(1/3), as
    StructureMatcher reports it) among its matches. Returns match_rate (fraction of targets), rmsd (mean over
    matched targets, None if none), n_targets, n_matched, k and the per-target best RMSDs (None when unmatched).
    With `valid_only`, only valid candidates can match: structurally valid and SMACT-valid, as CDVAE's and
    DiffCSP's evaluation code filter them (`is_valid` = structure and composition) before matching.
    """
    if len(candidates) != len(targets):
        raise ValueError(f"{len(candidates)} candidate lists for {len(targets)} targets")
    matcher = matcher or csp_matcher()
    best: list[float | None] = []
    for target, options in zip(targets, candidates):
        rms_values = []
        for candidate in list(options)[:k]:
            if valid_only and not (structural_validity([candidate])[0] and smact_valid(candidate.composition)):
                continue
            try:
                result = matcher.get_rms_dist(candidate, target)
            except Exception:  # an unbuildable candidate is simply not a match
                result = None
            if result is not None:
                rms_values.append(float(result[0]))
        best.append(min(rms_values) if rms_values else None)
    matched = [b for b in best if b is not None]
    return {"match_rate": len(matched) / len(targets) if len(targets) else None,
            "rmsd": float(np.mean(matched)) if matched else None,
            "n_targets": len(targets), "n_matched": len(matched),
            "k": k if k is not None else max((len(c) for c in candidates), default=0), "per_target_rmsd": best}


def top_k_sun_rate(candidates: Sequence[Sequence[Structure]], e_above_hull: Sequence[Sequence[float]],
                   reference: Sequence[Structure] | ReferenceIndex, k: int | None = None, matcher=None) -> dict:
    """The constrained-beam-search seed's Top-k S.U.N.: fraction of target compositions with at least one candidate
    (among the first k) that is stable (E_hull < 0.1 eV/atom), unique within that target's candidates and novel.

    `e_above_hull[t][j]` is candidate j of target t in eV/atom (NaN: unknown, counts as unstable).
    """
    if len(candidates) != len(e_above_hull):
        raise ValueError(f"{len(candidates)} candidate lists but {len(e_above_hull)} energy lists")
    index = reference if isinstance(reference, ReferenceIndex) else ReferenceIndex(reference, matcher)
    solved = 0
    for options, energies in zip(candidates, e_above_hull):
        options, energies = list(options)[:k], np.asarray(list(energies)[:k], dtype=float)
        with np.errstate(invalid="ignore"):
            stable = np.isfinite(energies) & (energies < METASTABLE_THRESHOLD)
        if not stable.any():
            continue
        unique = unique_flags(options, index.matcher)
        solved += any(stable[j] and unique[j] and not index.contains(options[j]) for j in range(len(options)))
    return {"top_k_sun_rate": solved / len(candidates) if len(candidates) else None, "n_targets": len(candidates),
            "n_solved": solved, "k": k}


# ==================================================================================================================
# Everything at once
# ==================================================================================================================


@dataclass
class ReferenceStats:
    """What the distribution metrics need from a reference set; JSON-able so it can be cached. `num_atoms` counts
    each primitive cell's atoms (`primitive_num_atoms`)."""

    symmetry: list[SymmetryInfo]
    num_atoms: list[int]
    densities: list[float]
    symprec: float = DEFAULT_SYMPREC
    wyckoff: dict[int, Counter] = field(init=False, repr=False)

    def __post_init__(self):
        self.wyckoff = wyckoff_histograms(self.symmetry)

    @property
    def spacegroups(self) -> list[int | None]:
        return [info.spacegroup for info in self.symmetry]

    @classmethod
    def from_structures(cls, structures: Sequence[Structure], symprec: float = DEFAULT_SYMPREC) -> "ReferenceStats":
        return cls(analyze_symmetry(structures, symprec), primitive_num_atoms(structures),
                   [float(s.density) for s in structures], symprec)

    def as_dict(self) -> dict:
        return {"symprec": self.symprec, "symmetry": [i.as_list() for i in self.symmetry],
                "num_atoms": self.num_atoms, "densities": self.densities}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ReferenceStats":
        return cls([SymmetryInfo.from_list(x) for x in data["symmetry"]], list(data["num_atoms"]),
                   list(data["densities"]), float(data["symprec"]))

    def js_distance_floor(self, n: int) -> dict:
        """`js_distance_floor` of this reference at sample size n (seed 0; computed once per n)."""
        cache = self.__dict__.setdefault("_js_floors", {})
        if n not in cache:
            cache[n] = js_distance_floor(self.symmetry, n)
        return cache[n]


def _timed(timings: dict, name: str, func: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    timings[f"time_{name}_s"] = round(time.perf_counter() - start, 3)
    return result


def _rate(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def _fraction(count: int, total: int) -> float:
    return float(count / total) if total else math.nan


def evaluate(structures: Sequence[Structure], reference: Sequence[Structure] | ReferenceIndex | None = None, *,
             intended_spacegroups: Sequence[int | None] | None = None,
             e_above_hull: Sequence[float] | None = None, symprec: float = DEFAULT_SYMPREC,
             reference_stats: ReferenceStats | None = None, matcher=None, n_attempts: int | None = None) -> dict:
    """Every generation metric of the seeds, as one flat JSON-able dict (NaN where not computable).

    Pipeline (SymADiT): structural validity on all n; uniqueness among the structurally valid; novelty of the unique
    valid ones against `reference`; U.N. over the structurally valid; S.U.N.-type rates over all n (needs
    `e_above_hull`, eV/atom, one per structure). Distribution metrics compare the whole sample with the reference
    (`reference_stats` is computed from `reference` when not given). Timings of each stage are `time_<stage>_s`.

    Papers' conventions, labelled in the keys: uniqueness and novelty under every MATCHER_SETTINGS entry
    (`uniqueness_<setting>`, `novelty_<setting>`, `un_rate_<setting>`; the plain keys are `matcher`'s, pymatgen's
    defaults unless given); `p1_rate` at `symprec` and `p1_rate_pymatgen` at 0.01 Å with pymatgen's analyser
    (SymADiT); JS *distances* (base 2) with `*_js_floor`, what a perfect sampler of the reference scores at this
    n; atoms per cell compared in primitive cells. `n_attempts` is how many structures the generator drew to make
    these n (a quality gate resamples: the papers score every draw, so a protocol that claims theirs divides by
    it); it defaults to n (nothing was turned down).
    """
    symprec = check_tolerance(symprec)  # before the validity stage: a bad tolerance fails at once, not after it
    n = len(structures)
    if n_attempts is not None and n_attempts < n:
        raise ValueError(f"n_attempts {n_attempts} is fewer than the {n} structures it made")
    timings: dict[str, float] = {}
    out: dict = {"n": n, "n_attempts": n if n_attempts is None else int(n_attempts), "symprec": symprec}

    distances = _timed(timings, "validity", min_distances, structures)
    start = time.perf_counter()
    struct_valid = structural_validity(structures, distances=distances)
    bonds_ok = bond_consistency(structures, distances=distances)
    comp_valid = compositional_validity(structures)
    timings["time_validity_s"] = round(timings["time_validity_s"] + time.perf_counter() - start, 3)
    out |= {"n_struct_valid": int(struct_valid.sum()), "struct_validity": _rate(struct_valid),
            "n_bond_consistent": int(bonds_ok.sum()), "bond_consistency": _rate(bonds_ok),
            "n_comp_valid": int(comp_valid.sum()), "comp_validity": _rate(comp_valid),
            "n_valid": int((struct_valid & comp_valid).sum()), "validity": _rate(struct_valid & comp_valid)}

    infos = _timed(timings, "symmetry", analyze_symmetry, structures, symprec)
    spacegroups = [info.spacegroup for info in infos]
    out |= {"n_symmetry_failed": sum(sg is None for sg in spacegroups), "p1_rate": p1_rate(spacegroups),
            "pymatgen_symprec": PYMATGEN_SYMPREC,
            "p1_rate_pymatgen": p1_rate(_timed(timings, "p1_pymatgen", pymatgen_spacegroups, structures))}
    if intended_spacegroups is not None:
        consistent = spacegroup_consistency(spacegroups, intended_spacegroups)
        checked = consistent[~np.isnan(consistent)]
        out |= {"n_sg_checked": int(len(checked)), "n_sg_consistent": int(checked.sum()),
                "sg_consistency": _rate(checked)}
    else:
        out |= {"n_sg_checked": 0, "n_sg_consistent": None, "sg_consistency": math.nan}

    valid_idx = np.flatnonzero(struct_valid)
    valid_structures = [structures[i] for i in valid_idx]
    keys = formula_keys(valid_structures)
    if reference is not None and not isinstance(reference, ReferenceIndex):
        reference = ReferenceIndex(reference, matcher)
    by_setting = {}
    for setting in MATCHER_SETTINGS:
        setting_matcher = matcher if matcher is not None and setting == "pymatgen_tol" else structure_matcher(setting)
        unique_s = np.zeros(n, dtype=bool)
        unique_s[valid_idx] = _timed(timings, f"uniqueness_{setting}", unique_flags, valid_structures,
                                     setting_matcher, keys)
        novel_s = np.zeros(n, dtype=bool)
        if reference is not None:
            unique_idx = np.flatnonzero(unique_s)
            index = reference if setting_matcher is reference.matcher else reference.with_matcher(setting_matcher)
            novel_s[unique_idx] = _timed(timings, f"novelty_{setting}", novel_flags,
                                         [structures[i] for i in unique_idx], index)
        by_setting[setting] = unique_s, novel_s
        out |= {f"n_unique_{setting}": int(unique_s.sum()),
                f"uniqueness_{setting}": _fraction(unique_s.sum(), len(valid_idx))}
        known = reference is not None
        out |= {f"n_novel_{setting}": int(novel_s.sum()) if known else None,
                f"novelty_{setting}": _fraction(novel_s.sum(), unique_s.sum()) if known else math.nan,
                f"un_rate_{setting}": _fraction(novel_s.sum(), len(valid_idx)) if known else math.nan}
    unique, novel = by_setting["pymatgen_tol"]
    out |= {"matcher": "given" if matcher is not None else MATCHER_LABELS["pymatgen_tol"],
            "n_unique": int(unique.sum()), "uniqueness": _fraction(unique.sum(), len(valid_idx))}

    if reference is not None:
        out |= {"n_novel": int(novel.sum()), "novelty": out["novelty_pymatgen_tol"],
                "un_rate": _fraction(novel.sum(), len(valid_idx))}
        if reference_stats is None:
            ref_structures = reference.structures if isinstance(reference, ReferenceIndex) else reference
            reference_stats = _timed(timings, "reference_stats", ReferenceStats.from_structures, ref_structures,
                                     symprec)
    else:
        out |= {"n_novel": None, "novelty": math.nan, "un_rate": math.nan}

    if reference_stats is not None:
        start = time.perf_counter()
        floor = reference_stats.js_distance_floor(sum(sg is not None for sg in spacegroups))
        out |= {"n_reference": len(reference_stats.num_atoms),
                "sg_js_distance": spacegroup_js_distance(spacegroups, reference_stats.spacegroups),
                "sg_js_floor": floor["sg"],
                "wyckoff_js_distance": wyckoff_js_distance(infos, reference_stats.wyckoff),
                "wyckoff_js_floor": floor["wyckoff"],
                "num_atoms_wasserstein": num_atoms_wasserstein(structures, reference_stats.num_atoms),
                "density_wasserstein": density_wasserstein(structures, reference_stats.densities)}
        timings["time_distributions_s"] = round(time.perf_counter() - start, 3)
    else:
        out |= {"n_reference": 0, "sg_js_distance": math.nan, "sg_js_floor": math.nan,
                "wyckoff_js_distance": math.nan, "wyckoff_js_floor": math.nan,
                "num_atoms_wasserstein": math.nan, "density_wasserstein": math.nan}

    n_elements = [len(s.composition.elements) for s in structures]
    out |= sun_metrics(e_above_hull, struct_valid=struct_valid, comp_valid=comp_valid, unique=unique,
                       novel=novel if reference is not None else np.zeros(n, dtype=bool), n_elements=n_elements)
    if reference is None and e_above_hull is not None:  # novelty unknown: S.U.N. rates would be meaningless zeros
        out |= {k: math.nan for k in ("sun_rate", "msun_rate", "vsun_rate")} | {"n_sun": None, "n_msun": None,
                                                                                "n_vsun": None}
    # Strict JSON: metrics that could not be computed are None rather than NaN.
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in (out | timings).items()}
