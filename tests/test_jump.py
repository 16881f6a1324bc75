"""JUMP application: metadata, plate reading, scoring, KS enrichment and summaries.

Synthetic plates are SQLite files with the CPJUMP1 (cytominer-database) schema: an ``Image``
table (TableNumber, ImageNumber, Metadata_Plate, Metadata_Well, Metadata_Site, ...) and a
``Nuclei`` table (TableNumber, ImageNumber, ObjectNumber, Nuclei_* CellProfiler features), with
ImageNumber restarting in every TableNumber as in the real backends. Wells follow the real
compound platemap shipped in ``assets/jump``. Nuclei are ellipses whose AreaShape features are
computed from their axes; a planted compound (colchicine) makes most nuclei long and thin.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from morphotype import jump, models
from morphotype.io import MorphotypeInputError, read_table

MODEL_FEATURES = [f"Nuclei_AreaShape_{name}" for name in (
    "Area", "Perimeter", "MajorAxisLength", "MinorAxisLength", "Eccentricity", "FormFactor",
    "Compactness", "Solidity", "ConvexArea", "Extent", "EquivalentDiameter", "MaxFeretDiameter",
    "MinFeretDiameter", "Orientation")]
PLATE_LACKS = "Nuclei_AreaShape_ConvexArea"  # as in the real CPJUMP1 plates (CellProfiler 4.0)
EXTRA_PLATE_FEATURES = ["Nuclei_Intensity_MeanIntensity_DNA", "Nuclei_Location_Center_X",
                        "Nuclei_Location_Center_Y", "Nuclei_Number_Object_Number"]
SHAPES = {  # equivalent radius (mean, sd) in pixels, minor/major axis ratio range, solidity range
    "Interphase": ((9.0, 1.0), (0.75, 1.0), (0.95, 0.99)),
    "Elongated": ((9.0, 1.0), (0.2, 0.45), (0.93, 0.98)),
    "Large": ((15.0, 1.5), (0.75, 1.0), (0.95, 0.99)),
    "SmallIrregular": ((5.0, 0.7), (0.5, 0.9), (0.80, 0.90)),
}
NORMAL_MIX = {"Interphase": 0.88, "Elongated": 0.04, "Large": 0.04, "SmallIrregular": 0.04}
PLANTED_MIX = {"Interphase": 0.15, "Elongated": 0.8, "Large": 0.025, "SmallIrregular": 0.025}
COMPOUND_MAP = "JUMP-Target-1_compound_platemap"
PLANTED = "colchicine"
PLATES = ("BR00116991", "BR00116992")  # both A549, 24 h, compound platemap


def nucleus_features(rng: np.random.Generator, n: int, shape: str, pixel_scale: float = 1.0) -> pd.DataFrame:
    """CellProfiler AreaShape features of ``n`` elliptic nuclei of one shape class."""
    (radius_mean, radius_sd), (ratio_low, ratio_high), (sol_low, sol_high) = SHAPES[shape]
    radius = np.clip(rng.normal(radius_mean, radius_sd, n), 2.0, None) * pixel_scale
    ratio = rng.uniform(ratio_low, ratio_high, n)
    a, b = radius / np.sqrt(ratio), radius * np.sqrt(ratio)  # semi-axes, area = pi r^2
    theta = rng.uniform(0, np.pi, n)
    solidity = rng.uniform(sol_low, sol_high, n)
    area = np.pi * a * b * solidity
    perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))) / np.sqrt(solidity)
    width = 2 * np.sqrt((a * np.cos(theta)) ** 2 + (b * np.sin(theta)) ** 2)
    height = 2 * np.sqrt((a * np.sin(theta)) ** 2 + (b * np.cos(theta)) ** 2)
    noise = lambda: rng.normal(1.0, 0.02, n)  # noqa: E731 - measurement noise
    return pd.DataFrame({
        "Nuclei_AreaShape_Area": np.round(area),
        "Nuclei_AreaShape_Perimeter": perimeter * noise(),
        "Nuclei_AreaShape_MajorAxisLength": 2 * a * noise(),
        "Nuclei_AreaShape_MinorAxisLength": 2 * b * noise(),
        "Nuclei_AreaShape_Eccentricity": np.sqrt(1 - (b / a) ** 2),
        "Nuclei_AreaShape_FormFactor": 4 * np.pi * area / perimeter ** 2,
        "Nuclei_AreaShape_Compactness": (a ** 2 + b ** 2) / (2 * a * b) * noise(),
        "Nuclei_AreaShape_Solidity": solidity,
        "Nuclei_AreaShape_ConvexArea": np.round(area / solidity),
        "Nuclei_AreaShape_Extent": area / (width * height),
        "Nuclei_AreaShape_EquivalentDiameter": 2 * np.sqrt(area / np.pi),
        "Nuclei_AreaShape_MaxFeretDiameter": 2 * a * noise(),
        "Nuclei_AreaShape_MinFeretDiameter": 2 * b * noise(),
        "Nuclei_AreaShape_Orientation": np.degrees(theta) - 90,
    })


def mixture(rng: np.random.Generator, n: int, mix: dict[str, float], pixel_scale: float = 1.0) -> pd.DataFrame:
    counts = rng.multinomial(n, list(mix.values()))
    parts = [nucleus_features(rng, k, shape, pixel_scale) for shape, k in zip(mix, counts) if k]
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=int(rng.integers(1 << 31)))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Final and shuffled-baseline AreaShape models (morphotype.models) trained on MitoCheck-like
    nuclei: labelled cells of four shapes plus unlabelled negative-control cells for the scaler."""
    rng = np.random.default_rng(1)
    labelled = pd.concat([nucleus_features(rng, 300, shape).assign(Metadata_Phenotype=shape) for shape in SHAPES],
                         ignore_index=True)
    controls = mixture(rng, 2000, NORMAL_MIX).assign(Metadata_Phenotype=None, Metadata_Negcon=True)
    table = pd.concat([labelled.assign(Metadata_Negcon=False), controls], ignore_index=True)
    table["Metadata_CellID"] = [f"cell{i}" for i in range(len(table))]
    table["Metadata_ImageID"] = [f"image{i // 25}" for i in range(len(table))]
    data = models.prepare_data(table, "CP_areashape")
    assert data.features == MODEL_FEATURES
    folder = tmp_path_factory.mktemp("models")
    dirs = []
    for shuffled in (False, True):
        model = models.train_model(data, np.ones(len(data.X), bool), hyperparameters=(0.1, 0.3), shuffled=shuffled,
                                   random_state=0, n_jobs=1, progress=False)
        dirs.append(models.save_model(model, folder / model.model_id))
    return dirs[0], dirs[1]


