"""The shipped Wyckoff transformer and PyXtal give the same samples for the same seed as when these values were
recorded (before the generator toolkit moved their machinery): a refactor that changes what a seed samples fails."""

from __future__ import annotations

import pytest

from wyckoff_lab.core.generators import Conditions, get_generator

# Recorded with the shipped weights on CPU (one torch thread), before and after the move to core/generators/nn.
RANKED_ALCACU = {
    "attempts": 10, "failures": {}, "rejected": {"sites_too_close": 4}, "ranked_out": 3,
    "tokens": [
        "<bos> stab:low el:Al el:Ca el:Cu <sep> n:2 n:2 n:2 sg:63 w:62 el:Ca y=0.0937 w:62 el:Al y=0.9369 w:62 el:Cu "
        "y=0.4874 <end> a=3.5967 b=14.5201 c=4.5317",
        "<bos> stab:low el:Al el:Ca el:Cu <sep> n:2 n:1 n:1 sg:225 w:336 el:Al w:100 el:Ca w:101 el:Cu <end> a=6.6885",
        "<bos> stab:low el:Al el:Ca el:Cu <sep> n:2 n:1 n:1 sg:225 w:101 el:Ca w:336 el:Al w:100 el:Cu <end> a=6.8174",
    ],
    "nll_per_token": [1.0747, 1.2453, 1.1519],
}
# sample_sequences at T = 0.7, top-p 0.9, seed 5 in Fm-3m, and their NLLs (nats) at full precision.
RAW_FM3M = {
    "tokens": [
        "<bos> stab:low el:Ni el:Se el:Mo <sep> n:1 n:2 n:1 sg:225 w:101 el:Ni w:336 el:Se w:100 el:Mo <end> a=5.8695",
        "<bos> stab:low el:O el:V el:Cu <sep> n:8 n:2 n:2 sg:225 w:101 el:Cu w:818 el:O x=0.9039 w:336 el:V w:100 "
        "el:Cu <end> a=8.7582",
        "<bos> stab:low el:P el:S el:Ag <sep> n:2 n:2 n:6 sg:225 w:794 el:Ag x=0.8384 w:101 el:P w:336 el:S w:100 "
        "el:P <end> a=9.4132",
    ],
    "nll": [22.170270919799805, 39.29745864868164, 46.582820892333984],
}
# PyXtal, Mg-O at seed 1 over a small explicit space-group distribution (MP-20's would need the dataset parsed into
# the tests' fresh cache): formula, space group, cell lengths (Å) and the sum of all fractional coordinates.
PYXTAL_SPACEGROUPS = {225: 3, 62: 2, 12: 2, 2: 1, 166: 1}
# Coordinate sums are of the orbits wrapped into [0, 1) (the toolkit move gave 25.0 and 66.0 unwrapped; wrapping
# changed no lattice, composition or space group).
PYXTAL_MGO = [("Mg9 O9", 166, (9.901353, 9.901353, 2.807459), 21.0),
              ("Mg28 O28", 225, (8.297473, 8.297473, 8.297473), 60.0),
              ("Mg2 O2", 12, (3.040289, 5.107899, 3.516556), 3.0)]


def test_ranked_transformer_samples_are_pinned(shipped_generator, one_torch_thread):
    result = shipped_generator.ranked(2).generate(3, Conditions(elements=("Al", "Ca", "Cu")), seed=0)
    assert (result.attempts, result.failures, result.rejected, result.ranked_out) == (
        RANKED_ALCACU["attempts"], RANKED_ALCACU["failures"], RANKED_ALCACU["rejected"], RANKED_ALCACU["ranked_out"])
    assert [" ".join(c.tokens) for c in result.candidates] == RANKED_ALCACU["tokens"]
    assert [c.extra["nll_per_token"] for c in result.candidates] == RANKED_ALCACU["nll_per_token"]


def test_raw_sequences_and_likelihoods_are_pinned(shipped_generator, one_torch_thread):
    from wyckoff_lab.core.generators.wyckoff_grammar.masks import DecodingPlan
    from wyckoff_lab.core.generators.wyckoff_transformer.sampling import sample_sequences, sequence_nlls

    plan = DecodingPlan.build(Conditions(spacegroup=225), 20, shipped_generator.seen_elements,
                              shipped_generator.seen_spacegroups)
    states = sample_sequences(shipped_generator.model, plan, 3, 0.7, 0.9, 5, 3)
    sequences = [state.as_sequence() for state in states]
    assert [" ".join(s.as_strings()) for s in sequences] == RAW_FM3M["tokens"]
    assert list(sequence_nlls(shipped_generator.model, sequences)) == pytest.approx(RAW_FM3M["nll"], abs=1e-5)


def test_pyxtal_samples_are_pinned():
    result = get_generator("pyxtal", chemical_systems={"Mg-O": 1}, spacegroups=PYXTAL_SPACEGROUPS).generate(3, Conditions(elements=("Mg", "O")), seed=1)
    assert result.attempts == 3 and not result.failures
    found = [(c.structure.composition.formula, c.intended_spacegroup,
              tuple(round(float(x), 6) for x in c.structure.lattice.abc), round(float(c.structure.frac_coords.sum()), 6))
             for c in result.candidates]
    assert found == PYXTAL_MGO
