"""The run report (``floatscope report RUN``): readable axes, the incident step marked on every chart over
steps, the sampling of every chart stated, skipped steps visible, pages that fit the window.

The runs are recorded here with floatscope's own API: a GradScaler run whose first steps are skipped
(``floatscope.watch``) and a run that overflows float32 in the forward pass (``floatscope run``'s
``run_script``). The browser test opens both reports in headless Chromium at 1400 px, checks every plot
and writes screenshots to /tmp/report-shots.
"""

from __future__ import annotations

import math
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import floatscope
import floatscope.runs as fr
from floatscope._cli.main import main as cli_main
from floatscope._cli.run import run_script
from floatscope._report.run import _decade_axis, _scale_axis, _step_axis, write_run_report
from floatscope._store.schema import ModelInfo, RunConfig
from floatscope._store.sqlite import RunStore

SHOTS = Path("/tmp/report-shots")
WIDTH = 1400

# A float32 model whose loss is multiplied by 1.9 per step: the last layer's output overflows at step 11.
# The long line makes the incident's diagnosis quote a line far wider than the page.
OVERFLOW_SCRIPT = textwrap.dedent("""\
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for step in range(60):
        x = torch.randn(32, 8); y = torch.randn(32, 1) * 4
        loss = ((model(x) - y) ** 2).mean() * (1.9 ** step) + 0.0 * (ZEROS)
        opt.zero_grad(); loss.backward(); opt.step()
""").replace("ZEROS", " + ".join(["x.abs().max()", "y.abs().max()"] * 6))


def _scaler_run(store: Path) -> str:
    """CPU float16 autocast with a GradScaler whose initial scale (2**20) overflows the first gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=5)
    with floatscope.watch(model, opt, scaler=scaler, store=str(store), health_every=10, on_anomaly="record") as w:
        for _ in range(40):
            x, y = torch.randn(32, 8), torch.randn(32, 1)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert w.result.status == "clean" and w.result.skipped_steps > 0
    return fr.list_runs(store)[0].id


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(store, {"scaler": id, "overflow": id}, folder), both reports written by ``floatscope report``."""
    folder = tmp_path_factory.mktemp("report")
    store = folder / "runs.sqlite"
    ids = {"scaler": _scaler_run(store)}
    (folder / "overflow.py").write_text(OVERFLOW_SCRIPT)
    code, result = run_script(folder / "overflow.py", [], store=str(store), health_every=5)
    assert code == 3 and result.incident is not None
    ids["overflow"] = fr.list_runs(store)[0].id
    for name, run_id in ids.items():
        assert cli_main(["report", run_id, "--store", str(store), "-o", str(folder / f"{name}.html")]) == 0
    return store, ids, folder


# ----------------------------------------------------------------------------------- axes, without a browser
def test_loss_scale_axis_is_labelled_at_powers_of_two():
    # The scales of the run: plotly labelled them 0.3973396 and 179.7413.
    axis = _scale_axis([0.3973396, 179.7413, 2.0])
    ks = [round(math.log2(v)) for v in axis["tickvals"]]
    assert all(v == 2.0 ** k for v, k in zip(axis["tickvals"], ks, strict=True))
    assert axis["ticktext"] == [f"2<sup>{k}</sup>" for k in ks]
    assert ks[0] <= -1 and ks[-1] >= 8 and len(ks) <= 8
    low, high = axis["range"]  # log10 units: the whole curve is inside
    assert low <= math.log10(0.3973396) and high >= math.log10(179.7413)
    wide = _scale_axis([2.0 ** -20, 2.0 ** 100])
    assert len(wide["tickvals"]) <= 8 and axis["title"]["text"] == "loss scale"
    flat = _scale_axis([65536.0])  # a constant scale still gets ticks around it
    assert flat["tickvals"] == [2.0 ** 15, 2.0 ** 16, 2.0 ** 17]


