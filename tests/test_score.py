"""``morphotype score`` on real CellProfiler databases and on the other layouts built from them."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphotype import models
from morphotype.cellprofiler import map_feature_name, normalise_well, open_cellprofiler
from morphotype.io import read_table

from test_jump import SHAPES, nucleus_features

SHAPE_FEATURES = [f"Nuclei_AreaShape_{n}" for n in ("Area", "Perimeter", "MajorAxisLength", "MinorAxisLength",
                                                        "Eccentricity", "FormFactor", "Compactness", "Solidity",
                                                        "Extent", "MaxFeretDiameter", "MinFeretDiameter")]
INTENSITY = "Nuclei_Intensity_MeanIntensity_DNA"
REAL = {  # file -> (DNA stain, negative wells, treated wells)
    "cytominer_database_data_a.sqlite": ("Hoechst", ["A1", "A2"], ["A10", "A11"]),
    "cell_health_SQ00014613_cytotable.sqlite": ("DNA", ["A1"], ["O18"]),
    "cell_health_SQ00014613_pycytominer.sqlite": ("DNA", ["A1"], []),
}


def sqlite_dir() -> Path:
    return Path(os.environ.get("MORPHOTYPE_SHARED", "../shared")) / "data" / "third_party" / "cellprofiler_sqlite"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Final and shuffled models on AreaShape features the real files have, plus the DNA mean intensity."""
    rng = np.random.default_rng(3)
    parts = []
    for k, shape in enumerate(SHAPES):
        cells = nucleus_features(rng, 200, shape)[SHAPE_FEATURES]
        cells[INTENSITY] = rng.normal(0.05 * (k + 1), 0.01, len(cells))  # carries weight by design
        parts.append(cells.assign(Metadata_Phenotype=shape))
    table = pd.concat(parts, ignore_index=True)
    table["Metadata_CellID"] = [f"c{i}" for i in range(len(table))]
    table["Metadata_ImageID"] = [f"i{i // 20}" for i in range(len(table))]
    data = models.prepare_data(table, "CP")
    folder = tmp_path_factory.mktemp("score_models")
    dirs = []
    for shuffled in (False, True):
        model = models.train_model(data, np.ones(len(data.X), bool), hyperparameters=(0.1, 0.0), shuffled=shuffled,
                                   n_jobs=1, progress=False)
        dirs.append(models.save_model(model, folder / model.model_id))
    return dirs[0], dirs[1]


def write_platemap(path: Path, negative: list[str], treated: list[str]) -> Path:
    rows = [{"well": w, "treatment": "DMSO", "control": "negative"} for w in negative]
    rows += [{"well": w, "treatment": f"drug_{w}", "control": "treated"} for w in treated]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "morphotype", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def score_cli(input_path, model_dirs, platemap, outdir, *extra) -> subprocess.CompletedProcess:
    final, shuffled = model_dirs
    return run_cli("score", "--input", input_path, "--model", final, "--shuffled-model", shuffled,
                   "--platemap", platemap, "--min-cells", 0, "--outdir", outdir, *extra)


def test_well_names_and_feature_names_are_normalised():
    assert normalise_well("A1") == normalise_well("a01") == normalise_well("A001") == "A01"
    assert normalise_well("P24") == "P24" and normalise_well("xyz") is None
    assert map_feature_name("Nuclei_Intensity_MeanIntensity_DAPI", dna_stain="DAPI") == INTENSITY
    assert map_feature_name("Nucleus_Texture_Contrast_DAPI_3_00_256", "Nucleus", "DAPI") == \
        "Nuclei_Texture_Contrast_DNA_3_00_256"
    assert map_feature_name("Nuclei_RadialDistribution_FracAtD_DAPI_1of4", dna_stain="DAPI") == \
        "Nuclei_RadialDistribution_FracAtD_DNA_1of4"
    assert map_feature_name("Cells_AreaShape_Area") is None


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_databases_score_through_the_cli(name, model_dirs, tmp_path):
    stain, negative, treated = REAL[name]
    path = sqlite_dir() / name
    platemap = write_platemap(tmp_path / "platemap.csv", negative, treated)
    result = score_cli(path, model_dirs, platemap, tmp_path / "out", "--dna-stain", stain, "--keep-cells")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    summary = json.loads(next((tmp_path / "out").glob("*.summary.json")).read_text())
    with sqlite3.connect(path) as con:
        n_nuclei = con.execute("SELECT COUNT(*) FROM Nuclei").fetchone()[0]
    assert summary["n_cells"] == n_nuclei
    assert summary["feature_alignment"]["models"]["final"]["n_missing"] == 0
    assert summary["n_wells_tested"] == len(treated)
    shift = json.loads(next((tmp_path / "out").glob("*.domain_shift.json")).read_text())
    assert shift["flagged"] in (True, False) and shift["n_features_compared"] == len(SHAPE_FEATURES) + 1
    cells = read_table(next((tmp_path / "out").glob("*.cells.parquet")))
    assert cells["Metadata_InDistribution"].between(0, 1).all()


