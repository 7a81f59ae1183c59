"""`discover report` and the demo's report stage: the site's files, its galleries against the world
generator, its errors, and the site itself in headless Chromium (images load, no console errors,
search and sort work).

The browser test needs Debian's ``chromium`` and ``chromium-driver``; it is skipped without them,
unless ``DISCOVER_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them) makes that a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import demo
import discover
import report
import world
from common import DiscoverError

PROBE_N, PROBE_SEED = 300, 2
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class _Tags(HTMLParser):
    """Every tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def tags(page: Path) -> list[tuple[str, dict[str, str]]]:
    p = _Tags()
    p.feed(page.read_text())
    return p.tags


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The real demo (shipped checkpoints) on a small probe: dissect, evaluate, explain, report."""
    out = tmp_path_factory.mktemp("demo") / "out"
    demo.run(demo.DemoConfig(out=out, probe=f"world:{PROBE_N}:{PROBE_SEED}"))
    return out


def test_site_pages_and_every_local_link_exist(demo_dir: Path) -> None:
    site = demo_dir / "report"
    names = [m.name for m in demo.demo_models()]
    assert sorted(p.name for p in (demo_dir / "labels").iterdir()) == sorted(names)
    labels = {n: json.loads((demo_dir / "labels" / n / "labels.json").read_text()) for n in names}
    expected = [site / "index.html"]
    expected += [site / "layers" / f"{n}--{layer}.html" for n in labels for layer in labels[n]["layers"]]
    expected += [site / "explain" / f"{n}-{j}.html" for n in labels for j in range(6)]
    assert sorted(site.rglob("*.html")) == sorted(expected)
    for page in expected:
        for tag, attrs in tags(page):
            url = attrs.get("src") or (attrs.get("href") if tag == "a" else None)
            if url and not re.match(r"^(data:|#)", url):
                assert not re.match(r"^[a-z]+://", url), f"{page.name} links outside the site: {url}"
                assert (page.parent / url).is_file(), f"{page.name}: {url} does not exist"


def test_layer_cards_show_each_neurons_top_images_from_the_world(demo_dir: Path) -> None:
    site = demo_dir / "report"
    lab = json.loads((demo_dir / "labels" / "cvn" / "labels.json").read_text())
    layer = "blocks.3.mlp.act"
    page = site / "layers" / f"cvn--{layer}.html"
    neurons = [n for n in lab["neurons"] if n["layer"] == layer]
    cards, current = [], None
    for tag, attrs in tags(page):
        if tag == "div" and attrs.get("class") == "card":
            current = {"unit": int(attrs["data-unit"]), "images": []}
            cards.append(current)
        elif tag == "img" and current is not None and attrs.get("alt", "").startswith("top image"):
            current["images"].append(attrs["src"])
    assert [c["unit"] for c in cards] == [n["unit"] for n in neurons] == list(range(384))
    for card, n in zip(cards, neurons):  # a dead neuron has no top images: its "top 20" would be a tie
        assert [int(Path(u).stem) for u in card["images"]] == ([] if n["dead"] else n["top_images"][:report.GALLERY])
    assert any(n["dead"] for n in neurons) and "never active on a probe image" in page.read_text()
    # a thumbnail is the probe image itself: compare with the generator's own rendering
    unit = cards[5]
    for url in unit["images"][:3]:
        index = int(Path(url).stem)
        got = np.asarray(Image.open(page.parent / url).convert("RGB"))
        assert np.array_equal(got, world.render(PROBE_SEED, index, 64).image)


def test_explain_page_lists_the_table4_rows(demo_dir: Path) -> None:
    expl = json.loads((demo_dir / "explanations.json").read_text())["cvn"][0]
    page = demo_dir / "report" / "explain" / "cvn-0.html"
    text = page.read_text()
    assert expl["prediction"]["class"] in text
    assert f"<b>{expl['n_active']}</b> of {expl['K']}" in text
    rows = {"top": [], "bottom": []}
    table = None
    for tag, attrs in tags(page):
        if tag == "table" and attrs.get("id") in rows:
            table = attrs["id"]
        elif tag == "table":
            table = None
        elif tag == "img" and table and "of neuron" in attrs.get("alt", ""):
            unit = int(attrs["alt"].rsplit(" ", 1)[1])
            if unit not in rows[table]:
                rows[table].append(unit)
    units = [n["unit"] for n in expl["neurons"]]  # sorted by activation, highest first
    assert rows["top"] == units[:report.TOP]
    assert rows["bottom"] == units[report.TOP:][-report.BOTTOM:]


def test_report_is_reused_only_while_its_inputs_are_unchanged(demo_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    first = report.build(copy, progress=False)
    assert first["cached"] is True  # the demo made it from these very inputs
    ev = json.loads((copy / "evaluation.json").read_text())
    ev["runs"][0]["active_per_example"] = 47.5
    (copy / "evaluation.json").write_text(json.dumps(ev))
    again = report.build(copy, progress=False)
    assert again["cached"] is False
    assert "47.5" in (copy / "report" / "index.html").read_text()


def test_bad_report_inputs_are_one_line_errors(demo_dir: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(demo_dir, half, ignore=shutil.ignore_patterns("report", "explanations.json", "evaluation.json"))
    with pytest.raises(DiscoverError, match=r"half-finished demo run, missing evaluation\.json, explanations\.json"):
        report.build(half, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    res = runner.invoke(discover.cli, ["report", str(empty)])
    assert res.exit_code == 2
    assert "holds no results" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = runner.invoke(discover.cli, ["report", str(demo_dir), "--out", str(foreign)])
    assert res.exit_code == 2 and "not a report directory" in res.output
    assert (foreign / "notes.txt").read_text() == "mine"


def test_demo_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("keep me")
    res = CliRunner().invoke(discover.cli, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--force" in res.output
    assert (tmp_path / "thesis.tex").read_text() == "keep me"


# --- the site in a real browser ---------------------------------------------------------------------

def _browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("DISCOVER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DISCOVER_REQUIRE_BROWSER=1 but {CHROMIUM} / {CHROMEDRIVER} are missing")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _load(browser, page: Path) -> None:
    """Open ``page`` and wait until every image has finished (loaded or failed). Each poll switches
    any still-lazy image to eager first: after a single pass, some images of a 3 000-image layer page
    were seen still lazy (so never loading) in about one run in four, which a one-shot wait hung on."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 120, poll_frequency=0.2).until(lambda d: d.execute_script("""
        const imgs = Array.from(document.images);
        imgs.forEach(i => { if (i.loading !== 'eager') i.loading = 'eager'; });
        return document.readyState === 'complete' && imgs.every(i => i.complete);"""))


def test_every_page_loads_with_all_images_and_no_console_errors(demo_dir: Path, browser) -> None:
    pages = sorted((demo_dir / "report").rglob("*.html"))
    for page in pages:
        _load(browser, page)
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")
        assert broken == [], f"{page.name}: images that did not load: {broken[:3]}"
        assert browser.execute_script("return document.images.length;") > 0
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == [], f"{page.name}: console: {errors[:3]}"


def test_layer_page_search_sort_and_filter(demo_dir: Path, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    lab = json.loads((demo_dir / "labels" / "twin" / "labels.json").read_text())
    layer = "blocks.3.mlp.act"
    neurons = [n for n in lab["neurons"] if n["layer"] == layer]
    _load(browser, demo_dir / "report" / "layers" / f"twin--{layer}.html")

    def visible() -> list[int]:
        return browser.execute_script(
            "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden)"
            ".map(c => parseInt(c.dataset.unit));")

    assert visible() == list(range(len(neurons)))
    query = next(w for w in ("red", "striped", "dotted", "blue", "circle", "a") if any(
        w in (n["description"] or "").lower() for n in neurons))
    box = browser.find_element(By.ID, "search")
    box.send_keys(query)
    want = [n["unit"] for n in neurons if query in (n["description"] or "").lower()]
    assert visible() == want
    assert browser.find_element(By.ID, "shown").text == str(len(want))
    box.clear()
    box.send_keys(" ")  # clear() fires no input event; a blank query shows everything again
    Select(browser.find_element(By.ID, "sort")).select_by_value("score")
    order = visible()
    by_score = sorted(neurons, key=lambda n: (-(n["similarity"] if n["similarity"] is not None else -1e30), n["unit"]))
    assert order == [n["unit"] for n in by_score]
    for key, field in (("precision", "precision"), ("truth", "corr_truth")):  # the dissection's --score figures
        Select(browser.find_element(By.ID, "sort")).select_by_value(key)

        def value(n: dict) -> float:
            v = (n.get("simulation") or {}).get(field)
            return -1e30 if v is None else v
        assert visible() == [n["unit"] for n in sorted(neurons, key=lambda n: (-value(n), n["unit"]))]
        assert sum(value(n) > -1e30 for n in neurons) > len(neurons) // 2
    # every layer has its cutoff, calibrated on an untrained copy: the filter shows the units above it
    info = lab["layers"][layer]
    assert info["cutoff_from"] == "random copy" and info["interpretable"] == sum(
        n["similarity"] is not None and n["similarity"] > info["cutoff"] for n in neurons)
    browser.find_element(By.ID, "interpretable").click()
    assert visible() == [n["unit"] for n in neurons if n["interpretable"]]
    browser.find_element(By.ID, "interpretable").click()
    head = [n for n in lab["neurons"] if n["layer"] == "head"]
    assert lab["layers"]["head"]["similarity"] == "soft_wpmi"
    _load(browser, demo_dir / "report" / "layers" / "twin--head.html")
    browser.find_element(By.ID, "interpretable").click()
    assert sorted(visible()) == [n["unit"] for n in head if n["interpretable"]]
    assert 0 < len(visible()) < len(head) or all(n["interpretable"] for n in head)


def test_report_renders_a_plain_dissect_output(demo_dir: Path, tmp_path: Path) -> None:
    """A dissect output alone (no demo summary, evaluation or explanations) is reportable."""
    src = tmp_path / "labels"
    shutil.copytree(demo_dir / "labels" / "cvn", src)
    res = report.build(src, progress=False)
    lab = json.loads((src / "labels.json").read_text())
    site = src / "report"
    assert res["cached"] is False and (site / "index.html").is_file()
    assert sorted(p.name for p in (site / "layers").glob("*.html")) == sorted(
        f"{src.name}--{layer}.html" for layer in lab["layers"])


def test_the_real_scale_recipe_ends_in_a_report(tmp_path: Path) -> None:
    """The README's path past the demo: a timm model, an image folder (with a synset-free layout),
    dissect, explain, evaluate and report, each through the CLI, ending in a site whose pages exist."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def cli(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, str(root / "discover.py"), *args], cwd=root, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    cli("world", "export", str(tmp_path / "images"), "--n", "64", "--seed", "9")
    out = tmp_path / "dissect_r18"
    cli("dissect", "--model", "timm:resnet18", "--layers", "layer4,fc", "--probe", str(tmp_path / "images"),
        "--concepts", "world", "--out", str(out), "--batch-size", "32")
    lab = json.loads((out / "labels.json").read_text())
    assert lab["provenance"]["classes"][:2] == ["tench", "goldfish"] and set(lab["layers"]) == {"layer4", "fc"}
    img = next((tmp_path / "images").rglob("*.png"))
    assert "layer" in cli("explain", str(img), "--model", "timm:resnet18", "--labels", str(out), "--layer", "fc",
                          "--json").stdout
    cli("evaluate", str(out), "--json")
    res = cli("report", str(out))
    site = out / "report"
    assert (site / "index.html").is_file() and "report:" in res.stdout
    assert sorted(p.name for p in (site / "layers").glob("*.html")) == [f"{out.name}--fc.html", f"{out.name}--layer4.html"]


