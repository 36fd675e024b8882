"""Relax crystal structures with a universal potential (MatterSim, CHGNet or SevenNet): batched FIRE, cell relaxed."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixSymmetry
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from ase.stress import full_3x3_to_voigt_6_stress
from pymatgen.core import DummySpecies, Lattice, Structure
from threadpoolctl import threadpool_limits

from wyckoff_lab.core.defaults import SYMPREC

from wyckoff_lab.core.paths import (
    DownloadError,
    cache_dir,
    download,
    entry_field,
    file_digest,
    read_cache_entry,
    write_cache_entry,
)

log = logging.getLogger(__name__)

POTENTIALS = ("mattersim", "chgnet", "sevennet")
STATUSES = ("converged", "not_converged", "exploded", "atoms_too_close", "isolated_atoms", "nan_energy", "error")
# "error" may be transient (out of memory, a CUDA hiccup): such results are never cached, so a later run retries.
CACHEABLE_STATUSES = tuple(s for s in STATUSES if s != "error")
# Bump when a cached result's meaning or layout changes: entries of another version are recomputed.
# 2: entries carry this version; isolated atoms are no longer relaxed (version-1 entries may hold them "converged").
RELAX_CACHE_VERSION = 2

MATTERSIM_CHECKPOINT_ENV = "WYCKOFF_LAB_MATTERSIM_CHECKPOINT"
MATTERSIM_CHECKPOINT_NAME = "mattersim-v1.0.0-1M.pth"
# Where mattersim.forcefield.potential.Potential.from_checkpoint keeps (and downloads) its pretrained weights.
MATTERSIM_CACHE_DIR = "~/.local/mattersim/pretrained_models"
MATTERSIM_URL = (
    f"https://raw.githubusercontent.com/microsoft/mattersim/main/pretrained_models/{MATTERSIM_CHECKPOINT_NAME}"
)
# SevenNet's pretrained checkpoints ship inside its wheel (sevenn/pretrained_potentials/). Each supported file is
# pinned by its full SHA-256: it is a pickle we did not write, so it is read with weights_only=True and, besides,
# a file whose bytes differ from the released ones is refused. SevenNet-0 (11Jul2024) is trained on MPtrj, the
# PBE(+U) data of MP-20's DFT energies. $WYCKOFF_LAB_SEVENNET_CHECKPOINT may name another copy of a pinned file.
SEVENNET_CHECKPOINT_ENV = "WYCKOFF_LAB_SEVENNET_CHECKPOINT"
SEVENNET_DEFAULT_MODEL = "SevenNet-0_11Jul2024"
SEVENNET_CHECKPOINTS = {  # model name -> (path inside the sevenn package, SHA-256 of the released file)
    "SevenNet-0_11Jul2024": ("pretrained_potentials/SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
                             "7052cb42b7b3be42b40b97fa0d21077a48c54b5548948fc4dcf346629f813c36"),
    "SevenNet-0_22May2024": ("pretrained_potentials/SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
                             "5d389fafd512e6ae2830d74d0b66ffc49a55d3832653ff8e7bf7f1343013c1d1"),
    "SevenNet-l3i5": ("pretrained_potentials/SevenNet_l3i5/checkpoint_l3i5.pth",
                      "a7ff190d41efe5b8317a03d20a468e4036a1a3e64e0b14fdbab64ac3f4bfc09d"),
}
SEVENNET_INSTALL = "pip install 'wyckoff-lab[sevennet]' (or `make install`)"
# A failed download of the checkpoint is remembered this long (cache_dir()/mattersim_probe.json): every command
# used to try the host again, wait for its timeout and print the same warning.
MATTERSIM_PROBE_TTL_S = 24 * 3600
# FixSymmetry keeps the space group spglib finds at this tolerance: the one the candidate table shows as detected.
FIX_SYMMETRY_SYMPREC = SYMPREC

# Graphs per forward pass. On CPU large batches only cost memory: 32 generated Li-Mn-O cells (731 atoms, 3 CHGNet
# FIRE steps, one thread) peaked at 12.3 GB in batches of 32 and took 109 s, against 6.6 GB / 32 s in batches of 8 and
# 2.2 GB / 33 s one at a time. A GPU gains from batching.
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


def batch_size(device: str) -> int:
    """Structures per potential forward pass on `device`."""
    return CPU_BATCH_SIZE if str(device) == "cpu" else GPU_BATCH_SIZE


PROGRESS_EVERY_STEPS = 50  # relax() logs (INFO) how many structures are still relaxing this often

MIN_DISTANCE_A = 0.5  # closer pairs than this are unphysical: no potential is trained there
EXPLODED_ENERGY_PER_ATOM_EV = -50.0  # real total energies are above about -15 eV/atom
EXPLODED_VOLUME_RATIO = 5.0  # final/initial volume beyond 5x (or below 1/5x) means the cell blew up or collapsed
# An atom with no neighbour within the potential's cutoff feels nothing: its energy is a free atom's, not a
# crystal's, and "converged" would be meaningless. For calculators whose cutoff we do not know: CHGNet's atom-graph
# cutoff, the larger of the two shipped potentials' (MatterSim's is 5 Å).
ISOLATION_CUTOFF_A = 6.0


class PotentialError(RuntimeError):
    """A potential cannot be loaded: a corrupt checkpoint, a missing file named by the user (and the subclass)."""


class PotentialUnavailableError(PotentialError):
    """A potential cannot be had on this machine (package missing, no checkpoint and offline)."""


class RememberedUnavailableError(PotentialUnavailableError):
    """Unavailable for a reason an earlier process already found and warned about (the download host was
    unreachable a short while ago): said again only at INFO level."""


class DeviceError(PotentialError, ValueError):
    """A torch device that this machine does not have (CUDA on a CPU-only machine) or that does not exist."""


@dataclass
class Evaluation:
    """One single-point calculation."""

    energy: float  # eV, total
    forces: np.ndarray  # (n_atoms, 3), eV/Å
    stress: np.ndarray | None  # (6,) Voigt, eV/Å^3, ASE sign convention; None when not asked for


@dataclass
class LoadedPotential:
    """A potential ready to evaluate batches of structures.

    `identity` names the exact model (name + version or checkpoint digest): relaxations are cached under it and
    hull energies are only compared when it matches. `evaluate(atoms_list, with_stress)` returns one Evaluation per
    structure, in one batched model call where the potential supports it.
    """

    name: str
    identity: str
    device: str
    calculator: Calculator
    evaluate: Callable[[list[Atoms], bool], list[Evaluation]]
    cacheable: bool = True  # False for arbitrary user calculators, whose parameters we cannot key on
    cutoff: float | None = None  # Å, the model's neighbour cutoff; None: unknown (ISOLATION_CUTOFF_A is used)


@dataclass
class RelaxResult:
    """The outcome of relaxing one structure. `status` is one of STATUSES; `message` says why when not converged.

    `rmsd_to_start` (Å): root-mean-square atomic displacement, measured in fractional coordinates (minimum image,
    mean translation removed) and expressed in Å through the final lattice, so a pure cell strain counts as zero.
    `max_force` (eV/Å) is the largest atomic force norm at the final structure. "converged" means both: that
    atomic force below fmax (the criterion the user set), and, with a relaxed cell, ASE's criterion on the
    FrechetCellFilter's generalised forces (the atomic forces mapped through the cell's deformation, and the
    cell's stress-derived forces) below fmax too. ASE's criterion alone let max atomic forces of 0.054-0.12 eV/Å
    pass as converged at fmax 0.05 (the deformation gradient scales the atomic rows).
    `fix_symmetry`: relaxed under ASE's FixSymmetry (forces and stress symmetrised, the space group kept).
    `forces` (eV/Å, n x 3) and `stress` (eV/Å^3, Voigt, ASE sign) at the final structure, None where unknown.
    """

    initial: Structure
    final: Structure
    energy: float  # eV, total energy of `final`
    energy_per_atom: float  # eV/atom
    steps: int  # FIRE steps taken (0 = single point)
    max_force: float  # eV/Å
    status: str
    message: str
    potential: str  # "chgnet", "mattersim" or a calculator's class name
    potential_identity: str
    rmsd_to_start: float  # Å
    wall_time_s: float
    cached: bool = False
    fix_symmetry: bool = False
    fmax: float = math.nan  # eV/Å, the atomic force criterion it was relaxed to
    relax_cell: bool = True
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None

    def summary(self) -> dict:
        """JSON-ready scalars (no structures); non-finite numbers become None so the output stays strict JSON."""
        values = {
            "formula": self.final.composition.reduced_formula,
            "status": self.status,
            "message": self.message,
            "potential": self.potential,
            "energy_eV": self.energy,
            "energy_per_atom_eV": self.energy_per_atom,
            "steps": self.steps,
            "max_force_eV_per_A": self.max_force,
            "rmsd_to_start_A": self.rmsd_to_start,
            "wall_time_s": self.wall_time_s,
            "cached": self.cached,
            "fix_symmetry": self.fix_symmetry,
            "fmax_eV_per_A": self.fmax,
            "criterion": convergence_criterion(self.fmax, self.relax_cell, self.fix_symmetry),
        }
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def convergence_criterion(fmax: float, relax_cell: bool = True, fix_symmetry: bool = False) -> str:
    """What "converged" meant for a relaxation, in words the UI and the CLI show."""
    text = f"max atomic force < {fmax:g} eV/Å" if math.isfinite(fmax) else "max atomic force < fmax"
    if relax_cell:
        text += " and cell (stress) forces of the Fréchet cell filter < fmax"
    return text + (", symmetry kept (FixSymmetry)" if fix_symmetry else "")


def _float_array(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=float)


@dataclass
class RelaxFrame:
    """A snapshot taken as the optimizer goes; `result` is set on the last frame only."""

    step: int
    structure: Structure
    energy_per_atom: float  # eV/atom
    max_force: float  # eV/Å
    result: RelaxResult | None = None


# ---------------------------------------------------------------------------------------------------------------------
# potentials


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None = None) -> str:
    """`device` checked against this machine, or default_device() for None.

    Raises DeviceError (a PotentialError and a ValueError) naming what is missing: torch would otherwise fail deep
    inside model loading with a bare AssertionError ("Torch not compiled with CUDA enabled").
    """
    import torch

    if device is None or not str(device).strip():
        return default_device()
    name = str(device).strip()
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):  # torch's message lists every device type it knows: too long to help
        raise DeviceError(f"unknown torch device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"CUDA requested (device {name!r}) but not available: {why}; use device 'cpu' "
                              "(or give none: CUDA where available, else CPU)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"CUDA device {parsed.index} requested but only {torch.cuda.device_count()} "
                              f"GPU(s) are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"MPS requested (device {name!r}) but not available on this machine; use device 'cpu'")
    elif parsed.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use cpu or cuda")
    return name


def check_relax_settings(fmax: float, max_steps: int) -> tuple[float, int]:
    """(fmax, max_steps) as float and int; ValueError unless fmax is a finite number > 0 (eV/Å) and max_steps an
    integer >= 0 (a negative one ran no step at all and gave a result without a status)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0 (0 = single point), not {max_steps!r}")
    if isinstance(fmax, bool) or not isinstance(fmax, int | float | np.floating | np.integer) \
            or not math.isfinite(fmax) or fmax <= 0:
        raise ValueError(f"fmax must be a finite number > 0 (eV/Å), not {fmax!r}")
    return float(fmax), int(max_steps)