def test_step_and_decade_axes():
    assert _step_axis([0, 1, 2]) == {"title": {"text": "step"}, "tickformat": "d", "tick0": 0, "dtick": 1}
    assert "dtick" not in _step_axis(list(range(500)))
    assert _decade_axis([1e4, 1e30])["dtick"] == 4     # 26 decades: a label every 4, not 26 labels
    assert _decade_axis([1.0, 50.0])["dtick"] == 1     # never plotly's bare '2', '5' in-between labels


# ----------------------------------------------------------------------------------- what the pages say
def test_scaler_report_shows_skipped_steps_and_keeps_the_heatmap(runs):
    store, ids, folder = runs
    with fr.open_store(store) as s:
        skipped = [st.step for st in s.steps(ids["scaler"]) if st.skipped]
    assert skipped[0] == 0  # the first step was skipped
    page = (folder / "scaler.html").read_text()
    assert 'id="grad-heatmap"' in page and "No gradient fingerprints" not in page
    assert "skipped step" in page and "Skipped by GradScaler: steps 0-" in page
    assert "sampled every 10 steps: 4 sample(s), steps 0, 10, 20, 30" in page


def test_overflow_report_marks_the_incident_and_its_output_headroom(runs):
    _, _, folder = runs
    page = (folder / "overflow.html").read_text()
    assert "Incident at step 11: Inf born in forward at aten.addmm.default (module &#x27;4&#x27;)" in page
    assert "incident: step 11, forward addmm" in page
    # The headroom chart: the samples (every 5 steps) and the incident's own output, which held Inf.
    assert "sampled every 5 steps: 3 sample(s), steps 0, 5, 10" in page
    assert "the incident&#x27;s own output at step 11 (module &#x27;4&#x27;, float32: Inf" in page
    assert "4 at the incident" in page


def test_gradient_rows_without_recorded_names_still_make_a_heatmap(tmp_path):
    # A run whose configuration lacks fingerprint_params: the rows are drawn under the model's names.
    path = tmp_path / "s.sqlite"
    store = RunStore(path)
    run_id = store.new_run(name="t", command="t")
    store.update_config(run_id, RunConfig.patch(model=ModelInfo(
        type="Sequential", structure=[("", "Sequential"), ("0", "Linear")],
        parameters={"0.weight": ([2, 2], "float32"), "0.bias": ([2], "float32")})))
    for step in range(3):
        store.add_step(run_id, step, loss=1.0, grad_norm=1.0, loss_scale=2.0 ** 16, skipped=step == 0)
        store.add_fingerprint(run_id, step, "grad", [math.inf, math.nan] if step == 0 else [0.5, 0.25])
    store.finish_run(run_id, status="clean", steps=3, skipped_steps=1, result=None)
    store.close()
    with RunStore(path, readonly=True) as reader:
        out = write_run_report(reader, run_id, tmp_path / "r.html")
    page = out.read_text()
    assert 'id="grad-heatmap"' in page and '"0.weight","0.bias"' in page and "NaN/Inf gradient" in page


# ----------------------------------------------------------------------------------- in a browser
_PLOTS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => {
    const L = gd._fullLayout;
    const axes = Object.keys(L).filter(k => /^[xy]axis\\d*$/.test(k)).map(k => {
        const a = L[k];
        const id = a._id;  // x, x2, y, y2 ...
        const ticks = [...gd.querySelectorAll(`g.${id}tick text`)].map(t => t.textContent);
        return {name: k, id, type: a.type, visible: a.visible, showticklabels: a.showticklabels,
                title: (a.title && a.title.text) || '', ticks};
    });
    return {id: gd.id, title: (L.title && L.title.text) || '', axes,
            shapes: (gd.layout.shapes || []).map(s => ({name: s.name, x0: s.x0})),
            annotations: (gd.layout.annotations || []).map(a => a.text),
            points: gd.data.reduce((n, t) => n + ((t.z || t.y || []).flat()
                                                  .filter(v => v !== null && v !== undefined).length), 0)};
})"""


def _plain(label: str) -> str:
    """A tick's text as read: plotly writes a minus sign U+2212 and zero-width spaces around superscripts."""
    return label.replace("\u2212", "-").replace("\u200b", "").strip()


