"""Compatibility between Crystal Toolkit 2026.7.20 and the pymatgen / Flask-Caching versions Wyckoff Lab runs on.

Crystal Toolkit's structure component builds its bonding graph with `StructureGraph.with_local_env_strategy` and
falls back to `with_empty_graph`; current pymatgen renamed both (`from_local_env_strategy`, `from_empty_graph`), so
without help every structure view fails — even the fallback raises. Its plugin also defaults to the Flask-Caching
types "simple" / "null", which Flask-Caching 2 no longer knows ("SimpleCache" / "NullCache"). And its HTML legend
asks for a colour without the site it needs when atoms are coloured by a site property (our Wyckoff orbits), which
raises ValueError in a callback.

`apply()` fixes these, idempotently, and only where something is missing or failing: on a pymatgen that still has
the old names, or a Flask-Caching that still has the old types, it changes nothing. Everything else in Wyckoff Lab
imports Crystal Toolkit through `crystal_toolkit_components()`, so the fixes are always in place first.

Crystal Toolkit's package imports every component it has (band structures, phonons, Pourbaix, the Materials
Project search with its API client...) just to reach the structure component, which is all Wyckoff Lab draws with:
3.5 s of the app's start-up. `import_crystal_toolkit()` loads `crystal_toolkit.components` as a lazy package, so
only the structure component's own imports run; the first access to any other name in that package imports the
rest exactly as upstream would (nothing is removed, only deferred).
"""

from __future__ import annotations

import functools
import sys

# (class attribute Crystal Toolkit calls, the name current pymatgen provides)
GRAPH_ALIASES = (("with_local_env_strategy", "from_local_env_strategy"), ("with_empty_graph", "from_empty_graph"))
# Flask-Caching 1.x backend names Crystal Toolkit passes as CACHE_TYPE, and their Flask-Caching 2 classes.
CACHE_TYPE_ALIASES = {"simple": "SimpleCache", "null": "NullCache", "filesystem": "FileSystemCache",
                      "redis": "RedisCache"}


def patch_graph_methods() -> list[str]:
    """Give StructureGraph / MoleculeGraph the old constructor names Crystal Toolkit calls; returns what was added."""
    from pymatgen.analysis.graphs import MoleculeGraph, StructureGraph

    added = []
    for cls in (StructureGraph, MoleculeGraph):
        for old, new in GRAPH_ALIASES:
            if not hasattr(cls, old) and hasattr(cls, new):
                # getattr on the class returns the bound classmethod; re-wrap so subclasses bind to themselves.
                setattr(cls, old, classmethod(getattr(cls, new).__func__))
                added.append(f"{cls.__name__}.{old}")
    return added


def patch_cache_types() -> list[str]:
    """Make the Flask-Caching 1.x CACHE_TYPE names resolve again (Flask-Caching imports
    `flask_caching.backends.<name>`), so Crystal Toolkit's default `Cache(config={"CACHE_TYPE": "simple"})` works."""
    from flask_caching import backends

    added = []
    for old, new in CACHE_TYPE_ALIASES.items():
        if not hasattr(backends, old) and hasattr(backends, new):
            setattr(backends, old, getattr(backends, new))
            added.append(old)
    return added


COMPONENTS = "crystal_toolkit.components"