_PROGRESS: contextvars.ContextVar[Callable[[int, int, int], None] | None] = contextvars.ContextVar(
    "relax_progress", default=None)


@contextlib.contextmanager
def relax_progress(report: Callable[[int, int, int], None]):
    """Within the block, every relax() without its own `progress` reports `report(done, total, step)` after each
    FIRE step: how a command shows a bar for relaxations made inside other modules (the hull's references)."""
    token = _PROGRESS.set(report)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


_LOADED: dict[tuple[str | None, str], LoadedPotential] = {}  # in-process model cache per (potential, device)
_FALLBACK_WARNED = False


def load_potential(potential: str | None = None, device: str | None = None) -> LoadedPotential:
    """Load a potential by name, cached per (potential, device) for the life of the process.

    None means MatterSim where its checkpoint can be had (WYCKOFF_LAB_MATTERSIM_CHECKPOINT, else MatterSim's own
    cache folder, else a quick download) and CHGNet otherwise, with one warning per process. Naming "mattersim"
    explicitly raises PotentialUnavailableError instead of falling back.
    """
    global _FALLBACK_WARNED
    device = resolve_device(device)
    key = (potential, device)
    if key in _LOADED:
        return _LOADED[key]
    if potential is None:
        try:
            loaded = load_potential("mattersim", device)
        except PotentialUnavailableError as exc:
            if not _FALLBACK_WARNED:
                level = logging.INFO if isinstance(exc, RememberedUnavailableError) else logging.WARNING
                log.log(level, "MatterSim is not available (%s); using CHGNet instead", exc)
                _FALLBACK_WARNED = True
            loaded = load_potential("chgnet", device)
    elif potential == "mattersim":
        loaded = _load_mattersim(device)
    elif potential == "chgnet":
        loaded = _load_chgnet(device)
    elif potential == "sevennet":
        loaded = load_sevennet(device)
    else:
        raise ValueError(f"unknown potential {potential!r}; choose one of {', '.join(POTENTIALS)}")
    _LOADED[key] = loaded
    return loaded