def _readable(label: str) -> bool:
    """A tick label of at most 6 significant characters: '1.5', '10⁸' ('108' as text), '2¹⁶', '65k'."""
    text = _plain(label).replace(",", "")
    digits = re.sub(r"[^0-9]", "", text).lstrip("0")
    return bool(text) and len(text) <= 8 and len(digits) <= 6 and not re.search(r"\.\d{3,}", text)


def _open_in_chromium(pages: dict[str, Path]) -> dict[str, dict]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    seen: dict[str, dict] = {}
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            for name, page in pages.items():
                tab = b.new_page(viewport={"width": WIDTH, "height": 900})
                errors: list[str] = []
                tab.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                tab.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                tab.goto(page.as_uri())
                expected = page.read_text().count("Plotly.newPlot")
                tab.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}")
                tab.wait_for_timeout(300)
                seen[name] = {"errors": errors, "plots": tab.evaluate(_PLOTS),
                              "scroll_width": tab.evaluate("document.documentElement.scrollWidth")}
                tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
                for plot in seen[name]["plots"]:
                    tab.locator(f"#{plot['id']}").screenshot(path=str(SHOTS / f"{name}-{plot['id']}.png"))
                tab.close()
        finally:
            b.close()
    return seen


def test_reports_in_chromium_fit_the_window_with_titled_readable_axes_and_the_incident_marked(runs):
    store, ids, folder = runs
    with fr.open_store(store) as s:
        incident = s.get(ids["overflow"]).incident
    seen = _open_in_chromium({"scaler": folder / "scaler.html", "overflow": folder / "overflow.html"})
    for name, page in seen.items():
        assert page["errors"] == [], (name, page["errors"])
        assert page["scroll_width"] <= WIDTH, (name, page["scroll_width"])  # the incident block wraps
        plots = page["plots"]
        assert [p["id"] for p in plots] == ["loss", "grad-heatmap", "headroom"]
        for plot in plots:
            where = f"{name}/{plot['id']}"
            assert plot["points"] > 0, where
            # Every chart says how its data were sampled.
            assert "every step" in plot["title"] or "sampled every" in plot["title"], (where, plot["title"])
            shown = [a for a in plot["axes"] if a["visible"] and a["showticklabels"]]
            assert {a["id"][0] for a in shown} == {"x", "y"}, where
            for axis in shown:
                assert axis["title"], (where, axis["name"])
                assert axis["ticks"], (where, axis["name"])
                if axis["type"] != "category":
                    bad = [t for t in axis["ticks"] if not _readable(t)]
                    assert not bad, (where, axis["name"], bad)
                    if axis["title"] == "step":
                        assert all(re.fullmatch(r"-?\d+", _plain(t)) for t in axis["ticks"]), \
                            (where, axis["ticks"])  # no step 0.5
            over_steps = any(a["title"] == "step" for a in shown)
            marked = [s for s in plot["shapes"] if s["name"] == "incident"]
            if name == "overflow" and over_steps:
                assert [s["x0"] for s in marked] == [incident.step], where
                assert any("incident: step 11" in t for t in plot["annotations"]), where
            else:
                assert marked == [], where
    # The loss scale has its own axis, labelled at powers of two; skipped steps are drawn on it.
    loss = seen["scaler"]["plots"][0]
    scale_axis = next(a for a in loss["axes"] if a["title"] == "loss scale")
    assert scale_axis["type"] == "log", scale_axis
    assert all(re.fullmatch(r"2-?\d+", _plain(t))
                                               for t in scale_axis["ticks"]), scale_axis["ticks"]
    # The headroom chart of the overflow run has the incident's own row.
    headroom = seen["overflow"]["plots"][2]
    layer_axis = next(a for a in headroom["axes"] if a["type"] == "category")
    assert "4 at the incident" in layer_axis["ticks"]