def plate_layout(wells: pd.DataFrame, rng: np.random.Generator) -> dict[str, tuple[int, dict]]:
    """Well -> (cell count, shape mixture): every DMSO well, the planted compound, a few others."""
    platemap = wells[wells["Metadata_PlateMap"] == COMPOUND_MAP]
    negcon = platemap[platemap["Metadata_control_type"] == "negcon"]["Metadata_Well"].tolist()
    planted = platemap[platemap["Metadata_Treatment"] == PLANTED]["Metadata_Well"].tolist()
    others = platemap[(platemap["Metadata_pert_type"] == "trt")
                      & (platemap["Metadata_Treatment"] != PLANTED)]["Metadata_Well"].tolist()
    layout = {well: (int(rng.integers(66, 90)), NORMAL_MIX) for well in negcon}
    layout[negcon[0]] = (40, NORMAL_MIX)  # too few cells: dropped from the controls too
    layout.update({well: (90, PLANTED_MIX) for well in planted})
    chosen = others[:12]
    layout.update({well: (int(rng.integers(66, 90)), NORMAL_MIX) for well in chosen[:9]})
    layout.update({chosen[9]: (30, NORMAL_MIX), chosen[10]: (50, NORMAL_MIX), chosen[11]: (51, NORMAL_MIX)})
    return layout