def load_calculator(potential: str | None = None, device: str | None = None) -> Calculator:
    """The ASE calculator of `load_potential(potential, device)`, for single points or MD."""
    return load_potential(potential, device).calculator


def resolve_potential(
    potential: str | None | Calculator | LoadedPotential, device: str | None = None
) -> LoadedPotential:
    """A LoadedPotential from a name (see load_potential), an ASE calculator (uncached, evaluated one by one) or
    an already loaded potential."""
    if isinstance(potential, LoadedPotential):
        return potential
    if isinstance(potential, Calculator):
        cls = type(potential)
        return LoadedPotential(
            name=cls.__name__,
            identity=f"{cls.__module__}.{cls.__qualname__}@{id(potential):x}",
            device=device or "cpu",
            calculator=potential,
            evaluate=_calculator_evaluator(potential),
            cacheable=False,
        )
    return load_potential(potential, device)


def _calculator_evaluator(calc: Calculator) -> Callable[[list[Atoms], bool], list[Evaluation]]:
    """Evaluate structures one by one through a plain ASE calculator."""

    def evaluate(atoms_list: list[Atoms], with_stress: bool) -> list[Evaluation]:
        out = []
        for atoms in atoms_list:
            atoms = atoms.copy()
            atoms.calc = calc
            stress = atoms.get_stress(voigt=True) if with_stress else None
            out.append(Evaluation(float(atoms.get_potential_energy()), atoms.get_forces(), stress))
        return out

    return evaluate


def _load_chgnet(device: str) -> LoadedPotential:
    from chgnet.model import CHGNet, CHGNetCalculator

    # CHGNet prints banners to stdout, which would corrupt `--json` output of the CLI.
    with contextlib.redirect_stdout(io.StringIO()):
        model = CHGNet.load(verbose=False, use_device=device)
        calculator = CHGNetCalculator(model=model, use_device=device)

    def evaluate(atoms_list: list[Atoms], with_stress: bool) -> list[Evaluation]:
        structures = [_to_structure(atoms) for atoms in atoms_list]
        with warnings.catch_warnings():
            # CHGNet's stress code warns about its own tensor handling on every call; it is harmless noise.
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            predictions = model.predict_structure(
                structures, task="efs" if with_stress else "ef", batch_size=batch_size(device)
            )
        if len(structures) == 1:
            predictions = [predictions]
        return [
            Evaluation(
                energy=float(p["e"]) * len(s),  # CHGNet predicts eV/atom
                forces=p["f"],
                stress=full_3x3_to_voigt_6_stress(p["s"]) * units.GPa if with_stress else None,
            )
            for s, p in zip(structures, predictions)
        ]

    log.info("loaded CHGNet %s on %s", model.version, device)
    return LoadedPotential("chgnet", f"chgnet:{model.version}", device, calculator, evaluate,
                           cutoff=float(model.graph_converter.atom_graph_cutoff))


def _checkpoint_named_by(variable: str) -> Path | None:
    """The checkpoint file an environment variable names (None when unset); a name that is not a file is an error."""
    env = os.environ.get(variable)
    if not env:
        return None
    path = Path(env).expanduser()
    if not path.is_file():
        raise PotentialError(f"{variable}={env} is not a file")
    return path


def sevennet_checkpoint() -> Path:
    """The SevenNet checkpoint file: $WYCKOFF_LAB_SEVENNET_CHECKPOINT, else SevenNet-0 (11Jul2024) from the installed
    sevenn package. Raises PotentialUnavailableError when sevenn is not installed. (load_sevennet checks its bytes.)"""
    named = _checkpoint_named_by(SEVENNET_CHECKPOINT_ENV)
    if named is not None:
        return named
    try:
        import sevenn
    except ImportError as exc:
        raise PotentialUnavailableError(f"the sevenn package cannot be imported ({exc}); install it with "
                                        f"{SEVENNET_INSTALL}") from None
    relative, _ = SEVENNET_CHECKPOINTS[SEVENNET_DEFAULT_MODEL]
    path = Path(sevenn.__file__).parent / relative
    if not path.is_file():
        raise PotentialUnavailableError(f"the sevenn package has no {relative}; reinstall it with {SEVENNET_INSTALL}")
    return path


