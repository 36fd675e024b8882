"""Shared fixtures: real MP-20 rows from WYCKOFF_LAB_DATA (tests skip with a clear reason when it is absent)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest


def data_root() -> Path | None:
    env = os.environ.get("WYCKOFF_LAB_DATA")
    return Path(env) if env and Path(env).is_dir() else None


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep test caches out of the user's cache folder (one folder for the whole session, so tests share it)."""
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "wyckoff-lab-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models gain nothing from a second thread, and OpenMP spin-waiting hurts on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mp20_test_rows():
    """The first 200 rows of MP-20 test as (material_id, Structure, spacegroup.number) — real data."""
    root = data_root()
    if root is None or not (root / "mp_20" / "test.csv.gz").is_file():
        pytest.skip("WYCKOFF_LAB_DATA is not set or has no mp_20/test.csv.gz (the README says how to get it)")
    import pandas as pd
    from pymatgen.core import Structure

    frame = pd.read_csv(root / "mp_20" / "test.csv.gz", nrows=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(row.material_id, Structure.from_str(row.cif, fmt="cif"), int(row["spacegroup.number"]))
                for _, row in frame.iterrows()]


APP_SYSTEM = ("Al", "Ca", "Cu")  # the chemical system the app tests generate in


def _in_system(elements: str) -> bool:
    import ast

    return set(ast.literal_eval(elements)) <= set(APP_SYSTEM)


@pytest.fixture(scope="session")
def mp20_al_ca_cu(tmp_path_factory):
    """Real MP-20 rows inside Al–Ca–Cu (novelty, hull references) plus a few others from every split, so that the
    tests' fresh cache parses them in seconds rather than all of MP-20 in minutes."""
    import os
    from pathlib import Path

    import pandas as pd

    root = os.environ.get("WYCKOFF_LAB_DATA")
    if not root or not (Path(root) / "mp_20" / "train.csv.gz").is_file():
        pytest.skip("WYCKOFF_LAB_DATA is not set or has no MP-20 (the README says how to get it)")
    out = tmp_path_factory.mktemp("data") / "mp_20"
    out.mkdir()
    for name in ("train", "val", "test", "train_meta_nocoords"):
        table = pd.read_csv(Path(root) / "mp_20" / f"{name}.csv.gz")
        table[table["elements"].map(_in_system) | (table.index < 10)].to_csv(out / f"{name}.csv.gz", index=False)
    return out.parent