def write_plate(path: Path, plate: str, layout: dict[str, tuple[int, dict]], seed: int,
                pixel_scale: float = 1.6, sites: int = 3) -> Path:
    """A CPJUMP1-schema SQLite plate: one TableNumber per well, ImageNumber restarting at 1."""
    rng = np.random.default_rng(seed)
    image_rows, nuclei = [], []
    for well, (n_cells, mix) in layout.items():
        table_number = hashlib.md5(f"{plate}/{well}".encode()).hexdigest()
        cells = mixture(rng, n_cells, mix, pixel_scale)
        site_of_cell = np.sort(rng.integers(1, sites + 1, n_cells))
        for site in range(1, sites + 1):
            chunk = cells[site_of_cell == site].reset_index(drop=True)
            image_rows.append({"TableNumber": table_number, "ImageNumber": site, "Metadata_Plate": plate,
                               "Metadata_Well": well, "Metadata_Site": site,
                               "Image_Count_Nuclei": len(chunk),
                               "Image_FileName_OrigDNA": f"r01c01f{site:02d}p01-ch5sk1fk1fl1.tiff"})
            chunk.insert(0, "ObjectNumber", np.arange(1, len(chunk) + 1))
            chunk.insert(0, "ImageNumber", site)
            chunk.insert(0, "TableNumber", table_number)
            chunk["Nuclei_Number_Object_Number"] = chunk["ObjectNumber"]
            chunk["Nuclei_Location_Center_X"] = rng.uniform(0, 1080, len(chunk))
            chunk["Nuclei_Location_Center_Y"] = rng.uniform(0, 1080, len(chunk))
            chunk["Nuclei_Intensity_MeanIntensity_DNA"] = rng.uniform(0.01, 0.2, len(chunk))
            nuclei.append(chunk)
    nuclei_table = pd.concat(nuclei, ignore_index=True).drop(columns=PLATE_LACKS)
    with sqlite3.connect(path) as connection:
        pd.DataFrame(image_rows).to_sql("Image", connection, index=False)
        nuclei_table.to_sql("Nuclei", connection, index=False, chunksize=5000)
    connection.close()
    return path


@pytest.fixture(scope="module")
def metadata():
    return jump.load_metadata()


@pytest.fixture(scope="module")
def synthetic_plates(tmp_path_factory, metadata) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plates")
    _, wells = metadata
    return {plate: write_plate(folder / f"{plate}.sqlite", plate, plate_layout(wells, np.random.default_rng(i)),
                               seed=10 + i)
            for i, plate in enumerate(PLATES)}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, synthetic_plates, model_dirs) -> dict:
    final, shuffled = model_dirs
    outdir = tmp_path_factory.mktemp("scored")
    summaries = {plate: jump.score_plate(path, final, shuffled, outdir, chunk_size=1000,
                                         keep_cells=(plate == PLATES[0]))
                 for plate, path in synthetic_plates.items()}
    overall = jump.summarise([outdir], outdir / "summary", top_n=5)
    return {"outdir": outdir, "plates": summaries, "summary": overall}


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def test_shipped_metadata_is_derived_from_the_cpjump1_tables(shared_dir, tmp_path):
    source = shared_dir / "data" / "jump_cpjump1_metadata"
    plates, wells = jump.build_metadata(source)
    jump.write_metadata(plates, wells, tmp_path)
    rebuilt = jump.load_metadata(tmp_path / "plates.csv", tmp_path / "wells.csv")
    shipped = jump.load_metadata()
    for got, expected in zip(rebuilt, shipped):
        pd.testing.assert_frame_equal(got, expected)

    plates, wells = shipped
    barcodes = pd.read_csv(source / "barcode_platemap.csv")
    assert len(plates) == len(barcodes) == plates["Metadata_Plate"].nunique() == 51  # one row per plate
    assert set(plates["Metadata_Batch"]) == {jump.BATCH}
    assert plates.groupby("Metadata_Perturbation").size().to_dict() == {"compound": 24, "crispr": 18, "orf": 9}
    assert set(plates["Metadata_CellType"]) == {"A549", "U2OS"}
    locations = plates[["Metadata_SQLite", "Metadata_Plate"]].itertuples(index=False)
    assert all(url.endswith(f"/{barcode}/{barcode}.sqlite") for url, barcode in locations)
    negcon = wells[wells["Metadata_control_type"] == "negcon"].groupby("Metadata_PlateMap")
    assert negcon.size().to_dict() == {COMPOUND_MAP: 64, "JUMP-Target-1_crispr_platemap": 60,
                                       "JUMP-Target-1_orf_platemap": 60}
    assert set(negcon.get_group(COMPOUND_MAP)["Metadata_Treatment"]) == {"DMSO"}
    assert negcon.get_group("JUMP-Target-1_orf_platemap")["Metadata_broad_sample"].nunique() == 15
    crispr = negcon.get_group("JUMP-Target-1_crispr_platemap")["Metadata_negcon_control_type"]
    assert crispr.notna().all() and crispr.str.contains("NO_SITE|INTERGENIC").all()
    assert (wells.groupby("Metadata_PlateMap").size() == 384).all()
    assert (wells["Metadata_pert_type"] == "empty").sum() == 8  # 4 untreated wells on CRISPR/ORF maps


