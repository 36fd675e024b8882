"""Training the Wyckoff transformer on a dataset's Wyckoff table, through the shared loop (`nn.training.fit`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from wyckoff_lab.core.generators.nn.checkpoints import save_pretrained
from wyckoff_lab.core.generators.nn.data import pad_sequences, stability_label, training_rows
from wyckoff_lab.core.generators.nn.training import TrainingSettings, fit, read_checkpoint
from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import VOCAB, TokenSequence, centering_factor, encode
from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig
from wyckoff_lab.core.wyckoff import WyckoffCrystal

MODEL_TYPE = "wyckoff_transformer"


@dataclass
class TrainConfig(TrainingSettings):
    dataset: str = "mp_20"
    train_split: str = "train"
    val_split: str = "val"
    out_dir: str = "runs/wyckoff-transformer"
    weight_decay: float = 1e-3  # Matra-Genoa: Adam(0.9, 0.999), weight decay 1e-3, one-cycle schedule
    precision: str = "fp32"  # the shipped weights were trained in fp32
    continuous_weight: float = 1.0
    extra_data: str | None = None  # e.g. "mp_36k": add its rows to training and label stability from both
    max_atoms: int = 20  # primitive cell; longer crystals are left out of training (counted)
    model: WyckoffTransformerConfig = field(default_factory=WyckoffTransformerConfig)

    def problems(self) -> list[str]:
        """What makes these settings unusable (an empty list when they are sound), the model's config included."""
        found = super().problems()
        if not isinstance(self.max_atoms, int) or isinstance(self.max_atoms, bool) or self.max_atoms < 1:
            found.append(f"max_atoms must be a whole number >= 1 (got {self.max_atoms!r})")
        value = self.continuous_weight
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            found.append(f"continuous_weight must be a finite number >= 0 (got {value!r})")
        return found + self.model.problems()


@dataclass
class TrainingSet:
    """Crystals with stability labels, re-tokenised every epoch with a fresh random orbit order."""

    crystals: list[WyckoffCrystal]
    stability: list[str]

    def sequences(self, rng: np.random.Generator) -> list[TokenSequence]:
        return [encode(c, s, rng) for c, s in zip(self.crystals, self.stability)]


def load_training_set(dataset_name: str, split: str, max_atoms: int, max_len: int, progress: bool = False,
                      extra_data: str | None = None, add_extra_rows: bool = False) -> tuple[TrainingSet, dict]:
    """Wyckoff crystals + stability tokens of a split (`nn.data.training_rows`); what was left out is counted by
    reason."""
    from wyckoff_lab.core.wyckoff_table import wyckoff_table

    parts = training_rows(dataset_name, split, extra_data, add_extra_rows, progress)
    crystals, stability, skipped = [], [], Counter()
    report = {"rows": sum(len(d) for d in parts)}
    for dataset in parts:
        table = wyckoff_table(dataset, progress=progress)
        e_hull = dataset.frame["e_above_hull"].to_numpy(dtype=float)
        kept_before = len(crystals)
        for crystal, e in zip(table, e_hull):
            if isinstance(crystal, str):
                skipped[f"wyckoff_{crystal}"] += 1
            elif not math.isfinite(e):
                skipped["no_e_above_hull"] += 1
            elif crystal.num_sites // centering_factor(crystal.spacegroup) > max_atoms:
                skipped["too_many_atoms"] += 1
            elif len(encode(crystal, "low")) > max_len:
                skipped["too_long"] += 1
            else:
                crystals.append(crystal)
                stability.append(stability_label(e))
        report[f"kept_{dataset.name}_{dataset.split}"] = len(crystals) - kept_before
    report |= {"kept": len(crystals), "high_stability_tokens": stability.count("high"), "skipped": dict(skipped)}
    return TrainingSet(crystals, stability), report


SEQUENCE_FIELDS = (("tokens", np.int64, VOCAB.pad), ("values", np.float32, 0.0), ("kinds", np.int64, 0))


