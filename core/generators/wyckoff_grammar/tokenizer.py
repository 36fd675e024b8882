"""Token sequences of Wyckoff crystals (Matra-Genoa): discrete tokens plus continuous values, invertibly.

A sequence reads

    <bos> stab:low  el:Al el:Ca el:Cu <sep>  n:4 n:2 n:4  sg:139  w:17 el:Ca  w:52 el:Al <num>  ...  <end>  <num> <num>

stability; the chemical system (elements by atomic number); atoms per element in the primitive cell (conventional
count / centering factor, so the 20-atom primitive limit of MP-20 bounds every count whatever the centering); the space
group; then each orbit as its shared Wyckoff token, its element and one <num> per free parameter; <end>; and one
<num> per free lattice parameter of the crystal family. `<num>` positions carry a float value and a kind
(x, y, z, a, b, c, alpha, beta, gamma) that says how to embed and predict it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element

from wyckoff_lab.core.symmetry import LATTICE_PARAMETER_NAMES, orbit_vocabulary, spacegroup
from wyckoff_lab.core.wyckoff import WyckoffCrystal

MAX_Z = 103
MAX_COUNT = 128  # atoms of one element in the primitive cell


def centering_factor(spacegroup_number: int) -> int:
    """Conventional-cell atoms per primitive-cell atom (R groups in hexagonal axes: 3)."""
    return spacegroup(spacegroup_number).centering_factor


SPECIALS = ("<pad>", "<bos>", "<sep>", "<end>", "<num>", "stab:low", "stab:high")
CONTINUOUS_KINDS = ("x", "y", "z") + LATTICE_PARAMETER_NAMES  # kind index k>0 is CONTINUOUS_KINDS[k-1]
COORD_KINDS = (1, 2, 3)
LENGTH_KINDS = (4, 5, 6)
ANGLE_KINDS = (7, 8, 9)


class Vocabulary:
    """Discrete token ids: specials, elements, counts, space groups, shared Wyckoff orbit tokens."""

    def __init__(self) -> None:
        self.tokens: list[str] = list(SPECIALS)
        self.tokens += [f"el:{Element.from_Z(z).symbol}" for z in range(1, MAX_Z + 1)]
        self.tokens += [f"n:{n}" for n in range(1, MAX_COUNT + 1)]
        self.tokens += [f"sg:{n}" for n in range(1, 231)]
        self.tokens += [f"w:{t}" for t in range(len(orbit_vocabulary()))]
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        self.pad, self.bos, self.sep, self.end, self.num = (self.index[t] for t in SPECIALS[:5])
        self.stab = {"low": self.index["stab:low"], "high": self.index["stab:high"]}
        self.element_offset = self.index["el:H"]
        self.count_offset = self.index["n:1"]
        self.sg_offset = self.index["sg:1"]
        self.wyckoff_offset = self.index["w:0"]

    def __len__(self) -> int:
        return len(self.tokens)

    def element(self, symbol: str) -> int:
        return self.element_offset + Element(symbol).Z - 1

    def element_symbol(self, token: int) -> str:
        return Element.from_Z(token - self.element_offset + 1).symbol

    def count(self, n: int) -> int:
        if not 1 <= n <= MAX_COUNT:
            raise ValueError(f"{n} atoms of one element is outside 1..{MAX_COUNT}")
        return self.count_offset + n - 1

    def spacegroup(self, number: int) -> int:
        return self.sg_offset + number - 1

    def wyckoff(self, vocab_token: int) -> int:
        return self.wyckoff_offset + vocab_token

    def is_element(self, token: int) -> bool:
        return self.element_offset <= token < self.element_offset + MAX_Z


VOCAB = Vocabulary()


@dataclass
class TokenSequence:
    """Aligned arrays: token id, continuous value (0 where discrete) and continuous kind (0 where discrete)."""

    tokens: np.ndarray
    values: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def as_strings(self) -> list[str]:
        return [f"{CONTINUOUS_KINDS[k - 1]}={v:.4f}" if k else VOCAB.tokens[t]
                for t, v, k in zip(self.tokens, self.values, self.kinds)]


def encode(crystal: WyckoffCrystal, stability: str, rng: np.random.Generator | None = None) -> TokenSequence:
    """Tokenise a crystal. With `rng`, orbits come in a random order (training augmentation), else canonical."""
    tokens, values, kinds = [VOCAB.bos, VOCAB.stab[stability]], [0.0, 0.0], [0, 0]
    counts = crystal.composition
    elements = sorted((el.symbol for el in counts), key=lambda e: Element(e).Z)
    for el in elements:
        tokens.append(VOCAB.element(el))
    tokens.append(VOCAB.sep)
    factor = centering_factor(crystal.spacegroup)
    for el in elements:
        tokens.append(VOCAB.count(int(counts[el]) // factor))
    tokens.append(VOCAB.spacegroup(crystal.spacegroup))
    values += [0.0] * (2 * len(elements) + 2)
    kinds += [0] * (2 * len(elements) + 2)
    order = rng.permutation(len(crystal.orbits)) if rng is not None else range(len(crystal.orbits))
    for i in order:
        orbit = crystal.orbits[i]
        tokens += [VOCAB.wyckoff(orbit.position.token), VOCAB.element(orbit.element)]
        values += [0.0, 0.0]
        kinds += [0, 0]
        for axis, value in zip(orbit.position.free_axes, orbit.free_params):
            tokens.append(VOCAB.num)
            values.append(float(value))
            kinds.append(1 + axis)
    tokens.append(VOCAB.end)
    values.append(0.0)
    kinds.append(0)
    family = crystal.group.lattice_family
    for name, value in zip(family.free_parameters, family.free_values(crystal.lattice)):
        tokens.append(VOCAB.num)
        values.append(float(value))
        kinds.append(1 + CONTINUOUS_KINDS.index(name))
    return TokenSequence(np.array(tokens, dtype=np.int64), np.array(values, dtype=np.float32),
                         np.array(kinds, dtype=np.int64))


def decode(sequence: TokenSequence) -> tuple[WyckoffCrystal, str]:
    """Rebuild (crystal, stability) from a complete sequence; ValueError says what is missing or inconsistent."""
    tokens, values = list(sequence.tokens), list(sequence.values)
    pos = 0

    def take() -> int:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("sequence ends early")
        pos += 1
        return tokens[pos - 1]

    if take() != VOCAB.bos:
        raise ValueError("sequence does not start with <bos>")
    stab_token = take()
    stability = {v: k for k, v in VOCAB.stab.items()}.get(stab_token)
    if stability is None:
        raise ValueError("missing stability token")
    elements = []
    while (tok := take()) != VOCAB.sep:
        if not VOCAB.is_element(tok):
            raise ValueError(f"expected an element, got {VOCAB.tokens[tok]}")
        elements.append(VOCAB.element_symbol(tok))
    counts = {}
    for el in elements:
        tok = take()
        if not VOCAB.count_offset <= tok < VOCAB.count_offset + MAX_COUNT:
            raise ValueError(f"expected a count for {el}, got {VOCAB.tokens[tok]}")
        counts[el] = tok - VOCAB.count_offset + 1
    sg_number = take() - VOCAB.sg_offset + 1
    if not 1 <= sg_number <= 230:
        raise ValueError("missing space group")
    group = spacegroup(sg_number)
    by_token = {wp.token: wp for wp in group.wyckoff_positions}
    orbits = []
    while (tok := take()) != VOCAB.end:
        wp = by_token.get(tok - VOCAB.wyckoff_offset)
        if wp is None:
            raise ValueError(f"{VOCAB.tokens[tok]} is not a Wyckoff position of space group {sg_number}")
        el_tok = take()
        if not VOCAB.is_element(el_tok):
            raise ValueError("expected an element after a Wyckoff token")
        free = []
        for _ in range(wp.dof):
            if take() != VOCAB.num:
                raise ValueError(f"missing free parameter of {wp.label}")
            free.append(values[pos - 1])
        orbits.append((VOCAB.element_symbol(el_tok), wp.letter, free))
    lattice_free = []
    for _ in group.lattice_family.free_parameters:
        if take() != VOCAB.num:
            raise ValueError("missing lattice parameter")
        lattice_free.append(values[pos - 1])
    crystal = WyckoffCrystal.from_orbits(sg_number, group.lattice_family.from_free(lattice_free), orbits)
    factor = centering_factor(sg_number)
    if dict(crystal.composition.as_dict()) != {el: float(n * factor) for el, n in counts.items()}:
        raise ValueError(f"orbits give {crystal.composition.formula}, the header says {counts}")
    return crystal, stability