def test_duplicate_metadata_trap_is_caught(shared_dir):
    source = shared_dir / "data" / "jump_cpjump1_metadata"
    experiment = pd.read_csv(source / "experiment-metadata.tsv", sep="\t")
    repeated = experiment["Assay_Plate_Barcode"].value_counts()
    assert (repeated > 1).sum() == 16  # the trap exists in the source table
    with pytest.raises(MorphotypeInputError, match=r"duplicate rows; 16 key\(s\)"):
        jump.build_metadata(source, batch=None)

    plates, wells = jump.load_metadata()
    with pytest.raises(MorphotypeInputError, match="must be unique"):
        jump.load_metadata(pd.concat([plates, plates.iloc[[3]]]), wells)
    with pytest.raises(MorphotypeInputError, match="must be unique"):
        jump.load_metadata(plates, pd.concat([wells, wells.iloc[[0]]]))


# ---------------------------------------------------------------------------------------------
# Scoring and enrichment
# ---------------------------------------------------------------------------------------------

def test_planted_elongation_is_enriched_with_the_final_model_only(scored):
    top = read_table(Path(scored["summary"]["outputs"]["enrichment_top"]))
    enrichment = read_table(Path(scored["summary"]["outputs"]["enrichment"]))
    condition = ((enrichment["Metadata_Perturbation"] == "compound") & (enrichment["Metadata_CellType"] == "A549")
                 & (enrichment["Metadata_Time"] == 24) & (enrichment["Metadata_Phenotype"] == "Elongated"))
    final = enrichment[condition & (enrichment["Metadata_Model"] == "final")].set_index("Metadata_Treatment")
    shuffled = enrichment[condition & (enrichment["Metadata_Model"] == "shuffled")].set_index("Metadata_Treatment")

    planted = final.loc[PLANTED]
    assert planted["n_wells"] == 2 and planted["n_plates"] == 2  # one replicate well per plate
    assert planted["enriched"] and planted["rank"] == 1
    assert planted["median_ks_d"] > 0.6 and planted["median_shift"] > 0.5 and planted["q"] < 1e-6
    others = final.drop(index=PLANTED)
    assert not others["enriched"].any() and others["median_ks_d"].max() < 0.35
    top_final = top[(top["Metadata_Model"] == "final") & (top["Metadata_Phenotype"] == "Elongated")]
    assert top_final["Metadata_Treatment"].tolist() == [PLANTED]

    # the shuffled baseline's probabilities barely move (its D may still be large: KS is rank-based)
    assert not shuffled.loc[PLANTED, "enriched"]
    assert abs(shuffled.loc[PLANTED, "median_shift"]) < 0.1
    assert not top[top["Metadata_Model"] == "shuffled"]["Metadata_Treatment"].eq(PLANTED).any()


def test_wells_with_50_cells_or_fewer_are_skipped_and_counted(scored, metadata):
    _, wells = metadata
    plate_summary = scored["plates"][PLATES[0]]
    layout = plate_layout(wells, np.random.default_rng(0))
    expected_skipped = {well for well, (n, _) in layout.items() if n <= jump.MIN_CELLS}
    skipped = {row["Metadata_Well"]: row["n_cells"] for row in plate_summary["wells_skipped_low_count"]}
    assert set(skipped) == expected_skipped and len(expected_skipped) == 3  # 30, 50 (treated), 40 (DMSO)
    assert plate_summary["n_wells_skipped_low_count"] == 3
    assert plate_summary["n_wells_with_cells"] == len(layout)
    ks = read_table(scored["outdir"] / f"{PLATES[0]}.ks.parquet")
    tested = set(ks["Metadata_Well"])
    assert not tested & expected_skipped
    assert min(layout[w][0] for w in tested) == 51
    negcon_wells = [w for w, (n, _) in layout.items()
                    if wells.set_index(["Metadata_PlateMap", "Metadata_Well"]).loc[(COMPOUND_MAP, w),
                                                                                   "Metadata_control_type"] == "negcon"]
    assert plate_summary["n_negcon_wells_used"] == len(negcon_wells) - 1  # the 40-cell DMSO well is out
    n_controls = sum(layout[w][0] for w in negcon_wells if layout[w][0] > jump.MIN_CELLS)
    assert (ks["n_control"] == n_controls).all()
    assert plate_summary["n_wells_tested"] == ks["Metadata_Well"].nunique() == len(tested)
    profiles = read_table(scored["outdir"] / f"{PLATES[0]}.profiles.parquet")
    assert set(profiles["Metadata_Well"]) == set(layout) - expected_skipped  # controls included
    assert (profiles["Metadata_CellCount"] > jump.MIN_CELLS).all()


