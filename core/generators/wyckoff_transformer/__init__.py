"""The Wyckoff transformer generator (Matra-Genoa): loads shipped weights and samples with constrained decoding."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from wyckoff_lab.core.generators import (
    Candidate,
    Conditions,
    GenerationResult,
    Generator,
    UnsupportedConditionError,
    register_generator,
)

MODEL_NAME = "wyckoff_transformer"
MODELS_ENV = "WYCKOFF_LAB_MODELS"
DEFAULT_MAX_ATOMS = 20  # primitive cell, as in MP-20


class ModelLoadError(ValueError):
    """Weights missing, corrupt or not matching their config."""


def default_weights_dir() -> Path:
    """`$WYCKOFF_LAB_MODELS/wyckoff_transformer` if set, else the weights shipped in the package's assets."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]) / MODEL_NAME
    from importlib import resources

    return Path(str(resources.files("wyckoff_lab.assets").joinpath("models", MODEL_NAME)))


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
        model = WyckoffTransformer(WyckoffTransformerConfig(**metadata["model"]))
        model.load_state_dict(load_file(weights_path), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise ModelLoadError(f"corrupt or mismatched Wyckoff transformer weights in {folder}: {exc}") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), metadata


@register_generator("wyckoff-transformer")
class WyckoffTransformerGenerator(Generator):
    """Autoregressive sampling over Wyckoff tokens and free coordinates, conditioned by prefix."""

    name = "wyckoff-transformer"
    description = "Autoregressive transformer over Wyckoff positions and free coordinates (Matra-Genoa)"
    supported_conditions = frozenset({"elements", "formula", "spacegroup", "template", "stability", "max_atoms"})

    def __init__(self, weights: str | Path | None = None, device=None, top_p: float = 1.0, batch_size: int = 256):
        self.model, self.metadata = load_model(weights, device)
        self.top_p = top_p
        self.batch_size = batch_size
        self.seen_elements = sorted(self.metadata.get("element_counts", {}))
        self.seen_spacegroups = sorted(int(k) for k in self.metadata.get("spacegroup_counts", {}))

    def _generate(self, n, conditions: Conditions, temperature, seed, progress) -> GenerationResult:
        from wyckoff_lab.core.generators.wyckoff_transformer.decoding import DecodingPlan
        from wyckoff_lab.core.generators.wyckoff_transformer.sampling import sample_sequences
        from wyckoff_lab.core.generators.wyckoff_transformer.tokenizer import decode

        self._check_feasible(conditions)
        max_atoms = conditions.max_atoms or DEFAULT_MAX_ATOMS
        plan = DecodingPlan.build(conditions, max_atoms, self.seen_elements, self.seen_spacegroups)
        start = time.perf_counter()
        states = sample_sequences(self.model, plan, n, temperature, self.top_p, seed, self.batch_size, progress)
        candidates, failures = [], Counter()
        decoded = []
        for state in states:
            if state.failure:
                failures[state.failure] += 1
                continue
            sequence = state.as_sequence()
            try:
                crystal, _ = decode(sequence)
                decoded.append((crystal.as_structure(), crystal, sequence))
            except ValueError as exc:
                failures[f"decode: {exc}"] += 1
        per_candidate = (time.perf_counter() - start) / max(1, n)
        for structure, crystal, sequence in decoded:
            candidates.append(Candidate(structure, self.name, conditions, crystal.spacegroup, crystal.as_dict(),
                                        sequence.as_strings(), per_candidate, seed))
        return GenerationResult(candidates, attempts=n, failures=dict(failures))

    def _check_feasible(self, conditions: Conditions) -> None:
        """Elements the model never saw get a clear error (impossible templates are refused by DecodingPlan)."""
        unseen = [el for el in conditions.chemical_system or () if el not in self.seen_elements]
        if unseen:
            raise UnsupportedConditionError(
                f"the Wyckoff transformer never saw {', '.join(unseen)} in training, so it cannot place "
                f"{'it' if len(unseen) == 1 else 'them'}; try the PyXtal baseline for this chemistry")


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


def export_embeddings(model, path) -> None:
    """Write `learned_embeddings` as a compressed npz: <kind>_labels and <kind>_vectors per kind."""
    import numpy as np

    arrays = {}
    for kind, (labels, vectors) in learned_embeddings(model).items():
        arrays[f"{kind}_labels"] = np.array([str(label) for label in labels])
        arrays[f"{kind}_vectors"] = vectors
    np.savez_compressed(path, **arrays)