def test_layer_cards_show_simulation_scores_and_object_iou(demo_dir: Path) -> None:
    """Each card of a spatial CVN layer carries the unit's simulation correlation (dissect --score)
    and its object IoU from the evaluation (where it wins), as the evaluation computed them."""
    import re

    lab = json.loads((demo_dir / "labels" / "cvn" / "labels.json").read_text())
    ev = json.loads((demo_dir / "evaluation.json").read_text())
    layer = next(r for r in ev["runs"] if r["labels"].endswith("cvn") and r.get("localisation"))
    page = (demo_dir / "report" / "layers" / f"cvn--{layer['layer']}.html").read_text()
    ious = [float(v) for v in re.findall(r'data-iou="([-+0-9.e]+)"', page)]
    want = layer["localisation"]["iou_win"]
    assert len(ious) == len(want) and all(abs(a - (b if b is not None else -1e30)) < 1e-9 * max(1, abs(a))
                                          for a, b in zip(ious, want))
    sims = [float(v) for v in re.findall(r'data-sim="([-+0-9.e]+)"', page)]
    own = [n["simulation"]["corr"] if n.get("simulation") and n["simulation"]["corr"] is not None else -1e30
           for n in sorted((n for n in lab["neurons"] if n["layer"] == layer["layer"]), key=lambda n: n["unit"])]
    assert sims == pytest.approx(own)
    assert f"Localisation on {layer['localisation']['images']} probe images" in page and "Simulation on held-out" in page