def test_missing_features_are_reported_and_extra_ones_ignored(scored):
    plate_summary = scored["plates"][PLATES[0]]
    assert plate_summary["missing_features"] == [PLATE_LACKS]
    assert scored["summary"]["missing_features"] == {plate: [PLATE_LACKS] for plate in PLATES}
    assert not set(EXTRA_PLATE_FEATURES) & set(plate_summary["model_features"]["final"])
    assert plate_summary["n_cells_dropped_missing_values"] == 0


def test_probabilities_match_an_independent_pycytominer_computation(scored, synthetic_plates, model_dirs):
    """Per cell, keyed by Metadata_CellID: pycytominer negcon standardisation + model = our output."""
    from pycytominer import normalize

    final = models.load_model(model_dirs[0])
    plate = PLATES[0]
    with sqlite3.connect(synthetic_plates[plate]) as connection:
        cells = pd.read_sql("SELECT i.Metadata_Plate, i.Metadata_Well, i.Metadata_Site, n.* FROM Nuclei n "
                            "JOIN Image i ON n.TableNumber = i.TableNumber AND n.ImageNumber = i.ImageNumber",
                            connection)
    connection.close()
    _, wells = jump.load_metadata()
    cells = cells.merge(wells[wells["Metadata_PlateMap"] == COMPOUND_MAP][["Metadata_Well", "Metadata_control_type"]],
                        on="Metadata_Well", how="left", validate="many_to_one")
    present = [f for f in MODEL_FEATURES if f in cells.columns]
    normalised = normalize(profiles=cells, features=present,
                           meta_features=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "TableNumber",
                                          "ImageNumber", "ObjectNumber", "Metadata_control_type"],
                           samples="Metadata_control_type == 'negcon'", method="standardize")
    normalised[PLATE_LACKS] = 0.0
    logits = normalised[final.features].to_numpy() @ final.coef.T + final.intercept
    expected = pd.DataFrame(softmax(logits, axis=1), columns=final.classes)
    expected["Metadata_CellID"] = [f"{plate}_{w}_{s}_{t}_{i}_{o}" for w, s, t, i, o in normalised[
        ["Metadata_Well", "Metadata_Site", "TableNumber", "ImageNumber", "ObjectNumber"]].itertuples(index=False)]

    ours = read_table(scored["outdir"] / f"{plate}.cells.parquet")
    ours = ours[ours["Metadata_Model"] == "final"]
    assert ours["Metadata_CellID"].is_unique and len(ours) == len(expected)
    joined = ours.merge(expected, on="Metadata_CellID", suffixes=("", "_expected"), validate="one_to_one")
    assert len(joined) == len(expected)
    for phenotype in final.classes:
        np.testing.assert_allclose(joined[phenotype], joined[f"{phenotype}_expected"], atol=1e-6)


def test_results_do_not_depend_on_chunk_size(scored, synthetic_plates, model_dirs, tmp_path):
    final, shuffled = model_dirs
    plate = PLATES[1]
    reference = scored["outdir"]
    for chunk_size in (257, 4096):
        out = tmp_path / str(chunk_size)
        jump.score_plate(synthetic_plates[plate], final, shuffled, out, chunk_size=chunk_size)
        for kind in ("ks", "profiles"):
            pd.testing.assert_frame_equal(read_table(out / f"{plate}.{kind}.parquet"),
                                          read_table(reference / f"{plate}.{kind}.parquet"), check_exact=True)


