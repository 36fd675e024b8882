"""Training the Wyckoff transformer on a dataset's Wyckoff table: resumable, checkpointed, exported as safetensors."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from wyckoff_lab.core.generators import STABILITY_THRESHOLD_EV
from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig
from wyckoff_lab.core.generators.wyckoff_transformer.tokenizer import VOCAB, TokenSequence, encode, centering_factor
from wyckoff_lab.core.wyckoff import WyckoffCrystal

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    dataset: str = "mp_20"
    train_split: str = "train"
    val_split: str = "val"
    out_dir: str = "runs/wyckoff-transformer"
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3  # Matra-Genoa: Adam(0.9, 0.999), weight decay 1e-3, one-cycle schedule
    warmup_fraction: float = 0.05
    continuous_weight: float = 1.0
    extra_data: str | None = None  # e.g. "mp_36k": add its rows to training and label stability from both
    max_atoms: int = 20  # primitive cell; longer crystals are left out of training (counted)
    max_minutes: float | None = None  # stop (after a checkpoint) when this much wall time has passed
    checkpoint_every_s: float = 300.0
    seed: int = 0
    device: str | None = None
    model: WyckoffTransformerConfig = field(default_factory=WyckoffTransformerConfig)

    def problems(self) -> list[str]:
        """What makes these settings unusable (an empty list when they are sound), the model's config included."""
        found = []
        for name in ("epochs", "batch_size", "max_atoms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"{name} must be a whole number >= 1 (got {value!r})")
        # A NaN or negative learning rate trained NaN weights for hours without a word.
        for name in ("lr",) + (() if self.max_minutes is None else ("max_minutes",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                found.append(f"{name} must be a finite number > 0 (got {value!r})")
        for name in ("weight_decay", "warmup_fraction", "continuous_weight", "checkpoint_every_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                found.append(f"{name} must be a finite number >= 0 (got {value!r})")
        return found + self.model.problems()


@dataclass
class TrainingSet:
    """Crystals with stability labels, re-tokenised every epoch with a fresh random orbit order."""

    crystals: list[WyckoffCrystal]
    stability: list[str]

    def sequences(self, rng: np.random.Generator) -> list[TokenSequence]:
        return [encode(c, s, rng) for c, s in zip(self.crystals, self.stability)]


# Sets that may add rows to a dataset's training split (see `load_training_set`).
EXTRA_TRAINING_DATA = ("mp_36k",)


def load_training_set(dataset_name: str, split: str, max_atoms: int, max_len: int, progress: bool = False,
                      extra_data: str | None = None, add_extra_rows: bool = False) -> tuple[TrainingSet, dict]:
    """Wyckoff crystals + stability tokens of a split; what was left out is counted by reason.

    `extra_data="mp_36k"` (MP-20 only) labels stability from the hull of MP-20 and the 36k MP set together, and
    with `add_extra_rows` the split also gets that set's admissible rows (`datasets.mp36k_training_rows`), so the
    stability token sees unstable phases that MP-20 leaves out.
    """
    from wyckoff_lab.core.datasets import load_dataset, mp20_and_36k_e_above_hull, mp36k_training_rows
    from wyckoff_lab.core.wyckoff_table import wyckoff_table

    if extra_data is not None and (extra_data not in EXTRA_TRAINING_DATA or dataset_name != "mp_20"):
        raise ValueError(f"extra training data {extra_data!r} is not available for {dataset_name!r}; "
                         f"MP-20 can take {', '.join(EXTRA_TRAINING_DATA)}")
    parts = [load_dataset(dataset_name, split, progress=progress)]
    if extra_data is not None:
        parts[0].frame["e_above_hull"] = parts[0].frame["material_id"].map(
            mp20_and_36k_e_above_hull(progress=progress))
        if add_extra_rows:
            parts.append(mp36k_training_rows(progress=progress))
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
                stability.append("low" if e < STABILITY_THRESHOLD_EV else "high")
        report[f"kept_{dataset.name}_{dataset.split}"] = len(crystals) - kept_before
    report |= {"kept": len(crystals), "high_stability_tokens": stability.count("high"), "skipped": dict(skipped)}
    return TrainingSet(crystals, stability), report


def collate(sequences: list[TokenSequence], device) -> tuple[torch.Tensor, ...]:
    T = max(len(s) for s in sequences)
    B = len(sequences)
    tokens = np.full((B, T), VOCAB.pad, dtype=np.int64)
    values = np.zeros((B, T), dtype=np.float32)
    kinds = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for i, s in enumerate(sequences):
        n = len(s)
        tokens[i, :n], values[i, :n], kinds[i, :n], mask[i, :n] = s.tokens, s.values, s.kinds, True
    return tuple(torch.from_numpy(a).to(device) for a in (tokens, values, kinds, mask))


def vocabulary_statistics(training: TrainingSet) -> dict:
    """Elements and space groups seen in training: sampling proposes only these unless the user asks otherwise."""
    elements, groups = Counter(), Counter()
    for crystal in training.crystals:
        elements.update(el.symbol for el in crystal.composition)
        groups[crystal.spacegroup] += 1
    return {"element_counts": dict(elements), "spacegroup_counts": {str(k): v for k, v in sorted(groups.items())}}


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear one-cycle: warm up to the peak, then decay linearly to 1% of it."""
    warmup = max(1, int(config.warmup_fraction * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.01, 1 - (step - warmup) / max(1, total - warmup))


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


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from (truncated, not ours, or of another model)."""


def read_checkpoint(path: Path, device) -> dict | None:
    """The saved training state at `path` (None when there is none). Only tensors and plain containers are
    unpickled (`weights_only`): a checkpoint is code otherwise. Raises CheckpointError, naming the file."""
    if not path.exists():
        return None
    advice = f"delete {path} to start afresh, or train into a new --out"
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickled objects: torch raises many kinds
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot resume from {path}: not a readable training checkpoint ({first}); "
                              f"{advice}") from None
    if not isinstance(saved, dict) or not {"model", "optimizer", "state"} <= set(saved):
        raise CheckpointError(f"cannot resume from {path}: it lacks the model, optimizer or state; {advice}")
    try:
        saved["state"] = json.loads(saved["state"])
        int(saved["state"]["epoch"]), int(saved["state"]["step"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its training state is unreadable ({exc}); "
                              f"{advice}") from None
    return saved


def train(config: TrainConfig, progress: bool = True, training: TrainingSet | None = None,
          validation: TrainingSet | None = None) -> dict:
    """Train (or resume from `out_dir/checkpoint.pt`), keeping the best-validation weights in `out_dir/best/`."""
    from tqdm import tqdm

    if config.problems():
        raise ValueError("unusable training configuration: " + "; ".join(config.problems()))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = read_checkpoint(checkpoint, device)  # before the data: a bad checkpoint fails in a second, not minutes
    torch.manual_seed(config.seed)
    data_report = {}
    if training is None:
        training, data_report["train"] = load_training_set(config.dataset, config.train_split, config.max_atoms,
                                                           config.model.max_len, progress, config.extra_data,
                                                           add_extra_rows=True)
    if validation is None:
        validation, data_report["val"] = load_training_set(config.dataset, config.val_split, config.max_atoms,
                                                           config.model.max_len, progress, config.extra_data)
    stats = vocabulary_statistics(training)
    val_sequences = validation.sequences(np.random.default_rng(12345))

    model = WyckoffTransformer(config.model).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(training.crystals) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    state = {"step": 0, "epoch": 0, "best_val": float("inf"), "history": []}
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {checkpoint}: it holds another model ({str(exc)[:200]}); "
                                  "train into a new --out or use the same model settings") from None
        state = saved["state"]
        log.info("resumed from %s at epoch %d step %d", checkpoint, state["epoch"], state["step"])

    def save_checkpoint():
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": json.dumps(state)}, tmp)
        tmp.replace(checkpoint)

    started = time.time()
    last_save = time.time()
    model.train()
    stop = False
    while state["epoch"] < config.epochs and not stop:
        rng = np.random.default_rng(config.seed * 100_003 + state["epoch"])
        sequences = training.sequences(rng)
        order = rng.permutation(len(sequences))
        first_batch = state["step"] - state["epoch"] * steps_per_epoch  # resume mid-epoch
        bar = tqdm(range(first_batch, steps_per_epoch), disable=not progress, desc=f"epoch {state['epoch'] + 1}",
                   unit="batch", leave=False)
        for b in bar:
            batch = collate([sequences[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]], device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(state["step"], total_steps, config)
            ce, nll = model.loss(*batch)
            loss = ce + config.continuous_weight * nll
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state["step"] += 1
            bar.set_postfix(ce=f"{ce.item():.3f}", nll=f"{nll.item():.3f}")
            if time.time() - last_save > config.checkpoint_every_s:
                save_checkpoint()
                last_save = time.time()
            if config.max_minutes and time.time() - started > 60 * config.max_minutes:
                stop = True
                break
        if stop:
            break
        state["epoch"] += 1
        metrics = evaluate_loss(model, val_sequences, 256, device) | {"epoch": state["epoch"], "step": state["step"],
                                                                      "minutes": (time.time() - started) / 60}
        state["history"].append(metrics)
        log.info("epoch %d: %s", state["epoch"], metrics)
        if progress:
            tqdm.write(json.dumps(metrics))
        if metrics["val_loss"] < state["best_val"]:
            state["best_val"] = metrics["val_loss"]
            export(model, out / "best", stats | {"train_config": _jsonable(config), "val": metrics,
                                                 "data": data_report})
        save_checkpoint()
        last_save = time.time()
    save_checkpoint()
    return {"epochs_done": state["epoch"], "steps": state["step"], "best_val_loss": state["best_val"],
            "history": state["history"], "data": data_report, "parameters": model.num_parameters()}


def _jsonable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def export(model: WyckoffTransformer, folder: Path, metadata: dict) -> None:
    """Write `model.safetensors` + `config.json` (model config, training vocabulary statistics, provenance)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model": model.config.as_dict(), **metadata}, indent=1))
