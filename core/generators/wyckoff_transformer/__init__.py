"""The Wyckoff transformer generator (Matra-Genoa): loads shipped weights and samples with constrained decoding."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from wyckoff_lab.core.defaults import MAX_ATOMS, SYMPREC
from wyckoff_lab.core.generators import (
    Candidate,
    Conditions,
    GenerationResult,
    GeneratorOption,
    TrainingRecipe,
    UnsupportedConditionError,
    register_generator,
    weights_folder,
)
from wyckoff_lab.core.generators.nn.checkpoints import ModelLoadError, load_pretrained
from wyckoff_lab.core.generators.quality import RESAMPLE_ROUNDS, QualityGate, cell_is_sound, round_seed, sample_until
from wyckoff_lab.core.generators.ranking import LikelihoodRanked, wyckoff_template_key
from wyckoff_lab.core.symmetry import check_tolerance

MODEL_NAME = "wyckoff_transformer"
DEFAULT_MAX_ATOMS = MAX_ATOMS


def default_weights_dir() -> Path:
    """`$WYCKOFF_LAB_MODELS/wyckoff_transformer` if set, else the weights shipped in the package's assets."""
    return weights_folder(MODEL_NAME)


def load_model(folder: str | Path | None = None, device=None):
    """(model, metadata) from `model.safetensors` + `config.json` (`nn.checkpoints.load_pretrained`)."""
    from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig

    folder = Path(folder) if folder else default_weights_dir()

    def build(settings: dict) -> WyckoffTransformer:
        config = WyckoffTransformerConfig(**settings)
        if config.problems():
            raise ModelLoadError(f"unusable Wyckoff transformer config in {folder / 'config.json'}: "
                                 f"{'; '.join(config.problems())}")
        return WyckoffTransformer(config)

    return load_pretrained(folder, MODEL_NAME, build, "Wyckoff transformer",
                           "train one with `wyckoff-lab train wyckoff-transformer`", device)


@dataclasses.dataclass
class _Sample:
    """One decoded sequence on its way to a Candidate."""

    structure: object
    crystal: object
    sequence: object
    extra: dict = dataclasses.field(default_factory=dict)
    found: int | None = None  # the space group the quality gate found (None where it did not look)


