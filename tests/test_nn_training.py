"""The shared trainer and weight files (`core.generators.nn.training`, `.checkpoints`) on a tiny real regression
task: it learns, a resumed run ends where an uninterrupted one does, EMA weights are what gets validated and
exported, bf16 autocast is used where asked, the time budget stops it, and weight folders of another model type
or a newer format are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wyckoff_lab.core.generators.nn import checkpoints, training
from wyckoff_lab.core.generators.nn.checkpoints import ModelLoadError, load_pretrained, save_pretrained
from wyckoff_lab.core.generators.nn.training import TrainingSettings, fit, read_checkpoint


class LinearTask:
    """y = x W* + b* with noise-free targets: 4 batches of 16 per epoch, a fixed validation set."""

    steps_per_epoch = 4

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.true_w, self.true_b = torch.randn(3, 2, generator=g), torch.randn(2, generator=g)
        self.x = torch.randn(64, 3, generator=g)
        self.val_x = torch.randn(32, 3, generator=g)
        self.exported: list[dict] = []
        self.validated_weights: list[torch.Tensor] = []
        self.dtypes: set[torch.dtype] = set()

    def target(self, x):
        return x @ self.true_w + self.true_b

    def batches(self, epoch):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        return lambda b: self.x[order[16 * b:16 * (b + 1)]]

    def loss(self, model, batch):
        prediction = model(batch)
        self.dtypes.add(prediction.dtype)
        loss = (prediction.float() - self.target(batch)).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    def validate(self, model):
        self.validated_weights.append(model.weight.detach().clone())
        with torch.no_grad():
            return {"val_loss": float((model(self.val_x) - self.target(self.val_x)).pow(2).mean())}

    def export(self, model, folder: Path, metrics: dict):
        self.exported.append(dict(metrics))
        save_pretrained(model, folder, "linear-test", {"in": 3, "out": 2}, {"metrics": metrics})


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _settings(tmp_path, **overrides):
    return TrainingSettings(**({"out_dir": str(tmp_path / "run"), "epochs": 30, "batch_size": 16, "lr": 0.05,
                                "weight_decay": 0.0, "checkpoint_every_s": 1e9} | overrides))


def test_fit_learns_and_exports_the_best_validation_weights(tmp_path):
    task, model = LinearTask(), _model()
    before = task.validate(model)["val_loss"]
    summary = fit(model, _settings(tmp_path), task, "cpu", progress=False)
    assert summary["epochs_done"] == 30 and summary["steps"] == 120
    assert summary["best_val_loss"] < 0.02 * before
    # Exported only on improvement, and what is on disk is the best epoch.
    losses = [m["val_loss"] for m in task.exported]
    assert losses == sorted(losses, reverse=True) and losses[-1] == summary["best_val_loss"]
    loaded, config = load_pretrained(tmp_path / "run" / "best", "linear-test", lambda c: torch.nn.Linear(3, 2),
                                     "linear test", device="cpu")
    assert config["format_version"] == checkpoints.FORMAT_VERSION and config["model_type"] == "linear-test"
    assert config["metrics"]["val_loss"] == summary["best_val_loss"]
    assert task.validate(loaded)["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-6)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = _model()
    fit(whole, _settings(tmp_path / "a", epochs=6), LinearTask(), "cpu", progress=False)

    first = _model()
    fit(first, _settings(tmp_path / "b", epochs=3), LinearTask(), "cpu", progress=False)
    checkpoint = tmp_path / "b" / "run" / "checkpoint.pt"
    saved = read_checkpoint(checkpoint, "cpu")
    assert saved["state"]["epoch"] == 3 and saved["state"]["step"] == 12
    # Interrupted mid-epoch (by the time budget, as a killed run would be between checkpoints) and resumed:
    # the same batches, learning rates and optimizer moments as the run that never stopped.
    partial = _model()
    fit(partial, _settings(tmp_path / "c", epochs=6, max_minutes=1e-9), LinearTask(), "cpu", progress=False)
    saved = read_checkpoint(tmp_path / "c" / "run" / "checkpoint.pt", "cpu")
    assert saved["state"]["step"] == 1  # the time budget stopped it after its first step, checkpointed
    resumed = _model()
    summary = fit(resumed, _settings(tmp_path / "c", epochs=6), LinearTask(), "cpu", saved=saved, progress=False)
    assert summary["steps"] == 24 and summary["epochs_done"] == 6
    assert torch.allclose(resumed.weight, whole.weight, atol=1e-6)
    assert torch.allclose(resumed.bias, whole.bias, atol=1e-6)


def test_ema_weights_are_validated_and_exported_and_differ_from_the_raw_ones(tmp_path):
    task, model = LinearTask(), _model()
    initial = model.weight.detach().clone()
    fit(model, _settings(tmp_path, epochs=3, ema_decay=0.9), task, "cpu", progress=False)
    raw = model.weight.detach().clone()
    validated = task.validated_weights[-1]
    assert not torch.allclose(validated, raw)  # validation saw the average, not the last step
    # After the swap the raw weights are back in the model.
    assert torch.equal(model.weight.detach(), raw) and not torch.equal(raw, initial)
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.pt", "cpu")
    assert torch.allclose(saved["average"]["weight"], validated)  # and the average is resumable
    assert torch.allclose(saved["model"]["weight"], raw)
    # The average follows w_avg <- decay * w_avg + (1 - decay) * w at each step.
    average = training.WeightAverage(torch.nn.Linear(3, 2), 0.9)
    target = torch.nn.Linear(3, 2)
    start = average.shadow["weight"].clone()
    average.update(target)
    assert torch.allclose(average.shadow["weight"], 0.9 * start + 0.1 * target.weight.detach())


def test_bf16_autocast_where_asked_and_fp32_otherwise(tmp_path):
    task = LinearTask()
    fit(_model(), _settings(tmp_path / "bf16", epochs=1, precision="bf16"), task, "cpu", progress=False)
    assert task.dtypes == {torch.bfloat16}
    task = LinearTask()
    fit(_model(), _settings(tmp_path / "auto", epochs=1, precision="auto"), task, "cpu", progress=False)
    assert task.dtypes == {torch.float32}  # auto: bf16 only on a CUDA device that supports it


def test_settings_problems_name_every_unusable_field():
    problems = TrainingSettings(epochs=0, precision="fp8", ema_decay=1.5, clip_norm=-1).problems()
    assert any("epochs" in p for p in problems)
    assert any("precision must be one of auto, fp32, bf16" in p for p in problems)
    assert any("ema_decay must be in (0, 1)" in p for p in problems)
    assert any("clip_norm" in p for p in problems)
    assert TrainingSettings().problems() == []


def test_a_checkpoint_of_another_model_is_a_checkpoint_error(tmp_path):
    fit(_model(), _settings(tmp_path, epochs=1), LinearTask(), "cpu", progress=False)
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.pt", "cpu")
    with pytest.raises(training.CheckpointError, match="another model"):
        fit(torch.nn.Linear(4, 2), _settings(tmp_path, epochs=2), LinearTask(), "cpu", saved=saved, progress=False)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "materium"}, "holds a 'materium' model, not a 'linear-test' one"),
    ({"format_version": checkpoints.FORMAT_VERSION + 1}, "update wyckoff-lab to load it"),
    ({"format_version": "1"}, "has format version '1'"),
])
def test_weight_folders_of_another_type_or_a_newer_format_are_refused(tmp_path, change, message):
    save_pretrained(torch.nn.Linear(3, 2), tmp_path, "linear-test", {"in": 3})
    document = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(tmp_path, "linear-test", lambda c: torch.nn.Linear(3, 2), "linear test", device="cpu")


def test_version_0_folders_without_type_keys_still_load(tmp_path):
    """The shipped Wyckoff transformer's config predates `model_type` / `format_version`."""
    model = torch.nn.Linear(3, 2)
    save_pretrained(model, tmp_path, "linear-test", {"in": 3})
    document = json.loads((tmp_path / "config.json").read_text())
    del document["model_type"], document["format_version"]
    (tmp_path / "config.json").write_text(json.dumps(document))
    loaded, _ = load_pretrained(tmp_path, "linear-test", lambda c: torch.nn.Linear(3, 2), "linear test", device="cpu")
    assert torch.equal(loaded.weight, model.weight)


def test_nan_weights_and_mismatched_shapes_are_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    save_pretrained(model, tmp_path / "nan", "linear-test", {})
    with pytest.raises(ModelLoadError, match="NaN or infinite"):
        load_pretrained(tmp_path / "nan", "linear-test", lambda c: torch.nn.Linear(3, 2), "linear test", device="cpu")
    save_pretrained(torch.nn.Linear(3, 2), tmp_path / "shape", "linear-test", {})
    with pytest.raises(ModelLoadError, match="corrupt or mismatched"):
        load_pretrained(tmp_path / "shape", "linear-test", lambda c: torch.nn.Linear(4, 2), "linear test",
                        device="cpu")