def _safe_sevennet_load(data: bytes) -> dict:
    """The checkpoint's dict, unpickled with weights_only=True. Its config holds numpy arrays (the per-species
    energy shifts and scales), so exactly numpy's array-rebuilding globals are allowed, nothing else."""
    import numpy.dtypes
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    # float32 arrays are all the pinned checkpoints hold (checked for each); any other type still fails to load.
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, numpy.dtypes.Float32DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _build_sevennet_model(checkpoint: dict):
    """SevenNet's model built from a safely loaded checkpoint dict with sevenn's own public building blocks (its
    SevenNetCheckpoint reads the file with weights_only=False, which this project does not do)."""
    import sevenn._const as sevenn_const
    import sevenn._keys as sevenn_keys
    import sevenn.scripts.backward_compatibility as sevenn_compat
    import torch
    from sevenn.model_build import build_E3_equivariant_model, init_shift_scale
    from sevenn.nn.scale import get_resolved_shift_scale

    config = dict(checkpoint["config"])
    defaults = dict(sevenn_const.model_defaults(config))
    config = sevenn_compat.patch_old_config(config)
    shift, scale = get_resolved_shift_scale(init_shift_scale(config), config.get(sevenn_keys.TYPE_MAP),
                                            config.get(sevenn_keys.MODAL_MAP, None))
    config["shift"], config["scale"] = shift, scale
    for key, value in defaults.items():
        config.setdefault(key, value)
    config = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in config.items()}
    config[sevenn_keys.USE_OEQ] = False
    model = build_E3_equivariant_model(config)
    state = sevenn_compat.patch_state_dict_if_old(checkpoint["model_state_dict"], config, model)
    missing, unexpected = model.load_state_dict(state, strict=True)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model (missing {missing}, unexpected {unexpected})")
    if model.modal_map:  # multi-fidelity models need a modality per structure; none of the pinned ones has it
        raise ValueError(f"a multi-fidelity model (modalities {list(model.modal_map)}) is not supported")
    return model, float(config[sevenn_keys.CUTOFF])


def load_sevennet(device: str | None = None, checkpoint: Path | None = None) -> LoadedPotential:
    """SevenNet from `checkpoint` (default: `sevennet_checkpoint()`), on `device` (default: CUDA if available).

    The file must be byte-identical to one of SEVENNET_CHECKPOINTS (full SHA-256), else PotentialError; a missing
    sevenn package is a PotentialUnavailableError naming the install command. Not cached per process: use
    load_potential("sevennet") for that.
    """
    device = resolve_device(device)
    try:
        import sevenn._keys as sevenn_keys
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.calculator import SevenNetCalculator
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch
    except ImportError as exc:
        raise PotentialUnavailableError(f"the sevenn package cannot be imported ({exc}); install it with "
                                        f"{SEVENNET_INSTALL}") from None
    path = sevennet_checkpoint() if checkpoint is None else Path(checkpoint)
    if not path.is_file():
        raise PotentialError(f"SevenNet checkpoint {path} is not a file")
    data = path.read_bytes()  # hashed and unpickled from the same bytes: the file cannot change in between
    digest = hashlib.sha256(data).hexdigest()
    model_name = next((name for name, (_, sha) in SEVENNET_CHECKPOINTS.items() if sha == digest), None)
    if model_name is None:
        raise PotentialError(f"{path} is not a released SevenNet checkpoint this project supports (SHA-256 "
                             f"{digest[:16]}… matches none of {', '.join(SEVENNET_CHECKPOINTS)}): refused unread")
    try:
        model, cutoff = _build_sevennet_model(_safe_sevennet_load(data))
    except Exception as exc:
        raise PotentialError(f"{path} is not a usable SevenNet checkpoint ({type(exc).__name__}: {exc})") from None
    model.to(device)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor-product accelerator" advice: none exists for CPU
        calculator = SevenNetCalculator(model, file_type="model_instance", device=device)

    def evaluate(atoms_list: list[Atoms], with_stress: bool) -> list[Evaluation]:
        out = []
        size = batch_size(device)
        for first in range(0, len(atoms_list), size):
            part = atoms_list[first:first + size]
            graphs = [AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, cutoff)) for atoms in part]
            batch = Batch.from_data_list(graphs).to(device)
            # The calculator (single structures) and this batched path share the model: its mode is set per call.
            model.set_is_batch_data(True)
            try:
                result = model(batch)
            finally:
                model.set_is_batch_data(False)
            energies = result[sevenn_keys.PRED_TOTAL_ENERGY].detach().cpu().numpy().reshape(-1)
            forces = result[sevenn_keys.PRED_FORCE].detach().cpu().numpy()
            # SevenNet's stress: (xx, yy, zz, xy, yz, zx) in eV/Å^3 with the opposite sign of ASE's, whose
            # Voigt order is (xx, yy, zz, yz, zx, xy).
            stresses = -result[sevenn_keys.PRED_STRESS].detach().cpu().numpy().reshape(len(part), 6)
            stresses = stresses[:, [0, 1, 2, 4, 5, 3]]
            offsets = np.cumsum([0] + [len(atoms) for atoms in part])
            out += [Evaluation(float(energies[i]), forces[offsets[i]:offsets[i + 1]],
                               stresses[i] if with_stress else None) for i in range(len(part))]
        return out

    log.info("loaded SevenNet %s (%s) on %s", model_name, path, device)
    return LoadedPotential("sevennet", f"sevennet:{model_name}:{file_digest(path)}", device, calculator, evaluate,
                           cutoff=cutoff)


