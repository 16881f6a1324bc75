"""Model families, image-grouped selection and calibration (morphotype.estimators, selection,
calibration) on tiny synthetic data with known structure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.utils._param_validation import InvalidParameterError

from morphotype import models
from morphotype.calibration import apply_temperature, expected_calibration_error, fit_temperature
from morphotype.estimators import (
    ElasticNetLogistic,
    FamilyModel,
    load_any_model,
    load_family_model,
    make_estimator,
)
from morphotype.selection import grouped_folds, train_families, write_families

CLASSES = ["Alpha", "Beta", "Gamma"]
FAST_GRIDS = {"logistic": [{"C": 0.1, "l1_ratio": 0.0, "tol": 1e-4}, {"C": 1.0, "l1_ratio": 0.0, "tol": 1e-4}],
              "hgb": [{"max_iter": 25, "learning_rate": 0.3, "max_leaf_nodes": 7, "min_samples_leaf": 5}]}


def synthetic_table(seed: int = 0, n_images: int = 18, cells_per_image: int = 12) -> pd.DataFrame:
    """Three phenotypes: Alpha and Beta differ linearly (feature 0), Gamma is an XOR of features
    1 and 2 (a shape no linear model draws); each image adds its own offset (a batch effect)."""
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(n_images):
        offset = rng.normal(0, 0.3, 6)
        for cell in range(cells_per_image):
            label = CLASSES[(image + cell) % 3]
            x = rng.normal(0, 1, 6) + offset
            x[0] += {"Alpha": -2.0, "Beta": 2.0, "Gamma": 0.0}[label]
            sign = rng.choice([-1, 1])
            if label == "Gamma":
                x[1], x[2] = sign * (2 + abs(x[1])), sign * (2 + abs(x[2]))  # same-sign corners
            else:
                x[1], x[2] = sign * (2 + abs(x[1])), -sign * (2 + abs(x[2]))  # opposite corners
            rows.append({"Metadata_CellID": f"i{image}c{cell}", "Metadata_ImageID": f"image{image}",
                         "Metadata_Phenotype": label, **{f"Nuclei_AreaShape_F{j}": v for j, v in enumerate(x)}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data():
    return models.prepare_data(synthetic_table(), "CP")


@pytest.fixture(scope="module")
def split(data):
    return models.split_cells(data.metadata, method="image", test_size=0.25, random_state=1)


@pytest.fixture(scope="module")
def trained(data, split):
    return train_families(data, split, grids=FAST_GRIDS, cv_folds=3, loio_folds=3, n_jobs=1)


def test_logistic_estimator_is_the_study_solver_with_declarative_checks(data):
    y = data.labels
    Z = (data.X - data.X.mean(0)) / data.X.std(0)
    estimator = ElasticNetLogistic(C=0.5, l1_ratio=0.3).fit(Z, y)
    codes = np.searchsorted(estimator.classes_, y)
    solved = models.fit_logistic(Z, codes, n_classes=3, C=0.5, l1_ratio=0.3,
                                 sample_weight=models.balanced_sample_weight(codes))
    np.testing.assert_allclose(estimator.coef_, solved.coef)
    assert estimator.predict_proba(Z).shape == (len(y), 3)
    with pytest.raises(InvalidParameterError, match="C"):
        ElasticNetLogistic(C=-1.0).fit(Z, y)
    with pytest.raises(InvalidParameterError, match="l1_ratio"):
        ElasticNetLogistic(l1_ratio=2.0).fit(Z, y)


@pytest.mark.parametrize("family", ["logistic", "hgb"])
def test_each_family_learns_the_planted_structure(family, data, split):
    train, test = split == "train", split == "test"
    Z = (data.X - data.X[train].mean(0)) / data.X[train].std(0)
    params = {"logistic": {"C": 1.0}, "hgb": FAST_GRIDS["hgb"][0]}[family]
    estimator = make_estimator(family, params).fit(Z[train], data.labels[train])
    accuracy = (estimator.predict(Z[test]) == data.labels[test]).mean()
    gamma = data.labels[test] == "Gamma"
    gamma_recall = (estimator.predict(Z[test])[gamma] == "Gamma").mean()
    if family == "hgb":  # trees draw the XOR corners
        assert accuracy > 0.85 and gamma_recall >= 0.8
    else:  # the linear model separates Alpha from Beta but cannot draw the XOR: Gamma is its weak class
        assert accuracy > 0.5 and gamma_recall < 0.8


def test_grouped_folds_never_split_an_image(data):
    images = data.metadata["Metadata_ImageID"].to_numpy()
    folds = grouped_folds(data.labels, images, 4, random_state=0)
    seen = np.zeros(len(images), int)
    for train, validate in folds:
        assert not set(images[train]) & set(images[validate])
        seen[validate] += 1
    assert (seen == 1).all()


def test_families_recommended_by_grouped_cv_and_ensemble_averages(trained):
    candidates, recommended = trained
    assert set(candidates) == {"CP__balanced__logistic__final", "CP__balanced__hgb__final",
                               "CP__balanced__ensemble__final", recommended["shuffled_model_id"]}
    scores = recommended["grouped_cv_f1"]
    assert recommended["model_id"] == max(scores, key=scores.get)
    assert recommended["model_id"] != "CP__balanced__logistic__final"  # XOR: trees (or their ensemble) win
    hgb = candidates["CP__balanced__hgb__final"]
    assert hgb.scores["test_f1"] > 0.85 and hgb.scores["lio_pass_fraction"] > 0.8
    shuffled = candidates[recommended["shuffled_model_id"]]
    assert shuffled.scores["test_f1"] < 0.6  # chance is ~1/3
    for candidate in candidates.values():
        assert 0 <= candidate.scores["test_ece"] <= 1


def test_calibrator_never_sees_the_test_split(data, split, trained):
    """Scrambling the test cells' features and labels changes no temperature, no chosen
    hyper-parameter and not the recommendation."""
    candidates, recommended = trained
    test = split == "test"
    rng = np.random.default_rng(5)
    scrambled = models.LabelledData(data.feature_space, data.features, data.X.copy(), data.metadata.copy(),
                                    {}, [])
    scrambled.X[test] = rng.normal(0, 10, scrambled.X[test].shape)
    scrambled.metadata.loc[test, "Metadata_Phenotype"] = rng.permutation(
        scrambled.metadata.loc[test, "Metadata_Phenotype"].to_numpy())
    again, recommended_again = train_families(scrambled, split, grids=FAST_GRIDS, cv_folds=3, loio_folds=3,
                                              n_jobs=1)
    assert recommended_again["model_id"] == recommended["model_id"]
    for model_id, candidate in candidates.items():
        assert again[model_id].model.temperature == pytest.approx(candidate.model.temperature, rel=1e-9)
        assert again[model_id].model.params == candidate.model.params


def test_every_family_predicts_identically_after_reload(trained, data, tmp_path):
    candidates, recommended = trained
    write_families(candidates, recommended, tmp_path / "models", tmp_path / "evaluation")
    for model_id, candidate in candidates.items():
        loaded = load_family_model(tmp_path / "models" / model_id)
        assert isinstance(loaded, FamilyModel) and loaded.classes == candidate.model.classes
        np.testing.assert_array_equal(loaded.probabilities(data.X), candidate.model.probabilities(data.X))
        card = json.loads((tmp_path / "models" / model_id / "model_card.json").read_text())
        assert card["family"] == candidate.model.family and card["features"] == data.features
    # a models folder loads as its recommended model; table and figure are written
    assert load_any_model(tmp_path / "models").model_id == recommended["model_id"]
    table = pd.read_csv(tmp_path / "evaluation" / "model_families.csv")
    assert table["recommended"].sum() == 1 and (tmp_path / "evaluation" / "model_families.png").stat().st_size > 0
    predictions = models.predict_table(load_any_model(tmp_path / "models"), synthetic_table())
    assert predictions["predicted_phenotype"].notna().all()


def test_old_logistic_model_folders_still_load_as_the_study_model(data, tmp_path):
    model = models.train_model(data, np.ones(len(data.X), bool), hyperparameters=(0.1, 0.0), progress=False,
                               n_jobs=1)
    folder = models.save_model(model, tmp_path / model.model_id)
    loaded = load_any_model(folder)
    assert isinstance(loaded, models.PhenotypeModel)
    np.testing.assert_array_equal(loaded.probabilities(data.X), model.probabilities(data.X))


def test_temperature_scaling_repairs_overconfidence():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    logits = rng.normal(0, 1.5, (n, k))
    truth = np.array([rng.choice(k, p=p) for p in np.exp(logits) / np.exp(logits).sum(1, keepdims=True)])
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    overconfident = apply_temperature(calibrated, 0.4)  # logits x 2.5
    assert expected_calibration_error(calibrated, truth) < 0.03
    assert expected_calibration_error(overconfident, truth) > 0.1
    temperature = fit_temperature(overconfident, truth)
    assert temperature == pytest.approx(2.5, rel=0.15)
    assert expected_calibration_error(apply_temperature(overconfident, temperature), truth) < 0.03
    np.testing.assert_array_equal(apply_temperature(overconfident, temperature).argmax(1), overconfident.argmax(1))


def test_staged_tree_tuning_equals_separate_fits(data):
    """Grid points that differ only in boosting rounds share one fit per fold: same OOF as fitting each."""
    from morphotype.selection import _grid_oof, out_of_fold

    Z = (data.X - data.X.mean(0)) / data.X.std(0)
    folds = grouped_folds(data.labels, data.metadata["Metadata_ImageID"].to_numpy(), 3, 0)
    classes = sorted(set(data.labels))
    grid = [{"max_iter": n, "max_leaf_nodes": 7} for n in (5, 10)]
    for params, staged in zip(grid, _grid_oof("hgb", grid, Z, data.labels, folds, classes, 0, 1)):
        np.testing.assert_allclose(staged, out_of_fold("hgb", params, Z, data.labels, folds, classes, n_jobs=1))
