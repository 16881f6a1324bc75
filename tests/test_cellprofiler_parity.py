"""Parity of morphotype.features.measure_nuclei with real CellProfiler (5.0 nightly).

Opt-in: runs only where the CellProfiler venv exists (``make cellprofiler-venv``); it is never
installed into the main venv. One synthetic frame with touching nuclei and two shared MitoCheck
crops go through CellProfiler once (~15 s); thresholds are what was measured on 3 frames and 40
crops (benchmarks/cellprofiler_parity.py), with margin only where CellProfiler's float32 pixels
leave round-off.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CELLPROFILER = REPO / ".venv-cellprofiler" / "bin" / "cellprofiler"

if not CELLPROFILER.exists():
    pytest.skip(f"optional CellProfiler venv missing ({CELLPROFILER}); build it with `make cellprofiler-venv`",
                allow_module_level=True)

from morphotype.features import FEATURE_NAMES, measure_nuclei  # noqa: E402

pytestmark = [pytest.mark.cellprofiler, pytest.mark.slow]

MAD = "Nuclei_Intensity_MADIntensity_DNA"


def _load_parity_module():
    spec = importlib.util.spec_from_file_location("cellprofiler_parity", REPO / "benchmarks" / "cellprofiler_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _load_parity_module()


@pytest.fixture(scope="module")
def measured(tmp_path_factory, crops_dir):
    """Ours (8-bit and CellProfiler's float32 pixels), CellProfiler's table and its centres."""
    workdir = tmp_path_factory.mktemp("cellprofiler")
    inputs = [parity.synthetic_frame(seed=7, n_nuclei=30, shape=(400, 520), touching=0.5)]
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    for row in manifest.sample(n=2, random_state=3).itertuples():
        inputs.append(parity.otsu_crop(crops_dir / row.phenotype / row.file))
    paths = [parity.write_frame(image, labels, workdir, f"image{i}") for i, (image, labels) in enumerate(inputs)]
    theirs = parity.run_cellprofiler([p[0] for p in paths], [p[1] for p in paths], workdir / "run")
    centres = parity.cellprofiler_centres([p[1] for p in paths])
    ours, ours_float32, mad4 = [], [], []
    for number, (image, labels) in enumerate(inputs, start=1):
        ours.append(measure_nuclei(image, labels).assign(ImageNumber=number))
        pixels = (image / 255.0).astype(np.float32).astype(np.float64)
        ours_float32.append(measure_nuclei(pixels, labels).assign(ImageNumber=number))
        mad = parity.cellprofiler4_mad(image, labels)
        mad4.append(pd.DataFrame({"ImageNumber": number, "ObjectNumber": mad.index, "mad4": mad.to_numpy()}))
    return {
        "ours": pd.concat(ours, ignore_index=True),
        "ours_float32": pd.concat(ours_float32, ignore_index=True),
        "mad4": pd.concat(mad4, ignore_index=True),
        "theirs": theirs,
        "centres": centres,
    }


def _family_table(ours, theirs, features=None):
    features = features or [n for n in FEATURE_NAMES if n != MAD]
    return parity.compare(ours, theirs, features).set_index("family")


def test_cellprofiler_table_has_every_study_feature(measured):
    theirs, ours = measured["theirs"], measured["ours"]
    assert set(FEATURE_NAMES) <= set(theirs.columns)
    assert len(theirs) == len(ours) >= 20
    # the frame has touching nuclei, so the Neighbors comparison below is not all zeros
    assert (theirs["Nuclei_Neighbors_NumberOfNeighbors_Adjacent"] > 0).sum() >= 5


def test_exact_families_match_cellprofiler(measured):
    table = _family_table(measured["ours_float32"], measured["theirs"])
    for family in ("AreaShape", "Zernike", "Texture", "Neighbors", "Intensity"):
        assert table.at[family, "max_rel"] <= 1e-9, (family, table.loc[family].to_dict())
        assert table.at[family, "nan_mismatch"] == 0, family


def test_granularity_matches_to_float32_round_off(measured):
    row = _family_table(measured["ours_float32"], measured["theirs"]).loc["Granularity"]
    assert row["median_rel"] <= 1e-6
    assert row["within_1e-6"] >= 0.9
    assert row["within_1e-3"] >= 0.99
    assert row["max_abs"] <= 1e-5  # granularity is in percent: 1e-7 of the image's signal


def test_intensity_on_8bit_image_matches_to_float32_precision(measured):
    row = _family_table(measured["ours"], measured["theirs"]).loc["Intensity"]
    assert row["median_rel"] <= 1e-6
    assert row["max_rel"] <= 1e-5


def test_mad_follows_cellprofiler_4(measured):
    """CellProfiler 5 switched MADIntensity to a true median; the study (4.2.4) used the n/2 formula."""
    merged = measured["ours"].merge(measured["mad4"], on=["ImageNumber", "ObjectNumber"])
    difference = parity.relative_difference(merged[MAD].to_numpy(), merged["mad4"].to_numpy())
    assert difference.max() <= 1e-5


def test_radial_distribution_differs_only_where_cellprofiler_picks_another_tied_centre(measured):
    centres = measured["centres"]
    assert len(centres) == len(measured["theirs"])
    assert (centres.loc[~centres["same_centre"], "ties"] > 1).all()
    radial = [n for n in FEATURE_NAMES if "_RadialDistribution_" in n]
    same = centres.loc[centres["same_centre"], ["ImageNumber", "ObjectNumber"]]
    assert len(same) >= 10
    row = parity.compare(measured["ours_float32"].merge(same), measured["theirs"].merge(same), radial).iloc[0]
    assert row["max_rel"] <= 1e-4, row.to_dict()
    assert row["nan_mismatch"] == 0


def test_run_cellprofiler_rejects_masks_with_gaps(tmp_path):
    image = np.zeros((32, 32), np.uint8)
    labels = np.zeros((32, 32), np.int32)
    labels[2:6, 2:6], labels[10:14, 10:14] = 1, 3
    image_path, labels_path = parity.write_frame(image, labels, tmp_path, "gappy")
    with pytest.raises(ValueError, match="1..N without gaps"):
        parity.run_cellprofiler([image_path], [labels_path], tmp_path / "run")
