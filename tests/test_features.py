"""Nucleus features: names, geometry, intensities, neighbours, NaN rules, parity with cp-measure."""

from __future__ import annotations

import warnings

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import skimage.morphology
from cp_measure.bulk import get_core_measurements, get_multimask_measurements
from cp_measure.core.measuregranularity import get_granularity
from skimage.draw import disk, ellipse
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.segmentation import relabel_sequential, watershed

from morphotype import features
from morphotype.features import FEATURE_NAMES, OBJECT_COLUMNS, measure_nuclei

CP_MEASURE = get_core_measurements(legacy=True)


def _families(names):
    groups = {}
    for name in names:
        parts = name.split("_")
        family = "Zernike" if parts[2] == "Zernike" else parts[1]
        groups.setdefault(family, []).append(name)
    return groups


def _frame(seed=0, n=25, shape=(260, 300), touching=False):
    """Synthetic nuclei: textured ellipses on a noisy background (touching cells if asked)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(2000):
        if k == n:
            break
        centre = rng.uniform(12, np.array(shape) - 12)
        rr, cc = ellipse(*centre, rng.uniform(5, 14), rng.uniform(4, 10), shape=shape, rotation=rng.uniform(0, np.pi))
        if labels[rr, cc].any():
            continue
        k += 1
        labels[rr, cc] = k
    if touching:  # grow every nucleus into its Voronoi cell, capped at 10 pixels
        distance = ndi.distance_transform_edt(labels == 0)
        labels = watershed(distance, labels, mask=distance <= 10)
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    image = np.where(labels > 0, 0.5 + 0.3 * texture, 0.05) + rng.normal(0, 0.01, shape)
    image = np.clip(ndi.gaussian_filter(image, 0.7), 0, 1)
    return (image * 255).astype(np.uint8), labels


# ------------------------------------------------------------------------------------------
# names


def test_feature_names_are_the_papers_157_in_documented_order():
    assert len(FEATURE_NAMES) == 157 == len(set(FEATURE_NAMES))
    assert all(name.startswith("Nuclei_") for name in FEATURE_NAMES)
    groups = _families(FEATURE_NAMES)
    assert {family: len(names) for family, names in groups.items()} == {
        "AreaShape": 25,
        "Zernike": 30,
        "Granularity": 16,
        "Intensity": 15,
        "Neighbors": 7,
        "RadialDistribution": 12,
        "Texture": 52,
    }
    # families are contiguous blocks in this order
    order = list(dict.fromkeys(_families([n]).popitem()[0] for n in FEATURE_NAMES))
    assert order == ["AreaShape", "Zernike", "Granularity", "Intensity", "Neighbors", "RadialDistribution", "Texture"]
    assert groups["Granularity"] == [f"Nuclei_Granularity_{i}_DNA" for i in range(1, 17)]
    assert groups["Zernike"][:4] == [f"Nuclei_AreaShape_Zernike_{n}_{m}" for n, m in ((0, 0), (1, 1), (2, 0), (2, 2))]
    assert all(int(n) <= 9 and int(m) <= int(n) and (int(n) - int(m)) % 2 == 0
               for n, m in (name.split("_")[-2:] for name in groups["Zernike"]))
    assert "Nuclei_AreaShape_ConvexArea" in groups["AreaShape"]
    assert "Nuclei_Neighbors_NumberOfNeighbors_Adjacent" in groups["Neighbors"]
    assert "Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent" in groups["Neighbors"]
    assert all(name.endswith("_Adjacent") for name in groups["Neighbors"])
    assert groups["RadialDistribution"][:5] == [
        f"Nuclei_RadialDistribution_FracAtD_DNA_{b}of4" for b in range(1, 5)
    ] + ["Nuclei_RadialDistribution_MeanFrac_DNA_1of4"]
    assert groups["Texture"][:5] == [
        f"Nuclei_Texture_AngularSecondMoment_DNA_3_{a:02d}_256" for a in range(4)
    ] + ["Nuclei_Texture_Contrast_DNA_3_00_256"]
    assert all(name.endswith("_DNA") for name in groups["Intensity"] + groups["Granularity"])


def test_columns_dtypes_and_noncontiguous_ids():
    image, labels = _frame(seed=1, n=6)
    ids = np.array([0, 7, 3, 42, 10**7, 9, 5])  # label k -> ids[k]; 10**7 > pixel count
    table = measure_nuclei(image, ids[labels])
    assert list(table.columns) == OBJECT_COLUMNS + FEATURE_NAMES
    assert all(dtype == np.float64 for dtype in table.dtypes)
    assert table["ObjectNumber"].tolist() == sorted(ids[1:].tolist())
    # the same objects numbered 1..6 give the same features, row by row
    plain = measure_nuclei(image, labels).set_index(pd.Index(ids[1:7])).sort_index()
    renumbered = table.set_index(table["ObjectNumber"].astype(int))
    feature_cols = [c for c in FEATURE_NAMES if "ClosestObjectNumber" not in c]
    pd.testing.assert_frame_equal(renumbered[feature_cols], plain[feature_cols], check_names=False)
    # closest-object numbers are ids of the input, not internal numbers
    closest = renumbered["Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent"].astype(int)
    assert set(closest) <= set(ids[1:])
    assert (closest.to_numpy() == ids[plain["Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent"].astype(int)]).all()


def test_empty_label_image_gives_empty_table():
    table = measure_nuclei(np.zeros((50, 60), np.uint8), np.zeros((50, 60), np.int32))
    assert table.shape == (0, 3 + 157)
    assert list(table.columns) == OBJECT_COLUMNS + FEATURE_NAMES
    assert all(dtype == np.float64 for dtype in table.dtypes)


def test_other_channel_name():
    image, labels = _frame(seed=2, n=3)
    table = measure_nuclei(image, labels, channel="H2B")
    assert "Nuclei_Intensity_MeanIntensity_H2B" in table.columns
    assert "Nuclei_Texture_Contrast_H2B_3_00_256" in table.columns
    assert "Nuclei_RadialDistribution_FracAtD_H2B_1of4" in table.columns
    assert not any("_DNA" in column for column in table.columns)
    assert table.shape[1] == 160


@pytest.mark.parametrize(
    "image, labels, message",
    [
        (np.zeros((10, 10), np.uint8), np.zeros((10, 11), np.int32), "shape"),
        (np.full((10, 10), 1.5), np.zeros((10, 10), np.int32), r"\[0, 1\]"),
        (np.zeros((10, 10), np.int32), np.zeros((10, 10), np.int32), "dtype"),
        (np.zeros((10, 10), np.uint8), -np.ones((10, 10), np.int32), "non-negative"),
        (np.zeros((10, 10), np.uint8), np.zeros((10, 10)), "integer"),
        (np.zeros((2, 10, 10), np.uint8), np.zeros((2, 10, 10), np.int32), "2-D"),
    ],
)
def test_bad_input_is_a_clear_error(image, labels, message):
    with pytest.raises(ValueError, match=message):
        measure_nuclei(image, labels)


# ------------------------------------------------------------------------------------------
# geometry and intensity


def test_disk_geometry():
    labels = np.zeros((120, 140), np.int32)
    rr, cc = disk((60, 75), 20)
    labels[rr, cc] = 1
    image = (labels * 120).astype(np.uint8)
    row = measure_nuclei(image, labels).iloc[0]
    assert row["Nuclei_AreaShape_Area"] == len(rr)
    assert row["Nuclei_AreaShape_Area"] == pytest.approx(np.pi * 20**2, rel=0.02)
    assert row["Nuclei_AreaShape_EquivalentDiameter"] == pytest.approx(40, rel=0.01)
    assert row["Nuclei_AreaShape_Eccentricity"] < 0.05
    assert row["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(40, rel=0.03)
    assert row["Nuclei_AreaShape_FormFactor"] == pytest.approx(1, abs=0.1)
    assert row["Nuclei_AreaShape_Solidity"] > 0.97
    assert row["Nuclei_AreaShape_MaximumRadius"] == pytest.approx(20, abs=1)
    assert row["Nuclei_AreaShape_MaxFeretDiameter"] == pytest.approx(40, abs=1.5)
    assert row["Location_Center_X"] == pytest.approx(75) and row["Location_Center_Y"] == pytest.approx(60)
    assert row["Nuclei_AreaShape_Center_X"] == pytest.approx(75)
    assert row["Nuclei_AreaShape_Zernike_0_0"] > 0.9  # a disk fills its enclosing circle
    # a single nucleus has no neighbours: CellProfiler's zeros
    assert row["Nuclei_Neighbors_NumberOfNeighbors_Adjacent"] == 0
    assert row["Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent"] == 0


def test_ellipse_axes_and_orientation():
    labels = np.zeros((120, 160), np.int32)
    rr, cc = ellipse(40, 50, 10, 30)  # major axis along x
    labels[rr, cc] = 1
    rr, cc = ellipse(80, 120, 25, 8)  # major axis along y
    labels[rr, cc] = 2
    table = measure_nuclei((labels > 0).astype(np.uint8) * 200, labels)
    horizontal, vertical = table.iloc[0], table.iloc[1]
    assert horizontal["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(60, rel=0.03)
    assert horizontal["Nuclei_AreaShape_MinorAxisLength"] == pytest.approx(20, rel=0.06)
    assert vertical["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(50, rel=0.03)
    assert vertical["Nuclei_AreaShape_MinorAxisLength"] == pytest.approx(16, rel=0.06)
    # CellProfiler 4 (regionprops) convention: angle of the major axis from the row axis
    assert abs(horizontal["Nuclei_AreaShape_Orientation"]) == pytest.approx(90)
    assert vertical["Nuclei_AreaShape_Orientation"] == pytest.approx(0)
    assert horizontal["Nuclei_AreaShape_Eccentricity"] == pytest.approx(np.sqrt(1 - (10 / 30) ** 2), abs=0.02)


def test_constant_intensity_and_scaling_of_8_and_16_bit_images():
    labels = np.zeros((80, 90), np.int32)
    rr, cc = disk((40, 45), 15)
    labels[rr, cc] = 1
    image = np.where(labels > 0, 100, 10).astype(np.uint8)
    row = measure_nuclei(image, labels).iloc[0]
    value = 100 / 255
    area = row["Nuclei_AreaShape_Area"]
    for name in ("MeanIntensity", "MedianIntensity", "LowerQuartileIntensity", "UpperQuartileIntensity",
                 "MinIntensity", "MaxIntensity", "MeanIntensityEdge", "MinIntensityEdge", "MaxIntensityEdge"):
        assert row[f"Nuclei_Intensity_{name}_DNA"] == pytest.approx(value)
    assert row["Nuclei_Intensity_IntegratedIntensity_DNA"] == pytest.approx(value * area)
    assert row["Nuclei_Intensity_StdIntensity_DNA"] == pytest.approx(0, abs=1e-12)
    assert row["Nuclei_Intensity_MADIntensity_DNA"] == pytest.approx(0, abs=1e-12)
    assert row["Nuclei_Intensity_MassDisplacement_DNA"] == pytest.approx(0, abs=1e-9)
    # uniform stain: the fraction of intensity in each ring equals its fraction of pixels
    fractions = [row[f"Nuclei_RadialDistribution_FracAtD_DNA_{b}of4"] for b in range(1, 5)]
    assert sum(fractions) == pytest.approx(1)
    for b in range(1, 5):
        assert row[f"Nuclei_RadialDistribution_MeanFrac_DNA_{b}of4"] == pytest.approx(1, abs=1e-9)
        assert row[f"Nuclei_RadialDistribution_RadialCV_DNA_{b}of4"] == pytest.approx(0, abs=1e-12)
    # the same image as 16-bit (x257) and as float gives the same features
    as_uint16 = measure_nuclei(image.astype(np.uint16) * 257, labels)
    as_float = measure_nuclei(image / 255.0, labels)
    pd.testing.assert_frame_equal(as_uint16, measure_nuclei(image, labels), rtol=1e-9)
    pd.testing.assert_frame_equal(as_float, measure_nuclei(image, labels), rtol=1e-9)


def test_quartiles_follow_cellprofiler_not_numpy():
    """CellProfiler's quartile of n sorted values sits at n*q (numpy: (n-1)*q): legacy=True."""
    labels = np.zeros((10, 12), np.int32)
    labels[2, 2:10] = 1  # eight pixels
    image = np.zeros((10, 12), np.uint8)
    image[2, 2:10] = np.arange(10, 90, 10)[::-1]  # 80, 70, ..., 10
    row = measure_nuclei(image, labels).iloc[0]
    assert row["Nuclei_Intensity_LowerQuartileIntensity_DNA"] == pytest.approx(30 / 255)  # sorted[2]
    assert row["Nuclei_Intensity_MedianIntensity_DNA"] == pytest.approx(50 / 255)  # sorted[4]
    assert row["Nuclei_Intensity_UpperQuartileIntensity_DNA"] == pytest.approx(70 / 255)  # sorted[6]
    # MAD: |x - 50| sorted = 0,10,10,20,20,30,30,40 -> position 4
    assert row["Nuclei_Intensity_MADIntensity_DNA"] == pytest.approx(20 / 255)
    assert np.median(np.arange(10, 90, 10)) == 45  # numpy would say 45, CellProfiler 50