def _load_mattersim(device: str) -> LoadedPotential:
    import torch

    try:
        from mattersim.datasets.utils.build import build_dataloader
        from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
        from mattersim.forcefield.potential import MatterSimCalculator, Potential
    except ImportError as exc:
        raise PotentialUnavailableError(f"the mattersim package cannot be imported ({exc})") from None

    path = mattersim_checkpoint()
    try:
        # weights_only: a checkpoint is a pickle, and only tensors and plain containers may come out of it.
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        if checkpoint["model_name"] != "m3gnet":
            raise ValueError(f"model_name is {checkpoint['model_name']!r}, expected 'm3gnet'")
        model = M3Gnet(device=device, **checkpoint["model_args"]).to(device)
        # strict=False as in MatterSim's own loader: released checkpoints carry a few keys the module does not own.
        model.load_state_dict(checkpoint["model"], strict=False)
    except Exception as exc:
        raise PotentialError(f"{path} is not a usable MatterSim checkpoint ({type(exc).__name__}: {exc})") from None
    model.eval()
    potential = Potential(model, device=device)
    calculator = MatterSimCalculator(potential=potential, device=device)
    cutoff, threebody_cutoff = model.model_args["cutoff"], model.model_args["threebody_cutoff"]

    def evaluate(atoms_list: list[Atoms], with_stress: bool) -> list[Evaluation]:
        loader = build_dataloader(
            atoms_list, cutoff=cutoff, threebody_cutoff=threebody_cutoff, batch_size=batch_size(device),
            only_inference=True,
        )
        energies, forces, stresses = potential.predict_properties(
            loader, include_forces=True, include_stresses=with_stress
        )
        return [
            Evaluation(
                energy=float(energies[i]),
                forces=forces[i],
                stress=full_3x3_to_voigt_6_stress(stresses[i]) * units.GPa if with_stress else None,
            )
            for i in range(len(atoms_list))
        ]

    identity = f"mattersim:{path.name}:{file_digest(path)}"
    log.info("loaded MatterSim %s on %s", path, device)
    return LoadedPotential("mattersim", identity, device, calculator, evaluate, cutoff=float(cutoff))


def mattersim_checkpoint() -> Path:
    """The MatterSim checkpoint to use: $WYCKOFF_LAB_MATTERSIM_CHECKPOINT, else MatterSim's cache, else downloaded.

    Raises PotentialUnavailableError when there is none and the download server cannot be reached quickly.
    """
    named = _checkpoint_named_by(MATTERSIM_CHECKPOINT_ENV)
    if named is not None:
        return named
    path = Path(MATTERSIM_CACHE_DIR).expanduser() / MATTERSIM_CHECKPOINT_NAME
    if not path.is_file():
        failed = _remembered_probe_failure()
        if failed is not None:
            raise RememberedUnavailableError(
                f"no MatterSim checkpoint at {path}, and its download host was unreachable {failed} (not tried "
                f"again for {MATTERSIM_PROBE_TTL_S // 3600} h; delete {_probe_path()} to retry now)")
        try:
            download(MATTERSIM_URL, path)
        except DownloadError as exc:
            _remember_probe_failure(str(exc))
            raise PotentialUnavailableError(f"no MatterSim checkpoint at {path} and {exc}") from None
    return path


def _probe_path() -> Path:
    return cache_dir() / "mattersim_probe.json"


def _remembered_probe_failure(now: float | None = None) -> str | None:
    """'at <UTC time>' when a download of the MatterSim checkpoint failed less than MATTERSIM_PROBE_TTL_S ago,
    else None (never tried, too long ago, or an unreadable note: then the host is tried again)."""
    try:
        data = json.loads(_probe_path().read_text())
        failed_at = float(data["failed_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = time.time() if now is None else now
    if not 0 <= now - failed_at < MATTERSIM_PROBE_TTL_S:
        return None
    return "at " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(failed_at))


def _remember_probe_failure(reason: str) -> None:
    try:
        path = _probe_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"failed_at": time.time(), "url": MATTERSIM_URL, "reason": reason}))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the next process simply probes again
        pass


# ---------------------------------------------------------------------------------------------------------------------
# relaxation


def _to_structure(atoms: Atoms, wrap: bool = False) -> Structure:
    return Structure(
        Lattice(atoms.cell.array), atoms.numbers, atoms.positions, coords_are_cartesian=True, to_unit_cell=wrap
    )


def _to_atoms(structure: Structure) -> Atoms:
    return Atoms(
        numbers=[site.specie.Z for site in structure],
        positions=structure.cart_coords,
        cell=structure.lattice.matrix,
        pbc=True,
    )


def _rmsd_to_start(initial: Structure, final: Structure) -> float:
    """RMS displacement (Å): fractional, minimum image, mean shift removed, measured with the final lattice."""
    d = final.frac_coords - initial.frac_coords
    d -= np.round(d)
    d -= d.mean(axis=0)  # moving every atom by the same vector is no structural change
    return float(np.sqrt(np.mean(np.sum((d @ final.lattice.matrix) ** 2, axis=1))))


