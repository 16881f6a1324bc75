"""Z-scoring features against negative-control nuclei."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from morphotype import normalize
from morphotype.io import MorphotypeInputError

FEATURES = ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA", "Nuclei_Texture_Contrast_DNA_3_00_256"]


def _cells(n: int, *, plate: str, control: str, shift: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.normal([300.0, 0.2, 5.0], [60.0, 0.05, 2.0], size=(n, 3)) + shift * np.array([50.0, 0.04, 1.0])
    table = pd.DataFrame(values, columns=FEATURES)
    table.insert(0, "Metadata_Plate", plate)
    table.insert(1, "Metadata_Control", control)
    table["Nuclei_Location_Center_X"] = rng.uniform(0, 1344, n)
    return table


@pytest.fixture()
def screen() -> pd.DataFrame:
    parts = [
        _cells(200, plate="A", control="negative", shift=0.0, seed=1),
        _cells(80, plate="A", control="treated", shift=2.0, seed=2),
        _cells(150, plate="B", control="negative", shift=1.0, seed=3),
        _cells(60, plate="B", control="positive", shift=-1.0, seed=4),
    ]
    table = pd.concat(parts, ignore_index=True)
    table.loc[5, FEATURES[1]] = np.nan  # a failed measurement is ignored in the fit and stays NaN
    return table


def test_negative_controls_get_mean_0_and_sd_1(screen):
    scaler = normalize.fit_scaler(screen)
    assert list(scaler["feature"]) == FEATURES  # locations are not model features
    z = normalize.apply_scaler(screen, scaler)
    controls = z[z["Metadata_Control"] == "negative"][FEATURES]
    np.testing.assert_allclose(controls.mean(), 0, atol=1e-12)
    np.testing.assert_allclose(controls.std(ddof=0), 1, atol=1e-12)
    assert z[FEATURES].iloc[:, 1].isna().sum() == 1 and scaler["n"].tolist() == [350, 349, 350]
    treated = z[z["Metadata_Control"] == "treated"][FEATURES]
    assert (treated.mean() > 0.5).all()  # treated cells sit away from the controls
    pd.testing.assert_series_equal(z["Nuclei_Location_Center_X"], screen["Nuclei_Location_Center_X"])


def test_pycytominer_normalisation_matches_the_persisted_scaler(screen):
    normalised, scaler = normalize.normalize_to_controls(screen)
    assert list(normalised.columns) == list(screen.columns)
    pd.testing.assert_frame_equal(normalised, normalize.apply_scaler(screen, scaler), check_exact=False, atol=1e-10)


def test_per_plate_scalers_for_screens_like_jump(screen):
    normalised, scaler = normalize.normalize_to_controls(screen, group_by=["Metadata_Plate"])
    assert set(scaler["Metadata_Plate"]) == {"A", "B"} and len(scaler) == 2 * len(FEATURES)
    for plate in ("A", "B"):
        controls = normalised[(normalised["Metadata_Plate"] == plate) & (normalised["Metadata_Control"] == "negative")]
        np.testing.assert_allclose(controls[FEATURES].mean(), 0, atol=1e-12)
        np.testing.assert_allclose(controls[FEATURES].std(ddof=0), 1, atol=1e-12)
    pd.testing.assert_frame_equal(normalised, normalize.apply_scaler(screen, scaler), check_exact=False, atol=1e-10)
    with pytest.raises(MorphotypeInputError, match="no scaler fitted for group"):
        normalize.apply_scaler(screen.assign(Metadata_Plate="C"), scaler)


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".csv"])
def test_scaler_round_trip_applies_to_labelled_cells(screen, tmp_path, suffix):
    controls = screen[screen["Metadata_Control"] == "negative"]
    scaler = normalize.fit_scaler(controls)
    path = normalize.write_scaler(scaler, tmp_path / f"scaler{suffix}")
    loaded = normalize.read_scaler(path)
    pd.testing.assert_frame_equal(loaded, scaler, check_dtype=False)
    labelled = _cells(30, plate="L", control="treated", shift=0.5, seed=9)
    z = normalize.apply_scaler(labelled, loaded)
    expected = (labelled[FEATURES] - controls[FEATURES].mean()) / controls[FEATURES].std(ddof=0)
    np.testing.assert_allclose(z[FEATURES].to_numpy(), expected.to_numpy(), rtol=1e-9)


def test_bad_inputs_name_the_problem(screen, tmp_path):
    with pytest.raises(MorphotypeInputError, match="0 control cell"):
        normalize.fit_scaler(screen, samples="Metadata_Control == 'none'")
    with pytest.raises(MorphotypeInputError, match="samples query"):
        normalize.fit_scaler(screen, samples="Metadata_Nope == 1")
    scaler = normalize.fit_scaler(screen)
    with pytest.raises(MorphotypeInputError, match="missing column"):
        normalize.apply_scaler(screen.drop(columns=FEATURES[0]), scaler)
    bad = tmp_path / "bad.csv"
    bad.write_text("feature,mean\nx,1\n")
    with pytest.raises(MorphotypeInputError, match="bad.csv: missing column"):
        normalize.read_scaler(bad)