# ------------------------------------------------------------------------------------------
# neighbours


def test_neighbours_of_a_row_of_touching_squares():
    labels = np.zeros((60, 120), np.int32)
    for ident, column in ((10, 10), (20, 20), (30, 30)):
        labels[20:30, column : column + 10] = ident  # three 10x10 squares side by side
    labels[20:30, 80:90] = 7  # isolated, 50 px right of square 30
    table = measure_nuclei((labels > 0).astype(np.uint8) * 150, labels).set_index("ObjectNumber")
    get = lambda name: table[f"Nuclei_Neighbors_{name}_Adjacent"].to_dict()  # noqa: E731
    assert get("NumberOfNeighbors") == {7: 0, 10: 1, 20: 2, 30: 1}
    assert get("FirstClosestObjectNumber") == {7: 30, 10: 20, 20: 10, 30: 20}  # tie 10/30: lower number
    assert get("SecondClosestObjectNumber") == {7: 20, 10: 30, 20: 30, 30: 10}
    assert get("FirstClosestDistance") == {7: 50, 10: 10, 20: 10, 30: 10}
    assert get("SecondClosestDistance") == {7: 60, 10: 20, 20: 10, 30: 20}
    assert get("AngleBetweenNeighbors") == pytest.approx({7: 0, 10: 0, 20: 180, 30: 0})
    # a 10x10 square has 36 outline pixels; one touching side covers 10 of them
    assert get("PercentTouching") == pytest.approx({7: 0, 10: 1000 / 36, 20: 2000 / 36, 30: 1000 / 36})


