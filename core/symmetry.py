"""Crystallographic tables: space groups, Wyckoff positions, lattice families and the shared orbit vocabulary.

Everything is tabulated once from pyxtal's International Tables data (ITA standard settings: unique axis b,
origin choice 2, hexagonal axes for rhombohedral groups) and shipped as a package resource, so run-time code
needs neither pyxtal nor the network. `tabulate()` regenerates the resource; a test checks they agree.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from wyckoff_lab.core.defaults import SYMPREC

RESOURCE = "spacegroups.json.gz"


@contextlib.contextmanager
def quiet_spglib():
    """Silence spglib's C-level messages ("ssm_get_exact_positions failed"), which it prints unless told not to."""
    previous = os.environ.get("SPGLIB_WARNING")
    os.environ["SPGLIB_WARNING"] = "OFF"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SPGLIB_WARNING", None)
        else:
            os.environ["SPGLIB_WARNING"] = previous


def check_tolerance(value, name: str = "symprec") -> float:
    """`value` as a float if it is a finite tolerance > 0; ValueError otherwise. spglib crashes the process
    (segmentation fault) on a negative or NaN tolerance, so every caller that passes one on checks it first."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")
    return number


@dataclass(frozen=True)
class SymmetryAnalysis:
    """What spglib finds of one structure at one tolerance: the space group, and each site's Wyckoff letter and
    orbit (the index of its orbit's first site), in the structure's own site order."""

    number: int
    symprec: float
    wyckoff_letters: tuple[str, ...]
    equivalent_atoms: tuple[int, ...]

    @property
    def spacegroup(self) -> SpaceGroupInfo:
        return spacegroup(self.number)


SYMMETRY_CACHE_SIZE = 4096  # analyses kept (a few hundred bytes each): a session's candidates and their views


def analyze_symmetry_of(structure, symprec: float = SYMPREC) -> SymmetryAnalysis | None:
    """spglib's analysis of a pymatgen Structure at `symprec` (Å), None if it finds no group. Run once per
    structure and tolerance: the quality gate, the candidate records and the 3D view ask for the same cell, and
    the answer is cached by the cell's content (lattice, species, coordinates), as pymatgen's SpacegroupAnalyzer
    keeps its dataset."""
    symprec = check_tolerance(symprec)
    lattice = np.ascontiguousarray(structure.lattice.matrix, dtype=float)
    coords = np.ascontiguousarray(structure.frac_coords, dtype=float)
    numbers = tuple(site.specie.Z for site in structure)
    return _analysis(lattice.tobytes(), coords.tobytes(), numbers, symprec)


@functools.lru_cache(maxsize=SYMMETRY_CACHE_SIZE)
def _analysis(lattice: bytes, coords: bytes, numbers: tuple[int, ...], symprec: float) -> SymmetryAnalysis | None:
    import spglib

    cell = (np.frombuffer(lattice).reshape(3, 3), np.frombuffer(coords).reshape(-1, 3), list(numbers))
    try:
        with quiet_spglib():
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:  # spglib raises on degenerate cells (e.g. overlapping atoms)
        return None
    if dataset is None:
        return None
    return SymmetryAnalysis(int(dataset.number), symprec, tuple(str(w) for w in dataset.wyckoffs),
                            tuple(int(i) for i in dataset.equivalent_atoms))


def detected_spacegroup(structure, symprec: float = SYMPREC) -> int | None:
    """The space-group number spglib finds for a pymatgen Structure at `symprec` (Å), None if it finds none."""
    analysis = analyze_symmetry_of(structure, symprec)
    return None if analysis is None else analysis.number


LATTICE_PARAMETER_NAMES = ("a", "b", "c", "alpha", "beta", "gamma")
AXES = "xyz"


# ----------------------------------------------------------------------------------------------------------------
# Wyckoff positions
# ----------------------------------------------------------------------------------------------------------------


def parse_xyz_op(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one coordinate triplet such as '-x+1/2, 2x, z+1/4' into (R 3x3, t 3) with site = R @ xyz + t."""
    rotation = np.zeros((3, 3))
    translation = np.zeros(3)
    for row, expr in enumerate(text.replace(" ", "").split(",")):
        for sign, coeff, var in re.findall(r"([+-]?)(\d*(?:/\d+)?)([xyz]?)", expr):
            if not coeff and not var:
                continue
            value = 1.0
            if coeff:
                num, _, den = coeff.partition("/")
                value = float(num) / float(den or 1)
            value = -value if sign == "-" else value
            if var:
                rotation[row, AXES.index(var)] += value
            else:
                translation[row] += value
    return rotation, translation


@dataclass(frozen=True, eq=False)
class WyckoffPosition:
    """One Wyckoff position of a space group: its orbit as affine maps of the free parameters.

    `ops[i]` maps a coordinate vector (x, y, z) to the i-th site of the orbit. Only the coordinates listed in
    `free_axes` enter the representative site `ops[0]`; the others are ignored (e.g. '0, y, 0' has free_axes (1,)).
    """

    spacegroup: int
    letter: str
    multiplicity: int
    site_symmetry: str
    ops_xyz: tuple[str, ...]
    token: int = -1  # index into the shared orbit vocabulary
    rotations: np.ndarray = field(repr=False, default=None)  # (m, 3, 3)
    translations: np.ndarray = field(repr=False, default=None)  # (m, 3)

    def __post_init__(self) -> None:
        if self.rotations is None:
            parsed = [parse_xyz_op(op) for op in self.ops_xyz]
            object.__setattr__(self, "rotations", np.array([r for r, _ in parsed]))
            object.__setattr__(self, "translations", np.array([t for _, t in parsed]))

    @property
    def label(self) -> str:
        """The Wyckoff label as written in the International Tables, e.g. '4a'."""
        return f"{self.multiplicity}{self.letter}"

    @functools.cached_property
    def free_axes(self) -> tuple[int, ...]:
        """Indices of x, y, z that the representative site depends on: its degrees of freedom."""
        return tuple(int(i) for i in np.flatnonzero(np.abs(self.rotations[0]).sum(axis=0) > 0))

    @property
    def dof(self) -> int:
        return len(self.free_axes)

    @property
    def free_parameter_names(self) -> tuple[str, ...]:
        return tuple(AXES[i] for i in self.free_axes)

    @functools.cached_property
    def jacobian(self) -> np.ndarray:
        """d(representative site)/d(free parameters): the 3 x dof site-symmetry Jacobian J_w (seed A12)."""
        return self.rotations[0][:, list(self.free_axes)]

    @functools.cached_property
    def jacobian_pinv(self) -> np.ndarray:
        """Moore–Penrose pseudo-inverse J_w^+ (dof x 3), projecting a displacement onto the free parameters."""
        return np.linalg.pinv(self.jacobian) if self.dof else np.zeros((0, 3))

    def _full_vector(self, free_params) -> np.ndarray:
        xyz = np.zeros(3)
        xyz[list(self.free_axes)] = np.asarray(free_params, dtype=float).reshape(-1)[: self.dof]
        return xyz

    def site(self, free_params=()) -> np.ndarray:
        """The representative site (fractional, wrapped to [0, 1)) for the given free parameters."""
        return (self.rotations[0] @ self._full_vector(free_params) + self.translations[0]) % 1.0

    def orbit(self, free_params=()) -> np.ndarray:
        """All `multiplicity` symmetry-equivalent sites in the conventional cell, (m, 3), wrapped to [0, 1)."""
        xyz = self._full_vector(free_params)
        sites = np.einsum("mij,j->mi", self.rotations, xyz) + self.translations
        return np.round(sites % 1.0, 12) % 1.0

    def snap(self, frac_coord, op_index: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
        """Nearest point of this position to an arbitrary fractional coordinate, through orbit member `op_index`.

        Returns (free parameters wrapped to [0, 1), snapped fractional coordinate, residual distance in
        fractional units). Tries the lattice translations n in {-1, 0, 1}^3 because J p = f - t holds only modulo 1.
        """
        rotation, translation = self.rotations[op_index], self.translations[op_index]
        jac = rotation[:, list(self.free_axes)]
        pinv = np.linalg.pinv(jac) if self.dof else np.zeros((0, 3))
        delta = (np.asarray(frac_coord, dtype=float) - translation) % 1.0
        candidates = delta[None, :] + _INTEGER_SHIFTS  # (27, 3)
        params = candidates @ pinv.T  # (27, dof)
        residual = candidates - params @ jac.T
        residual -= np.round(residual)
        norms = np.linalg.norm(residual, axis=1)
        best = int(np.argmin(norms))
        free = params[best] % 1.0
        return free, (jac @ free + translation) % 1.0, float(norms[best])

    def free_params_from_orbit(self, frac_coords: np.ndarray, tol: float = 1e-3) -> np.ndarray:
        """Free parameters of the representative site, given any sites of the orbit (e.g. all m of them).

        Each given site is tried as the image of ops[0]; the best exact solution wins. Raises ValueError when no
        site fits the position within `tol` (fractional units): the orbit is not of this Wyckoff type.
        """
        best_free, best_residual = None, np.inf
        for coord in np.atleast_2d(frac_coords):
            free, _, residual = self.snap(coord)
            if residual < best_residual:
                best_free, best_residual = free, residual
                if residual < 1e-9:
                    break
        if best_residual > tol:
            raise ValueError(f"sites do not lie on Wyckoff position {self.label} of space group {self.spacegroup}")
        return np.round(best_free, 12) % 1.0

    def project_orbit(self, frac_coords: np.ndarray) -> np.ndarray:
        """Symmetry rectification (seed eq. A12–A13): the free parameters best fitting m noisy orbit sites.

        `frac_coords[n]` is taken as the image of op n. Each site gives an estimate J_n^+ (f_n - t_n); estimates are
        aligned modulo 1 to the first one and averaged. Rebuild the rectified sites with `orbit(free)`.
        """
        frac_coords = np.asarray(frac_coords, dtype=float)
        estimates = []
        for n, coord in enumerate(frac_coords):
            free, _, _ = self.snap(coord, op_index=n)
            estimates.append(free)
        estimates = np.array(estimates)
        estimates -= np.round(estimates - estimates[0])
        return estimates.mean(axis=0) % 1.0


_INTEGER_SHIFTS = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)


# ----------------------------------------------------------------------------------------------------------------
# Lattice families
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatticeFamily:
    """Which of (a, b, c, alpha, beta, gamma) are free for a crystal system, and how to snap onto the family.

    `free_mask` is the binary mask m_Sg of the symmetry-inference seed (A.4, eq. A11) over lattice parameters.
    """

    crystal_system: str
    free_parameters: tuple[str, ...]

    @property
    def free_mask(self) -> tuple[bool, ...]:
        return tuple(name in self.free_parameters for name in LATTICE_PARAMETER_NAMES)

    def from_free(self, values) -> tuple[float, ...]:
        """Full (a, b, c, alpha, beta, gamma) in Å and degrees from the free parameters, in `free_parameters` order."""
        free = dict(zip(self.free_parameters, (float(v) for v in values)))
        return self._complete(free)

    def project(self, params) -> tuple[float, ...]:
        """Snap arbitrary lattice parameters onto this family (average the lengths that must be equal)."""
        a, b, c, alpha, beta, gamma = (float(p) for p in params)
        system = self.crystal_system
        if system == "cubic":
            free = {"a": (a + b + c) / 3}
        elif system in ("tetragonal", "hexagonal", "trigonal"):
            free = {"a": (a + b) / 2, "c": c}
        else:
            free = {"a": a, "b": b, "c": c, "alpha": alpha, "beta": beta, "gamma": gamma}
        return self._complete({k: v for k, v in free.items() if k in self.free_parameters})

    def free_values(self, params) -> tuple[float, ...]:
        """The free parameters of (already projected) lattice parameters."""
        return tuple(float(params[LATTICE_PARAMETER_NAMES.index(name)]) for name in self.free_parameters)

    def _complete(self, free: dict[str, float]) -> tuple[float, ...]:
        a = free["a"]
        b = free.get("b", a)
        c = free.get("c", a)
        gamma_fixed = 120.0 if self.crystal_system in ("hexagonal", "trigonal") else 90.0
        return (a, b, c, free.get("alpha", 90.0), free.get("beta", 90.0), free.get("gamma", gamma_fixed))


LATTICE_FAMILIES = {
    "triclinic": LatticeFamily("triclinic", LATTICE_PARAMETER_NAMES),
    "monoclinic": LatticeFamily("monoclinic", ("a", "b", "c", "beta")),  # unique axis b
    "orthorhombic": LatticeFamily("orthorhombic", ("a", "b", "c")),
    "tetragonal": LatticeFamily("tetragonal", ("a", "c")),
    "trigonal": LatticeFamily("trigonal", ("a", "c")),  # hexagonal axes, also for R groups
    "hexagonal": LatticeFamily("hexagonal", ("a", "c")),
    "cubic": LatticeFamily("cubic", ("a",)),
}


# ----------------------------------------------------------------------------------------------------------------
# Space groups
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpaceGroupInfo:
    """A space group in its ITA standard setting with its Wyckoff positions (general position first)."""

    number: int
    symbol: str
    crystal_system: str
    hall_number: int
    wyckoff_positions: tuple[WyckoffPosition, ...]

    @property
    def lattice_family(self) -> LatticeFamily:
        return LATTICE_FAMILIES[self.crystal_system]

    @functools.cached_property
    def by_letter(self) -> dict[str, WyckoffPosition]:
        return {wp.letter: wp for wp in self.wyckoff_positions}

    def wyckoff(self, label_or_letter: str) -> WyckoffPosition:
        """Look up a Wyckoff position by letter ('a') or label ('4a'); a clear KeyError otherwise."""
        letter = label_or_letter.lstrip("0123456789")
        wp = self.by_letter.get(letter)
        if wp is None or (letter != label_or_letter and wp.label != label_or_letter):
            known = ", ".join(w.label for w in self.wyckoff_positions)
            raise KeyError(f"space group {self.number} ({self.symbol}) has no Wyckoff position {label_or_letter!r}; "
                           f"it has {known}")
        return wp

    @property
    def general_position(self) -> WyckoffPosition:
        return self.wyckoff_positions[0]

    @property
    def centering_factor(self) -> int:
        """Conventional-cell atoms per primitive-cell atom, from the lattice centring (R in hexagonal axes: 3)."""
        return CENTERING_FACTOR[self.symbol[0]]

    @functools.cached_property
    def fixed_multiplicities(self) -> tuple[int, ...]:
        """Multiplicities of the 0-DOF positions (each holds one orbit at most), sorted."""
        return tuple(sorted(wp.multiplicity for wp in self.wyckoff_positions if wp.dof == 0))

    @functools.cached_property
    def repeatable_multiplicities(self) -> tuple[int, ...]:
        """Distinct multiplicities of the positions with free parameters (each may hold several orbits), sorted."""
        return tuple(sorted({wp.multiplicity for wp in self.wyckoff_positions if wp.dof > 0}))


# Conventional-cell atoms per primitive-cell atom by the first letter of the Hermann-Mauguin symbol.
CENTERING_FACTOR = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3}