def collate(sequences: list[TokenSequence], device) -> tuple[torch.Tensor, ...]:
    """(tokens, values, kinds, mask) tensors of a batch, padded to its longest sequence."""
    return pad_sequences(sequences, SEQUENCE_FIELDS, device)


def vocabulary_statistics(training: TrainingSet) -> dict:
    """Elements and space groups seen in training: sampling proposes only these unless the user asks otherwise."""
    elements, groups = Counter(), Counter()
    for crystal in training.crystals:
        elements.update(el.symbol for el in crystal.composition)
        groups[crystal.spacegroup] += 1
    return {"element_counts": dict(elements), "spacegroup_counts": {str(k): v for k, v in sorted(groups.items())}}


@torch.no_grad()
def evaluate_loss(model, sequences, batch_size, device) -> dict:
    model.eval()
    ce_sum = nll_sum = n = 0.0
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], device)
        ce, nll = model.loss(*batch)
        k = len(batch[0])
        ce_sum, nll_sum, n = ce_sum + ce.item() * k, nll_sum + nll.item() * k, n + k
    model.train()
    return {"val_ce": ce_sum / n, "val_nll": nll_sum / n, "val_loss": (ce_sum + nll_sum) / n}


class _Task:
    """The Wyckoff transformer's part of `nn.training.fit`: batches re-tokenised per epoch, CE + NLL loss."""

    def __init__(self, config: TrainConfig, training: TrainingSet, validation: TrainingSet, device, metadata: dict):
        self.config, self.training, self.device, self.metadata = config, training, device, metadata
        self.val_sequences = validation.sequences(np.random.default_rng(12345))
        self.steps_per_epoch = math.ceil(len(training.crystals) / config.batch_size)

    def batches(self, epoch: int):
        rng = np.random.default_rng(self.config.seed * 100_003 + epoch)
        sequences = self.training.sequences(rng)
        order = rng.permutation(len(sequences))
        size = self.config.batch_size
        return lambda b: collate([sequences[i] for i in order[b * size:(b + 1) * size]], self.device)

    def loss(self, model, batch):
        ce, nll = model.loss(*batch)
        return ce + self.config.continuous_weight * nll, {"ce": ce.item(), "nll": nll.item()}

    def validate(self, model) -> dict:
        return evaluate_loss(model, self.val_sequences, 256, self.device)

    def export(self, model, folder: Path, metrics: dict) -> None:
        export(model, folder, self.metadata | {"val": metrics})


def train(config: TrainConfig, progress: bool = True, training: TrainingSet | None = None,
          validation: TrainingSet | None = None) -> dict:
    """Train (or resume from `out_dir/checkpoint.pt`), keeping the best-validation weights in `out_dir/best/`."""
    from wyckoff_lab.core.relax import resolve_device

    if config.problems():
        raise ValueError("unusable training configuration: " + "; ".join(config.problems()))
    device = torch.device(resolve_device(config.device))
    saved = read_checkpoint(Path(config.out_dir) / "checkpoint.pt", device)  # before the data: fails in a second
    torch.manual_seed(config.seed)
    data_report = {}
    if training is None:
        training, data_report["train"] = load_training_set(config.dataset, config.train_split, config.max_atoms,
                                                           config.model.max_len, progress, config.extra_data,
                                                           add_extra_rows=True)
    if validation is None:
        validation, data_report["val"] = load_training_set(config.dataset, config.val_split, config.max_atoms,
                                                           config.model.max_len, progress, config.extra_data)
    metadata = vocabulary_statistics(training) | {"train_config": _jsonable(config), "data": data_report}
    model = WyckoffTransformer(config.model).to(device)
    task = _Task(config, training, validation, device, metadata)
    result = fit(model, config, task, device, saved, progress)
    return result | {"data": data_report, "parameters": model.num_parameters()}


def _jsonable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def export(model: WyckoffTransformer, folder: Path, metadata: dict) -> None:
    """Write `model.safetensors` + `config.json` (model config, training vocabulary statistics, provenance)."""
    save_pretrained(model, folder, MODEL_TYPE, model.config.as_dict(), metadata)
