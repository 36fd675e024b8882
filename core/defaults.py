"""The tolerances, distances and size limits the whole project shares, each defined once with where it comes from."""

from __future__ import annotations

# spglib's symmetry tolerance, Å: the one MP-20's own space-group labels were computed with; also WyckoffCrystal's,
# the generators' quality gates' and the metrics' default.
SYMPREC = 0.1
# pymatgen's own default (SpacegroupAnalyzer), which SymADiT reports P1 rates at.
PYMATGEN_SYMPREC = 0.01

# Atoms in the primitive cell: MP-20's limit, and every generator's default.
MAX_ATOMS = 20

# Interatomic distances, Å.
STRUCTURAL_MIN_DISTANCE_A = 0.5  # CDVAE's structural validity (as restated by SymADiT / composable crystals)
BOND_MIN_DISTANCE_A = 0.7  # Matra-Genoa's "bond consistency": no two atoms closer
# Closer pairs than this are unphysical for a potential (none is trained there): relax() refuses them.
RELAX_MIN_DISTANCE_A = STRUCTURAL_MIN_DISTANCE_A