def tabulate() -> dict:
    """Build the JSON-able tables from pyxtal (slow path, ~1 s; used to generate the shipped resource)."""
    from pyxtal.symmetry import Group

    groups = []
    vocabulary: dict[str, int] = {}
    for number in range(1, 231):
        group = Group(number)
        positions = []
        for wp in group.Wyckoff_positions:
            wp.get_site_symmetry()
            ops = [op.as_xyz_str() for op in wp.ops]
            key = orbit_key(ops)
            token = vocabulary.setdefault(key, len(vocabulary))
            positions.append({"letter": wp.letter, "multiplicity": wp.multiplicity,
                              "site_symmetry": wp.site_symm, "ops": ops, "token": token})
        groups.append({"number": number, "symbol": group.symbol, "crystal_system": group.lattice_type,
                       "hall_number": int(group.hall_number), "wyckoff_positions": positions})
    return {"source": "pyxtal International Tables data, ITA standard settings", "spacegroups": groups,
            "vocabulary_size": len(vocabulary)}


def orbit_key(ops_xyz) -> str:
    """The algebraic form of an orbit: its set of coordinate triplets, order-free, as canonical text.

    Positions of different space groups with the same set (e.g. '0,y,0 / 0,-y,0' in groups 10, 16 and 47) share
    one vocabulary token, as in Matra-Genoa.
    """
    canonical = []
    for op in ops_xyz:
        rotation, translation = parse_xyz_op(op)
        canonical.append(tuple(np.round(rotation, 6).ravel()) + tuple(np.round(translation % 1.0, 6)))
    return json.dumps(sorted(canonical))