def test_missing_weighted_features_are_refused_then_accepted_with_fill_missing(model_dirs, tmp_path):
    path = sqlite_dir() / "cytominer_database_data_a.sqlite"  # stain named Hoechst: DNA intensity is "missing"
    platemap = write_platemap(tmp_path / "platemap.csv", ["A01", "A02"], ["A10", "A11"])
    refused = score_cli(path, model_dirs, platemap, tmp_path / "refused")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cytominer_database_data_a.sqlite: table Nuclei" in refused.stderr
    assert INTENSITY in refused.stderr and "of its weight" in refused.stderr
    accepted = score_cli(path, model_dirs, platemap, tmp_path / "filled", "--fill-missing")
    assert accepted.returncode == 0, accepted.stderr
    alignment = json.loads(next((tmp_path / "filled").glob("*.summary.json")).read_text())["feature_alignment"]
    assert alignment["filled"] and alignment["fill_missing"]
    missing = alignment["models"]["final"]
    assert list(missing["missing"]) == [INTENSITY] and missing["missing_weight"] > 0.05


def _profiles(outdir: Path) -> pd.DataFrame:
    table = read_table(next(outdir.glob("*.profiles.parquet")))
    return table.sort_values(["Metadata_Model", "Metadata_Well"]).reset_index(drop=True)


def _reference(model_dirs, tmp_path) -> tuple[Path, pd.DataFrame]:
    platemap = write_platemap(tmp_path / "platemap.csv", ["A01", "A02"], ["A10", "A11"])
    result = score_cli(sqlite_dir() / "cytominer_database_data_a.sqlite", model_dirs, platemap, tmp_path / "ref",
                       "--dna-stain", "Hoechst", "--plate", "data_a")
    assert result.returncode == 0, result.stderr
    return platemap, _profiles(tmp_path / "ref")


def _real_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    with sqlite3.connect(sqlite_dir() / "cytominer_database_data_a.sqlite") as con:
        image = pd.read_sql("SELECT * FROM Image", con)
        nuclei = pd.read_sql("SELECT * FROM Nuclei", con)
    return image, nuclei


def test_exporttodatabase_layout_with_prefix_gives_the_same_profiles(model_dirs, tmp_path):
    platemap, reference = _reference(model_dirs, tmp_path)
    image, nuclei = _real_tables()
    per_image = image.drop(columns="TableNumber").rename(
        columns={c: f"Image_{c}" for c in image.columns if c not in ("TableNumber", "ImageNumber")})
    per_nuclei = nuclei.drop(columns=["TableNumber", "ObjectNumber"]).assign(
        Nuclei_Number_Object_Number=nuclei["ObjectNumber"])
    path = tmp_path / "MyExpt.db"
    with sqlite3.connect(path) as con:
        per_image.to_sql("MyExpt_Per_Image", con, index=False)
        per_nuclei.to_sql("MyExpt_Per_Nuclei", con, index=False)
    result = score_cli(path, model_dirs, platemap, tmp_path / "db", "--dna-stain", "Hoechst", "--plate", "data_a")
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(_profiles(tmp_path / "db"), reference)


