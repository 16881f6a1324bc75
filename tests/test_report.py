"""The HTML report: sections per model, embedded figures that decode, tables behind every figure,
stated (not crashing) missing parts, and a clean render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from morphotype import evaluate, jump
from morphotype.io import MorphotypeInputError, write_table
from morphotype.training import train_all, write_results
from morphotype.report import LOIO_PASS_RANK, write_report

# the module trains a real (tiny) run with LOIO and UMAP once: ~30 s of setup on 2 cores
pytestmark = pytest.mark.slow

PHENOTYPES = ["Apoptosis", "Interphase", "Prometaphase"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,2000",
                  "--enable-logging=stderr", "--v=0"]


# --------------------------------------------------------------------------------------------
# A small but real run output: models and evaluation written by the pipeline's own writers
# --------------------------------------------------------------------------------------------

def _single_cells(n_images: int = 12, per_class: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(n_images):
        for k, phenotype in enumerate(PHENOTYPES):
            for cell in range(per_class):
                number = k * per_class + cell + 1
                rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"W{image}", "Metadata_Site": 1,
                             "Metadata_Frame": 1, "Metadata_ImageID": f"P1_W{image}_1_1",
                             "Metadata_FileID": f"file{image}", "Metadata_ObjectNumber": number,
                             "Metadata_CellID": f"file{image}_{number}", "Metadata_Phenotype": phenotype,
                             "Nuclei_AreaShape_Area": 200 + 80 * k + rng.normal(0, 25),
                             "Nuclei_AreaShape_Eccentricity": 0.3 + 0.2 * k + rng.normal(0, 0.08),
                             "Nuclei_AreaShape_Solidity": 0.9 - 0.05 * k + rng.normal(0, 0.03),
                             "Nuclei_AreaShape_Perimeter": 60 + rng.normal(0, 5),
                             "Nuclei_Intensity_MeanIntensity_DNA": 0.4 + 0.1 * k + rng.normal(0, 0.05)})
    table = pd.DataFrame(rows)
    unlabelled = table.iloc[:3].assign(Metadata_Phenotype=None, Metadata_CellID=lambda t: t["Metadata_CellID"] + "u")
    return pd.concat([table, unlabelled], ignore_index=True)


def _jump_outputs(tmp: Path) -> Path:
    """Per-plate KS/profile tables in the format of jump.score_plate, summarised by jump.summarise."""
    rng = np.random.default_rng(1)
    plates_dir = tmp / "plates"
    plates_dir.mkdir(parents=True)
    for plate in ("BR1", "BR2"):
        ks_rows, profile_rows = [], []
        for w in range(6):
            well = {"Metadata_Plate": plate, "Metadata_PlateMap": "MAP", "Metadata_Perturbation": "compound",
                    "Metadata_CellType": "U2OS", "Metadata_Time": 24, "Metadata_Well": f"A{w:02d}",
                    "Metadata_broad_sample": f"BRD-{w}", "Metadata_Treatment": f"drug{w}",
                    "Metadata_pert_type": "trt", "Metadata_control_type": None}
            for model in jump.MODEL_NAMES:
                strong = model == "final" and w < 2
                for phenotype in PHENOTYPES:
                    d = float(rng.uniform(0.6, 0.9) if strong else rng.uniform(0.0, 0.2))
                    ks_rows.append({**well, "Metadata_Model": model, "Metadata_Phenotype": phenotype,
                                    "n_treated": 300, "n_control": 900, "n_treated_compared": 300,
                                    "n_control_compared": 300, "ks_d": d, "ks_p": 1e-12 if strong else 0.5,
                                    "median_shift": 0.3 if strong else 0.0})
                profile_rows.append({**well, "Metadata_Model": model, "Metadata_CellCount": 300,
                                     **{p: float(rng.uniform()) for p in PHENOTYPES}})
        write_table(pd.DataFrame(ks_rows), plates_dir / f"{plate}.ks.parquet")
        write_table(pd.DataFrame(profile_rows), plates_dir / f"{plate}.profiles.parquet")
        (plates_dir / f"{plate}.summary.json").write_text(json.dumps({
            "plate": plate, "outputs": {"ks": f"{plate}.ks.parquet", "profiles": f"{plate}.profiles.parquet"},
            "n_cells_scored": 5000, "n_wells_tested": 6, "n_wells_skipped_low_count": 0, "missing_features": []}))
    return plates_dir


@pytest.fixture(scope="module")
def run_outdir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    table = _single_cells()
    write_table(table, out / "features" / "single_cells.parquet")
    results = train_all(table, feature_spaces=("CP", "CP_areashape", "DP"), balanced=(True,),
                        shuffled=(False, True), binary=True, binary_feature_spaces=("CP_areashape",),
                        grid={"C": [1.0], "l1_ratio": [0.5]}, cv_folds=2, loio=True,
                        loio_feature_spaces=("CP_areashape",), umap=True, n_jobs=1, progress=False)
    write_results(results, out)
    (out / "pipeline_info").mkdir()
    (out / "pipeline_info" / "params.yaml").write_text("mitocheck_crops: /data/crops\nsegmentation_backend: threshold\n")
    (out / "pipeline_info" / "versions.json").write_text(json.dumps({"morphotype": "0.0.0", "numpy": np.__version__}))
    jump.summarise([_jump_outputs(out / "jump_work")], out / "jump" / "summary", top_n=3)
    return out


@pytest.fixture(scope="module")
def report(run_outdir) -> Path:
    started = time.perf_counter()
    path = write_report(run_outdir)
    assert time.perf_counter() - started < 60
    return path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.external, self.scripts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _section(html_text: str, section_id: str) -> str:
    match = re.search(rf'<section id="{re.escape(section_id)}"[^>]*>(.*?)</section>', html_text, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------

def test_a_section_for_every_model_and_the_study_sections(run_outdir, report):
    assert report == run_outdir / "report" / "index.html"
    page = _parse(report)
    models = sorted(p.name for p in (run_outdir / "models").iterdir() if p.is_dir())
    assert len(models) == 2 + 2 + 2 * len(PHENOTYPES)  # CP, CP_areashape x final/shuffled + binaries
    for model_id in models:
        assert f"model-{model_id}" in page.ids
    for section in ("run", "data", "models", "loio", "silhouette", "jump", "feature-space-CP",
                    "feature-space-CP_areashape"):
        assert section in page.ids
    assert len(page.ids) == len(set(page.ids)), "duplicate element ids"
    text = report.read_text()
    assert "DP" in _section(text, "run")  # the skipped feature space is reported
    assert "/data/crops" in _section(text, "data")


def test_every_embedded_figure_decodes_and_nothing_is_external(report):
    page = _parse(report)
    assert page.scripts == 0 and page.external == []
    assert len(page.images) > 30
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 50
        assert np.asarray(image.convert("L")).std() > 1  # not a blank canvas


def test_every_figure_has_png_svg_and_its_table(report):
    figures = report.parent / "figures"
    names = sorted(p.stem for p in figures.glob("*.png"))
    assert len(names) == len(_parse(report).images)
    for name in names:
        assert (figures / f"{name}.svg").read_text().lstrip().startswith("<?xml")
        assert len(pd.read_csv(figures / f"{name}.csv")) > 0
        assert f'id="fig-{name}"' in report.read_text()


def test_figure_tables_match_the_evaluation(run_outdir, report):
    figures = report.parent / "figures"
    model_id = "CP_areashape__balanced__final"
    f1 = pd.read_csv(run_outdir / "evaluation" / "f1_scores.csv")
    shown = pd.read_csv(figures / f"model_{model_id}_f1.csv")
    assert set(shown["model_id"]) == {model_id, "CP_areashape__balanced__shuffled"}  # against the baseline
    expected = f1[(f1["split"] == "test") & f1["model_id"].isin(shown["model_id"])]
    merged = shown.merge(expected, on=["model_id", "phenotype"], suffixes=("", "_eval"))
    assert len(merged) == len(shown) == len(expected)
    np.testing.assert_allclose(merged["f1"], merged["f1_eval"])

    # the study's LOIO metric, recomputed independently by evaluate.loio_pass_fraction
    summary = pd.read_csv(run_outdir / "evaluation" / "loio_summary.csv")
    assert len(summary) and LOIO_PASS_RANK == 2
    expected = evaluate.loio_pass_fraction(summary)
    shown = pd.read_csv(figures / "loio_pass_fraction.csv").merge(expected, on="model_id", suffixes=("", "_eval"))
    assert len(shown) == len(expected) == 2
    np.testing.assert_allclose(shown["pass_fraction"], shown["pass_fraction_eval"])

    confusion = pd.read_csv(figures / f"model_{model_id}_confusion.csv")
    fractions = confusion.groupby("true_phenotype")["row_fraction"].sum()
    assert np.allclose(fractions[fractions > 0], 1.0)
    umap = pd.read_csv(figures / "umap_CP.csv")
    assert set(umap["Metadata_Phenotype"]) == set(PHENOTYPES)


def test_jump_section(report):
    text = _section(report.read_text(), "jump")
    figures = report.parent / "figures"
    for model in jump.MODEL_NAMES:
        heatmap = pd.read_csv(figures / f"jump_ks_{model}_compound_U2OS_24.csv")
        assert set(heatmap["Metadata_Phenotype"]) == set(PHENOTYPES)
    compare = pd.read_csv(figures / "jump_final_vs_shuffled.csv").set_index(["Metadata_Model", "Metadata_Phenotype"])
    assert (compare.loc["final", "n_enriched"] == 2).all() and (compare.loc["shuffled", "n_enriched"] == 0).all()
    assert "drug0" in text and "drug1" in text  # the top hits table


def test_missing_parts_are_stated_not_fatal(run_outdir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_outdir, out, ignore=shutil.ignore_patterns("report", "jump", "jump_work"))
    write_table(pd.DataFrame(), out / "evaluation" / "loio_summary.csv")  # as written with loio=False
    (out / "evaluation" / "umap.parquet").unlink()
    path = write_report(out, report_dir=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "index.html"
    text = path.read_text()
    assert "JUMP arm was not run" in _section(text, "jump")
    assert "LOIO was not run" in _section(text, "loio")
    assert "LOIO was not run for this model" in _section(text, "model-CP_areashape__balanced__final")
    assert "No UMAP embedding" in _section(text, "feature-space-CP")

    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "No trained models" in text and "JUMP arm was not run" in text
    with pytest.raises(MorphotypeInputError, match="not a folder"):
        write_report(tmp_path / "absent")


def test_malformed_model_card_names_the_file(run_outdir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_outdir / "models", out / "models")
    card = next((out / "models").glob("*/model_card.json"))
    card.write_text("{not json")
    with pytest.raises(MorphotypeInputError, match="model_card.json"):
        write_report(out)


# --------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is required to test the report: install it with "
                "`apt-get install -y chromium` (Debian) and re-run")


def _render(html_path: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """Screenshot ``html_path``; return the screenshot and every console message Chromium logged.

    With ``--enable-logging=stderr`` Chromium writes each console message and uncaught exception of
    the page to stderr as ``...:CONSOLE:<line>] "<message>", source: <url>``. The report has no
    scripts, so any such line is a failure.
    """
    screenshot = tmp_path / f"{html_path.stem}.png"
    result = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             f"--screenshot={screenshot}", html_path.resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return screenshot, console


def test_console_check_catches_page_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><p>x</p><script>throw new Error("boom")</script></body></html>')
    _, console = _render(bad, tmp_path)
    assert any("Uncaught Error: boom" in line for line in console), console


def test_report_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    screenshot, console = _render(report, tmp_path)
    assert console == []
    image = Image.open(screenshot)
    assert image.size == (1280, 2000)
    assert np.asarray(image.convert("L")).std() > 5  # text and figures, not an empty page