def _lazy_components_package():
    """`crystal_toolkit.components` as a package whose `__init__` runs on the first access to a name it defines.

    Submodules (`crystal_toolkit.components.structure`) import as usual without it. Built from the package's file
    location, never by importing it: a lookup through the import system would run `crystal_toolkit/__init__.py`,
    which imports every component.
    """
    import importlib.util
    from pathlib import Path

    top = importlib.util.find_spec("crystal_toolkit")  # finds, does not import
    folder = Path(top.origin).parent / "components"
    spec = importlib.util.spec_from_file_location(COMPONENTS, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    state = {"loaded": False}

    def __getattr__(name: str):
        if name.startswith("__") or state["loaded"]:
            raise AttributeError(f"module {COMPONENTS!r} has no attribute {name!r}")
        state["loaded"] = True
        spec.loader.exec_module(module)  # upstream's __init__, in this very module: every component appears
        return getattr(module, name)

    module.__getattr__ = __getattr__
    module.wyckoff_lab_lazy = state
    return module


@functools.cache
def import_crystal_toolkit():
    """Import Crystal Toolkit with only its structure component loaded (see the module docstring); returns
    `crystal_toolkit.components`. Where that package is already imported (fully), it is used as it is."""
    if COMPONENTS not in sys.modules and "crystal_toolkit" not in sys.modules:
        sys.modules[COMPONENTS] = _lazy_components_package()
    try:
        import crystal_toolkit
        from crystal_toolkit.components.structure import StructureMoleculeComponent
    except Exception:
        if getattr(sys.modules.get(COMPONENTS), "wyckoff_lab_lazy", None) is not None:
            del sys.modules[COMPONENTS]  # an upstream layout we do not know: import it the ordinary way
            for name in [n for n in sys.modules if n == "crystal_toolkit" or n.startswith("crystal_toolkit.")]:
                del sys.modules[name]
            import crystal_toolkit.components

            return crystal_toolkit.components
        raise
    components = sys.modules[COMPONENTS]
    crystal_toolkit.components = components
    components.StructureMoleculeComponent = StructureMoleculeComponent
    return components


def patch_site_property_legend() -> list[str]:
    """Let the structure component's HTML legend show site-property colours (e.g. Wyckoff orbits).

    Upstream builds the legend by asking for each element's colour, which only works for element colour schemes;
    for a site property the legend data already holds colour -> label, so that is shown instead.
    """
    import_crystal_toolkit()
    from crystal_toolkit.components.structure import StructureMoleculeComponent
    from dash import html

    original = StructureMoleculeComponent._make_legend
    if getattr(original, "wyckoff_lab_patched", False):
        return []

    def _make_legend(self, legend):
        try:
            return original(self, legend)
        except ValueError:  # colour scheme is a site property: no per-element colour exists
            chips = [html.Span(html.Span(label, className="icon", style={"color": _contrast(color),
                                                                          "width": "auto", "padding": "0 6px"}),
                               className="button is-static is-rounded", style={"backgroundColor": color})
                     for color, label in (legend.get("colors") or {}).items()]
            return html.Div(chips, id=self.id("legend"), style={"display": "flex", "flexWrap": "wrap"},
                            className="buttons")

    _make_legend.wyckoff_lab_patched = True
    StructureMoleculeComponent._make_legend = _make_legend
    return ["StructureMoleculeComponent._make_legend"]


def _contrast(hex_color: str) -> str:
    """Black or white text, whichever reads better on `hex_color` (the rule Crystal Toolkit uses)."""
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if (r * 0.299 + g * 0.587 + b * 0.114) / 255 > 0.5 else "white"


@functools.cache
def apply() -> tuple[str, ...]:
    """Apply every fix once per process; returns the names that had to be added (empty on fixed upstreams)."""
    return tuple(patch_graph_methods() + patch_cache_types() + patch_site_property_legend())


def make_cache(config: dict | None = None):
    """A Flask-Caching `Cache` for Crystal Toolkit's memoised callbacks, with a type that exists in Flask-Caching 2.

    In-process and bounded: scenes are cheap to rebuild, and each background job is its own process anyway.
    """
    from flask_caching import Cache

    return Cache(config={"CACHE_TYPE": "SimpleCache", "CACHE_THRESHOLD": 200, **(config or {})})


def crystal_toolkit_components():
    """`crystal_toolkit.components`, imported with the fixes applied: the structure component at once (~2.5 s),
    every other component when first asked for."""
    apply()
    return import_crystal_toolkit()


def crystal_toolkit_assets_dir():
    """The folder of CSS and fonts shipped in Crystal Toolkit's wheel (Bulma + Font Awesome, served locally)."""
    from pathlib import Path

    import crystal_toolkit

    return Path(crystal_toolkit.__file__).parent / "apps" / "assets"