def test_spreadsheet_export_gives_the_same_profiles(model_dirs, tmp_path):
    platemap, reference = _reference(model_dirs, tmp_path)
    image, nuclei = _real_tables()
    folder = tmp_path / "csv"
    folder.mkdir()
    image.drop(columns="TableNumber").to_csv(folder / "MyExpt_Image.csv", index=False)
    nuclei.drop(columns="TableNumber").rename(columns=lambda c: c.removeprefix("Nuclei_")).to_csv(
        folder / "MyExpt_Nuclei.csv", index=False)
    result = score_cli(folder, model_dirs, platemap, tmp_path / "out", "--dna-stain", "Hoechst", "--plate", "data_a")
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(_profiles(tmp_path / "out"), reference)


def test_cytotable_parquet_gives_the_same_profiles(model_dirs, tmp_path):
    """Columns as CytoTable's cellprofiler_sqlite_pycytominer preset writes them (cytotable/presets.py)."""
    platemap, reference = _reference(model_dirs, tmp_path)
    image, nuclei = _real_tables()
    joined = nuclei.rename(columns={"TableNumber": "Metadata_TableNumber", "ImageNumber": "Metadata_ImageNumber",
                                    "ObjectNumber": "Metadata_Nuclei_Number_Object_Number"}).merge(
        image[["TableNumber", "ImageNumber", "Metadata_Well"]].rename(columns={
            "TableNumber": "Metadata_TableNumber", "ImageNumber": "Metadata_ImageNumber",
            "Metadata_Well": "Image_Metadata_Well"}), on=["Metadata_TableNumber", "Metadata_ImageNumber"])
    path = tmp_path / "data_a.parquet"
    joined.to_parquet(path)
    result = score_cli(path, model_dirs, platemap, tmp_path / "out", "--dna-stain", "Hoechst", "--plate", "data_a")
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(_profiles(tmp_path / "out"), reference)


def test_controls_query_replaces_the_platemap(model_dirs, tmp_path):
    final, _ = model_dirs
    result = run_cli("score", "--input", sqlite_dir() / "cytominer_database_data_a.sqlite", "--model", final,
                     "--controls", "Metadata_Well in ['A01', 'A02']", "--dna-stain", "Hoechst", "--min-cells", 0,
                     "--outdir", tmp_path)
    assert result.returncode == 0, result.stderr
    ks = read_table(next(tmp_path.glob("*.ks.parquet")))
    assert sorted(ks["Metadata_Well"].unique()) == ["A10", "A11"]


def test_bad_inputs_exit_2_naming_file_table_and_column(model_dirs, tmp_path):
    image, nuclei = _real_tables()
    path = tmp_path / "no_object_number.sqlite"
    with sqlite3.connect(path) as con:
        image.to_sql("Image", con, index=False)
        nuclei.drop(columns=["ObjectNumber", "Nuclei_Number_Object_Number"]).to_sql("Nuclei", con, index=False)
    platemap = write_platemap(tmp_path / "platemap.csv", ["A01", "A02"], ["A10", "A11"])
    result = score_cli(path, model_dirs, platemap, tmp_path / "out", "--dna-stain", "Hoechst")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no_object_number.sqlite: table Nuclei: no object number column" in result.stderr
    short = write_platemap(tmp_path / "short.csv", ["A01"], ["A10"])
    result = score_cli(sqlite_dir() / "cytominer_database_data_a.sqlite", model_dirs, short, tmp_path / "out2",
                       "--dna-stain", "Hoechst")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "short.csv" in result.stderr and "A02" in result.stderr and "not in the plate map" in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("well,treatment,control\nA01,DMSO,negative\nZZ99x,drug,treated\n")
    result = score_cli(sqlite_dir() / "cytominer_database_data_a.sqlite", model_dirs, bad, tmp_path / "out3")
    assert result.returncode == 2 and "bad.csv, row 3, column well" in result.stderr


def test_reader_standard_form_matches_the_database():
    table = open_cellprofiler(sqlite_dir() / "cytominer_database_data_a.sqlite", dna_stain="Hoechst")
    try:
        cells = table.read_features([INTENSITY, "Nuclei_AreaShape_Area"])
    finally:
        table.close()
    _, nuclei = _real_tables()
    assert len(cells) == len(nuclei)
    assert np.allclose(np.sort(cells[INTENSITY]), np.sort(nuclei["Nuclei_Intensity_MeanIntensity_Hoechst"]))
    assert set(cells["Metadata_Well"]) == {"A01", "A02", "A10", "A11"}