def test_corner_contact_touches_but_is_no_neighbour():
    """CellProfiler Adjacent: neighbours share an edge (cross dilation); touching uses 3x3."""
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[15:25, 15:25] = 2  # meets square 1 only at a corner
    table = measure_nuclei((labels > 0).astype(np.uint8) * 99, labels)
    assert table["Nuclei_Neighbors_NumberOfNeighbors_Adjacent"].tolist() == [0, 0]
    assert table["Nuclei_Neighbors_PercentTouching_Adjacent"].tolist() == pytest.approx([100 / 36, 100 / 36])
    assert table["Nuclei_Neighbors_AngleBetweenNeighbors_Adjacent"].tolist() == [0, 0]  # only two objects


def test_neighbours_match_cp_measure_except_its_self_neighbour_bug():
    image, labels = _frame(seed=3, n=30, touching=True)
    ours = measure_nuclei(image, labels)
    theirs = get_multimask_measurements()["neighbors"](labels, labels, distance_method="Adjacent")
    assert ours["Nuclei_Neighbors_NumberOfNeighbors_Adjacent"].sum() > 30  # the layout does touch (36 contacts)
    for name in ("NumberOfNeighbors", "PercentTouching", "FirstClosestDistance", "SecondClosestDistance",
                 "AngleBetweenNeighbors"):
        np.testing.assert_allclose(
            ours[f"Nuclei_Neighbors_{name}_Adjacent"], theirs[f"Neighbors_{name}_Adjacent"], rtol=1e-9, atol=1e-9
        )
    # cp-measure 0.3.0 reports every object as its own closest object, shifting the ranking by one
    numbers = np.arange(1, labels.max() + 1)
    np.testing.assert_array_equal(theirs["Neighbors_FirstClosestObjectNumber_Adjacent"], numbers)
    np.testing.assert_array_equal(
        ours["Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent"], theirs["Neighbors_SecondClosestObjectNumber_Adjacent"]
    )
    assert (ours["Nuclei_Neighbors_FirstClosestObjectNumber_Adjacent"] != numbers).all()


