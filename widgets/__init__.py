"""Reusable Dash components of Wyckoff Lab, each usable alone in Jupyter.

    from wyckoff_lab.widgets import Explorer, StructureView
    Explorer(elements=["Al", "Ca", "Cu"])      # the whole app, inline (port=..., path_prefix=...: see .jupyter)
    StructureView(structure)                   # one widget on its own

Classes are imported lazily: Crystal Toolkit takes seconds to import, and `wyckoff-lab --help` should not wait.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Explorer": "explorer", "create_app": "explorer",
    "ChemistryPicker": "chemistry", "SymmetryPanel": "symmetry", "GeneratePanel": "generate",
    "CandidateTable": "candidates", "StructureView": "structure_view", "RelaxPanel": "relaxation",
    "HullView": "hull", "EmbeddingView": "embeddings", "TeachView": "teach",
    "LabContext": "context", "LabSettings": "context", "Links": "base", "Widget": "base", "build_app": "base",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
