"""Shared fixtures: real MP-20 data from WYCKOFF_LAB_DATA (tests skip with a clear reason when it is absent), the
shipped Wyckoff transformer, and the `needs_chromium` marker. Test modules take these by name and import nothing
from one another."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

MP20_FILES = ("train.csv.gz", "val.csv.gz", "test.csv.gz", "train_meta_nocoords.csv.gz")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_chromium: drives headless Chromium (skipped where it is not installed)")


def pytest_collection_modifyitems(config, items):
    if CHROMIUM and CHROMEDRIVER:
        return
    skip = pytest.mark.skip(reason="Debian chromium + chromium-driver are not installed (make test installs them "
                                   "when run as root)")
    for item in items:
        if item.get_closest_marker("needs_chromium"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The WYCKOFF_LAB_DATA folder, holding MP-20's CSV files (as `wyckoff-lab data prepare` or the README's copy
    leaves them)."""
    env = os.environ.get("WYCKOFF_LAB_DATA")
    root = Path(env) if env and Path(env).is_dir() else None
    if root is None:
        pytest.skip("WYCKOFF_LAB_DATA is not set; these tests read the real MP-20 CSV files (the README says how "
                    "to get them)")
    missing = [name for name in MP20_FILES if not (root / "mp_20" / name).is_file()]
    if missing:
        pytest.skip(f"WYCKOFF_LAB_DATA={root} has no mp_20/{', mp_20/'.join(missing)}")
    return root


@pytest.fixture(scope="session")
def mp20_test_table(real_data):
    """MP-20 test as read from its CSV (CIF text, formation energies; nothing parsed)."""
    import pandas as pd

    return pd.read_csv(real_data / "mp_20" / "test.csv.gz")


@pytest.fixture(scope="session")
def al_rh_rows(mp20_test_table):
    """MP-20 test's Al–Rh rows: AlRh (mp-364) and Rh (mp-74), as (structures, ids, DFT formation energies)."""
    from pymatgen.core import Structure

    table = mp20_test_table[mp20_test_table["material_id"].isin(["mp-364", "mp-74"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [Structure.from_str(cif, fmt="cif") for cif in table["cif"]]
    return structures, table["material_id"].tolist(), table["formation_energy_per_atom"].tolist()


@pytest.fixture(scope="session")
def shipped_generator():
    """The shipped Wyckoff transformer on the CPU, loaded once (loading the weights costs seconds)."""
    from wyckoff_lab.core.generators import get_generator
    from wyckoff_lab.core.generators.wyckoff_transformer import default_weights_dir

    if not (default_weights_dir() / "model.safetensors").is_file():
        pytest.skip("no shipped Wyckoff transformer weights in assets/models")
    return get_generator("wyckoff-transformer", device="cpu")


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
def mp20_test_rows(mp20_test_table):
    """The first 200 rows of MP-20 test as (material_id, Structure, spacegroup.number) — real data."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(row.material_id, Structure.from_str(row.cif, fmt="cif"), int(row["spacegroup.number"]))
                for _, row in mp20_test_table.head(200).iterrows()]


APP_SYSTEM = ("Al", "Ca", "Cu")  # the chemical system the app tests generate in


def _in_system(elements: str) -> bool:
    import ast

    return set(ast.literal_eval(elements)) <= set(APP_SYSTEM)


@pytest.fixture(scope="session")
def mp20_al_ca_cu(real_data, tmp_path_factory):
    """Real MP-20 rows inside Al–Ca–Cu (novelty, hull references) plus a few others from every split, so that the
    tests' fresh cache parses them in seconds rather than all of MP-20 in minutes."""
    import pandas as pd

    out = tmp_path_factory.mktemp("data") / "mp_20"
    out.mkdir()
    for name in ("train", "val", "test", "train_meta_nocoords"):
        table = pd.read_csv(real_data / "mp_20" / f"{name}.csv.gz")
        table[table["elements"].map(_in_system) | (table.index < 10)].to_csv(out / f"{name}.csv.gz", index=False)
    return out.parent


# Prototype chemistry for the substitution generator: alkali halides and oxides, alkaline-earth and transition-metal
# oxides and the intermetallics of a few metals, so that Na-Cl, Li-Mn-O, CaCu5 and Al-Ca-Cu have prototypes of
# other systems.
PROTOTYPE_ELEMENTS = {"Li", "Na", "K", "Cs", "Ag", "F", "Cl", "Br", "I", "O", "Mg", "Ca", "Sr", "Mn", "Fe", "Co", "Ni",
                      "Al", "Cu", "Zn", "Ga", "La", "Y", "Ce", "Pr", "Nd", "Sm", "Gd", "Si", "Ge", "Sn", "In"}


def _prototype_row(elements: str) -> bool:
    import ast

    found = set(ast.literal_eval(elements))
    return found <= PROTOTYPE_ELEMENTS and len(found) <= 3


@pytest.fixture(scope="session")
def mp20_with_prototypes(real_data, tmp_path_factory):
    """`mp20_al_ca_cu`'s rows plus the real MP-20 rows of at most three PROTOTYPE_ELEMENTS (about a tenth of
    MP-20), so that generators which exchange ions into known crystals find prototypes; parsed once a session."""
    import pandas as pd

    out = tmp_path_factory.mktemp("data-prototypes") / "mp_20"
    out.mkdir()
    for name in ("train", "val", "test", "train_meta_nocoords"):
        table = pd.read_csv(real_data / "mp_20" / f"{name}.csv.gz")
        keep = table["elements"].map(_in_system) | (table.index < 10) | table["elements"].map(_prototype_row)
        table[keep].to_csv(out / f"{name}.csv.gz", index=False)
    return out.parent