# ------------------------------------------------------------------------------------------
# per-object computation equals cp-measure's whole-image computation


@pytest.mark.parametrize("touching", [False, True])
def test_families_equal_cp_measure_on_the_whole_image(touching):
    image, labels = _frame(seed=4, n=30, touching=touching)
    labels[labels == labels[labels > 0][0]] = 0  # a gap in the ids
    labels[0:8, 100:112] = labels.max() + 1  # an object on the image border
    ours = measure_nuclei(image, labels)
    clean = relabel_sequential(labels)[0]
    pixels = image / 255.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        radial = CP_MEASURE["radial_distribution"](clean, pixels)
        reference = {
            **{f"Nuclei_AreaShape_{k}": v for k, v in CP_MEASURE["sizeshape"](clean, pixels, calculate_advanced=False, new_features=False).items()},
            **{f"Nuclei_{k}_DNA": v for k, v in CP_MEASURE["intensity"](clean, pixels).items()},
            **{f"Nuclei_RadialDistribution_{k.split('_')[1]}_DNA_{k.split('_')[2]}": v for k, v in radial.items()},
        }
    checked = 0
    for name, expected in reference.items():
        if name in ours.columns:
            np.testing.assert_allclose(ours[name], expected, rtol=1e-9, atol=1e-12, err_msg=name)
            checked += 1
    assert checked == 23 + 15 + 12