@dataclass
class _Run:
    """One structure's relaxation in progress: its atoms, its own FIRE state and what becomes its result."""

    initial: Structure
    atoms: Atoms | None
    optimizer: FIRE | None
    volume0: float  # Å^3
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    energy: float = math.nan  # eV
    max_force: float = math.nan  # eV/Å
    status: str | None = None  # None while running
    message: str = ""
    wall_time_s: float = math.nan
    forces: np.ndarray | None = None  # eV/Å, as the optimizer saw them (symmetrised under FixSymmetry)
    stress: np.ndarray | None = None  # eV/Å^3, Voigt
    settings: tuple[float, bool, bool] = (math.nan, True, False)  # fmax, relax_cell, fix_symmetry

    def finish(self, status: str, message: str = "") -> None:
        assert status in STATUSES, status
        self.status, self.message = status, message
        self.wall_time_s = time.perf_counter() - self.t0

    def result(self, potential: LoadedPotential) -> RelaxResult:
        final = _to_structure(self.atoms, wrap=True) if self.atoms is not None else self.initial
        n_atoms = max(len(final), 1)
        fmax, relax_cell, fix_symmetry = self.settings
        return RelaxResult(
            initial=self.initial,
            final=final,
            energy=self.energy,
            energy_per_atom=self.energy / n_atoms,
            steps=self.steps,
            max_force=self.max_force,
            status=self.status,
            message=self.message,
            potential=potential.name,
            potential_identity=potential.identity,
            rmsd_to_start=_rmsd_to_start(self.initial, final) if len(final) else math.nan,
            wall_time_s=self.wall_time_s,
            fix_symmetry=fix_symmetry, fmax=fmax, relax_cell=relax_cell,
            forces=self.forces, stress=self.stress,
        )


def _start(structure: Structure | Atoms, relax_cell: bool, cutoff: float | None = None, fmax: float = math.nan,
           fix_symmetry: bool = False) -> _Run:
    """Set up a run; structures that cannot be relaxed come back already finished with a status.

    `cutoff` (Å): the potential's neighbour cutoff; an atom with no neighbour within it is "isolated_atoms".
    `fix_symmetry`: ASE's FixSymmetry constraint (at FIX_SYMMETRY_SYMPREC) keeps the space group; with the cell
    filter it symmetrises the stress too.
    """
    if isinstance(structure, Atoms):
        structure = _to_structure(structure)
    run = _Run(initial=structure, atoms=None, optimizer=None, volume0=structure.volume,
               settings=(fmax, relax_cell, fix_symmetry))
    if len(structure) == 0:
        run.finish("error", "empty structure")
    elif not structure.is_ordered:
        run.finish("error", "disordered structure (partial occupancies): order it first")
    elif dummies := sorted({str(sp) for sp in structure.species if isinstance(sp, DummySpecies)}):
        run.finish("error", f"placeholder species {', '.join(dummies)} have no element for the potential")
    elif len(distances := structure.get_neighbor_list(MIN_DISTANCE_A)[3]):
        run.finish("atoms_too_close", f"two atoms are {distances.min():.3f} Å apart (< {MIN_DISTANCE_A} Å)")
    elif isolated := _isolated_sites(structure, cutoff or ISOLATION_CUTOFF_A):
        first = structure[isolated[0]]
        run.finish("isolated_atoms", f"{len(isolated)} of {len(structure)} atom(s) (e.g. {first.species_string} at "
                   f"site {isolated[0]}) have no neighbour within the potential's {cutoff or ISOLATION_CUTOFF_A:g} Å "
                   "cutoff: the energy would be a free atom's, not a crystal's; shrink the cell or the vacuum")
    else:
        run.atoms = _to_atoms(structure)
        if fix_symmetry:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # FixSymmetry prints its symmetry report
                    run.atoms.set_constraint(FixSymmetry(run.atoms, symprec=FIX_SYMMETRY_SYMPREC))
            except Exception as exc:  # spglib finds no symmetry dataset: relaxing without it would lie
                run.finish("error", f"FixSymmetry could not be set up ({type(exc).__name__}: {exc})")
                run.atoms = None
                return run
        optimizable = FrechetCellFilter(run.atoms) if relax_cell else run.atoms
        run.optimizer = FIRE(optimizable, logfile=None)
    return run


def _isolated_sites(structure: Structure, cutoff: float) -> list[int]:
    """Indices of sites without any neighbour (periodic images included, so also their own) within cutoff Å."""
    centers = structure.get_neighbor_list(cutoff)[0]
    return sorted(set(range(len(structure))) - {int(i) for i in centers})


def _evaluate(potential: LoadedPotential, atoms_list: list[Atoms], with_stress: bool) -> list[Evaluation | Exception]:
    """Batched evaluation; if the batch fails, evaluate one by one so a single bad structure fails alone."""
    try:
        return potential.evaluate(atoms_list, with_stress)
    except Exception as exc:  # any model failure becomes that structure's "error" status, never a crash
        if len(atoms_list) == 1:
            return [exc]
        return [_evaluate(potential, [atoms], with_stress)[0] for atoms in atoms_list]


def _judge(run: _Run, ev: Evaluation | Exception, step: int, fmax: float, max_steps: int) -> None:
    """Record one evaluation on its run and finish the run if it converged, broke a guard rail or ran out of steps."""
    run.steps = step
    if isinstance(ev, Exception):
        run.finish("error", f"{type(ev).__name__}: {ev}")
        return
    n_atoms = len(run.atoms)
    run.energy = ev.energy
    forces = np.asarray(ev.forces, dtype=float)
    finite_stress = ev.stress is None or bool(np.all(np.isfinite(ev.stress)))
    run.max_force = float(np.linalg.norm(forces, axis=1).max()) if np.all(np.isfinite(forces)) else math.nan
    volume_ratio = run.atoms.get_volume() / run.volume0
    if not (math.isfinite(ev.energy) and math.isfinite(run.max_force) and finite_stress):
        run.finish("nan_energy", f"non-finite energy, forces or stress at step {step}")
    elif ev.energy / n_atoms < EXPLODED_ENERGY_PER_ATOM_EV:
        run.finish("exploded", f"energy {ev.energy / n_atoms:.1f} eV/atom at step {step}")
    elif not 1 / EXPLODED_VOLUME_RATIO < volume_ratio < EXPLODED_VOLUME_RATIO:
        run.finish("exploded", f"volume changed {volume_ratio:.2f}x at step {step}")
    else:
        # The optimizer reads forces and stress from the atoms' calculator: hand it this step's batched results.
        results = {"energy": ev.energy, "free_energy": ev.energy, "forces": forces}
        if ev.stress is not None:
            results["stress"] = np.asarray(ev.stress, dtype=float)
        run.atoms.calc = SinglePointCalculator(run.atoms, **results)
        if run.atoms.constraints:  # the forces the optimizer moves along: symmetrised by FixSymmetry
            forces = run.atoms.get_forces()
            run.max_force = float(np.linalg.norm(forces, axis=1).max())
        run.forces = forces
        run.stress = None if ev.stress is None else np.asarray(ev.stress, dtype=float)
        run.optimizer.fmax = fmax
        # Both: the atomic criterion the user set, and the filter's (which also holds the cell's forces).
        if run.max_force < fmax and run.optimizer.gradient_converged(run.optimizer.optimizable.get_gradient()):
            run.finish("converged")
        elif step == max_steps:
            run.finish("not_converged", f"max_steps={max_steps} reached")


