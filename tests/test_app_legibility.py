"""Legible hulls and 3D views, the symmetry and generation forms (issue 17, part C): the hull figure's colour
scale, units and labels (real MP-20 Al-Ca-Cu phases), a build only on request with its cost, element colours
that differ, the orbit and Wyckoff tables, the chemist's order of a system, the cell-size warning, the
charge-balanced box, and, in headless Chromium, label boxes, the toolbar, the figure's size, the colour key and
the 3D view's camera (oblique, no atom hidden behind another, the frame filled)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from wyckoff_lab.core.hull import tie_lines
from wyckoff_lab.widgets.hull import MAX_HULL_COLOR_EV, hull_figure, label_box, place_labels

SYSTEM = ("Al", "Ca", "Cu")


def mp20_hull(root: Path, elements=SYSTEM) -> dict:
    """The hull data the Hull tab draws, from real MP-20 phases of `elements` at their DFT formation energies
    (every split; no relaxation), in the form `jobs.hull_data` stores."""
    table = pd.concat([pd.read_csv(root / "mp_20" / f"{split}.csv.gz") for split in ("train", "val", "test")])
    entries = [PDEntry(Composition(el), 0.0, name=el) for el in elements]
    for _, row in table.iterrows():
        comp = Composition(row["pretty_formula"])
        if {e.symbol for e in comp} <= set(elements) and len(comp) > 1:
            entries.append(PDEntry(comp, row["formation_energy_per_atom"] * comp.num_atoms, name=row["material_id"]))
    diagram = PhaseDiagram(entries)
    refs = [{"formula": e.composition.reduced_formula, "source": e.name,
             "composition": {el.symbol: float(a) for el, a in e.composition.items()},
             "formation_energy_per_atom": diagram.get_form_energy_per_atom(e),
             "e_above_hull": diagram.get_e_above_hull(e), "on_hull": e in diagram.stable_entries}
            for e in entries]
    return {"elements": list(elements), "potential": "MP-20 DFT", "references": refs, "tie_lines": tie_lines(diagram)}


@pytest.fixture(scope="module")
def hull(real_data):
    return mp20_hull(real_data)


def candidates(e_above: list[float], formula: str = "CaAl2Cu") -> list[dict]:
    return [{"id": f"c{i}", "label": i + 1, "formula": formula, "sg_label": "P1", "e_above_hull": e,
             "formation_energy_per_atom": -0.2 + e} for i, e in enumerate(e_above)]


def _intersect(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


# -- hull figure ------------------------------------------------------------------------------------------------------


def test_colour_scale_resolves_half_an_ev_and_says_what_lies_above(hull):
    figure = hull_figure(hull, candidates([0.05, 0.3, 0.45, 0.9]))
    marker = next(t for t in figure.data if t.name == "candidates").marker
    assert marker.cmin == 0 and marker.cmax == MAX_HULL_COLOR_EV == 0.5
    assert list(marker.color) == [0.05, 0.3, 0.45, 0.5]  # 0.3 and 0.45 get different colours; 0.9 the top one
    assert marker.colorbar.ticktext[-1] == "≥ 0.5" and "eV/atom" in marker.colorbar.title.text


def test_every_energy_is_in_ev_per_atom(hull):
    figure = hull_figure(hull, candidates([0.12]))
    hovers = [h for t in figure.data for h in (getattr(t, "hovertext", None) or getattr(t, "text", None) or [])]
    assert hovers and not any("meV" in h for h in hovers)
    assert any("E above hull = 0.120 eV/atom" in h for h in hovers)


def test_ternary_labels_of_the_mp20_al_ca_cu_phases_do_not_overlap(hull):
    figure = hull_figure(hull, [])
    stable = next(t for t in figure.data if t.name == "stable reference")
    assert sum(bool(t) for t in stable.text) >= 10  # MP-20 has 12 stable Al-Ca-Cu phases: nearly all labelled
    # the placement's own boxes, in px at the nominal triangle size, never meet
    from wyckoff_lab.widgets.hull import NOMINAL_PLOT_PX, ternary_xy, _fractions

    refs = [r for r in hull["references"] if r["on_hull"]]
    xy = [ternary_xy(_fractions(r["composition"], hull["elements"])) for r in refs]
    boxes = [label_box(NOMINAL_PLOT_PX * x, NOMINAL_PLOT_PX * y, text, pos)
             for (x, y), text, pos in zip(xy, stable.text, stable.textposition) if text]
    assert not any(_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_a_crowded_cluster_leaves_labels_to_the_hover_rather_than_overlapping():
    points = [(100 + 3 * i, 100 + 2 * i) for i in range(12)]
    texts = [f"Ca{i}Al{i}Cu" for i in range(12)]
    positions = place_labels(points, texts)
    boxes = [label_box(*p, t, pos) for p, t, pos in zip(points, texts, positions) if pos]
    assert 0 < len(boxes) < 12
    assert not any(_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert place_labels(points, texts) == positions  # deterministic


def test_binary_hulls_label_their_stable_phases(real_data):
    binary = mp20_hull(real_data, ("Al", "Cu"))
    figure = hull_figure(binary, candidates([0.1], "AlCu"))
    line = next(t for t in figure.data if t.name == "hull (stable phases)")
    stable = sorted(r["formula"] for r in binary["references"] if r["on_hull"])
    assert "text" in line.mode and sorted(t for t in line.text if t) == stable


def test_the_title_and_toolbar_have_their_own_places(hull):
    figure = hull_figure(hull, [])
    assert figure.layout.modebar.orientation == "v" and figure.layout.title.xanchor == "left"
    assert figure.layout.margin.t >= 60 and figure.layout.height >= 600
    assert "Ca-Al-Cu convex hull" in figure.layout.title.text  # a chemist's order


# -- build only on request --------------------------------------------------------------------------------------------


def test_the_hull_tab_offers_a_build_with_its_cost_and_relaxes_nothing(mp20_al_ca_cu, monkeypatch):
    from wyckoff_lab.core.pipeline import HullBook
    from wyckoff_lab.core.relax import load_potential
    from wyckoff_lab.widgets.hull import hull_plan

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    book = HullBook(load_potential("chgnet"), dataset="mp_20")
    started = time.perf_counter()
    plan = hull_plan(book, ["Cu", "Al", "Ca"])
    assert time.perf_counter() - started < 30  # a plan, not a build (that relaxes every reference: minutes)
    assert plan.n_references >= 12 and plan.n_uncached == plan.n_references  # a fresh cache: all of them to do
    assert plan.estimated_s > 0
    assert not book._hulls  # nothing built or remembered as built


def test_the_offer_says_what_to_do_first_and_when_a_hull_is_already_shown():
    from wyckoff_lab.widgets.hull import build_offer

    class Sessions:
        def __init__(self, records, hull):
            self.records, self.hull = records, hull

        def candidates(self, _sid):
            return self.records

        def get(self, _sid, key):
            return self.hull if key == "hull" else None

    class Context:
        def __init__(self, records, hull=None):
            self.sessions = Sessions(records, hull)

    assert "Generate candidates first" in build_offer(Context([]), "s")
    records = [{"elements": ["Al", "Ca", "Cu"]}]
    shown = build_offer(Context(records, {"elements": ["Al", "Ca", "Cu"]}), "s")
    assert "Ca-Al-Cu hull of this session is shown" in shown


# -- status lines -----------------------------------------------------------------------------------------------------


def test_a_switched_system_clears_the_status_and_a_cancel_the_progress_label():
    from dash import no_update

    from wyckoff_lab.widgets.base import cleared_status

    assert cleared_status("wl-chemistry", "wl-gen-cancel") == ("", "")
    assert cleared_status("wl-gen-cancel", "wl-gen-cancel") == (no_update, "")


# -- 3D view ----------------------------------------------------------------------------------------------------------


def test_al_ca_cu_get_colours_that_differ():
    from crystal_toolkit.core.legend import EL_COLORS

    from wyckoff_lab.widgets.structure_view import MIN_DELTA_E, _hex, delta_e, element_colors

    vesta = {el: _hex(EL_COLORS["VESTA"][el]) for el in SYSTEM}
    assert delta_e(vesta["Al"], vesta["Ca"]) < MIN_DELTA_E  # the issue: VESTA's blues
    colours = element_colors(SYSTEM)
    assert min(delta_e(colours[a], colours[b]) for a, b in (("Al", "Ca"), ("Al", "Cu"), ("Ca", "Cu"))) >= MIN_DELTA_E
    assert colours["Al"] == vesta["Al"] and colours["Cu"] == vesta["Cu"]  # the familiar colours stay where they can
    assert element_colors(["Na", "Cl"]) == {"Na": _hex(EL_COLORS["VESTA"]["Na"]), "Cl": _hex(EL_COLORS["VESTA"]["Cl"])}


def test_the_orbit_table_shows_free_parameters_in_full():
    from wyckoff_lab.widgets.structure_view import ORBIT_TABLE_STYLE

    cell = ORBIT_TABLE_STYLE["style_cell"]
    assert cell["whiteSpace"] == "normal" and cell["textOverflow"] != "ellipsis" and cell["overflow"] == "visible"


def test_the_oblique_view_turns_the_crystal_without_changing_it():
    """The drawn crystal is the same crystal turned (never mirrored): cell, fractional coordinates and site
    properties kept, the view direction onto +z (Crystal Toolkit's camera axis), c up."""
    import numpy as np
    from pymatgen.core import Lattice, Structure

    from wyckoff_lab.widgets.structure_view import VIEW_DIRECTION, oblique_view

    monoclinic = Structure(Lattice.from_parameters(4.1, 5.3, 7.9, 90, 104, 90), ["Ca", "Al", "Cu"],
                           [[0, 0, 0], [0.3, 0.1, 0.6], [0.7, 0.5, 0.2]], site_properties={"tag": [1, 2, 3]})
    turned = oblique_view(monoclinic)
    assert np.allclose(turned.lattice.parameters, monoclinic.lattice.parameters)
    assert np.allclose(turned.frac_coords, monoclinic.frac_coords) and turned.site_properties == {"tag": [1, 2, 3]}
    assert np.sign(np.linalg.det(turned.lattice.matrix)) == np.sign(np.linalg.det(monoclinic.lattice.matrix))
    unit = turned.lattice.matrix / np.array(turned.lattice.abc)[:, None]
    view = np.asarray(VIEW_DIRECTION) @ unit
    assert np.allclose(view / np.linalg.norm(view), [0, 0, 1])
    c = turned.lattice.matrix[2]
    assert abs(c[0]) < 1e-9 and c[1] > 0  # c on screen points straight up
    assert np.allclose(turned.distance_matrix, monoclinic.distance_matrix)


# -- symmetry and chemistry forms -------------------------------------------------------------------------------------


def test_the_wyckoff_table_shows_every_position_of_fm3m_on_one_sortable_page():
    from wyckoff_lab.widgets.symmetry import wyckoff_rows, wyckoff_table

    table = wyckoff_table("t", wyckoff_rows(225))
    labels = [row["label"] for row in table.data]
    assert table.page_action == "none" and table.sort_action == "native"
    assert labels[0] == "192l" and labels[-2:] == ["4b", "4a"]  # International Tables order, all there


def test_systems_read_in_a_chemists_order():
    from wyckoff_lab.widgets.chemistry import system_text
    from wyckoff_lab.widgets.symmetry import template_verdict

    assert system_text(["Al", "Ca", "Cu"]) == "Ca-Al-Cu" and system_text(["O", "P", "Fe", "Li"]) == "Li-Fe-P-O"
    assert system_text(["Cl", "Ne", "Na"]) == "Na-Cl-Ne"  # no electronegativity: last
    assert "Ca-Al-Cu fits" in template_verdict(["Al", "Ca", "Cu"], None, 139, [], 20).headline


def test_max_atoms_below_the_formulas_known_cell_is_warned(real_data):
    from wyckoff_lab.widgets.chemistry import cell_size_warning, smallest_known_cells

    # MP-20's rows as the reference table holds them (formula, atoms per primitive cell); LiFePO4 is in `val`
    rows = pd.read_csv(real_data / "mp_20" / "val.csv.gz", usecols=["pretty_formula", "num_atoms"])
    known = smallest_known_cells(rows.rename(columns={"pretty_formula": "formula"}))
    assert known["LiFePO4"] == 14
    assert cell_size_warning("LiFePO4", 10, known) == ("LiFePO4 needs 14 atoms in the primitive cell in MP-20; "
                                                       "raise max atoms (now 10)")
    assert cell_size_warning("LiFePO4", 20, known) is None
    assert "28 atoms in the primitive cell in MPTS-52" in cell_size_warning("LiFePO4", 20, {"LiFePO4": 28}, "MPTS-52")
    assert "12 atoms per formula unit" in cell_size_warning("Ca3Al7Cu2", 6, {})  # not in the data: its formula unit


def test_the_generate_panel_has_the_charge_balanced_box_and_never_ignores_it(shipped_generator):
    """The box reaches the job's conditions, and the job makes only balanced compositions (the transformer does
    not declare the condition: the shared resampler enforces it)."""
    from wyckoff_lab.core.compositions import is_charge_balanced
    from wyckoff_lab.widgets.generate import request_for
    from wyckoff_lab.widgets.jobs import conditions_for, generate_in_workers

    plain = request_for("pyxtal", 5, {"elements": ["Na", "Cl"]}, {}, 1.0, 0, "", {}, False)
    assert plain.elements == ["Na", "Cl"] and not conditions_for(plain).charge_balanced
    request = request_for("wyckoff-transformer", 6, {"elements": ["Na", "Cl"]}, {"spacegroup": 225}, 1.0, 0, "",
                          {}, True)
    conditions = conditions_for(request)
    assert conditions.charge_balanced
    result = generate_in_workers(shipped_generator, 6, conditions, 1.0, 0, 1, lambda done, total: None)
    assert len(result.candidates) == 6
    assert all(is_charge_balanced(c.structure.composition) for c in result.candidates)


# -- in headless Chromium ---------------------------------------------------------------------------------------------

RECT = "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom];"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from app_timing import start_browser

    driver = start_browser(tmp_path_factory.mktemp("profile"))
    yield driver
    driver.quit()


@pytest.mark.needs_chromium
def test_drawn_labels_and_title_do_not_collide_in_chromium(hull, browser, tmp_path):
    """The MP-20 Al-Ca-Cu diagram as plotly.js draws it (inlined, offline): no two phase labels' boxes meet, and
    the toolbar stays off the title."""
    from selenium.webdriver.common.by import By

    page = tmp_path / "hull.html"
    hull_figure(hull, candidates([0.05, 0.3])).write_html(page, include_plotlyjs=True, full_html=True,
                                                          config={"displaylogo": False}, default_width="900px")
    browser.get(page.as_uri())
    time.sleep(2)
    labels = [e for e in browser.find_elements(By.CSS_SELECTOR, "g.textpoint text") if e.text.strip()]
    boxes = [browser.execute_script(RECT, e) for e in labels]
    assert len(boxes) >= 10
    assert not any(_intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), boxes
    browser.execute_script("document.querySelector('.modebar').style.opacity = 1")
    title = browser.execute_script(RECT, browser.find_element(By.CSS_SELECTOR, ".gtitle"))
    modebar = browser.execute_script(RECT, browser.find_element(By.CSS_SELECTOR, ".modebar"))
    assert title[2] > title[0] and modebar[3] > modebar[1] and not _intersect(title, modebar), (title, modebar)


@pytest.fixture(scope="module")
def app_url(mp20_al_ca_cu, tmp_path_factory):
    """`wyckoff-lab app` in a subprocess (the module's one app start), PyXtal as the generator."""
    from app_timing import free_port, stop_process

    from wyckoff_lab.app.commands.app import wait_until_up

    port = free_port()
    home = tmp_path_factory.mktemp("app")
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(mp20_al_ca_cu), WYCKOFF_LAB_CACHE=str(home / "cache"),
               WYCKOFF_LAB_MODELS=str(home / "no-models"), OMP_NUM_THREADS="1")
    log = open(home / "app.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port", str(port),
         "--generator", "pyxtal", "--samples", "6", "--elements", "Al,Ca,Cu"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert wait_until_up(url, 120), (home / "app.log").read_text()
        yield url
    finally:
        stop_process(process)
        log.close()


@pytest.mark.needs_chromium
def test_the_real_app_lays_out_the_forms_the_scene_key_and_the_hull_tab(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 180, poll_frequency=0.25)
    text = lambda ident: browser.find_element(By.ID, ident).text
    rect = lambda element: browser.execute_script(RECT, element)
    browser.get(app_url)
    wait.until(ec.element_to_be_clickable((By.ID, "wl-gen-run")))
    wait.until(lambda d: "pyxtal" in text("wl-gen-generator"))
    assert "Ca-Al-Cu" in text("wl-chem-summary") and "primitive cell" in text("wl-chem-summary")
    assert "charge-balanced compositions only" in text("wl-gen-panel")

    # generate, select: the colour key lies below the scene, not on it
    browser.find_element(By.ID, "wl-gen-run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]"))
    browser.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]")[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-view-legend .wl-legend-chip"))
    scene = rect(browser.find_element(By.CSS_SELECTOR, "#CTwl-view-ct_scene canvas"))
    for chip in browser.find_elements(By.CSS_SELECTOR, "#wl-view-legend .wl-legend-chip"):
        assert not _intersect(rect(chip), scene), (rect(chip), scene)
    hidden = browser.find_elements(By.CSS_SELECTOR, "[id$='_legend_container']")
    assert all(not e.is_displayed() for e in hidden)  # Crystal Toolkit's pills over the atoms are gone
    for cell in browser.find_elements(By.CSS_SELECTOR, "#wl-view-orbits td[data-dash-column=free]"):
        fits = browser.execute_script("const c = arguments[0].querySelector('div') || arguments[0];"
                                      "return c.scrollWidth <= c.clientWidth + 1 &&"
                                      " getComputedStyle(c).textOverflow !== 'ellipsis';", cell)
        assert fits, cell.text

    # the hull tab: nothing is built unasked; the button says what a build costs; the diagram is the main element
    browser.find_element(By.XPATH, "//*[@id='wl-tabs']//*[text()='Hull']").click()
    wait.until(lambda d: "Build hull" in text("wl-hull-offer"))
    time.sleep(3)
    assert text("wl-hull-status") == "" and text("wl-hull-progress-label") == ""
    assert browser.find_element(By.ID, "wl-hull-build").is_enabled()  # no build job holds the button
    assert "reference phases" in text("wl-hull-offer")
    diagram = rect(browser.find_element(By.ID, "wl-hull-diagram"))
    main = rect(browser.find_element(By.CSS_SELECTOR, ".wl-main"))
    assert diagram[2] - diagram[0] >= 0.85 * (main[2] - main[0]) and diagram[3] - diagram[1] >= 600

    # the Wyckoff table: Fm-3m's 4a and 4b on the one page, reached by scrolling, no pager
    dropdown = browser.find_element(By.CSS_SELECTOR, "#wl-sym-spacegroup input")
    dropdown.send_keys("225")
    wait.until(lambda d: d.find_elements(By.XPATH, "//*[contains(@class,'VirtualizedSelectOption')][contains(., 'Fm-3m')]"))
    browser.find_element(By.XPATH, "//*[contains(@class,'VirtualizedSelectOption')][contains(., 'Fm-3m')]").click()
    wait.until(lambda d: "4a" in text("wl-sym-wyckoff"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#wl-sym-wyckoff .previous-next-container")
    labels = [c.get_attribute("textContent") for c in
              browser.find_elements(By.CSS_SELECTOR, "#wl-sym-wyckoff td[data-dash-column=label]")]
    assert labels[0] == "192l" and {"4a", "4b"} <= set(labels)


# The 3D view's camera, read from the page: Crystal Toolkit's three.js scene object (held in a React ref of the
# CrystalToolkitScene component, found through the React fiber of the scene's mount node), its camera's direction,
# and every drawn atom projected through that camera to canvas pixels (x, y, depth, radius), as the renderer draws
# them; the cell vectors a, b, c come from the scene JSON the page holds (the unit cell's first three edges).
SCENE_CAMERA = """
const root = document.getElementById(arguments[0]);
const canvas = root && root.querySelector('canvas');
let view = null;
for (let node = canvas; node && !view; node = node.parentElement) {
  const key = Object.keys(node).find(k => k.startsWith('__reactFiber$'));
  for (let fiber = key && node[key]; fiber && !view; fiber = fiber.return) {
    for (let hook = fiber.memoizedState; hook && typeof hook === 'object' && 'next' in hook && !view;
         hook = hook.next) {
      const ref = hook.memoizedState;
      if (ref && ref.current && ref.current.camera && ref.current.scene && ref.current.threeUUIDTojsonObject) {
        view = ref.current;
      }
    }
  }
}
if (!view) return null;
const camera = view.camera;
camera.updateMatrixWorld();
const direction = camera.getWorldDirection(camera.position.clone());
const up = camera.position.clone().set(0, 1, 0).applyQuaternion(camera.quaternion);
const width = view.renderer.domElement.clientWidth;
const pxPerUnit = width * camera.zoom / (camera.right - camera.left);
const atoms = [];
for (const [uuid, json] of Object.entries(view.threeUUIDTojsonObject)) {
  const group = json.type === 'spheres' && view.scene.getObjectByProperty('uuid', uuid);
  if (!group) continue;
  for (const mesh of group.children) {
    const p = mesh.getWorldPosition(camera.position.clone()).project(camera);
    atoms.push([p.x * width / 2, p.y * width / 2, p.z, json.radius * pxPerUnit]);
  }
}
const data = window.dash_component_api.getLayout(arguments[0]).props.data;
const find = (node, test) => {
  if (!node || typeof node !== 'object') return null;
  if (test(node)) return node;
  for (const child of node.contents || []) { const found = find(child, test); if (found) return found; }
  return null;
};
const lines = find(find(data, n => n.name === 'unit_cell'), n => n.type === 'lines');
if (!lines) return null;  // no structure drawn yet
const edges = lines.positions;
const cell = [0, 2, 4].map(i => edges[i + 1].map((v, k) => v - edges[i][k]));  // origin -> a, b, c
return {direction: [direction.x, direction.y, direction.z], up: [up.x, up.y, up.z], atoms: atoms, cell: cell,
        data: JSON.stringify(data)};
"""


def hidden_atoms(atoms) -> int:
    """Drawn atoms whose centre lies under a nearer atom, within half their own radius on screen."""
    return sum(any(j != i and other[2] < atom[2] and math.dist(atom[:2], other[:2]) < 0.5 * atom[3]
                   for j, other in enumerate(atoms)) for i, atom in enumerate(atoms))


def _angle(u, v) -> float:
    cosine = abs(sum(a * b for a, b in zip(u, v))) / (math.hypot(*u) * math.hypot(*v))
    return math.degrees(math.acos(min(1.0, cosine)))


@pytest.fixture
def rocksalt_view_url(tmp_path, monkeypatch, mp20_al_ca_cu):
    """A StructureView of rock salt (conventional cell: viewed down a cube axis, 18 of its 27 drawn atoms sit behind
    others) served on its own from a thread, as `StructureView(structure).show()` serves it."""
    from pymatgen.core import Lattice, Structure

    from wyckoff_lab.widgets.context import LabContext, LabSettings
    from wyckoff_lab.widgets.jupyter import ThreadedServer
    from wyckoff_lab.widgets.structure_view import StructureView

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work"))
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    view = StructureView(rocksalt, context=context)
    server = ThreadedServer(view.app(), 0)
    # Crystal Toolkit numbers the ids of components made after others of the same name in this process (a full
    # test run makes many): "CTwl-view-ct-3_scene", not "CTwl-view-ct_scene".
    yield server.url, view.ct.id("scene")
    server.stop()
    context.sessions.close()


@pytest.mark.needs_chromium
def test_the_3d_view_looks_at_the_crystal_obliquely_and_fills_the_frame(rocksalt_view_url, browser):
    """The camera as the page holds it: not along a, b or c (within 15 degrees), no drawn atom hidden behind
    another, c pointing up on screen, the structure spanning the view (FRAME_FILL); the same after a redraw with
    new scene data (Crystal Toolkit puts its camera back on every new scene)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_app_e2e import _scene_fill

    url, scene_id = rocksalt_view_url
    browser.get(url)
    camera = lambda d: d.execute_script(SCENE_CAMERA, scene_id)
    seen = WebDriverWait(browser, 120, poll_frequency=0.5).until(lambda d: (c := camera(d)) and c["atoms"] and c)
    for redraw in ("element", "orbit"):
        assert len(seen["atoms"]) == 27, redraw  # Na on corners and faces (14), Cl on edges and centre (13)
        angles = [_angle(seen["direction"], vector) for vector in seen["cell"]]
        assert min(angles) > 15, (redraw, angles, seen["direction"], seen["cell"])
        assert hidden_atoms(seen["atoms"]) == 0, (redraw, hidden_atoms(seen["atoms"]))
        c = seen["cell"][2]
        along = sum(a * b for a, b in zip(c, seen["direction"]))
        across = [x - along * d for x, d in zip(c, seen["direction"])]  # c as it lies on the screen
        assert _angle(across, seen["up"]) < 1 and sum(a * b for a, b in zip(across, seen["up"])) > 0, redraw
        assert _scene_fill(browser, scene_id) >= 0.6, redraw
        if redraw == "element":  # colour by orbit: new scene data, so Crystal Toolkit sets its camera up again
            before = seen["data"]
            browser.find_element(By.XPATH, "//*[@id='wl-view-colour']//label[contains(., 'Wyckoff orbit')]").click()
            seen = WebDriverWait(browser, 60, poll_frequency=0.5).until(
                lambda d: (c := camera(d)) and c["atoms"] and c["data"] != before and c)