def test_granularity_equals_cp_measure():
    image, labels = _frame(seed=5, n=12, shape=(150, 170))
    ours = measure_nuclei(image, labels)
    expected = get_granularity(labels, image / 255.0)  # subsample 0.25, 0.25, radius 10, 16 steps
    for g in range(1, 17):
        np.testing.assert_allclose(ours[f"Nuclei_Granularity_{g}_DNA"], expected[f"Granularity_{g}"], rtol=1e-9, atol=1e-9)
    assert ours.filter(like="Granularity").abs().to_numpy().max() > 0.1  # not trivially zero


def test_texture_equals_cp_measure_mahotas_path():
    image, labels = _frame(seed=6, n=10, shape=(120, 140))
    ours = measure_nuclei(image, labels)
    expected = CP_MEASURE["texture"](labels, image / 255.0)
    for name, values in expected.items():
        feature, rest = name.split("_", 1)
        np.testing.assert_allclose(ours[f"Nuclei_Texture_{feature}_DNA_{rest}"], values, rtol=1e-8, atol=1e-10)


def test_grey_reconstruction_equals_skimage():
    rng = np.random.default_rng(7)
    cross = skimage.morphology.disk(1)
    for trial in range(25):
        shape = tuple(rng.integers(1, 70, 2))
        mask = rng.random(shape)
        if trial % 2:
            mask = np.round(mask * 3) / 3  # plateaus and ties
        seed = skimage.morphology.erosion(mask, cross) * rng.uniform(0.3, 1)
        np.testing.assert_array_equal(
            features._reconstruct_by_dilation(seed, mask),
            skimage.morphology.reconstruction(seed, mask, footprint=cross),
        )


# ------------------------------------------------------------------------------------------
# degenerate objects