def _fire(
    runs: list[_Run], potential: LoadedPotential, fmax: float, max_steps: int, relax_cell: bool
) -> Iterator[_Run]:
    """Batched FIRE over all runs: per step, one potential call for every unfinished structure, then one FIRE step
    each with its own optimizer state. Yields every evaluated run before it moves (finished runs have their status
    set), so callers can snapshot frames.
    """
    active = [run for run in runs if run.status is None]
    for step in range(max_steps + 1):
        if not active:
            return
        evaluations = _evaluate(potential, [run.atoms for run in active], relax_cell)
        with _cell_filter_context():
            for run, ev in zip(active, evaluations):
                _judge(run, ev, step, fmax, max_steps)
        yield from active
        active = [run for run in active if run.status is None]
        with _cell_filter_context():
            for run in active:
                run.optimizer.step()


@contextlib.contextmanager
def _cell_filter_context():
    """Around the cell filter's 3x3 matrix functions (expm/logm): one BLAS thread, because they gain nothing from
    more and on a busy machine spin-waiting OpenBLAS threads made them ~20x slower (measured: 15.5 s vs 0.56 s for
    two small relaxations); and no "logm result may be inaccurate" warnings, which scipy raises at errors of
    ~1e-12 thousands of times per relaxation."""
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="logm result may be inaccurate")
        yield


def _cache_path(
    structure: Structure, potential: LoadedPotential, fmax: float, max_steps: int, relax_cell: bool,
    fix_symmetry: bool = False,
) -> Path | None:
    """cache_dir()/relax/<sha256>.json keyed on the structure (rounded to 1e-6) and all settings; None: uncacheable."""
    if not potential.cacheable or not structure.is_ordered:
        return None
    key = {
        # + 0.0 turns -0.0 into 0.0 so equal structures serialize equally
        "lattice": (np.round(structure.lattice.matrix, 6) + 0.0).tolist(),
        "species": [str(site.specie) for site in structure],
        "frac_coords": (np.round(structure.frac_coords, 6) + 0.0).tolist(),
        "potential": potential.identity,
        "fmax": fmax,
        "max_steps": max_steps,
        "relax_cell": relax_cell,
    }
    if fix_symmetry:  # only when set, so the entries of free relaxations keep their keys
        key["fix_symmetry"] = FIX_SYMMETRY_SYMPREC
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "relax" / f"{digest}.json"


def _load_cached(path: Path | None, structure: Structure, fmax: float = math.nan, relax_cell: bool = True,
                 fix_symmetry: bool = False) -> RelaxResult | None:
    """The cached result, or None (no entry, an unreadable one, or a "converged" one written before the atomic
    criterion was checked whose max atomic force is not below fmax: that one is relaxed again)."""
    t0 = time.perf_counter()

    def parse(data: dict) -> RelaxResult:
        final = Structure.from_dict(entry_field(data, "final", dict))
        if list(final.atomic_numbers) != list(structure.atomic_numbers):  # final is bare elements, no charges
            raise ValueError("its final structure has other atoms than the one to relax")
        status = entry_field(data, "status", str)
        if status not in CACHEABLE_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(CACHEABLE_STATUSES)}")
        steps = entry_field(data, "steps", int)
        if steps < 0:
            raise ValueError(f"steps {steps} < 0")
        forces, stress = data.get("forces"), data.get("stress")  # absent from entries of older versions
        if forces is not None and np.shape(forces) != (len(final), 3):
            raise ValueError(f"forces of shape {np.shape(forces)} for {len(final)} atoms")
        return RelaxResult(
            initial=structure, final=final, status=status, steps=steps,
            **{k: entry_field(data, k, float) for k in ("energy", "energy_per_atom", "max_force", "rmsd_to_start")},
            **{k: entry_field(data, k, str) for k in ("message", "potential", "potential_identity")},
            wall_time_s=time.perf_counter() - t0, cached=True, fix_symmetry=fix_symmetry, fmax=fmax,
            relax_cell=relax_cell, forces=_float_array(forces), stress=_float_array(stress),
        )

    result = read_cache_entry(path, RELAX_CACHE_VERSION, parse, "relax cache entry")
    if result is not None and result.status == "converged" and not result.max_force < fmax:
        return None
    return result


def _store_cached(path: Path | None, result: RelaxResult) -> None:
    # Only what a rerun would give again: errors may be transient (out of memory), and a status outside STATUSES
    # (a run that never finished) is no result at all.
    if path is None or result.status not in CACHEABLE_STATUSES:
        return
    write_cache_entry(path, RELAX_CACHE_VERSION, {
        "energy": result.energy,
        "energy_per_atom": result.energy_per_atom,
        "steps": result.steps,
        "max_force": result.max_force,
        "status": result.status,
        "message": result.message,
        "potential": result.potential,
        "potential_identity": result.potential_identity,
        "rmsd_to_start": result.rmsd_to_start,
        "final": result.final.as_dict(),
        "forces": None if result.forces is None else np.asarray(result.forces, dtype=float).tolist(),
        "stress": None if result.stress is None else np.asarray(result.stress, dtype=float).tolist(),
    })