@register_generator("wyckoff-transformer")
class WyckoffTransformerGenerator(LikelihoodRanked):
    """Autoregressive sampling over Wyckoff tokens and free coordinates, conditioned by prefix."""

    name = "wyckoff-transformer"
    description = "Autoregressive transformer over Wyckoff positions and free coordinates (Matra-Genoa)"
    supported_conditions = frozenset({"elements", "formula", "spacegroup", "template", "stability", "max_atoms"})
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
                 resample: bool = True, symprec: float = SYMPREC, oversample: int = 1):
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

    @property
    def has_likelihood(self) -> bool:
        return self.model.config.head == "mixture"  # the MSE head predicts points, which have no density

    def log_likelihood(self, samples: list[_Sample]) -> tuple[np.ndarray, np.ndarray]:
        """log p of each sample's sequence (`sampling.sequence_nlls`) and its number of predicted tokens."""
        from wyckoff_lab.core.generators.wyckoff_transformer.sampling import sequence_nlls

        sequences = [sample.sequence for sample in samples]
        return -sequence_nlls(self.model, sequences, self.batch_size), np.array([len(s) - 1 for s in sequences])

    def _generate(self, n, conditions: Conditions, temperature, seed, progress) -> GenerationResult:
        """Sample `n` sequences and decode them; with `resample`, what fails or misses the quality gate
        (`quality.QualityGate` at `symprec`) is sampled again, RESAMPLE_ROUNDS times at most, and the last round
        keeps what it gets, each saying in `extra` what the gate found.

        Every candidate's `extra` holds -log p of its sequence under the model (`sequence_nlls`), in total
        (`nll_nats`) and per predicted token (`nll_per_token`). With `oversample` k > 1, k * n structures are made
        and the n most likely per token kept (in sampling order, one per Wyckoff template first): the model's
        confidence ranks the samples by how close to the hull they relax (see the README).

        Per token, not in total: the total favours short sequences, so within a chemical system it keeps one-formula-
        unit cells of odd stoichiometry (BaTiO6 in Pm-3m) and repeats them; per token it ranks how sure the model
        was of each choice (it still prefers small cells, less strongly; measured in the README's S.U.N. section).
        Scoring costs about 7 % of the sampling time, so every sample carries its NLL, ranked or not.
        """
        from wyckoff_lab.core.generators.nn.decoding import check_sampling_settings
        from wyckoff_lab.core.generators.wyckoff_grammar.masks import DecodingPlan
        from wyckoff_lab.core.generators.wyckoff_transformer.sampling import sample_sequences

        check_sampling_settings(temperature, self.top_p)  # before any work: a NaN temperature crashed the sampler

        self._check_feasible(conditions)
        max_atoms = conditions.max_atoms or DEFAULT_MAX_ATOMS
        plan = DecodingPlan.build(conditions, max_atoms, self.seen_elements, self.seen_spacegroups)
        start = time.perf_counter()

        def draw(wanted: int, round_: int, have: int) -> list:
            def report(done: int, total: int) -> None:
                if progress:
                    progress(min(n, (have + done) // self.oversample), n)

            states = sample_sequences(self.model, plan, wanted, temperature, self.top_p, round_seed(seed, round_),
                                      self.batch_size, report)
            return [state.failure or _decoded(state.as_sequence()) for state in states]

        gate = QualityGate(symprec=self.symprec)

        def check(sample: _Sample) -> tuple[str | None, _Sample]:
            problem, extra, found = gate.check(sample.structure, sample.crystal.spacegroup)
            return problem, dataclasses.replace(sample, extra=extra, found=found)

        sampled = sample_until(n * self.oversample, draw, check if self.resample else None,
                               RESAMPLE_ROUNDS if self.resample else 1)
        made = sampled.kept
        kept = made
        if made and self.has_likelihood:
            keep, nll, per_token = self._keep_most_likely(made, n, [wyckoff_template_key(s.crystal) for s in made])
            for sample, total, mean in zip(made, nll, per_token):
                sample.extra = {**sample.extra, "nll_nats": round(float(total), 3),
                                "nll_per_token": round(float(mean), 4)}
            kept = [made[i] for i in keep]
        per_candidate = (time.perf_counter() - start) / max(1, len(kept))
        candidates = [Candidate(s.structure, self.name, conditions, s.crystal.spacegroup, s.crystal.as_dict(),
                                s.sequence.as_strings(), per_candidate, seed, s.extra, s.found,
                                None if s.found is None else self.symprec)
                      for s in kept]
        return GenerationResult(candidates, attempts=sampled.attempts, failures=sampled.failures,
                                rejected=sampled.rejected, ranked_out=len(made) - len(kept))

    def _check_feasible(self, conditions: Conditions) -> None:
        """Elements the model never saw get a clear error (impossible templates are refused by DecodingPlan)."""
        unseen = [el for el in conditions.chemical_system or () if el not in self.seen_elements]
        if unseen:
            raise UnsupportedConditionError(
                f"the Wyckoff transformer never saw {', '.join(unseen)} in training, so it cannot place "
                f"{'it' if len(unseen) == 1 else 'them'}; try the PyXtal baseline for this chemistry")


def _decoded(sequence) -> _Sample | str:
    """A complete sequence as a structure, or why it is not one (a decoding error, a degenerate cell)."""
    from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import decode

    try:
        crystal, _ = decode(sequence)
        structure = crystal.as_structure()
    except ValueError as exc:
        return f"decode: {exc}"
    if not cell_is_sound(structure):
        return "degenerate_cell"
    return _Sample(structure, crystal, sequence)


def learned_embeddings(model) -> dict:
    """The model's learned input embeddings, labelled, for the t-SNE maps of the app.

    Returns {"elements": (symbols, vectors), "spacegroups": (numbers, vectors), "wyckoff": (labels, vectors)}; a
    Wyckoff token's label lists the positions sharing it (e.g. '10:i 16:m 47:m').
    """
    from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import MAX_Z, VOCAB
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
