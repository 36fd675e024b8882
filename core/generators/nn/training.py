"""One training loop for every model: AdamW with and without weight decay, warm-up then linear decay, gradient
clipping, bf16 autocast where the device has it, an optional EMA of the weights, a wall-time budget, resumable
checkpoints and the best-validation weights exported as they improve."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainingSettings:
    """What the loop itself needs; a model's own config dataclass extends it (and may change the defaults)."""

    out_dir: str = "runs/model"
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_fraction: float = 0.05
    clip_norm: float = 1.0  # the gradient's global norm is clipped to this (0: no clipping)
    max_minutes: float | None = None  # stop (after a checkpoint) when this much wall time has passed
    checkpoint_every_s: float = 300.0
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU (relax.resolve_device)
    precision: str = "auto"  # auto: bf16 autocast on a CUDA device that supports it, else fp32
    ema_decay: float | None = None  # e.g. 0.999: validate and export an exponential moving average of the weights

    def problems(self) -> list[str]:
        """What makes these settings unusable (an empty list when they are sound)."""
        found = []
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"{name} must be a whole number >= 1 (got {value!r})")
        # A NaN or negative learning rate trained NaN weights for hours without a word.
        for name in ("lr",) + (() if self.max_minutes is None else ("max_minutes",)):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                found.append(f"{name} must be a finite number > 0 (got {value!r})")
        for name in ("weight_decay", "warmup_fraction", "checkpoint_every_s", "clip_norm"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                found.append(f"{name} must be a finite number >= 0 (got {value!r})")
        if self.precision not in PRECISIONS:
            found.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.ema_decay is not None and (not _is_number(self.ema_decay) or not 0 < self.ema_decay < 1):
            found.append(f"ema_decay must be in (0, 1) (got {self.ema_decay!r})")
        return found


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class TrainingTask(Protocol):
    """What a model brings to `fit`: its batches, its loss, its validation and its export."""

    steps_per_epoch: int

    def batches(self, epoch: int) -> Callable[[int], Any]:
        """The epoch's batch b, for b from 0 (deterministic per epoch, so that a resumed run continues it)."""

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and the figures shown beside the progress bar."""

    def validate(self, model) -> dict:
        """Validation figures, with the "val_loss" that picks the best weights."""

    def export(self, model, folder: Path, metrics: dict) -> None:
        """Write the weights (e.g. `checkpoints.save_pretrained`) with the validation figures."""


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


def learning_rate(step: int, total: int, settings: TrainingSettings) -> float:
    """Linear one-cycle: warm up to the peak, then decay linearly to 1% of it."""
    warmup = max(1, int(settings.warmup_fraction * total))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return settings.lr * max(0.01, 1 - (step - warmup) / max(1, total - warmup))


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings, none on biases, norm gains and other vectors."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_for(precision: str, device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `precision` asks for it (or, for 'auto', where the CUDA device supports it)."""
    device = torch.device(device)
    wanted = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                     and torch.cuda.is_bf16_supported())
    if wanted and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class WeightAverage:
    """An exponential moving average of a model's floating-point tensors, swapped in for validation and export."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model):
        current = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(current)


def fit(model, settings: TrainingSettings, task: TrainingTask, device, saved: dict | None = None,
        progress: bool = True) -> dict:
    """Train `model` (on `device`) for `settings.epochs`, resuming from `saved` (`read_checkpoint`, read before the
    data so that a bad checkpoint fails at once) and checkpointing to `out_dir/checkpoint.pt`; after each epoch the
    best validation so far is exported to `out_dir/best/`."""
    from tqdm import tqdm

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.999))
    average = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None
    steps_per_epoch = task.steps_per_epoch
    total_steps = settings.epochs * steps_per_epoch
    state = {"step": 0, "epoch": 0, "best_val": float("inf"), "history": []}
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if average is not None and "average" in saved:
                average.shadow = saved["average"]
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {checkpoint}: it holds another model ({str(exc)[:200]}); "
                                  "train into a new --out or use the same model settings") from None
        state = saved["state"]
        log.info("resumed from %s at epoch %d step %d", checkpoint, state["epoch"], state["step"])

    def save_checkpoint():
        tmp = checkpoint.with_suffix(".tmp")
        document = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": json.dumps(state)}
        if average is not None:
            document["average"] = average.shadow
        torch.save(document, tmp)
        tmp.replace(checkpoint)

    def evaluated() -> dict:
        if average is None:
            return task.validate(model)
        with average.swapped_in(model):
            return task.validate(model)

    started = time.time()
    last_save = time.time()
    model.train()
    stop = False
    while state["epoch"] < settings.epochs and not stop:
        batch_of = task.batches(state["epoch"])
        first_batch = state["step"] - state["epoch"] * steps_per_epoch  # resume mid-epoch
        bar = tqdm(range(first_batch, steps_per_epoch), disable=not progress, desc=f"epoch {state['epoch'] + 1}",
                   unit="batch", leave=False)
        for b in bar:
            batch = batch_of(b)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], total_steps, settings)
            with autocast_for(settings.precision, device):
                loss, shown = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            optimizer.step()
            if average is not None:
                average.update(model)
            state["step"] += 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if time.time() - last_save > settings.checkpoint_every_s:
                save_checkpoint()
                last_save = time.time()
            if settings.max_minutes and time.time() - started > 60 * settings.max_minutes:
                stop = True
                break
        if stop:
            break
        state["epoch"] += 1
        metrics = evaluated() | {"epoch": state["epoch"], "step": state["step"],
                                 "minutes": (time.time() - started) / 60}
        model.train()
        state["history"].append(metrics)
        log.info("epoch %d: %s", state["epoch"], metrics)
        if progress:
            tqdm.write(json.dumps(metrics))
        if metrics["val_loss"] < state["best_val"]:
            state["best_val"] = metrics["val_loss"]
            if average is None:
                task.export(model, out / "best", metrics)
            else:
                with average.swapped_in(model):
                    task.export(model, out / "best", metrics)
        save_checkpoint()
        last_save = time.time()
    save_checkpoint()
    return {"epochs_done": state["epoch"], "steps": state["step"], "best_val_loss": state["best_val"],
            "history": state["history"]}