def test_degenerate_objects_never_crash_and_give_documented_nans():
    labels = np.zeros((100, 120), np.int32)
    image = np.zeros((100, 120), np.uint8)
    rr, cc = ellipse(30, 40, 12, 25)
    labels[rr, cc] = 1
    image[rr, cc] = 120 + (np.arange(len(rr)) % 7) * 10  # a normal, textured nucleus
    labels[5, 5] = 2  # one pixel
    image[5, 5] = 200
    labels[90, 10:12] = 3  # two-pixel line
    image[90, 10:12] = 50
    labels[95, 30:33] = 4  # three-pixel line
    image[95, 30:33] = 60
    rr, cc = disk((70, 90), 8)
    labels[rr, cc] = 5  # zero intensity
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division warnings leak out
        table = measure_nuclei(image, labels).set_index("ObjectNumber")
    assert not np.isinf(table.to_numpy()).any()
    texture = [c for c in FEATURE_NAMES if "_Texture_" in c]
    zernike = [c for c in FEATURE_NAMES if "_Zernike_" in c]
    assert table.loc[1].notna().all()
    assert table.loc[2, zernike].isna().all()  # enclosing circle of radius 0
    assert np.isnan(table.loc[2, "Nuclei_AreaShape_FormFactor"])  # perimeter 0: inf in CellProfiler
    assert table.loc[2, "Nuclei_AreaShape_Area"] == 1
    for thin in (2, 3, 4):
        assert table.loc[thin, texture].isna().all()  # no pixel pairs 3 apart in every direction
        assert table.loc[thin, [c for c in FEATURE_NAMES if "_Intensity_" in c]].notna().all()
        assert table.loc[thin, [c for c in FEATURE_NAMES if "Granularity" in c]].notna().all()
    dark = table.loc[5]
    assert np.isnan(dark["Nuclei_Intensity_MassDisplacement_DNA"])
    assert dark[[c for c in FEATURE_NAMES if "FracAtD" in c or "MeanFrac" in c]].isna().all()
    assert (dark[[c for c in FEATURE_NAMES if "RadialCV" in c]] == 0).all()  # CellProfiler's 0
    assert dark["Nuclei_Intensity_MeanIntensity_DNA"] == 0
    assert dark[[c for c in FEATURE_NAMES if "AreaShape" in c]].notna().all()
    nan_allowed = set(texture) | set(zernike) | {
        "Nuclei_AreaShape_FormFactor", "Nuclei_Intensity_MassDisplacement_DNA"
    } | {c for c in FEATURE_NAMES if "FracAtD" in c or "MeanFrac" in c}
    assert set(table.columns[table.isna().any()]) <= nan_allowed


def test_tiny_image_granularity_is_nan():
    labels = np.zeros((6, 6), np.int32)
    labels[2:4, 2:4] = 1
    table = measure_nuclei((labels * 100).astype(np.uint8), labels)
    assert table.filter(like="Granularity").isna().all(axis=None)
    assert table["Nuclei_AreaShape_Area"].iloc[0] == 4


# ------------------------------------------------------------------------------------------
# real MitoCheck crops


def _otsu_nucleus(image):
    """The Otsu component under the crop centre (the annotated nucleus), else the largest."""
    components = label(image > threshold_otsu(image))
    keep = components[image.shape[0] // 2, image.shape[1] // 2]
    if keep == 0:
        keep = np.bincount(components.ravel())[1:].argmax() + 1
    return (components == keep).astype(np.int32)


def test_real_crops_end_to_end(crops_dir):
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    chosen = manifest[manifest["phenotype"].isin(["Interphase", "Large", "Elongated", "Prometaphase"])]
    chosen = chosen.groupby("phenotype").head(3)
    assert len(chosen) == 12
    for row in chosen.itertuples():
        image = iio.imread(crops_dir / row.phenotype / row.file)
        labels = _otsu_nucleus(image)
        table = measure_nuclei(image, labels)
        assert len(table) == 1
        values = table.iloc[0]
        assert values[FEATURE_NAMES].notna().all(), (row.file, values[values.isna()].index.tolist())
        assert 30 < values["Nuclei_AreaShape_Area"] < 64 * 64
        assert values["Nuclei_Intensity_MeanIntensity_DNA"] > threshold_otsu(image) / 255
        assert 0 < values["Nuclei_AreaShape_Solidity"] <= 1
        fractions = values[[f"Nuclei_RadialDistribution_FracAtD_DNA_{b}of4" for b in range(1, 5)]]
        assert fractions.sum() == pytest.approx(1)