def write_resource(path=None) -> None:
    """Regenerate the shipped tables (run after upgrading pyxtal; `wyckoff-lab represent tabulate`)."""
    target = path or resources.files("wyckoff_lab.core").joinpath("resources", RESOURCE)
    with gzip.open(target, "wt", encoding="utf-8") as f:
        json.dump(tabulate(), f, separators=(",", ":"))


@functools.cache
def _tables() -> dict[int, SpaceGroupInfo]:
    with resources.files("wyckoff_lab.core").joinpath("resources", RESOURCE).open("rb") as raw:
        data = json.loads(gzip.decompress(raw.read()))
    tables = {}
    for g in data["spacegroups"]:
        positions = tuple(
            WyckoffPosition(g["number"], p["letter"], p["multiplicity"], p["site_symmetry"], tuple(p["ops"]), p["token"])
            for p in g["wyckoff_positions"]
        )
        tables[g["number"]] = SpaceGroupInfo(g["number"], g["symbol"], g["crystal_system"], g["hall_number"], positions)
    return tables


def spacegroup(number: int) -> SpaceGroupInfo:
    """The space group with this ITA number (1–230); a clear ValueError otherwise."""
    try:
        return _tables()[int(number)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"space group number must be an integer in 1..230, got {number!r}") from None


def all_spacegroups() -> list[SpaceGroupInfo]:
    return list(_tables().values())


@functools.cache
def orbit_vocabulary() -> list[tuple[tuple[int, str], ...]]:
    """The shared orbit vocabulary: token -> the (space group, letter) positions that share its algebraic form."""
    members: dict[int, list[tuple[int, str]]] = {}
    for group in _tables().values():
        for wp in group.wyckoff_positions:
            members.setdefault(wp.token, []).append((group.number, wp.letter))
    return [tuple(members[t]) for t in range(len(members))]
