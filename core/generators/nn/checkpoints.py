"""Trained weights on disk: `model.safetensors` + `config.json` (model type, format version, config, provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

# config.json layouts this version reads: 0 has no `model_type` / `format_version` keys (the shipped Wyckoff
# transformer), 1 adds them; both keep the model's config under "model".
FORMAT_VERSION = 1
MAX_ABS_WEIGHT = 1e4  # trained weights here stay below ~10; 1e4 would overflow the softmax long before sampling


class ModelLoadError(ValueError):
    """Weights missing, corrupt or not matching their config."""


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


def save_pretrained(model, folder: str | Path, model_type: str, config: dict, metadata: dict | None = None) -> None:
    """Write the model's tensors as `model.safetensors` and `config.json` = {model_type, format_version, "model":
    config, **metadata} (vocabulary statistics, training provenance ...)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
    document = {"model_type": model_type, "format_version": FORMAT_VERSION, "model": config, **(metadata or {})}
    (folder / "config.json").write_text(json.dumps(document, indent=1))


def _check_format(metadata: dict, model_type: str, label: str, path: Path) -> None:
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{path} is not a {label} config (a JSON object is expected)")
    found = metadata.get("model_type", model_type)
    if found != model_type:
        raise ModelLoadError(f"{path} holds a {found!r} model, not a {model_type!r} one")
    version = metadata.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= FORMAT_VERSION:
        raise ModelLoadError(f"{path} has format version {version!r}; this version reads 0 to {FORMAT_VERSION} "
                             "(update wyckoff-lab to load it)")


def load_pretrained(folder: str | Path, model_type: str, build: Callable[[dict], object], label: str,
                    hint: str = "", device=None):
    """(model on `device`, the config.json contents) from a weights folder; never unpickles anything.

    `build(config)` makes the untrained model from the "model" entry (raising ModelLoadError for an unusable
    one); every tensor must then match it (strict). `label` names the model in errors, `hint` says how to get
    weights. Device: `relax.resolve_device` (CUDA when available, else CPU).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from wyckoff_lab.core.relax import resolve_device

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"no {label} weights in {folder} (need config.json and model.safetensors)"
                             + (f"; {hint}" if hint else ""))
    try:
        metadata = json.loads(config_path.read_text())
        _check_format(metadata, model_type, label, config_path)
        model = build(metadata["model"])
        state = load_file(weights_path)
        model.load_state_dict(state, strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise ModelLoadError(f"corrupt or mismatched {label} weights in {folder}: {exc}") from None
    broken = weight_problems(state)
    if broken:
        raise ModelLoadError(f"corrupt {label} weights in {weights_path}: {broken}")
    return model.to(resolve_device(device)).eval(), metadata