def cached_flags(
    structures: Iterable[Structure], potential: LoadedPotential, fmax: float = 0.05, max_steps: int = 500,
    relax_cell: bool = True, fix_symmetry: bool = False,
) -> list[bool]:
    """Per structure, whether relax() with these settings has a cache entry for it (a quick look, not a read)."""
    paths = [_cache_path(s, potential, fmax, max_steps, relax_cell, fix_symmetry) for s in structures]
    return [path is not None and path.is_file() for path in paths]


def relax(
    structures: Structure | Atoms | Iterable[Structure | Atoms],
    potential: str | None | Calculator | LoadedPotential = None,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
    device: str | None = None,
    cache: bool = True,
    fix_symmetry: bool = False,
    on_result: Callable[[int, RelaxResult], None] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[RelaxResult]:
    """Relax one structure or many with FIRE (cell too, via FrechetCellFilter unless relax_cell=False).

    `fix_symmetry`: under ASE's FixSymmetry, so the space group is kept (part of the cache key).
    `on_result(i, result)` is called as soon as structure i has its result (cached ones first), so a caller can
    store and show each one without waiting for the batch. `progress(done, total, step)` after every FIRE step
    (default: the one set with `relax_progress`, for callers that relax through other modules, e.g. the hull).

    fmax in eV/Å; max_steps FIRE steps (0 = single point). All unfinished structures are evaluated together each
    step (batched for CHGNet, MatterSim and SevenNet). Never raises for a bad structure: its result carries a status.
    Results are cached on disk (cache_dir()/relax) per structure, potential identity and settings. Raises
    ValueError for settings out of range and DeviceError for a device this machine lacks.
    """
    fmax, max_steps = check_relax_settings(fmax, max_steps)
    if isinstance(structures, Structure | Atoms):
        structures = [structures]
    progress = progress or _PROGRESS.get()
    pot = resolve_potential(potential, device)
    runs = [_start(s, relax_cell, pot.cutoff, fmax, fix_symmetry) for s in structures]
    results: list[RelaxResult | None] = [None] * len(runs)
    # Structures _start already judged (too close, isolated) need no cache: that check is instant, and it must win
    # over an entry an older version wrote for them.
    paths = [_cache_path(run.initial, pot, fmax, max_steps, relax_cell, fix_symmetry)
             if cache and run.status is None else None for run in runs]
    for i, run in enumerate(runs):
        results[i] = _load_cached(paths[i], run.initial, fmax, relax_cell, fix_symmetry)
        if results[i] is not None:
            run.finish(results[i].status, results[i].message)
        elif run.status is not None:  # judged at the start (too close, isolated): its result is final already
            results[i] = run.result(pot)
        if results[i] is not None and on_result is not None:
            on_result(i, results[i])
    t0 = time.perf_counter()
    next_report = PROGRESS_EVERY_STEPS
    index = {id(run): i for i, run in enumerate(runs)}
    done = sum(r is not None for r in results)
    if progress is not None:
        progress(done, len(runs), 0)
    last_step = -1
    for run in _fire(runs, pot, fmax, max_steps, relax_cell):
        if run.status is not None:
            # Cached as soon as it finishes, not when the whole batch has: an interrupted long batch (a benchmark,
            # a hull) keeps every structure it finished.
            i = index[id(run)]
            results[i] = run.result(pot)
            _store_cached(paths[i], results[i])
            done += 1
            if on_result is not None:
                on_result(i, results[i])
        if progress is not None and (run.status is not None or run.steps != last_step):
            progress(done, len(runs), run.steps)
            last_step = run.steps
        if run.steps >= next_report:  # long batches (hull references) say how far they are
            log.info("step %d: %d of %d structures still relaxing (%.0f s)", run.steps,
                     sum(r.status is None for r in runs), len(runs), time.perf_counter() - t0)
            next_report += PROGRESS_EVERY_STEPS
    for i, run in enumerate(runs):
        if results[i] is None:
            results[i] = run.result(pot)
            _store_cached(paths[i], results[i])
            if on_result is not None:
                on_result(i, results[i])
    n_computed = sum(not r.cached for r in results)
    log.info("relaxed %d structures with %s in %.1f s (%d from cache)", n_computed, pot.name,
             time.perf_counter() - t0, len(runs) - n_computed)
    return results


def relax_frames(
    structure: Structure | Atoms,
    potential: str | None | Calculator | LoadedPotential = None,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
    device: str | None = None,
    cache: bool = True,
    fix_symmetry: bool = False,
) -> Iterator[RelaxFrame]:
    """Relax one structure, yielding a RelaxFrame per FIRE step for live display; the last frame carries `result`.

    Same loop, settings and cache as relax(); a cache hit yields just the final frame.
    """
    fmax, max_steps = check_relax_settings(fmax, max_steps)
    pot = resolve_potential(potential, device)
    run = _start(structure, relax_cell, pot.cutoff, fmax, fix_symmetry)
    path = (_cache_path(run.initial, pot, fmax, max_steps, relax_cell, fix_symmetry)
            if cache and run.status is None else None)
    result = _load_cached(path, run.initial, fmax, relax_cell, fix_symmetry)
    if result is None:
        for run in _fire([run], pot, fmax, max_steps, relax_cell):
            if run.status is None:
                structure = _to_structure(run.atoms, wrap=True)
                yield RelaxFrame(run.steps, structure, run.energy / len(run.atoms), run.max_force)
        result = run.result(pot)
        _store_cached(path, result)
    yield RelaxFrame(result.steps, result.final, result.energy_per_atom, result.max_force, result=result)