def test_ks_sampling_follows_the_paper():
    rng = np.random.default_rng(0)
    control_wells = np.repeat([0, 1, 2], [100, 50, 50])
    treated, controls = jump.sample_for_ks(30, control_wells, rng)
    assert np.array_equal(treated, np.arange(30))  # all treated cells kept
    per_well = np.bincount(control_wells[controls])
    assert per_well.tolist() == [round(0.15 * 100), round(0.15 * 50), round(0.15 * 50)]  # stratified by well
    assert len(set(controls)) == len(controls)
    treated, controls = jump.sample_for_ks(500, control_wells, np.random.default_rng(0))
    assert np.array_equal(controls, np.arange(200)) and len(set(treated)) == 200 and treated.max() < 500
    again, _ = jump.sample_for_ks(500, control_wells, np.random.default_rng(0))
    assert np.array_equal(treated, again)  # seeded
    assert jump.combine_replicate_pvalues(np.array([0.01, 0.03])) == pytest.approx(0.04)
    assert jump.combine_replicate_pvalues(np.array([0.2])) == 0.2
    assert jump.combine_replicate_pvalues(np.array([0.9, 0.8])) == 1.0


def test_summary_refuses_a_plate_counted_twice(scored, tmp_path):
    plate = PLATES[0]
    copy = tmp_path / "again"
    copy.mkdir()
    for name in (f"{plate}.summary.json", f"{plate}.ks.parquet", f"{plate}.profiles.parquet"):
        shutil.copy(scored["outdir"] / name, copy / name)
    with pytest.raises(MorphotypeInputError, match="more than once"):
        jump.summarise([scored["outdir"], copy], tmp_path / "out")


