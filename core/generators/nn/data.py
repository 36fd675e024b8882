"""Training data every model shares: a split's rows with stability labels (held-out systems kept out), and padding
variable-length sequences into batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Sets that may add rows to a dataset's training split (see `training_rows`).
EXTRA_TRAINING_DATA = ("mp_36k",)


def training_rows(dataset_name: str, split: str, extra_data: str | None = None, add_extra_rows: bool = False,
                  progress: bool = False) -> list:
    """The split as CrystalDatasets, each with `e_above_hull` per row.

    `extra_data="mp_36k"` (MP-20 only) labels stability from the hull of MP-20 and the 36k MP set together, and
    with `add_extra_rows` the split also gets that set's admissible rows (`datasets.mp36k_training_rows`, which
    leaves out every MP-20 id and every chemical system MP-20 has only in val/test, so held-out systems stay held
    out), so that a stability label sees unstable phases that MP-20 leaves out.
    """
    from wyckoff_lab.core.datasets import load_dataset, mp20_and_36k_e_above_hull, mp36k_training_rows

    if extra_data is not None and (extra_data not in EXTRA_TRAINING_DATA or dataset_name != "mp_20"):
        raise ValueError(f"extra training data {extra_data!r} is not available for {dataset_name!r}; "
                         f"MP-20 can take {', '.join(EXTRA_TRAINING_DATA)}")
    parts = [load_dataset(dataset_name, split, progress=progress)]
    if extra_data is not None:
        parts[0].frame["e_above_hull"] = parts[0].frame["material_id"].map(
            mp20_and_36k_e_above_hull(progress=progress))
        if add_extra_rows:
            parts.append(mp36k_training_rows(progress=progress))
    return parts


def stability_label(e_above_hull: float) -> str:
    """'low' below the Matra-Genoa threshold (`STABILITY_THRESHOLD_EV` eV/atom above the hull), else 'high'."""
    from wyckoff_lab.core.generators.base import STABILITY_THRESHOLD_EV

    return "low" if e_above_hull < STABILITY_THRESHOLD_EV else "high"


def pad_sequences(sequences: Sequence, fields: Sequence[tuple[str, type, object]], device) -> tuple:
    """Batch tensors (B, T) of variable-length sequences: one per (attribute, numpy dtype, padding value) of
    `fields`, read from each sequence, then the boolean mask of real positions; T is the longest sequence."""
    import torch

    T = max(len(s) for s in sequences)
    B = len(sequences)
    arrays = [np.full((B, T), pad, dtype=dtype) for _, dtype, pad in fields]
    mask = np.zeros((B, T), dtype=bool)
    for i, s in enumerate(sequences):
        n = len(s)
        for array, (name, _, _) in zip(arrays, fields):
            array[i, :n] = getattr(s, name)
        mask[i, :n] = True
    return tuple(torch.from_numpy(a).to(device) for a in (*arrays, mask))
