"""The Wyckoff transformer generator (Matra-Genoa): loads shipped weights and samples with constrained decoding."""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from wyckoff_lab.core.generators import (
    Candidate,
    Conditions,
    GenerationResult,
    Generator,
    GeneratorOption,
    TrainingRecipe,
    UnsupportedConditionError,
    register_generator,
    weights_folder,
)
from wyckoff_lab.core.symmetry import check_tolerance, detected_spacegroup

MODEL_NAME = "wyckoff_transformer"
DEFAULT_MAX_ATOMS = 20  # primitive cell, as in MP-20
# The quality gate of `generate` (see WyckoffTransformerGenerator._gate): spglib's tolerance of the space-group
# metrics, Matra-Genoa's bond-consistency distance, and how many times a shortfall is sampled again.
GATE_SYMPREC = 0.1
GATE_MIN_DISTANCE_A = 0.7
# ... and the shortest contact relative to the covalent radii (metrics.min_contact_ratio). PyXtal's baseline never
# goes below 0.4; in `bench sun` (n = 200, before this check) the transformer's samples below it converged in 43 % of
# their relaxations and 6 % ended within 0.1 eV/atom of the hull (those above: 92 % and 21 %).
GATE_MIN_CONTACT_RATIO = 0.4
RESAMPLE_ROUNDS = 5
# A sampled cell below this volume per atom (or with angles no cell can have, volume NaN) is a decoding failure:
# real crystals start near 5 Å^3/atom (diamond 5.7), and such cells break pymatgen's lattice reduction downstream.
MIN_VOLUME_PER_ATOM_A3 = 1.0


class ModelLoadError(ValueError):
    """Weights missing, corrupt or not matching their config."""


def default_weights_dir() -> Path:
    """`$WYCKOFF_LAB_MODELS/wyckoff_transformer` if set, else the weights shipped in the package's assets."""
    return weights_folder(MODEL_NAME)


MAX_ABS_WEIGHT = 1e4  # trained weights here stay below ~10; 1e4 would overflow the softmax long before sampling


def weight_problems(state: dict) -> str | None:
    """Why these tensors cannot be trained weights (NaN, infinite or absurdly large values), or None."""
    import torch

    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} has NaN or infinite values"
        if tensor.numel() and float(tensor.abs().max()) > MAX_ABS_WEIGHT:
            return f"tensor {name!r} has values of magnitude {float(tensor.abs().max()):.3g} (> {MAX_ABS_WEIGHT:g})"
    return None