def test_bad_plates_raise_clear_errors(tmp_path, synthetic_plates, model_dirs):
    final, shuffled = model_dirs
    broken = tmp_path / "no_nuclei.sqlite"
    with sqlite3.connect(broken) as connection:
        connection.execute("CREATE TABLE Image (TableNumber TEXT, ImageNumber INTEGER, Metadata_Well TEXT)")
    connection.close()
    with pytest.raises(MorphotypeInputError, match="no_nuclei.sqlite: no Nuclei table"):
        jump.score_plate(broken, final, shuffled, tmp_path / "out")
    with pytest.raises(MorphotypeInputError, match="expected 'BR00116993'"):
        jump.score_plate(synthetic_plates[PLATES[0]], final, shuffled, tmp_path / "out", plate="BR00116993")
    with pytest.raises(MorphotypeInputError, match="does not exist"):
        jump.score_plate(tmp_path / "absent.sqlite", final, shuffled, tmp_path / "out")
    with pytest.raises(MorphotypeInputError, match="is a shuffled baseline but was given as the final model"):
        jump.score_plate(synthetic_plates[PLATES[0]], shuffled, final, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Remote plates
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def http_root(tmp_path):
    """A loopback HTTP server over a folder (path-style, like an anonymous S3 endpoint)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _same_results(out: Path, reference: Path, plate: str) -> None:
    for kind in ("ks", "profiles"):
        pd.testing.assert_frame_equal(read_table(out / f"{plate}.{kind}.parquet"),
                                      read_table(reference / f"{plate}.{kind}.parquet"))


def test_plates_are_read_from_http_and_s3_urls(http_root, scored, synthetic_plates, model_dirs, tmp_path,
                                               monkeypatch):
    root, base = http_root
    final, shuffled = model_dirs
    plate = PLATES[1]
    key = f"cpg0000-jump-pilot/source_4/workspace/backend/2020_11_04_CPJUMP1/{plate}/{plate}.sqlite"
    (root / "cellpainting-gallery" / key).parent.mkdir(parents=True)
    shutil.copy(synthetic_plates[plate], root / "cellpainting-gallery" / key)

    out = tmp_path / "https"
    jump.score_plate(f"{base}/cellpainting-gallery/{key}", final, shuffled, out, chunk_size=1000)
    _same_results(out, scored["outdir"], plate)
    assert not list((out / ".cache").glob("*.sqlite"))  # the download is removed after scoring

    public = f"https://cellpainting-gallery.s3.amazonaws.com/{key}"
    assert jump._remote_url(f"s3://cellpainting-gallery/{key}") == public
    monkeypatch.setenv("AWS_ENDPOINT_URL", base)
    out = tmp_path / "s3"
    jump.score_plate(f"s3://cellpainting-gallery/{key}", final, shuffled, out, chunk_size=1000,
                     cache_dir=tmp_path / "cache", keep_download=True)
    _same_results(out, scored["outdir"], plate)
    assert (tmp_path / "cache" / f"{plate}.sqlite").is_file()
    with pytest.raises(MorphotypeInputError, match="cannot download"):
        jump.score_plate(f"s3://cellpainting-gallery/absent/{plate}.sqlite", final, shuffled, tmp_path / "x")


def test_fetch_plate_goes_through_the_downloader_and_resumes(tmp_path):
    from morphotype.download import FetchOptions
    from morphotype.testing import LoopbackFileServer

    served = tmp_path / "served"
    served.mkdir()
    data = np.random.default_rng(0).bytes(400_000)
    (served / "BR00116991.sqlite").write_bytes(data)
    options = FetchOptions(timeout=2.0, retries=3, backoff=0.01)
    with LoopbackFileServer(served, faults=["truncate"]) as server:
        url = f"{server.url}/BR00116991.sqlite"
        path, downloaded = jump.fetch_plate(url, tmp_path / "cache", options=options)
        requests = list(server.requests)
        server.reset_counters()
        again, downloaded_again = jump.fetch_plate(url, tmp_path / "cache", options=options)
        assert server.requests == []  # the plate cache is reused
    assert downloaded and not downloaded_again and again == path == tmp_path / "cache" / "BR00116991.sqlite"
    assert path.read_bytes() == data and not list((tmp_path / "cache").glob("*.part"))
    (_, first, truncated), (_, resumed, status) = requests
    assert (first, truncated, status) == ("", "truncate", "206")
    assert resumed.startswith("bytes=") and resumed != "bytes=0-"  # the truncated half was kept


def _python_with_moto() -> str | None:
    for candidate in ("python3", "python"):
        path = shutil.which(candidate)
        if path and subprocess.run([path, "-c", "import moto.server"], capture_output=True).returncode == 0:
            return path
    return None


def test_plate_is_read_from_a_moto_s3_server(scored, synthetic_plates, model_dirs, tmp_path, monkeypatch):
    python = _python_with_moto()
    if python is None:  # transport only; the S3 code path is also covered by the loopback test
        pytest.skip("no python with moto on PATH")
    port = _free_port()
    server = subprocess.Popen([python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        plate = PLATES[1]
        key = f"cpg0000-jump-pilot/source_4/workspace/backend/2020_11_04_CPJUMP1/{plate}/{plate}.sqlite"
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/cellpainting-gallery", method="PUT"))
        body = synthetic_plates[plate].read_bytes()
        urllib.request.urlopen(urllib.request.Request(  # public-read, like the Cell Painting Gallery
            f"{endpoint}/cellpainting-gallery/{key}", data=body, method="PUT",
            headers={"x-amz-acl": "public-read", "Content-Type": "application/octet-stream"}))
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        final, shuffled = model_dirs
        out = tmp_path / "moto"
        summary = jump.score_plate(f"s3://cellpainting-gallery/{key}", final, shuffled, out, chunk_size=1000)
        assert summary["source"] == f"s3://cellpainting-gallery/{key}"
        _same_results(out, scored["outdir"], plate)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_summary_json_records_method_and_outputs(scored, tmp_path):
    summary = json.loads((scored["outdir"] / "summary" / "summary.json").read_text())
    assert summary["plates"] == list(PLATES) and summary["p_combination"] == jump.P_COMBINATION
    assert summary["median_ks_d"]["final"]["A549"] > 0
    assert summary["n_enriched"] == {"final": 1, "shuffled": 0}
    for name in summary["outputs"].values():
        assert Path(name).exists()
    # treatments by name (pools e.g. the CRISPR guides of a gene): same single enriched compound
    by_name = jump.summarise([scored["outdir"]], tmp_path, treatment_key="Metadata_Treatment")
    top = read_table(Path(by_name["outputs"]["enrichment_top"]))
    assert top[top["Metadata_Model"] == "final"]["Metadata_Treatment"].tolist() == [PLANTED]


def test_run_scores_every_listed_plate_with_the_runs_models(tmp_path, synthetic_plates, model_dirs, crops_dir,
                                                             scored):
    """`morphotype run` with jump_plates: one score per plate with <outdir>/models, then the summary."""
    import yaml

    from morphotype.cli import main

    final, shuffled = model_dirs
    outdir = tmp_path / "out"
    for model in (final, shuffled):
        shutil.copytree(model, outdir / "models" / model.name)
    family = final.name.removesuffix("__final")
    assert shuffled.name == f"{family}__shuffled"
    plate_list = tmp_path / "plates.txt"
    plate_list.write_text("# CPJUMP1 plates\n" + "\n".join(str(p) for p in synthetic_plates.values()) + "\n")
    image = sorted((crops_dir / "Interphase").glob("*.png"))[0]
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame({"image": [str(image)], "plate": ["P"], "well": ["1"], "site": [1], "frame": [0]}).to_csv(
        sheet, index=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"input": str(sheet), "remove_edge_objects": False, "train_models": False,
                                      "jump_plates": str(plate_list), "jump_model": family, "jump_top_n": 5}))
    assert main(["run", str(params), "--outdir", str(outdir), "--workers", "1"]) == 0
    for plate in PLATES:
        assert (outdir / "jump" / "plates" / f"{plate}.summary.json").is_file()
    enrichment = read_table(outdir / "jump" / "summary" / "enrichment.parquet")
    expected = read_table(scored["outdir"] / "summary" / "enrichment.parquet")
    pd.testing.assert_frame_equal(enrichment, expected)  # the same as scoring plate by plate
    html = (outdir / "report" / "index.html").read_text()
    assert 'id="jump"' in html and PLANTED in html


def test_a_tree_model_from_a_models_folder_scores_plates(tmp_path, synthetic_plates):
    """JUMP with another family: the models folder's recommended model (gradient-boosted trees)
    and its shuffled baseline; the planted elongation is found by the trees only."""
    from morphotype.selection import train_families, write_families

    rng = np.random.default_rng(2)
    labelled = pd.concat([nucleus_features(rng, 150, shape).assign(Metadata_Phenotype=shape) for shape in SHAPES],
                         ignore_index=True)
    controls = mixture(rng, 1000, NORMAL_MIX).assign(Metadata_Phenotype=None, Metadata_Negcon=True)
    table = pd.concat([labelled.assign(Metadata_Negcon=False), controls], ignore_index=True)
    table["Metadata_CellID"] = [f"cell{i}" for i in range(len(table))]
    table["Metadata_ImageID"] = [f"image{i // 20}" for i in range(len(table))]
    data = models.prepare_data(table, "CP_areashape")
    split = models.split_cells(data.metadata, method="image", test_size=0.2, random_state=1)
    candidates, recommended = train_families(
        data, split, families=("hgb",), ensemble=False, cv_folds=3, loio_folds=2, n_jobs=1,
        grids={"hgb": [{"max_iter": 20, "learning_rate": 0.3, "max_leaf_nodes": 7}]})
    assert recommended["model_id"] == "CP_areashape__balanced__hgb__final"
    folder = tmp_path / "models"
    write_families(candidates, recommended, folder, tmp_path / "evaluation")
    outdir = tmp_path / "scored"
    for plate, path in synthetic_plates.items():
        summary = jump.score_plate(path, folder, folder, outdir, chunk_size=1000)
        assert summary["models"] == {"final": recommended["model_id"], "shuffled": recommended["shuffled_model_id"]}
    overall = jump.summarise([outdir], outdir / "summary", top_n=5)
    enrichment = read_table(Path(overall["outputs"]["enrichment"]))
    elongated = enrichment[(enrichment["Metadata_Phenotype"] == "Elongated")
                           & (enrichment["Metadata_Perturbation"] == "compound")]
    final = elongated[elongated["Metadata_Model"] == "final"].set_index("Metadata_Treatment")
    shuffled = elongated[elongated["Metadata_Model"] == "shuffled"].set_index("Metadata_Treatment")
    assert final.loc[PLANTED, "enriched"] and final.loc[PLANTED, "rank"] == 1
    assert not shuffled.loc[PLANTED, "enriched"]