def load_model(folder: str | Path | None = None, device=None):
    """(model, metadata) from `model.safetensors` + `config.json`; never unpickles anything."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig

    folder = Path(folder) if folder else default_weights_dir()
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"no Wyckoff transformer weights in {folder} (need config.json and model.safetensors); "
                             "train one with `wyckoff-lab train wyckoff-transformer`")
    try:
        metadata = json.loads(config_path.read_text())
        config = WyckoffTransformerConfig(**metadata["model"])
        if config.problems():
            raise ModelLoadError(f"unusable Wyckoff transformer config in {config_path}: "
                                 f"{'; '.join(config.problems())}")
        state = load_file(weights_path)
        model = WyckoffTransformer(config)
        model.load_state_dict(state, strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise ModelLoadError(f"corrupt or mismatched Wyckoff transformer weights in {folder}: {exc}") from None
    broken = weight_problems(state)
    if broken:
        raise ModelLoadError(f"corrupt Wyckoff transformer weights in {weights_path}: {broken}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), metadata


@register_generator("wyckoff-transformer")
class WyckoffTransformerGenerator(Generator):
    """Autoregressive sampling over Wyckoff tokens and free coordinates, conditioned by prefix."""

    name = "wyckoff-transformer"
    description = "Autoregressive transformer over Wyckoff positions and free coordinates (Matra-Genoa)"
    supported_conditions = frozenset({"elements", "formula", "spacegroup", "template", "stability", "max_atoms"})
    ranks_by_likelihood = True
    has_learned_embeddings = True
    preference = 10
    default_max_atoms = DEFAULT_MAX_ATOMS
    training = TrainingRecipe("wyckoff_lab.core.generators.wyckoff_transformer.train", MODEL_NAME)
    options = (
        GeneratorOption("weights", "path", None, "weights folder (config.json + model.safetensors; default: the "
                        "shipped assets/models/wyckoff_transformer, or $WYCKOFF_LAB_MODELS/wyckoff_transformer)",
                        per_request=False),
        GeneratorOption("top_p", "float", 1.0, "nucleus sampling: keep the smallest set of tokens reaching this "
                        "probability (1 = off)", above=0.0, maximum=1.0, label="Top-p"),
        GeneratorOption("resample", "bool", True, "the quality gate: sample again what has sites too close or a "
                        "space group other than the sampled one (--no-resample: the raw model)"),
        GeneratorOption("oversample", "int", 1, "draw K times the structures asked for and keep those the model "
                        "finds most likely per token", minimum=1, maximum=100, label="Keep most likely 1 in"),
    )

    def __init__(self, weights: str | Path | None = None, device=None, top_p: float = 1.0, batch_size: int = 256,
                 resample: bool = True, symprec: float = GATE_SYMPREC, oversample: int = 1):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        symprec = check_tolerance(symprec)  # the space-group gate hands it to spglib, which segfaults on -1 or NaN
        self.model, self.metadata = load_model(weights, device)
        self.top_p = top_p
        self.oversample = self._checked_oversample(oversample)
        self.batch_size = batch_size
        self.resample = resample
        self.symprec = symprec
        self.seen_elements = sorted(self.metadata.get("element_counts", {}))
        self.seen_spacegroups = sorted(int(k) for k in self.metadata.get("spacegroup_counts", {}))

    def learned_embeddings(self) -> dict:
        return learned_embeddings(self.model)

    def ranked(self, oversample: int) -> WyckoffTransformerGenerator:
        oversample = self._checked_oversample(oversample)
        if oversample == self.oversample:
            return self
        other = copy.copy(self)  # shares the model and metadata
        other.oversample = oversample
        return other

    def _checked_oversample(self, oversample) -> int:
        if int(oversample) != oversample or oversample < 1:
            raise ValueError(f"oversample must be a whole number >= 1, got {oversample}")
        if oversample > 1 and self.model.config.head != "mixture":
            raise ValueError("oversample ranks samples by likelihood, which the MSE head does not define")
        return int(oversample)

    def _generate(self, n, conditions: Conditions, temperature, seed, progress) -> GenerationResult:
        """Sample `n` sequences and decode them; with `resample`, what fails or misses the quality gate (see
        `_gate`) is sampled again, RESAMPLE_ROUNDS times at most, and the last round keeps what it gets.

        Every candidate's `extra` holds -log p of its sequence under the model (`sequence_nlls`), in total
        (`nll_nats`) and per predicted token (`nll_per_token`). With `oversample` k > 1, k * n structures are made
        and the n most likely per token kept (in sampling order): the model's confidence ranks the samples by how
        close to the hull they relax (see the README).
        """
        from wyckoff_lab.core.generators.wyckoff_transformer.decoding import DecodingPlan
        from wyckoff_lab.core.generators.wyckoff_transformer.sampling import check_sampling_settings, sample_sequences
        from wyckoff_lab.core.generators.wyckoff_transformer.tokenizer import decode

        check_sampling_settings(temperature, self.top_p)  # before any work: a NaN temperature crashed the sampler

        self._check_feasible(conditions)
        max_atoms = conditions.max_atoms or DEFAULT_MAX_ATOMS
        plan = DecodingPlan.build(conditions, max_atoms, self.seen_elements, self.seen_spacegroups)
        start = time.perf_counter()
        kept: list[tuple] = []  # (structure, crystal, sequence, extra, spacegroup the gate found or None)
        failures, rejected = Counter(), Counter()
        attempts = 0
        rounds = RESAMPLE_ROUNDS if self.resample else 1
        target = n * self.oversample
        for round_ in range(rounds):
            wanted = target - len(kept)
            if wanted <= 0:
                break
            last = round_ == rounds - 1
            round_seed = seed if round_ == 0 or seed is None else int(
                np.random.SeedSequence([seed, round_]).generate_state(1)[0])

            def report(done: int, total: int, have: int = len(kept)) -> None:
                if progress:
                    progress(min(n, (have + done) // self.oversample), n)

            states = sample_sequences(self.model, plan, wanted, temperature, self.top_p, round_seed,
                                      self.batch_size, report)
            attempts += wanted
            for state in states:
                if state.failure:
                    failures[state.failure] += 1
                    continue
                sequence = state.as_sequence()
                try:
                    crystal, _ = decode(sequence)
                    structure = crystal.as_structure()
                except ValueError as exc:
                    failures[f"decode: {exc}"] += 1
                    continue
                if not cell_is_sound(structure):
                    failures["degenerate_cell"] += 1
                    continue
                problem, extra, found = (self._gate(structure, crystal.spacegroup) if self.resample
                                         else (None, {}, None))
                if problem and not last:
                    rejected[problem] += 1
                    continue
                kept.append((structure, crystal, sequence, extra, found))
        made = len(kept)
        kept = self._rank(kept, n)
        per_candidate = (time.perf_counter() - start) / max(1, len(kept))
        candidates = [Candidate(structure, self.name, conditions, crystal.spacegroup, crystal.as_dict(),
                                sequence.as_strings(), per_candidate, seed, extra, found,
                                None if found is None else self.symprec)
                      for structure, crystal, sequence, extra, found in kept]
        return GenerationResult(candidates, attempts=attempts, failures=dict(failures), rejected=dict(rejected),
                                ranked_out=made - len(kept))

    def _rank(self, kept: list[tuple], n: int) -> list[tuple]:
        """Record each sequence's NLL (nats, total and per predicted token) in its `extra`; keep the n with the
        lowest NLL per token of an oversampled batch, one per Wyckoff template first (`_most_likely_distinct`).

        Per token, not in total: the total favours short sequences, so within a chemical system it keeps one-formula-
        unit cells of odd stoichiometry (BaTiO6 in Pm-3m) and repeats them; per token it ranks how sure the model
        was of each choice (it still prefers small cells, less strongly; measured in the README's S.U.N. section).
        Scoring costs about 7 % of the sampling time, so every sample carries its NLL, ranked or not."""
        if not kept or self.model.config.head != "mixture":
            return kept
        from wyckoff_lab.core.generators.wyckoff_transformer.sampling import sequence_nlls

        sequences = [sequence for _, _, sequence, _, _ in kept]
        nll = sequence_nlls(self.model, sequences, self.batch_size)
        per_token = nll / np.array([len(sequence) - 1 for sequence in sequences])
        kept = [(s, c, q, {**extra, "nll_nats": round(float(total), 3), "nll_per_token": round(float(mean), 4)}, f)
                for (s, c, q, extra, f), total, mean in zip(kept, nll, per_token)]
        if len(kept) <= n:
            return kept
        # A NaN (never seen so far) ranks last rather than poisoning the order.
        order = np.argsort(np.nan_to_num(per_token, nan=np.inf), kind="stable")
        return [kept[i] for i in sorted(_most_likely_distinct(order, [c for _, c, _, _, _ in kept], n))]

    def _gate(self, structure, sampled_spacegroup: int) -> tuple[str | None, dict, int | None]:
        """Why a decoded structure is not what was asked for (None if it is), what a kept one should carry in
        `extra`, and the space group spglib found at `symprec` (None where the distance check already failed).

        Two ways a valid sequence can still disappoint: two sites closer than GATE_MIN_DISTANCE_A or than
        GATE_MIN_CONTACT_RATIO of their covalent radii' sum (the coordinates are drawn one orbit at a time, and a
        later orbit's images can land on an earlier one), and a space group that comes out higher than the sampled
        one, because the sampled positions together happen to be invariant under a supergroup (e.g. R-3 with every
        atom on the 3-fold axes is R-3m) or a free coordinate or lattice parameter landed within `symprec` of a
        special value. Both are resampled; a structure kept in the last
        round anyway carries what spglib found in `extra`.
        """
        from wyckoff_lab.core.metrics import closest_contacts

        closest, contact = closest_contacts(structure)  # closest: the distance Matra-Genoa's bond consistency uses
        if closest < GATE_MIN_DISTANCE_A:
            return "sites_too_close", {"min_distance_A": round(closest, 3)}, None
        if contact < GATE_MIN_CONTACT_RATIO:
            return "sites_too_close", {"min_contact_ratio": round(contact, 3)}, None
        found = detected_spacegroup(structure, self.symprec)
        if found != sampled_spacegroup:
            return "spacegroup_mismatch", {"detected_spacegroup": found}, found
        return None, {}, found

    def _check_feasible(self, conditions: Conditions) -> None:
        """Elements the model never saw get a clear error (impossible templates are refused by DecodingPlan)."""
        unseen = [el for el in conditions.chemical_system or () if el not in self.seen_elements]
        if unseen:
            raise UnsupportedConditionError(
                f"the Wyckoff transformer never saw {', '.join(unseen)} in training, so it cannot place "
                f"{'it' if len(unseen) == 1 else 'them'}; try the PyXtal baseline for this chemistry")


def wyckoff_template_key(crystal) -> tuple:
    """Space group and element-labelled orbits: crystals sharing it differ only in free parameters and lattice."""
    return crystal.spacegroup, tuple(sorted((orbit.element, orbit.label) for orbit in crystal.orbits))


def _most_likely_distinct(order, crystals, n: int) -> list[int]:
    """The first n indices of `order` (most likely first), taking one crystal per Wyckoff template before any
    second one: within a chemical system the model's favourite template can otherwise fill the whole sample
    (23 of 25 Gd-Ge-Pt samples were GdGePt in Pnma)."""
    seen, first, repeats = set(), [], []
    for i in order:
        key = wyckoff_template_key(crystals[i])
        (repeats if key in seen else first).append(int(i))
        seen.add(key)
    return (first + repeats)[:n]


def cell_is_sound(structure) -> bool:
    """False for a cell whose lattice parameters or volume are not finite or whose volume per atom is below
    MIN_VOLUME_PER_ATOM_A3 (sampled angles can violate the inequalities a real cell's angles obey)."""
    lattice = structure.lattice
    with np.errstate(invalid="ignore"):
        volume = lattice.volume
    return (bool(np.all(np.isfinite(lattice.parameters))) and np.isfinite(volume)
            and volume >= MIN_VOLUME_PER_ATOM_A3 * len(structure))


def learned_embeddings(model) -> dict:
    """The model's learned input embeddings, labelled, for the t-SNE maps of the app.

    Returns {"elements": (symbols, vectors), "spacegroups": (numbers, vectors), "wyckoff": (labels, vectors)}; a
    Wyckoff token's label lists the positions sharing it (e.g. '10:i 16:m 47:m').
    """
    from wyckoff_lab.core.generators.wyckoff_transformer.tokenizer import MAX_Z, VOCAB
    from wyckoff_lab.core.symmetry import orbit_vocabulary

    weight = model.token_emb.weight.detach().cpu().numpy()
    vocabulary = orbit_vocabulary()
    return {
        "elements": ([VOCAB.element_symbol(VOCAB.element_offset + z) for z in range(MAX_Z)],
                     weight[VOCAB.element_offset:VOCAB.element_offset + MAX_Z]),
        "spacegroups": (list(range(1, 231)), weight[VOCAB.sg_offset:VOCAB.sg_offset + 230]),
        "wyckoff": ([" ".join(f"{sg}:{letter}" for sg, letter in members) for members in vocabulary],
                    weight[VOCAB.wyckoff_offset:VOCAB.wyckoff_offset + len(vocabulary)]),
    }
